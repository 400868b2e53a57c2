#!/usr/bin/env bash
# barman-cloud backup and restore through the blob gateway with NO storage key anywhere in
# egress-gate: the gateway's upstream is `workloadIdentity: {}`, its settings from the
# variables AKS would inject, its tokens from a token endpoint written for this test
# (blob_keyless_token.py: it checks the client assertion is the token file's current
# content and issues short-lived unsigned JWTs). Azurite runs in OAuth mode over HTTPS and
# checks each token's issuer, audience and lifetime; the workload holds only its
# gateway-only client key. Loopback only; uses the e2e's installed Azurite, venv and
# PostgreSQL (tests/e2e/install.sh). Needs root (PostgreSQL runs as `postgres`) and E2E_BIN.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/e2e/cache.sh
source "$here/cache.sh" # $venv, $azurite_dir
azurite=$azurite_dir/node_modules/.bin/azurite-blob
proxy=${E2E_BIN:?set E2E_BIN to the folder holding egress-proxy}/egress-proxy
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
for need in "$azurite" "$venv/bin/python" "$venv/bin/barman-cloud-backup" "$proxy" "$pgbin/initdb"; do
  [[ -x $need ]] || { echo "blob-keyless: missing $need (run tests/e2e/install.sh)" >&2; exit 1; }
done
say() { echo "blob-keyless: $*"; }

