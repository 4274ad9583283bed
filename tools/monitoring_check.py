"""The monitoring objects of a rendering (tools/k8s_check.py), offline.

- ServiceMonitor and PrometheusRule (monitoring.coreos.com/v1, which the
  Kubernetes schemas do not know) against schemas of the fields the Prometheus
  Operator's CRDs define for them, strict (an unknown or misspelt field fails);
- every rule's expression and every dashboard query parses as PromQL
  (promql-parser), and every metric it names is one a service exports
  (services/common/metrics.py; tests/deploy/test_monitoring.py checks the same
  names against a scrape of the running services) or Prometheus's own `up`;
- rules: unique alert names, a severity label, a summary, valid durations;
- the dashboard (a ConfigMap's JSON) has the structure Grafana loads:
  uid, title, schemaVersion, panels with unique ids, a grid position and
  queries on the dashboard's Prometheus data source variable;
- the ServiceMonitor selects the Service of each of the three services, by a
  port the Service has.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import promql_parser

from services.common import metrics

Obj = dict[str, Any]
MONITORING_API = "monitoring.coreos.com/v1"
SERVICES = ("ingest", "meter", "billing")
# Series Prometheus adds to every scrape target.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
# Grafana's variables, replaced by something PromQL parses.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$namespace": "ns",
    "${datasource}": "ds",
}
GRAFANA_PANEL_TYPES = frozenset(
    {"row", "timeseries", "stat", "gauge", "table", "bargauge", "heatmap", "text", "state-timeline"}
)

_DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": _STRINGS,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": _STRINGS,
        "annotations": _STRINGS,
    },
    "additionalProperties": False,
}
_RELABELING = {
    "type": "object",
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer"},
        "replacement": {"type": "string"},
        "action": {"type": "string"},
    },
    "additionalProperties": False,
}
# The fields of monitoring.coreos.com/v1 that a ServiceMonitor and a
# PrometheusRule may have (a subset of the Operator's CRDs: what a chart of
# this kind uses; anything else is refused rather than let through unchecked).
SCHEMAS: dict[str, Obj] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": MONITORING_API},
            "kind": {"const": "ServiceMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "properties": {
                    "jobLabel": {"type": "string"},
                    "targetLabels": {"type": "array", "items": {"type": "string"}},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                    "selector": _LABEL_SELECTOR,
                    "namespaceSelector": {
                        "type": "object",
                        "properties": {
                            "any": {"type": "boolean"},
                            "matchNames": {"type": "array", "items": {"type": "string"}},
                        },
                        "additionalProperties": False,
                    },
                    "sampleLimit": {"type": "integer", "minimum": 0},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "properties": {
                                "port": {"type": "string"},
                                "targetPort": {"type": ["string", "integer"]},
                                "path": {"type": "string", "pattern": "^/"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                                "honorLabels": {"type": "boolean"},
                                "honorTimestamps": {"type": "boolean"},
                                "relabelings": {"type": "array", "items": _RELABELING},
                                "metricRelabelings": {"type": "array", "items": _RELABELING},
                            },
                            "additionalProperties": False,
                        },
                    },
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": MONITORING_API},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": _DURATION,
                                "limit": {"type": "integer"},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "oneOf": [
                                            {"required": ["alert"]},
                                            {"required": ["record"]},
                                        ],
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": ["string", "integer"]},
                                            "for": _DURATION,
                                            "keep_firing_for": _DURATION,
                                            "labels": _STRINGS,
                                            "annotations": _STRINGS,
                                        },
                                        "additionalProperties": False,
                                    },
                                },
                            },
                            "additionalProperties": False,
                        },
                    }
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
}


def is_monitoring(obj: Obj) -> bool:
    return str(obj.get("apiVersion", "")).startswith("monitoring.coreos.com/")


def describe(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def validate_schema(obj: Obj) -> list[str]:
    schema = SCHEMAS.get(str(obj.get("kind")))
    if schema is None or obj.get("apiVersion") != MONITORING_API:
        return [f"{describe(obj)}: no schema for {obj.get('apiVersion')} {obj.get('kind')}"]
    return [
        f"{describe(obj)}: {'.'.join(str(p) for p in e.path) or '(top)'}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(obj)
    ]


@functools.cache
def exported_series() -> frozenset[str]:
    """Every sample name some service exports (services/common/metrics.py)."""
    names: set[str] = set()
    for service in SERVICES:
        for family in metrics.registry_of(service).collect():
            names.update(sample.name for sample in family.samples)
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
            else:
                names.add(family.name)
    return frozenset(names)


def series_in(expr: str) -> set[str]:
    """The metric names an expression selects; ValueError when it does not parse."""
    try:
        parsed = promql_parser.parse(expr)
    except Exception as exc:  # the parser raises a plain exception with its message
        raise ValueError(str(exc)) from None
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            names.update(m.value for m in node.matchers.matchers if m.name == "__name__")
        return True

    promql_parser.walk(parsed, visit)
    return names


def check_expression(where: str, expr: str, known: Iterable[str] | None = None) -> list[str]:
    known = frozenset(known) if known is not None else exported_series() | PROMETHEUS_SERIES
    try:
        names = series_in(expr)
    except ValueError as exc:
        return [f"{where}: expression does not parse ({exc}): {expr}"]
    if not names:
        return [f"{where}: expression selects no series: {expr}"]
    return [f"{where}: no service exports {name}" for name in sorted(names - known)]


def check_rules(obj: Obj) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for group in obj.get("spec", {}).get("groups", []):
        for rule in group.get("rules", []):
            name = str(rule.get("alert") or rule.get("record"))
            where = f"{describe(obj)} rule {name}"
            problems += check_expression(where, str(rule.get("expr", "")))
            if "alert" not in rule:
                continue
            if name in seen:
                problems.append(f"{where}: alert name used twice")
            seen.add(name)
            if not (rule.get("labels") or {}).get("severity"):
                problems.append(f"{where}: no severity label")
            if not (rule.get("annotations") or {}).get("summary"):
                problems.append(f"{where}: no summary annotation")
    return problems


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def check_dashboard(where: str, text: str) -> list[str]:
    try:
        dashboard = json.loads(text)
    except json.JSONDecodeError as exc:
        return [f"{where}: not JSON: {exc}"]
    problems = [
        f"{where}: no {key}"
        for key in ("uid", "title", "schemaVersion", "panels")
        if not dashboard.get(key)
    ]
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    source = variables.get("datasource", {})
    if source.get("type") != "datasource" or source.get("query") != "prometheus":
        problems.append(f"{where}: no Prometheus data source variable `datasource`")
    ids: set[int] = set()
    panels = list(dashboard.get("panels", []))
    for panel in panels:
        label = f"{where} panel {panel.get('title')!r}"
        if panel.get("id") in ids or not isinstance(panel.get("id"), int):
            problems.append(f"{label}: id missing or not unique")
        ids.add(panel.get("id"))
        if panel.get("type") not in GRAFANA_PANEL_TYPES:
            problems.append(f"{label}: unknown panel type {panel.get('type')!r}")
        grid = panel.get("gridPos") or {}
        if not all(isinstance(grid.get(k), int) for k in ("h", "w", "x", "y")) or (
            grid.get("x", 0) + grid.get("w", 0) > 24
        ):
            problems.append(f"{label}: gridPos must have integer h, w, x, y within 24 columns")
        if panel.get("type") == "row":
            continue
        if (panel.get("datasource") or {}).get("uid") != "${datasource}":
            problems.append(f"{label}: not on the ${{datasource}} variable")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{label}: no query")
        for target in targets:
            problems += check_expression(label, grafana_to_promql(str(target.get("expr", ""))))
    namespace = variables.get("namespace", {}).get("definition", "")
    match = re.fullmatch(r"label_values\((\w+), *\w+\)", namespace)
    if match and match.group(1) not in exported_series():
        problems.append(f"{where}: variable namespace reads {match.group(1)}, not exported")
    return problems


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for rule in selector.get("matchExpressions") or []:
        key, operator, values = rule["key"], rule["operator"], rule.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def check_service_monitor(monitor: Obj, objects: list[Obj]) -> list[str]:
    spec = monitor.get("spec", {})
    selected = [
        o
        for o in objects
        if o.get("kind") == "Service"
        and _selects(spec.get("selector") or {}, o.get("metadata", {}).get("labels") or {})
    ]
    problems = []
    by_name = {
        (s.get("metadata", {}).get("labels") or {}).get("app.kubernetes.io/name"): s
        for s in selected
    }
    for service in SERVICES:
        found = by_name.get(service)
        if found is None:
            problems.append(f"{describe(monitor)}: selects no Service of {service}")
            continue
        ports = {p.get("name") for p in found.get("spec", {}).get("ports", [])}
        for endpoint in spec.get("endpoints", []):
            if endpoint.get("port") not in ports:
                problems.append(
                    f"{describe(monitor)}: {describe(found)} has no port {endpoint.get('port')!r}"
                )
    extra = sorted(describe(s) for s in selected if s not in by_name.values())
    if extra or len(by_name) < len(selected):
        problems.append(f"{describe(monitor)}: selects other Services too (each pod once): {extra}")
    return problems


def dashboards(objects: Iterable[Obj]) -> dict[str, str]:
    """(ConfigMap/name key) -> the JSON of each dashboard in a ConfigMap."""
    return {
        f"{describe(o)} {key}": str(value)
        for o in objects
        if o.get("kind") == "ConfigMap"
        for key, value in (o.get("data") or {}).items()
        if key.endswith("dashboard.json")
    }


def check_monitoring(objects: list[Obj]) -> list[str]:
    """Every problem of the monitoring objects of one rendering (schemas
    excepted: validate_schema, called with the other schema checks)."""
    problems: list[str] = []
    for obj in objects:
        if obj.get("kind") == "PrometheusRule":
            problems += check_rules(obj)
        elif obj.get("kind") == "ServiceMonitor":
            problems += check_service_monitor(obj, objects)
    for where, text in dashboards(objects).items():
        problems += check_dashboard(where, text)
    return problems


def shipped(objects: Iterable[Obj]) -> tuple[Any, ...]:
    """What must be the same wherever monitoring is rendered: the rules'
    groups and the dashboards' JSON."""
    objects = list(objects)
    rules = [o["spec"] for o in objects if o.get("kind") == "PrometheusRule"]
    boards = sorted(json.dumps(json.loads(t), sort_keys=True) for t in dashboards(objects).values())
    return (json.dumps(rules, sort_keys=True), tuple(boards))
