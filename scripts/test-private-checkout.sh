#!/usr/bin/env bash
# make test: the tests pass wherever the checkout is, also under a folder only its owner can
# enter (/root is 0700 on Debian, as is every mktemp -d folder). There, a process started as
# another user cannot reach any file of the checkout (issue 18: Squid, dropped to `proxy`,
# could not read its hosts file nor write its logs under target/bench/, and the benchmark
# smoke failed).
#
# This copies the work tree (tracked and new files, as they are now, with their timestamps, so
# that cargo reuses the build in the shared CARGO_TARGET_DIR) into a fresh 0700 folder, runs
# the benchmark smoke from there, and fails if it fails, if Squid or tinyproxy (the peers that
# drop privileges) did not carry tunnels and log them, or if a peer's runtime folder is left
# behind. Then, from the same copy, the e2e's first steps (PostgreSQL archives, backs up and
# restores through egress-proxy with barman-cloud as `postgres`); the full e2e runs once,
# later in `make test`, from the real checkout.
#
# How the e2e stays safe under a closed folder: everything the postgres user is given lives
# outside the checkout (the run folder in /tmp, the venv in tests/e2e/cache.sh's folder,
# Debian's PostgreSQL), its processes start in the run folder, and run.sh checks as that user
# that it can run initdb and barman-cloud before any step.
#
# Root only: without root no process changes user, so there is nothing to show.
#   PRIVATE_E2E=0   skip the e2e part (the benchmark smoke alone)
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "private-checkout: $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  echo "SKIP: private-checkout: only root starts processes as other users"
  exit 0
fi
CARGO_TARGET_DIR=$(realpath -m "${CARGO_TARGET_DIR:-target}")
export CARGO_TARGET_DIR

git rev-parse --is-inside-work-tree >/dev/null 2>&1 || { say "needs a git work tree (it copies the files git knows)"; exit 1; }

top=$(mktemp -d /tmp/egress-private.XXXXXX)
trap 'rm -rf "$top"' EXIT
chmod 700 "$top"
[[ $(stat -c %a "$top") == 700 ]] || { say "could not make $top 0700"; exit 1; }
co=$top/egress-gate
mkdir "$co"
# tar keeps timestamps; --ignore-failed-read passes over files deleted in the work tree.
git ls-files -z --cached --others --exclude-standard |
  tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$co"
say "work tree copied to $co (under a 0700 folder)"

# The copy has no ../shared beside it: the benchmark's identity scenario takes the
# kube-apiserver binary from beside this checkout.
if [[ -z ${KUBE_APISERVER:-} && -e ../shared/bin/kube-apiserver.xz ]]; then
  KUBE_APISERVER=$(realpath ../shared/bin/kube-apiserver.xz)
  export KUBE_APISERVER
fi
bench_dirs() { find /tmp -maxdepth 1 -name 'egress-bench-*' | sort; } # see peer_rundir
before=$(bench_dirs)
t0=$SECONDS
if ! (cd "$co" && BENCH_QUICK=1 bash scripts/bench-proxy.sh); then
  for f in "$co"/target/bench/*.stderr "$co"/target/bench/*/cache.log; do
    [[ -s $f ]] && { echo "----- ${f#"$co"/} (last 20 lines)" >&2; tail -n 20 "$f" >&2; }
  done
  say "FAIL: the benchmark smoke failed from $co"
  exit 1
fi
say "benchmark smoke passed from the private checkout in $((SECONDS - t0))s"

bench=$co/target/bench
for peer in squid tinyproxy; do
  [[ -s $bench/runs/$peer-1.json ]] || { say "FAIL: $peer has no results (reported missing?): nothing shown for it"; exit 1; }
done
# Each peer wrote its own log as its own user: a line per tunnel it carried.
grep -q 'TCP_TUNNEL/200' "$bench/squid/access.log" || { say "FAIL: squid's access log has no tunnel"; exit 1; }
grep -q 'CONNECT' "$bench/tinyproxy/tinyproxy.log" || { say "FAIL: tinyproxy's log has no CONNECT"; exit 1; }
say "squid ($(grep -c 'TCP_TUNNEL/200' "$bench/squid/access.log") tunnels) and tinyproxy ($(grep -c 'CONNECT' "$bench/tinyproxy/tinyproxy.log") CONNECT lines) logged as their own users"
left=$(comm -13 <(echo "$before") <(bench_dirs))
[[ -z $left ]] || { say "FAIL: runtime folders left behind: $left"; exit 1; }

if [[ ${PRIVATE_E2E:-1} == 1 ]]; then
  t0=$SECONDS
  bash "$co/tests/e2e/install.sh"
  cargo build -q --manifest-path "$co/Cargo.toml" -p egress-proxy -p egress-webhook --bins
  (cd "$co" && E2E_STEPS="1 2" E2E_BIN=$CARGO_TARGET_DIR/debug bash tests/e2e/run.sh) | tee "$top/e2e.out" ||
    { say "FAIL: the e2e's first steps failed from $co"; exit 1; }
  if grep -q '^SKIP' "$top/e2e.out"; then
    say "e2e part skipped (see SKIP above)"
  else
    say "e2e steps 1-3 passed from the private checkout in $((SECONDS - t0))s"
  fi
fi
say "passed"