# Readable by `postgres` (it runs barman-cloud with the CA bundle and the sockets here).
run=$(mktemp -d /tmp/egress-gate-blob-keyless.XXXXXX)
chmod 755 "$run"
pids=()
cleanup() {
  local rc=$?
  for d in "$run/pg" "$run/restored"; do
    if [[ -d $d ]]; then runuser -u postgres -- "$pgbin/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1 || true; fi
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if ((rc != 0)); then
    echo "blob-keyless: FAILED; logs:" >&2
    tail -n 30 "$run"/proxy.log "$run"/token.log "$run"/barman-*.log "$run"/pglog/*.log >&2 2>/dev/null || true
  fi
  rm -rf "$run"
}
trap cleanup EXIT
cd "$run"

free_port() { "$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
az_port=$(free_port)
gw_port=$(free_port)
token_port=$(free_port)
admin_port=$(free_port)
pg_port=$(free_port)

openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=blob keyless test CA" \
  -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout tls.key -out tls.csr 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >san.ext
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 \
  -extfile san.ext -out tls.crt 2>/dev/null
chmod 644 ca.crt tls.crt

real_key=$(head -c 64 /dev/urandom | base64 -w0) # Azurite's only; the gateway never sees it
AZURITE_ACCOUNTS="realacct:$real_key" "$azurite" --blobHost 127.0.0.1 --blobPort "$az_port" \
  --oauth basic --cert tls.crt --key tls.key --inMemoryPersistence --disableProductStyleUrl \
  --loose --skipApiVersionCheck --disableTelemetry >azurite.log 2>&1 &
pids+=($!)

# What the AKS webhook would inject into the proxy pod.
tenant=72f988bf-86f1-41af-91ab-2d7cd011db47
client=0e8a1ef2-b6a4-4c5e-9b5f-4a4f0b0e0c11
printf 'eyJhbGciOiJSUzI1NiJ9.projected-sa-token-1.sig\n' >sa-token
"$venv/bin/python" "$here/blob_keyless_token.py" "$token_port" tls.crt tls.key "$run/sa-token" \
  "$tenant" "$client" 30 >token.log 2>&1 &
pids+=($!)

cat >proxy.yaml <<YAML
listen: 127.0.0.1:0
adminListen: 127.0.0.1:$admin_port
allow:
  - cidrs: [127.0.0.1/32]
    ports: [$az_port]
blob:
  tls: {listen: 127.0.0.1:$gw_port, certFile: $run/tls.crt, keyFile: $run/tls.key}
  accounts:
    - name: pg-prod
      clientKeyFile: $run/client.key
      containers: [pgbackups]
      permissions: [read, list, write, delete]
      upstream:
        endpoint: https://127.0.0.1:$az_port/realacct
        account: realacct
        caFile: $run/ca.crt
        workloadIdentity: {}
YAML
"$proxy" blob client-config --account pg-prod --config proxy.yaml \
  --endpoint "https://localhost:$gw_port" >client-config.yaml 2>client-config.err
conn=$(sed -n 's/^  AZURE_STORAGE_CONNECTION_STRING: "\(.*\)"$/\1/p' client-config.yaml)
client_key=$(sed -n 's/.*;AccountKey=\([^;]*\);.*/\1/p' <<<"$conn")
[[ -n $client_key ]] || { echo "blob-keyless: no connection string from client-config" >&2; exit 1; }
printf '%s\n' "$client_key" >client.key
AZURE_CLIENT_ID=$client AZURE_TENANT_ID=$tenant AZURE_FEDERATED_TOKEN_FILE=$run/sa-token \
  AZURE_AUTHORITY_HOST=https://127.0.0.1:$token_port/ "$proxy" --config proxy.yaml >proxy.log 2>&1 &
pids+=($!)

for _ in $(seq 150); do
  grep -q "successfully listens" azurite.log && grep -q "blob gateway listening" proxy.log &&
    grep -q "listening" token.log && break
  sleep 0.2
done
grep -q "successfully listens" azurite.log || { echo "blob-keyless: Azurite did not start" >&2; exit 1; }

# The container, made through the gateway with the SDK (barman expects it to exist).
C=$conn REQUESTS_CA_BUNDLE=$run/ca.crt "$venv/bin/python" -c \
  'import os; from azure.storage.blob import ContainerClient; ContainerClient.from_connection_string(os.environ["C"], "pgbackups").create_container()'

# PostgreSQL as `postgres`, archiving through the gateway, as CNPG's sidecar would.
envs=(env -i PATH="$venv/bin:/usr/bin:/bin" HOME=/tmp "AZURE_STORAGE_CONNECTION_STRING=$conn"
  "REQUESTS_CA_BUNDLE=$run/ca.crt")
as_pg() { runuser -u postgres -- "${envs[@]}" "$@"; }
psql_at() { as_pg "$pgbin/psql" -h "$run/sock" -p "$1" -d postgres -XAtq -v ON_ERROR_STOP=1 -c "$2"; }
url=https://localhost:$gw_port/pg-prod/pgbackups
barman=(--cloud-provider azure-blob-storage)
install -d -o postgres -g postgres -m 700 "$run/pg"
install -d -o postgres -g postgres -m 755 "$run/sock" "$run/pglog"
as_pg "$pgbin/initdb" -D "$run/pg" -A trust -U postgres >/dev/null
cat >>"$run/pg/postgresql.conf" <<CONF
port = $pg_port
listen_addresses = ''
unix_socket_directories = '$run/sock'
wal_level = replica
archive_mode = on
archive_command = 'barman-cloud-wal-archive ${barman[*]} $url pg %p'
CONF
as_pg "$pgbin/pg_ctl" -D "$run/pg" -l "$run/pglog/primary.log" -w -t 120 start >/dev/null
psql_at "$pg_port" "create table t(id int primary key, v text); insert into t select g, md5(g::text) from generate_series(1, 5000) g"
digest_sql="select count(*) || ' ' || md5(string_agg(id || ':' || v, ',' order by id)) from t"
want=$(psql_at "$pg_port" "$digest_sql")

as_pg barman-cloud-backup "${barman[@]}" --immediate-checkpoint -h "$run/sock" -p "$pg_port" -U postgres \
  "$url" pg >barman-backup.log 2>&1 || { echo "blob-keyless: barman-cloud-backup failed" >&2; exit 1; }
say "barman-cloud-backup done"
# Rotate the projected token, as the kubelet does; later exchanges must send the new one.
printf 'eyJhbGciOiJSUzI1NiJ9.projected-sa-token-2.sig\n' >sa-token
# The proxy refreshes at half the token's 30 s life. Wait for that exchange, so the WAL and
# the restore below run on a token got with the rotated file, however fast the backup was.
for _ in $(seq 450); do
  grep "issued.*projected-sa-token-2" token.log >/dev/null && break
  sleep 0.1
done
psql_at "$pg_port" "insert into t select g, md5(g::text) from generate_series(5001, 6000) g"
want=$(psql_at "$pg_port" "$digest_sql")
wal=$(psql_at "$pg_port" "select pg_walfile_name(pg_switch_wal())")
for _ in $(seq 600); do
  last=$(psql_at "$pg_port" "select coalesce(last_archived_wal, '') from pg_stat_archiver")
  [[ -n $last && ! $last < $wal ]] && break
  sleep 0.1
done
[[ -n $last && ! $last < $wal ]] || { echo "blob-keyless: WAL $wal was not archived" >&2; exit 1; }
say "WAL $wal archived"

bid=$(as_pg barman-cloud-backup-list "${barman[@]}" --format json "$url" pg |
  "$venv/bin/python" -c 'import json,sys; b=[x for x in json.load(sys.stdin)["backups_list"] if x["status"]=="DONE"]; print(b[-1]["backup_id"])')
install -d -o postgres -g postgres -m 700 "$run/restored"
as_pg barman-cloud-restore "${barman[@]}" "$url" pg "$bid" "$run/restored" >barman-restore.log 2>&1 ||
  { echo "blob-keyless: barman-cloud-restore failed" >&2; exit 1; }
restored_port=$(free_port)
cat >>"$run/restored/postgresql.auto.conf" <<CONF
port = $restored_port
archive_mode = off
restore_command = 'barman-cloud-wal-restore ${barman[*]} $url pg %f %p'
CONF
touch "$run/restored/recovery.signal"
chown postgres: "$run/restored/postgresql.auto.conf" "$run/restored/recovery.signal"
as_pg "$pgbin/pg_ctl" -D "$run/restored" -l "$run/pglog/restored.log" -w -t 120 start >/dev/null
for _ in $(seq 600); do
  [[ $(psql_at "$restored_port" "select pg_is_in_recovery()") == f ]] && break
  sleep 0.1
done
got=$(psql_at "$restored_port" "$digest_sql")
[[ $got == "$want" ]] || { echo "blob-keyless: restored $got, expected $want" >&2; exit 1; }
say "restored backup $bid with the WAL after it: $got"

# Every token came from an exchange whose assertion was the file's content at that moment,
# and the rotated file was used; the gateway holds no key and logged no token.
grep -q "refused" token.log && { echo "blob-keyless: the token endpoint refused an exchange" >&2; exit 1; }
issued=$(grep -c "issued" token.log)
grep -q "issued.*projected-sa-token-2" token.log ||
  { echo "blob-keyless: no exchange sent the rotated token file" >&2; exit 1; }
for secret in "$real_key" "$client_key" "projected-sa-token" "eyJ"; do
  if grep -qF -- "$secret" proxy.log; then
    echo "blob-keyless: the proxy log holds a key, token or assertion" >&2
    exit 1
  fi
done
fetched=$(curl -s "http://127.0.0.1:$admin_port/metrics" | sed -n 's/^egress_proxy_token_refresh_total{result="ok"} //p')
say "tokens issued $issued (30 s lifetime), proxy fetches ok: $fetched, blob requests: $(grep -c 'blob request' proxy.log)"
say "OK"
