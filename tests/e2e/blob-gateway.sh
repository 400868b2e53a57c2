#!/usr/bin/env bash
# The blob gateway against a real Azurite over HTTPS, driven by the Azure SDK for Python
# (tests/e2e/blob_gateway.py). Azurite holds the REAL key of `realacct`; the client holds
# only gateway-only keys, so Azurite accepting a request proves the gateway's re-signing.
# Every refused request must leave no trace in Azurite's debug log. Loopback only; uses the
# e2e's installed Azurite and venv (tests/e2e/install.sh). Needs E2E_BIN (the debug build).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/cache.sh" # $venv, $azurite_dir
azurite=$azurite_dir/node_modules/.bin/azurite-blob
proxy=${E2E_BIN:?set E2E_BIN to the folder holding egress-proxy}/egress-proxy
for need in "$azurite" "$venv/bin/python" "$proxy"; do
  [[ -x $need ]] || { echo "blob-gateway: missing $need (run tests/e2e/install.sh)" >&2; exit 1; }
done

run=$(mktemp -d /tmp/egress-gate-blob-e2e.XXXXXX)
pids=()
cleanup() {
  local rc=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if ((rc != 0)); then
    echo "blob-gateway: FAILED; logs:" >&2
    tail -n 30 "$run/proxy.log" "$run/azurite.log" >&2 2>/dev/null || true
  fi
  rm -rf "$run"
}
trap cleanup EXIT
cd "$run"

free_port() { "$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
az_port=$(free_port)
gw_port=$(free_port)
gw_plain_port=$(free_port)
admin_port=$(free_port)

# One test CA; a certificate for 127.0.0.1 (Azurite) and localhost (the gateway).
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=blob gateway test CA" \
  -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout tls.key -out tls.csr 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >san.ext
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 \
  -extfile san.ext -out tls.crt 2>/dev/null

key() { head -c 64 /dev/urandom | base64 -w0; }
real_key=$(key)
ro_key=$(key)
printf '%s\n' "$real_key" >real.key
printf '%s\n' "$ro_key" >ro.key

AZURITE_ACCOUNTS="realacct:$real_key" "$azurite" --blobHost 127.0.0.1 --blobPort "$az_port" \
  --cert tls.crt --key tls.key --inMemoryPersistence --disableProductStyleUrl \
  --loose --skipApiVersionCheck --disableTelemetry --debug azurite-debug.log >azurite.log 2>&1 &
pids+=($!)

cat >proxy.yaml <<YAML
listen: 127.0.0.1:0
adminListen: 127.0.0.1:$admin_port
allow:
  - cidrs: [127.0.0.1/32]
    ports: [$az_port]
blob:
  listen: 127.0.0.1:$gw_plain_port
  tls: {listen: 127.0.0.1:$gw_port, certFile: $run/tls.crt, keyFile: $run/tls.key}
  accounts:
    - name: pg-prod
      clientKeyFile: $run/client.key
      containers: [pgbackups]
      permissions: [read, list, write, delete]
      upstream: &up
        endpoint: https://127.0.0.1:$az_port/realacct
        account: realacct
        sharedKeyFile: $run/real.key
        caFile: $run/ca.crt
    - name: pg-ro
      clientKeyFile: $run/ro.key
      containers: [pgbackups]
      permissions: [read, list]
      upstream: *up
YAML
# pg-prod's key and connection string come from `egress-proxy blob client-config`, as a
# user gets them; the SDK's positive calls use that connection string unchanged.
"$proxy" blob client-config --account pg-prod --config proxy.yaml \
  --endpoint "https://localhost:$gw_port" >client-config.yaml 2>client-config.err
conn=$(sed -n 's/^  AZURE_STORAGE_CONNECTION_STRING: "\(.*\)"$/\1/p' client-config.yaml)
client_key=$(sed -n 's/.*;AccountKey=\([^;]*\);.*/\1/p' <<<"$conn")
[[ -n $client_key ]] || { echo "blob-gateway: no connection string from client-config" >&2; exit 1; }
printf '%s\n' "$client_key" >client.key
export CLIENT_CONNECTION_STRING=$conn
"$proxy" --config proxy.yaml >proxy.log 2>&1 &
pids+=($!)

for _ in $(seq 100); do
  grep -q "successfully listens" azurite.log && grep -q "blob gateway listening" proxy.log && break
  sleep 0.2
done
grep -q "successfully listens" azurite.log || { echo "blob-gateway: Azurite did not start" >&2; exit 1; }

gw_args=("https://localhost:$gw_port" "$client_key" "$real_key" "$ro_key" "$run/ca.crt")
"$venv/bin/python" "$here/blob_gateway.py" "${gw_args[@]}"
# Service SAS signed with the client key (Velero's download URLs), on both listeners.
"$venv/bin/python" "$here/blob_sas.py" "https://localhost:$gw_port" "http://127.0.0.1:$gw_plain_port" \
  "$client_key" "$real_key" "$run/ca.crt"

# Memory stays flat however large the upload: one Put Blob of BIG_MIB MiB (one request,
# one body, as barman sends WAL segments) while the proxy's RSS is sampled every 50 ms.
big_mib=${BIG_MIB:-256}
proxy_pid=${pids[1]}
rss() { awk '/^VmRSS/ { print $2 }' "/proc/$proxy_pid/status"; }
rss_before=$(rss)
(while :; do rss >>rss.samples; sleep 0.05; done) &
sampler=$!
pids+=("$sampler")
"$venv/bin/python" "$here/blob_gateway.py" "${gw_args[@]}" big "$big_mib"
kill "$sampler"
rss_max=$(sort -n rss.samples | tail -n1)
growth_kib=$((rss_max - rss_before))
echo "blob-gateway: ${big_mib} MiB Put Blob: proxy RSS ${rss_before} KiB before, ${rss_max} KiB at most ($(wc -l <rss.samples) samples), growth ${growth_kib} KiB"
((growth_kib < 16 * 1024)) || { echo "blob-gateway: RSS grew ${growth_kib} KiB (limit 16 MiB)" >&2; exit 1; }

# Nothing of any refused request reached Azurite: no marker in its debug log.
grep -q "pgbackups" azurite-debug.log || { echo "blob-gateway: Azurite's debug log shows no traffic at all" >&2; exit 1; }
for marker in neg-sas- neg-wrongkey neg-realkey neg-unknown negother neg-copy neg-stale neg-anon neg-bearer comp=acl x-ms-copy-source nobody pg-ro 'keep/me?'; do
  if grep -qF -- "$marker" azurite-debug.log; then
    echo "blob-gateway: a refused request reached Azurite ($marker)" >&2
    exit 1
  fi
done
# Accepted SAS requests went upstream without their SAS: the gateway re-signs them.
if grep -qE '[?&]sig=' azurite-debug.log; then
  echo "blob-gateway: a client's SAS reached Azurite" >&2
  exit 1
fi
# The refused delete of keep/me by pg-ro: Azurite saw no DELETE of it.
if grep -E "DELETE .*keep/me|keep%2Fme.*DELETE" azurite-debug.log >/dev/null; then
  echo "blob-gateway: the refused delete reached Azurite" >&2
  exit 1
fi
# Never a key or a signature in the access log.
for secret in "$real_key" "$client_key" "$ro_key" "SharedKey"; do
  if grep -qF -- "$secret" proxy.log; then
    echo "blob-gateway: the access log holds a key or signature" >&2
    exit 1
  fi
done
echo "blob-gateway: access log lines: $(grep -c 'blob request' proxy.log)"
echo "blob-gateway: OK"
