"""`make run`: the whole suite on this machine.

Uses DATABASE_URL and NATS_URL when both are set; otherwise starts a private
PostgreSQL and NATS under .run/ (kept across runs). Starts the three services,
makes sure a dev tenant and API key exist, writes .run/env, prints where
everything listens, and stops all it started on Ctrl-C or SIGTERM."""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

from services.common.config import DEFAULT_METRICS_PORTS
from tools.devstack import DEFAULT_BASE_DIR, DevStack
from tools.suite import DEFAULT_PORTS, SERVICES, Suite, create_tenant, key_works

RUN_DIR = DEFAULT_BASE_DIR


def _token(variable: str, file: str) -> str:
    """From the environment, else from .run/<file> (made once, kept across runs)."""
    if token := os.environ.get(variable):
        return token
    path = RUN_DIR / file
    if not path.exists():
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


def _outside_nats_credentials() -> dict[str, tuple[str, str]]:
    user = os.environ.get("USAGEBILLING_NATS_USER")
    password = os.environ.get("USAGEBILLING_NATS_PASSWORD")
    return {s: (user, password) for s in SERVICES} if user and password else {}


def _dev_key(suite: Suite) -> tuple[str, str]:
    path = RUN_DIR / "dev-tenant.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if key_works(suite, saved["api_key"]):
            return saved["tenant_id"], saved["api_key"]
    tenant_id, api_key = create_tenant(suite, "dev")
    path.write_text(json.dumps({"tenant_id": tenant_id, "api_key": api_key}))
    path.chmod(0o600)
    return tenant_id, api_key


def _write_env(suite: Suite, api_key: str) -> Path:
    path = RUN_DIR / "env"
    lines = {
        "DATABASE_URL": suite.database_url,
        "NATS_URL": suite.nats_url,
        "USAGEBILLING_ADMIN_TOKEN": suite.admin_token,
        "USAGEBILLING_API_KEY": api_key,
        **{f"USAGEBILLING_{s.upper()}_ADDR": suite.address(s) for s in SERVICES},
        **{f"USAGEBILLING_{s.upper()}_PORT": str(suite.ports[s]) for s in SERVICES},
    }
    path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    path.chmod(0o600)
    return path


def _banner(suite: Suite, tenant_id: str, api_key: str, env_path: Path) -> str:
    endpoints = "\n".join(
        f"  {s:<8} {suite.address(s)}    metrics http://127.0.0.1:{suite.metrics_ports[s]}/metrics"
        for s in ("ingest", "meter", "billing")
    )
    return f"""
usage-billing is running.

Endpoints (gRPC, plaintext; health and reflection on each):
{endpoints}

Admin token:   {suite.admin_token}
Dev tenant:    {tenant_id}
Dev API key:   {api_key}
Settings:      {env_path}    Logs: {suite.log_dir}/

Try it (another terminal):
  .venv/bin/python examples/quickstart.py

Ctrl-C stops everything.
"""


def main() -> int:
    RUN_DIR.mkdir(exist_ok=True)
    # A plain flag: a threading.Event set from a signal handler can deadlock
    # with the main thread waiting on it.
    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: stopping.append(signum))

    stack: DevStack | None = None
    database_url, nats_url = os.environ.get("DATABASE_URL"), os.environ.get("NATS_URL")
    if not (database_url and nats_url):
        stack = DevStack(RUN_DIR)
        database_url, nats_url = stack.start()
    ports = {
        s: int(os.environ.get(f"USAGEBILLING_{s.upper()}_PORT", DEFAULT_PORTS[s])) for s in SERVICES
    }
    suite = Suite(
        database_url,
        nats_url,
        RUN_DIR / "logs",
        _token("USAGEBILLING_ADMIN_TOKEN", "admin-token"),
        ports,
        metrics_ports=dict(DEFAULT_METRICS_PORTS),
        # One token per service (.run/<service>-token unless
        # USAGEBILLING_<SERVICE>_TOKEN is set): each acts for tenants only on
        # the methods services/common/service_identity.py gives it.
        service_tokens={
            s: _token(f"USAGEBILLING_{s.upper()}_TOKEN", f"{s}-token") for s in SERVICES
        },
        # Without a dev stack: USAGEBILLING_NATS_USER/PASSWORD for every service
        # when set (else the URL as is); with one, each service's own user.
        nats_credentials=None if stack is not None else _outside_nats_credentials(),
        die_with_parent=True,
    )
    try:
        suite.start()
        tenant_id, api_key = _dev_key(suite)
        print(_banner(suite, tenant_id, api_key, _write_env(suite, api_key)), flush=True)
        while not stopping:
            time.sleep(0.2)
            if dead := suite.dead():
                print(f"{', '.join(dead)} stopped unexpectedly; see {suite.log_dir}/", flush=True)
                return 1
        print("stopping...", flush=True)
        return 0
    except Exception as exc:
        print(f"make run failed: {exc}", file=sys.stderr)
        return 1
    finally:
        suite.stop()
        if stack is not None:
            stack.stop()
        print("stopped: nothing left running.", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
