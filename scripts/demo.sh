#!/usr/bin/env bash
# `make demo`: what egress-gate does to real workload shapes, on the built-in defaults.
# Exits 0 only when the checks at the end hold.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet -p egress-webhook --bin egress-webhook
bin=target/debug/egress-webhook
pods=webhook/examples/pods.yaml
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Configuration in force (built-in defaults)"
"$bin" check-config

step "Preview: egress-webhook inject --offline -f $pods"
"$bin" inject --offline -f "$pods" >"$work/injected.yaml" 2>"$work/report.txt"
cat "$work/report.txt"

step "The CNPG postgres container after injection"
awk '/name: pg-1$/{pod=1} pod && /- name: postgres/{c=1} c && /HTTPS_PROXY|https_proxy|NO_PROXY|no_proxy/{print; getline; print} /^---/{pod=0; c=0}' "$work/injected.yaml"

step "Reinvocation on the injected output (must change nothing)"
"$bin" inject --offline -f "$work/injected.yaml" >/dev/null 2>"$work/again.txt"
cat "$work/again.txt"

step "Checks"
fail=0
check() { if eval "$2"; then echo "ok   $1"; else echo "FAIL $1"; fail=1; fi; }
check "CNPG instance injected by the cnpg profile" \
  "grep -q 'Pod db/pg-1: injected (profile cnpg), [1-9]' '$work/report.txt'"
check "Velero Deployment template injected by the velero profile" \
  "grep -q 'Deployment velero/velero: injected (profile velero), [1-9]' '$work/report.txt'"
check "harbor stays direct" \
  "grep -q 'Pod db/harbor-core-7d9c: not-selected' '$work/report.txt'"
check "NO_PROXY names the CNPG peer services and the namespace's Services" \
  "grep -q 'pg-rw.db,pg-rw,.*harbor-core' '$work/injected.yaml'"
check "second pass is a no-op" \
  "! grep -q 'patch operations' <(grep -v ', 0 patch operations' '$work/again.txt')"
exit $fail
