#!/usr/bin/env bash
# Checks deploy/ offline, installing what it needs from the package registries when missing:
# - the Kubernetes manifests: `kustomize build` of the base and the example overlay (kubectl's
#   built-in kustomize will do), each object against the Kubernetes schemas (kubernetes-validate,
#   strict: an unknown field is an error), the KEDA objects against
#   kubernetes/schemas/keda.sh-v1alpha1.yaml and against the rest of the build, and the
#   Deployment's probes, grace period, pod security and resources (check_manifests.py);
# - the alerting rules (`promtool check rules`) and their unit tests (`promtool test rules`),
#   and the Prometheus configuration of docker-compose.yml (`promtool check config`);
# - every alert's summary, description and runbook section of docs/operations.md;
# - the Grafana dashboard and docker-compose.yml (check_dashboard.py).
# That every metric the dashboard and the rules name exists in a running worker's /metrics is
# checked by the end-to-end test tests/tests/deploy.rs (`cargo test -p opsgenie-e2e --test deploy`).
set -euo pipefail
cd "$(dirname "$0")"
tools="${TMPDIR:-/tmp}/opsgenie-deploy-tools"
mkdir -p "$tools"
export PATH="$tools/usr/bin:$PATH"

# The oldest Kubernetes these manifests are for (PodDisruptionBudget's
# unhealthyPodEvictionPolicy is GA in 1.31), and the newest kubernetes-validate knows.
k8s_versions=(1.31.0 latest)

if ! command -v promtool >/dev/null; then
  echo "promtool is missing; taking it from Debian's prometheus package."
  # Unpacked, not installed: installing the package would also enable (and, without a
  # policy-rc.d, start) a Prometheus server on this machine.
  (cd "$tools" && apt-get update -qq && apt-get download prometheus >/dev/null \
    && dpkg-deb -x prometheus_*.deb . && rm -f prometheus_*.deb)
fi
if ! python3 -c 'import yaml, jsonschema' 2>/dev/null; then
  python3 -m pip install --quiet pyyaml jsonschema
fi
if ! command -v kubernetes-validate >/dev/null; then
  python3 -m pip install --quiet kubernetes-validate
fi

build_dir="$(mktemp -d)"
trap 'rm -rf "$build_dir"' EXIT
if command -v kustomize >/dev/null; then
  kustomize_build() { kustomize build "$1"; }
elif command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
  kustomize_build() { kubectl kustomize "$1"; }
else
  kustomize_build() { :; }
fi

for dir in kubernetes/base kubernetes/overlays/example; do
  out="$build_dir/$(basename "$dir").yaml"
  kustomize_build "$dir" >"$out"
  if [ ! -s "$out" ]; then
    # No kustomize here: every manifest of the base, as written.
    echo "No kustomize found: checking the files of $dir one by one."
    for f in kubernetes/base/*.yaml; do
      [ "$(basename "$f")" = kustomization.yaml ] && continue
      printf -- '---\n' >>"$out"
      cat "$f" >>"$out"
    done
  else
    echo "kustomize build $dir: $(grep -c '^kind:' "$out") objects."
  fi
  # (kubernetes-validate has no schema for the KEDA kinds: check_manifests.py checks them next.)
  for version in "${k8s_versions[@]}"; do
    if [ "$version" = latest ]; then
      kubernetes-validate --strict --quiet "$out"
    else
      kubernetes-validate --strict --quiet -k "$version" "$out"
    fi
  done
  python3 check_manifests.py "$out"
done

promtool check rules prometheus/opsgenie-worker.rules.yml
(cd prometheus && promtool test rules opsgenie-worker.rules.test.yml)
promtool check config prometheus/prometheus.compose.yml

# Every alert's runbook annotation points to a section of docs/operations.md.
python3 - prometheus/opsgenie-worker.rules.yml ../docs/operations.md <<'PY'
import re, sys, yaml
rules = [r for g in yaml.safe_load(open(sys.argv[1]))["groups"] for r in g["rules"] if "alert" in r]
anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
           for h in re.findall(r"^#+ (.+)$", open(sys.argv[2]).read(), re.M)}
def runbook_ok(r):
    path, _, anchor = r.get("annotations", {}).get("runbook", "").partition("#")
    return path == "docs/operations.md" and anchor in anchors
bad = [r["alert"] for r in rules
       if not runbook_ok(r)
       or not r["annotations"].get("summary") or not r["annotations"].get("description")]
print(f"alerts: {len(rules)}, without a summary, a description or a runbook in docs/operations.md: {bad}")
sys.exit(1 if bad else 0)
PY

python3 check_dashboard.py grafana/opsgenie-worker.json ../docker-compose.yml
echo "deploy/: every check passed."
