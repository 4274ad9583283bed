"""A short slice of `make fuzz` (tools/fuzz.py): every RPC of the three
services with generated, mutated and raw requests, on a private stack. Fails
the same way as the full run: an INTERNAL or UNKNOWN status, a call over 5 s,
a traceback in a service's log, or a service that died."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import fuzz
from tools.fuzz_gen import Pool, Secrets, discover, make_case, now_seconds

pytestmark = pytest.mark.e2e

SEED = 10
REQUESTS = 1500


def test_fuzz_slice(tmp_path: Path) -> None:
    result = fuzz.run(tmp_path / "fuzz", seed=SEED, requests=REQUESTS, concurrency=4)
    report = result.report()
    print(report)
    assert len(result.outcomes) == REQUESTS
    # Every RPC of every server was called, and the requests were not all
    # turned away at the door: valid-looking ones reached the services' logic.
    assert {o.rpc for o in result.outcomes} == {r.label for r in discover()}
    counts = result.status_counts()
    assert counts["OK"] > REQUESTS // 10, counts
    assert counts["INVALID_ARGUMENT"] > REQUESTS // 10, counts
    assert result.ok, report


def test_cases_are_reproducible() -> None:
    rpcs = discover()
    pool = Pool(tenant_id="6f1c2d3e-0000-4000-8000-000000000001", event_names=["fz.tokens"])
    secrets = Secrets("ubk_key", "admin", "service", pool.tenant_id, "ubk_other", "ubk_revoked")
    now = now_seconds()
    first = [make_case(i, 7, rpcs, pool, secrets, now) for i in range(300)]
    again = [make_case(i, 7, rpcs, pool, secrets, now) for i in range(300)]
    other = [make_case(i, 8, rpcs, pool, secrets, now) for i in range(300)]
    assert [c.payloads() for c in first] == [c.payloads() for c in again]
    assert [c.metadata for c in first] == [c.metadata for c in again]
    assert [c.payloads() for c in first] != [c.payloads() for c in other]
    # Raw bytes and mutated messages both occur.
    kinds = {m.split(":")[0] for c in first for m in c.mutations}
    assert "raw" in kinds and len(kinds) > 5, kinds


def test_log_scan_finds_tracebacks(tmp_path: Path) -> None:
    (tmp_path / "ingest.log").write_text(
        json.dumps({"event": "started", "level": "info"})
        + "\n"
        + json.dumps(
            {
                "event": "rpc_failed",
                "level": "error",
                "method": "/usagebilling.ingest.v1.IngestService/GetEvent",
                "exception": "Traceback (most recent call last):\n  File x\nValueError: bad",
            }
        )
        + "\n"
        + json.dumps({"event": "relay_retry", "level": "warning"})
        + "\n"
    )
    (tmp_path / "meter.log").write_text(
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "    await fut\n"
        "asyncio.exceptions.CancelledError\n" + json.dumps({"event": "stopped", "level": "info"})
    )
    findings, notes = fuzz.scan_logs(tmp_path)
    assert [(f.service, f.what, f.method, f.count) for f in findings] == [
        (
            "ingest",
            "error rpc_failed: ValueError: bad",
            "/usagebilling.ingest.v1.IngestService/GetEvent",
            1,
        ),
        ("meter", "raw traceback: asyncio.exceptions.CancelledError", "", 1),
    ]
    assert [(n.service, n.what) for n in notes] == [("ingest", "warning relay_retry")]
