#!/usr/bin/env python3
"""Checks the Grafana dashboard and the docker-compose.yml that provisions it.

Usage: check_dashboard.py DASHBOARD.json COMPOSE.yml

The dashboard: valid JSON with a Prometheus data-source variable that every panel and query
uses (so it imports into any Grafana), unique panel ids, panels inside the 24-column grid and
not overlapping, a PromQL expression in every query, and a panel for each thing an operator
looks at (below). docker-compose.yml: every file or directory it mounts from the repository
exists, and Prometheus and Grafana are given the rules, the configuration and the dashboard.

Exits 1 with one line per problem, 0 when there is none.
"""

import json
import pathlib
import re
import sys

import yaml

DATASOURCE = "${datasource}"
# What the dashboard must show, as a pattern some query must match.
MUST_SHOW = {
    "jobs by outcome": r"sum by \(outcome\) \(rate\(opsgenie_jobs_total",
    "deliveries per second": r'opsgenie_jobs_total\{outcome="delivered"',
    "delivery latency quantiles": r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(opsgenie_delivery_duration_seconds_bucket",
    "responses by status": r"sum by \(status\) \(rate\(opsgenie_responses_total",
    "retries": r"opsgenie_retries_total",
    "jobs in flight": r"opsgenie_jobs_in_flight",
    "dead letters by reason": r'sum by \(reason\) \(increase\(opsgenie_jobs_total\{outcome="dead_lettered"',
    "confirmation results": r"sum by \(result\) \(rate\(opsgenie_confirmations_total",
    "confirmation lag": r"opsgenie_confirmation_lag_seconds_bucket",
    "replicas ready": r"opsgenie_ready",
    "keyring reloads": r"opsgenie_keyring_reloaded_timestamp_seconds",
}


def uses_datasource(ds):
    return isinstance(ds, dict) and ds.get("uid") == DATASOURCE and ds.get("type") == "prometheus"


def check_dashboard(path):
    problems = []
    dash = json.loads(pathlib.Path(path).read_text())
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no Prometheus data-source variable named `datasource`")
    for name, var in variables.items():
        if var.get("type") == "query" and not uses_datasource(var.get("datasource")):
            problems.append(f"variable {name}: not on {DATASOURCE}")
    ids, boxes, exprs = set(), [], []
    for panel in dash.get("panels", []):
        pid, title = panel.get("id"), panel.get("title")
        if pid in ids:
            problems.append(f"panel {title!r}: id {pid} used twice")
        ids.add(pid)
        g = panel.get("gridPos", {})
        x, y, w, h = g.get("x", -1), g.get("y", -1), g.get("w", 0), g.get("h", 0)
        if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > 24:
            problems.append(f"panel {title!r}: gridPos {g} outside the grid")
        for (ox, oy, ow, oh, other) in boxes:
            if x < ox + ow and ox < x + w and y < oy + oh and oy < y + h:
                problems.append(f"panel {title!r} overlaps {other!r}")
        boxes.append((x, y, w, h, title))
        if panel.get("type") == "row":
            continue
        if not uses_datasource(panel.get("datasource")):
            problems.append(f"panel {title!r}: not on {DATASOURCE}")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"panel {title!r}: no query")
        for target in targets:
            if not uses_datasource(target.get("datasource")):
                problems.append(f"panel {title!r}, query {target.get('refId')}: not on {DATASOURCE}")
            if not str(target.get("expr", "")).strip():
                problems.append(f"panel {title!r}, query {target.get('refId')}: no expression")
            exprs.append(target.get("expr", ""))
    for what, pattern in MUST_SHOW.items():
        if not any(re.search(pattern, e) for e in exprs):
            problems.append(f"no panel shows {what} (/{pattern}/)")
    return problems, len(ids)


def check_compose(path):
    problems = []
    root = pathlib.Path(path).resolve().parent
    compose = yaml.safe_load(pathlib.Path(path).read_text())
    services = compose.get("services", {})
    declared_volumes = set((compose.get("volumes") or {}).keys())
    mounts = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                if not (root / source).exists():
                    problems.append(f"service {name}: mounts {source}, which does not exist")
                mounts.setdefault(name, {})[target] = root / source
            elif source not in declared_volumes:
                problems.append(f"service {name}: volume {source} is not declared under `volumes`")
        for dep in (service.get("depends_on") or {}):
            if dep not in services:
                problems.append(f"service {name}: depends on {dep}, which is no service")
    for name in ("prometheus", "grafana"):
        if name not in services:
            problems.append(f"no {name} service")
    prom = mounts.get("prometheus", {})
    config = next((a.split("=", 1)[1] for a in services.get("prometheus", {}).get("command", [])
                   if a.startswith("--config.file=")), None)
    if config is None:
        problems.append("prometheus: no --config.file")
    else:
        found = [src / pathlib.Path(config).relative_to(tgt) for tgt, src in prom.items()
                 if pathlib.Path(config).is_relative_to(tgt)]
        if not found or not found[0].is_file():
            problems.append(f"prometheus: {config} is not a mounted file")
        else:
            rules = yaml.safe_load(found[0].read_text()).get("rule_files", [])
            for rule in rules:
                if not (found[0].parent / rule).is_file():
                    problems.append(f"prometheus: rule file {rule} is not beside {config}")
            if not rules:
                problems.append("prometheus: no rule_files")
    graf = mounts.get("grafana", {})
    if not any(str(t).startswith("/etc/grafana/provisioning") for t in graf):
        problems.append("grafana: the provisioning directory is not mounted")
    if not any(str(s).endswith(".json") for s in graf.values()):
        problems.append("grafana: no dashboard is mounted")
    return problems, len(services)


def main(dashboard, compose):
    problems, panels = check_dashboard(dashboard)
    compose_problems, services = check_compose(compose)
    problems += compose_problems
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"dashboard: {panels} panels, compose: {services} services, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
