#!/usr/bin/env python3
"""Checks built manifests (kustomize output, several YAML documents, read from the files named
or from standard input) for what the Kubernetes schemas cannot say.

The KEDA objects, against deploy/kubernetes/schemas/ (kubernetes-validate has no schema for
them), then against the rest of the build:
- a ScaledObject scales a Deployment of the build, with minReplicaCount <= maxReplicaCount
  (the CRD's own rule);
- each trigger's authenticationRef names a TriggerAuthentication of the build;
- a RabbitMQ trigger counts the queue the Deployment's worker consumes (WORKER_QUEUE), in
  QueueLength mode, with a connection (host) from its TriggerAuthentication;
- a TriggerAuthentication hands the RabbitMQ scaler only parameters it reads.

The worker's Deployment:
- the termination grace period is longer than DRAIN_TIMEOUT (default 30 s);
- /healthz is the liveness probe and /readyz the readiness probe, on the port METRICS_ADDR
  binds, on 0.0.0.0;
- the pod meets the `restricted` Pod Security Standard, with a read-only root file system;
- CPU and memory have requests and limits;
- a PodDisruptionBudget and a Service with a `metrics` port select its pods.

Exits 1 with one line per problem, 0 when there is none.
"""

import pathlib
import re
import sys

import jsonschema
import yaml

SCHEMAS = pathlib.Path(__file__).resolve().parent / "kubernetes" / "schemas" / "keda.sh-v1alpha1.yaml"
# What KEDA's RabbitMQ scaler reads from a TriggerAuthentication (its `authParams`).
RABBITMQ_AUTH_PARAMETERS = {
    "host", "protocol", "vhostName", "username", "password", "ca", "cert", "key",
    "keyPassword", "tls", "workloadIdentityResource",
}


def worker_queue(deployment):
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        for env in container.get("env", []):
            if env.get("name") == "WORKER_QUEUE":
                return env.get("value")
    return "opsgenie.alerts"  # the worker's default


def seconds(text):
    """`30s`, `2m`, `1h30m` or a bare number of seconds, as the worker's flags take them."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.replace(" ", ""))
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u or "s"] for n, u in parts)


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", []) if "name" in e}


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_deployment(name, deployment, by_kind):
    problems = []
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    pod_sc = pod.get("securityContext", {})
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append(f"Deployment {name}: shares a host namespace")
    for volume in pod.get("volumes", []):
        if "hostPath" in volume:
            problems.append(f"Deployment {name}: volume {volume['name']} is a hostPath")
    for container in pod.get("containers", []):
        where = f"Deployment {name}, container {container['name']}"
        sc = container.get("securityContext", {})
        env = env_of(container)
        drain = seconds(env.get("DRAIN_TIMEOUT") or "30s")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace <= drain:
            problems.append(f"{where}: terminationGracePeriodSeconds {grace} is not longer than DRAIN_TIMEOUT {drain:g} s")
        addr = env.get("METRICS_ADDR") or ""
        host, _, port = addr.rpartition(":")
        if host != "0.0.0.0":
            problems.append(f"{where}: METRICS_ADDR is {addr!r}, not 0.0.0.0:PORT (probes and scrapes come from outside)")
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = container.get(probe, {}).get("httpGet", {})
            probe_port = ports.get(get.get("port"), get.get("port"))
            if get.get("path") != path or str(probe_port) != port:
                problems.append(f"{where}: {probe} is not GET {path} on the metrics port {port}")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: the root file system is writable")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: capabilities are not all dropped")
        if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
            problems.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{where}: runs as root")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: no RuntimeDefault seccomp profile")
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(kind, {}):
                    problems.append(f"{where}: no {resource} in {kind}")
    if not any(selects(p["spec"].get("selector", {}).get("matchLabels"), labels)
               for p in by_kind.get("PodDisruptionBudget", {}).values()):
        problems.append(f"Deployment {name}: no PodDisruptionBudget selects its pods")
    if not any(selects(s["spec"].get("selector"), labels)
               and any(p.get("name") == "metrics" for p in s["spec"].get("ports", []))
               for s in by_kind.get("Service", {}).values()):
        problems.append(f"Deployment {name}: no Service with a `metrics` port selects its pods")
    return problems


def check(documents):
    schemas = yaml.safe_load(SCHEMAS.read_text())
    problems = []
    by_kind = {}
    for doc in documents:
        if doc:
            by_kind.setdefault(doc.get("kind"), {})[doc["metadata"]["name"]] = doc
    auths = by_kind.get("TriggerAuthentication", {})
    scaled = by_kind.get("ScaledObject", {})
    if not scaled:
        problems.append("no ScaledObject in the build")
    for kind in ("ScaledObject", "TriggerAuthentication"):
        validator = jsonschema.Draft202012Validator(schemas[kind])
        for name, doc in by_kind.get(kind, {}).items():
            for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
                where = "/".join(str(p) for p in error.absolute_path) or "(top)"
                problems.append(f"{kind} {name}: {where}: {error.message}")
    for name, deployment in by_kind.get("Deployment", {}).items():
        problems += check_deployment(name, deployment, by_kind)
    for name, so in scaled.items():
        spec = so.get("spec", {})
        target = spec.get("scaleTargetRef", {})
        if target.get("kind", "Deployment") != "Deployment":
            problems.append(f"ScaledObject {name}: scales a {target.get('kind')}, not a Deployment")
        deployment = by_kind.get("Deployment", {}).get(target.get("name"))
        if deployment is None:
            problems.append(f"ScaledObject {name}: no Deployment {target.get('name')} in the build")
        low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if low > high:
            problems.append(f"ScaledObject {name}: minReplicaCount {low} > maxReplicaCount {high}")
        for trigger in spec.get("triggers", []):
            ref = (trigger.get("authenticationRef") or {}).get("name")
            if ref is not None and ref not in auths:
                problems.append(f"ScaledObject {name}: no TriggerAuthentication {ref} in the build")
            if trigger.get("type") != "rabbitmq":
                continue
            meta = trigger.get("metadata", {})
            if meta.get("mode") != "QueueLength":
                problems.append(f"ScaledObject {name}: the rabbitmq trigger is not in QueueLength mode")
            if deployment is not None and meta.get("queueName") != worker_queue(deployment):
                problems.append(
                    f"ScaledObject {name}: counts queue {meta.get('queueName')!r}, "
                    f"the worker consumes {worker_queue(deployment)!r}"
                )
            params = {r["parameter"] for r in auths.get(ref, {}).get("spec", {}).get("secretTargetRef", [])}
            if "host" not in meta and "hostFromEnv" not in meta and "host" not in params:
                problems.append(f"ScaledObject {name}: the rabbitmq trigger has no host")
            for param in sorted(params - RABBITMQ_AUTH_PARAMETERS):
                problems.append(f"TriggerAuthentication {ref}: the rabbitmq scaler reads no {param!r}")
    return problems


def main(paths):
    texts = [pathlib.Path(p).read_text() for p in paths] if paths else [sys.stdin.read()]
    documents = [doc for text in texts for doc in yaml.safe_load_all(text)]
    problems = check(documents)
    for problem in problems:
        print(problem, file=sys.stderr)
    kinds = sum(1 for d in documents if d and d.get("kind") in ("Deployment", "ScaledObject", "TriggerAuthentication"))
    print(f"Deployments and KEDA objects: {kinds} checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
