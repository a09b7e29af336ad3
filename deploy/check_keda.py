#!/usr/bin/env python3
"""Checks the KEDA objects of built manifests (kustomize output, several YAML documents, read
from the files named or from standard input) against deploy/kubernetes/schemas/, then checks
what no schema can: that they agree with the rest of the build.

- a ScaledObject scales a Deployment of the build, with minReplicaCount <= maxReplicaCount
  (the CRD's own rule);
- each trigger's authenticationRef names a TriggerAuthentication of the build;
- a RabbitMQ trigger counts the queue the Deployment's worker consumes (WORKER_QUEUE), in
  QueueLength mode, with a connection (host) from its TriggerAuthentication;
- a TriggerAuthentication hands the RabbitMQ scaler only parameters it reads.

Exits 1 with one line per problem, 0 when there is none.
"""

import pathlib
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
    kinds = sum(1 for d in documents if d and d.get("kind") in ("ScaledObject", "TriggerAuthentication"))
    print(f"KEDA objects: {kinds} checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
