# egress-gate's front door. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
CARGO ?= cargo
WEBHOOK := target/debug/egress-webhook

.PHONY: all build demo test test-deps lint fmt bench bench-proxy bench-webhook golden clean

all: build

build:
	$(CARGO) build --workspace --bins

## demo: show what the webhook does to the bundled example pods, with the built-in defaults.
demo:
	bash scripts/demo.sh

## test: install what the tests need, then run every test.
test: test-deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace --all-targets
	bash scripts/demo.sh >/dev/null

## test-deps: the system packages the tests use (idempotent; skips what is present).
test-deps:
	bash scripts/test-deps.sh

## golden: rewrite the webhook's expected patches after an intended change; review the diff.
golden:
	UPDATE_GOLDEN=1 $(CARGO) test -p egress-webhook --test golden

bench: bench-proxy bench-webhook

bench-proxy:
	bash scripts/bench-proxy.sh

bench-webhook:
	@echo "bench-webhook: not built yet (the webhook server lands in a later change)" >&2; exit 1

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
