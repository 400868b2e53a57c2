#!/usr/bin/env bash
# make e2e: PostgreSQL backs up to Azure (Azurite) through egress-gate, in network
# namespaces (tests/e2e/run.sh; docs/e2e.md). Installs what it needs (cached), builds the
# binaries, runs the test. Prints "SKIP: ..." and exits 0 where network namespaces cannot
# exist (not root).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "SKIP: e2e: needs root to create network namespaces (ip netns)"
  exit 0
fi
t0=$SECONDS
bash tests/e2e/install.sh
echo "e2e: install checked in $((SECONDS - t0))s" >&2
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build -q -p egress-proxy -p egress-webhook --bins
export E2E_BIN=${E2E_BIN:-$(realpath -m "$CARGO_TARGET_DIR/debug")}
bash tests/e2e/run.sh # step 9 is the blob gateway (tests/e2e/blob-gateway.sh)
# barman-cloud backup and restore through the gateway with no storage key (workload
# identity against Azurite in OAuth mode).
exec bash tests/e2e/blob-keyless.sh
