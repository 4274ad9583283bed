"""The shipped monitoring (deploy/k8s/components/monitoring and the chart's
files/): the checks of tools/monitoring_check.py pass on it and fail on each
kind of mistake; and every metric the alerting rules and the dashboard name is
in a real scrape of the running services (not only in metrics.py)."""

from __future__ import annotations

import asyncio
import copy
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

for _module in ("promql_parser", "jsonschema", "yaml"):
    pytest.importorskip(
        _module,
        reason=f"Kubernetes tooling not installed ({_module}): `make k8s-check` installs"
        " requirements/k8s.lock and runs these tests",
    )

import yaml  # noqa: E402

from tools import monitoring_check  # noqa: E402
from tools.suite import SERVICES, Suite  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMPONENT = ROOT / "deploy" / "k8s" / "components" / "monitoring"
CHART_FILES = ROOT / "deploy" / "k8s" / "helm" / "usage-billing" / "files"


def _rule() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((COMPONENT / "prometheus-rule.yaml").read_text())
    return loaded


def _monitor() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((COMPONENT / "servicemonitor.yaml").read_text())
    return loaded


def _dashboard() -> str:
    return (COMPONENT / "usage-billing-dashboard.json").read_text()


def _services() -> list[dict[str, Any]]:
    """The three Services as the base renders them (labels and ports)."""
    return [
        {
            "kind": "Service",
            "metadata": {
                "name": name,
                "labels": {
                    "app.kubernetes.io/name": name,
                    "app.kubernetes.io/part-of": "usage-billing",
                },
            },
            "spec": {"ports": [{"name": "grpc"}, {"name": "metrics"}]},
        }
        for name in SERVICES
    ]


def test_the_shipped_monitoring_passes() -> None:
    objects = [_rule(), _monitor(), *_services()]
    assert monitoring_check.validate_schema(_rule()) == []
    assert monitoring_check.validate_schema(_monitor()) == []
    assert monitoring_check.check_monitoring(objects) == []
    assert monitoring_check.check_dashboard("dashboard", _dashboard()) == []


def test_the_chart_ships_the_same_rules_and_dashboard() -> None:
    chart_rules = yaml.safe_load((CHART_FILES / "prometheus-rules.yaml").read_text())
    assert chart_rules == _rule()["spec"]
    chart_board = (CHART_FILES / "usage-billing-dashboard.json").read_text()
    assert json.loads(chart_board) == json.loads(_dashboard())


def test_rule_mistakes_are_found() -> None:
    rule = _rule()
    first = rule["spec"]["groups"][0]["rules"][0]
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"][0]["rules"][0]["expr"] = "sum(rate(grpc_server_handled_total[5m])"
    assert "does not parse" in " ".join(monitoring_check.check_rules(broken))

    unknown = copy.deepcopy(rule)
    unknown["spec"]["groups"][0]["rules"][0]["expr"] = "usagebilling_outbox_size > 1"
    assert monitoring_check.check_rules(unknown) == [
        f"PrometheusRule/usage-billing rule {first['alert']}: no service exports"
        " usagebilling_outbox_size"
    ]

    twice = copy.deepcopy(rule)
    twice["spec"]["groups"][0]["rules"].append(copy.deepcopy(first))
    assert "alert name used twice" in " ".join(monitoring_check.check_rules(twice))

    typo = copy.deepcopy(rule)
    typo["spec"]["groups"][0]["rules"][0]["fro"] = "5m"
    assert monitoring_check.validate_schema(typo)

    bad_for = copy.deepcopy(rule)
    bad_for["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    assert monitoring_check.validate_schema(bad_for)


def test_service_monitor_mistakes_are_found() -> None:
    wrong_port = _monitor()
    wrong_port["spec"]["endpoints"][0]["port"] = "http-metrics"
    problems = monitoring_check.check_service_monitor(wrong_port, _services())
    assert len(problems) == 3 and all("no port 'http-metrics'" in p for p in problems)

    no_match = _monitor()
    no_match["spec"]["selector"]["matchLabels"]["app.kubernetes.io/part-of"] = "other"
    assert len(monitoring_check.check_service_monitor(no_match, _services())) == 3

    unknown_field = _monitor()
    unknown_field["spec"]["endpoints"][0]["intervall"] = "30s"
    assert monitoring_check.validate_schema(unknown_field)


def test_dashboard_mistakes_are_found() -> None:
    board = json.loads(_dashboard())
    panel = next(p for p in board["panels"] if p["type"] != "row")
    panel["targets"][0]["expr"] = "rate(usagebilling_events[5m])"
    panel["datasource"] = {"type": "prometheus", "uid": "prom-1"}
    board["panels"].append(copy.deepcopy(board["panels"][0]))  # a second panel with one id
    problems = monitoring_check.check_dashboard("d", json.dumps(board))
    assert any("no service exports usagebilling_events" in p for p in problems)
    assert any("not on the ${datasource} variable" in p for p in problems)
    assert any("id missing or not unique" in p for p in problems)
    assert monitoring_check.check_dashboard("d", "{") != []


# --- against the running services ---------------------------------------------


@pytest.fixture(scope="module")
def running(
    stack_urls: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Suite]:
    database_url, nats_url = stack_urls
    suite = Suite(
        database_url,
        nats_url,
        tmp_path_factory.mktemp("monitoring-logs"),
        extra_env={"USAGEBILLING_SCHEDULER_ENABLED": "false"},
    )
    try:
        suite.start()
        yield suite
    finally:
        suite.stop()


def _scrape(port: int) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        # A labelled series with no child yet shows only its HELP and TYPE lines.
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


@pytest.mark.timeout(180)
async def test_every_metric_in_the_rules_and_dashboard_is_in_a_scrape(running: Suite) -> None:
    scraped: set[str] = set()
    for service in SERVICES:
        scraped |= await asyncio.to_thread(_scrape, running.metrics_ports[service])
    known = scraped | monitoring_check.PROMETHEUS_SERIES
    assert monitoring_check.exported_series() <= scraped  # metrics.py says what is served

    problems = monitoring_check.check_rules(_rule())
    expressions = [
        str(rule["expr"]) for group in _rule()["spec"]["groups"] for rule in group["rules"]
    ]
    board = json.loads(_dashboard())
    expressions += [
        monitoring_check.grafana_to_promql(t["expr"])
        for p in board["panels"]
        for t in p.get("targets", [])
    ]
    assert len(expressions) > 20
    for expr in expressions:
        problems += monitoring_check.check_expression("scrape", expr, known)
    assert problems == []
