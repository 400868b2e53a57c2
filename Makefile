# egress-gate's front door. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
CARGO ?= cargo
WEBHOOK := target/debug/egress-webhook

.PHONY: all build demo test test-deps lint fmt bench bench-proxy bench-webhook bench-blob private-checkout fuzz fuzz-webhook fuzz-proxy fuzz-blob fuzz-blob-head fuzz-blob-sas e2e manifests golden clean

all: build

build:
	$(CARGO) build --workspace --bins

## demo: show what the webhook does to the bundled example pods, with the built-in defaults.
demo:
	bash scripts/demo.sh

## test: install what the tests need, then run every test.
## Incremental caches are off here: they add about a gigabyte that a one-off run never reuses.
test: export CARGO_INCREMENTAL = 0
## The real-API-server tests (tests/apiserver) fail here instead of skipping when no
## kube-apiserver binary is found: `make test` is what CI runs.
test: export REQUIRE_KUBE_APISERVER = 1
test: export REQUIRE_PROMTOOL = 1
## The blob gateway's Azurite tests fail instead of skipping without Azurite (test-deps installs it).
test: export REQUIRE_AZURITE = 1
test: test-deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace --all-targets --no-fail-fast # every failing binary reported, not only the first
	BENCH_QUICK=1 $(MAKE) bench # the benchmark harness's smoke: fails if it breaks, never on speed
	bash scripts/test-private-checkout.sh # make private-checkout
	bash scripts/test-manifests.sh
	bash scripts/demo.sh >/dev/null
	bash scripts/e2e.sh

## test-deps: the system packages the tests use (idempotent; skips what is present).
test-deps:
	bash scripts/test-deps.sh

## fuzz: every fuzzer, one after the other (FUZZ_SECONDS each, default 600). Needs cargo-fuzz;
## RUSTC_BOOTSTRAP=1 lets the stable toolchain take the sanitizer flags.
fuzz: fuzz-webhook fuzz-proxy fuzz-blob fuzz-blob-head fuzz-blob-sas

## fuzz-webhook: the admission review handler on arbitrary bodies.
fuzz-webhook:
	cd webhook && RUSTC_BOOTSTRAP=1 cargo fuzz run admission_review -- -max_total_time=$${FUZZ_SECONDS:-600}

## fuzz-proxy: the CONNECT head parser and the policy on arbitrary bytes.
fuzz-proxy:
	cd proxy && RUSTC_BOOTSTRAP=1 cargo fuzz run connect_head -- -max_total_time=$${FUZZ_SECONDS:-600}

## fuzz-blob: the blob gateway's Blob Batch parser, verifier and re-signer on arbitrary bodies.
fuzz-blob:
	cd proxy && RUSTC_BOOTSTRAP=1 cargo fuzz run blob_batch -- -max_total_time=$${FUZZ_SECONDS:-600}

## fuzz-blob-head: the blob gateway's serving path on arbitrary request heads (verify,
## classify, authorize, rewrite and re-sign).
fuzz-blob-head:
	cd proxy && RUSTC_BOOTSTRAP=1 cargo fuzz run blob_head -- -max_total_time=$${FUZZ_SECONDS:-600}

## fuzz-blob-sas: the blob gateway's service SAS parser and checks on arbitrary request targets.
fuzz-blob-sas:
	cd proxy && RUSTC_BOOTSTRAP=1 cargo fuzz run blob_sas -- -max_total_time=$${FUZZ_SECONDS:-600}

## e2e: PostgreSQL backs up to Azurite through egress-proxy in network namespaces (root).
e2e:
	bash scripts/e2e.sh

## manifests: render every kustomization under deploy/.
manifests:
	@for d in $$(find deploy -name kustomization.yaml -printf '%h\n' | sort); do echo "# $$d"; kubectl kustomize $$d; done

## golden: rewrite the webhook's expected patches after an intended change; review the diff.
golden:
	UPDATE_GOLDEN=1 $(CARGO) test -p egress-webhook --test golden

## bench: every benchmark; JSON, Markdown tables and PNG curves land in target/bench/.
## BENCH_QUICK=1: the CI-sized smoke (about a minute after the build).
bench: bench-proxy bench-webhook bench-blob

## bench-proxy: egress-proxy beside direct, Envoy, Squid and tinyproxy, with scale curves.
bench-proxy:
	bash scripts/bench-proxy.sh

## bench-blob: the blob gateway beside Envoy as a TLS-originating reverse proxy: upload and
## download Gbit/s, CPU per GiB, small GET latency, against a local TLS storage upstream.
bench-blob:
	bash scripts/bench-blob.sh

## private-checkout: the benchmark smoke and the e2e's first steps from a copy of the work
## tree inside a 0700 folder, where peers that run as other users cannot enter the checkout.
private-checkout:
	bash scripts/test-private-checkout.sh

## bench-webhook: admission reviews/s and latency over TLS, beside a fixed-response baseline,
## and with the pod drift watch (--watch-pods) on against a kube-apiserver holding 50,000 pods.
bench-webhook:
	$(CARGO) bench -p egress-webhook --bench admission
	$(CARGO) run --release -q -p egress-bench -- plot --in target/bench/webhook.json

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
