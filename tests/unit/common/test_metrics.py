"""services/common/metrics.py: what each service's registry holds."""

from __future__ import annotations

import tomllib
from pathlib import Path

from prometheus_client import generate_latest

from services.common import metrics

ROOT = Path(__file__).resolve().parents[3]


def test_version_is_the_projects() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == metrics.VERSION


def test_each_registry_has_the_common_and_its_own_series_only() -> None:
    metrics.set_build_info()
    own = {s: {c._name for c in metrics.OWN[s]} for s in metrics.OWN}  # type: ignore[attr-defined]
    for service, names in own.items():
        text = generate_latest(metrics.registry_of(service)).decode()
        exported = {
            line.split()[2].removesuffix("_total")
            for line in text.splitlines()
            if line.startswith("# TYPE usagebilling_")
        }
        assert exported == names | {"usagebilling_build_info", "usagebilling_ready"}
        assert "_created" not in text
        assert "# TYPE grpc_server_handled_total counter" in text
