#!/usr/bin/env bash
# Installs the system packages the tests use. Idempotent: only missing commands are installed.
set -euo pipefail

# command -> Debian package that provides it
declare -A wanted=(
  [curl]=curl
  [python3]=python3 # proxy tests: http.client sends the HTTP/1.0 CONNECT barman-cloud sends
  [etcd]=etcd-server # the real kube-apiserver the tests start (tests/apiserver) stores in etcd
  [xz]=xz-utils      # the kube-apiserver binary beside the project is xz-compressed
  [promtool]=prometheus # deploy/monitoring: promtool check/test rules (tests/manifests)
)

missing=()
for cmd in "${!wanted[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${wanted[$cmd]}")
done

if ((${#missing[@]})); then
  echo "test-deps: installing ${missing[*]}" >&2
  if [[ $(id -u) -ne 0 ]]; then
    echo "test-deps: need root to install ${missing[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Azurite (and the rest of the e2e's pinned tools, cached outside the checkout): the blob
# gateway's keyless tests (proxy/tests/blob_keyless.rs) start it in OAuth mode. The e2e at
# the end of `make test` needs the same install, so this only moves it earlier.
if [[ $(id -u) -eq 0 ]]; then
  bash "$(dirname "$0")/../tests/e2e/install.sh"
fi

# A full `make test` writes about GB_NEEDED GiB of build output under target/ (the debug
# tests, the release benchmarks) and the e2e's packages take up to one more; say so up front
# rather than let the linker die half-way (seen in CI: ld killed by SIGBUS on a full disk).
GB_NEEDED=3
free_kb=$(df -Pk . | awk 'NR == 2 { print $4 }')
if [[ $free_kb =~ ^[0-9]+$ ]] && ((free_kb < GB_NEEDED * 1024 * 1024)); then
  echo "test-deps: warning: only $((free_kb / 1024)) MiB free on $(df -P . | awk 'NR == 2 { print $6 }'); make test writes about ${GB_NEEDED} GiB under target/, plus packages" >&2
fi
