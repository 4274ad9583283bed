"""README's sample of what `make run` prints is what tools/run_suite.py's
banner prints (it lacked the HTTP/JSON column)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tools.run_suite import _banner

ROOT = Path(__file__).resolve().parents[2]


def test_readme_shows_the_banner_make_run_prints() -> None:
    ports = {"ingest": 50051, "meter": 50052, "billing": 50053}
    suite: Any = SimpleNamespace(
        address=lambda s: f"127.0.0.1:{ports[s]}",
        http_url=lambda s: f"http://127.0.0.1:{ports[s] - 50051 + 8081}",
        metrics_ports={s: p - 50051 + 9091 for s, p in ports.items()},
        admin_token="...",
        log_dir=Path("/path/to/checkout/.run/logs"),
    )
    banner = _banner(suite, "...", "ubk_...", Path("/path/to/checkout/.run/env"), [])
    assert "HTTP/JSON http://127.0.0.1:8083" in banner
    assert f"```\n{banner.strip()}\n```" in (ROOT / "README.md").read_text()
