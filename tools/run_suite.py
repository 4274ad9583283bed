"""`make run`: the whole suite on this machine.

Uses DATABASE_URL and NATS_URL when both are set; otherwise starts a private
PostgreSQL and NATS under .run/ (kept across runs). Starts the three services,
makes sure a dev tenant and API key exist, writes .run/env, prints where
everything listens, and stops all it started on Ctrl-C or SIGTERM.

While it runs it keeps the suite up: a service that exits is started again
(after 1 s, then 2, 4, ... up to 30 s while it keeps failing), a private
PostgreSQL or NATS that exits is started again on its port, and an outside
PostgreSQL or NATS that stops answering is reported by name (and again when it
is back). Each of these is one line on the terminal.

What stops it before anything starts is one line, not a traceback: another
`make run` on the same folder, or a gRPC port in use (naming its setting).
Metrics ports are 9091-9093 when free, else free ones (the banner says which)."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from services.common.config import DEFAULT_HTTP_PORTS, DEFAULT_METRICS_PORTS
from tools.devstack import DEFAULT_BASE_DIR, DevStack, free_port, port_busy
from tools.suite import DEFAULT_PORTS, SERVICES, Suite, create_tenant, key_works

RESTART_BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
# A service up this long has recovered: its next crash waits 1 s again.
HEALTHY_AFTER = 60.0
DEPENDENCY_CHECK_EVERY = 2.0


class RunError(Exception):
    """Stops `make run` with one line (the message), no traceback."""


def _say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def _token(run_dir: Path, variable: str, file: str) -> str:
    """From the environment, else from <run_dir>/<file> (made once, kept across runs)."""
    if token := os.environ.get(variable):
        return token
    path = run_dir / file
    if not path.exists():
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


def _outside_nats_credentials() -> dict[str, tuple[str, str]]:
    user = os.environ.get("USAGEBILLING_NATS_USER")
    password = os.environ.get("USAGEBILLING_NATS_PASSWORD")
    return {s: (user, password) for s in SERVICES} if user and password else {}


def _lock(run_dir: Path) -> IO[str]:
    """Holds <run_dir>/run.lock while this `make run` lives (the kernel lets go
    when the process ends, however it ends)."""
    handle = (run_dir / "run.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        raise RunError(
            f"already running on {run_dir} (pid {owner}):"
            " use that one, or stop it (Ctrl-C in its terminal) first"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _grpc_ports() -> dict[str, int]:
    """The services' gRPC ports (USAGEBILLING_<SERVICE>_PORT or the defaults),
    each free, else one line naming the port and the setting."""
    ports = {}
    for service in SERVICES:
        setting = f"USAGEBILLING_{service.upper()}_PORT"
        raw = os.environ.get(setting, str(DEFAULT_PORTS[service]))
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            raise RunError(f"{setting}={raw!r} is not a port number (1-65535)")
        port = int(raw)
        if port_busy(port):
            raise RunError(
                f"port {port} ({service} gRPC, {setting}) is in use by another process:"
                f" stop it, or set {setting} to a free port"
            )
        ports[service] = port
    if len(set(ports.values())) < len(ports):
        raise RunError(f"the services' gRPC ports must differ: {ports}")
    return ports


def _metrics_ports(
    taken: set[int], defaults: dict[str, int] = DEFAULT_METRICS_PORTS, what: str = "metrics"
) -> tuple[dict[str, int], list[str]]:
    """9091/9092/9093 where free (they are also Pushgateway's, Kafka's and
    Alertmanager's defaults), else a free port; and a note for each moved one.
    The HTTP/JSON ports likewise (8081-8083)."""
    ports: dict[str, int] = {}
    notes = []
    for service in ("ingest", "meter", "billing"):
        default = defaults[service]
        port = default
        if default in taken or port_busy(default):
            port = free_port()
            while port in taken:
                port = free_port()
            notes.append(f"{service} {what}: {default} is in use, took {port}")
        taken.add(port)
        ports[service] = port
    return ports, notes


def _dev_key(run_dir: Path, suite: Suite) -> tuple[str, str]:
    path = run_dir / "dev-tenant.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if key_works(suite, saved["api_key"]):
            return saved["tenant_id"], saved["api_key"]
    tenant_id, api_key = create_tenant(suite, "dev")
    path.write_text(json.dumps({"tenant_id": tenant_id, "api_key": api_key}))
    path.chmod(0o600)
    return tenant_id, api_key


def _write_env(run_dir: Path, suite: Suite, api_key: str) -> Path:
    path = run_dir / "env"
    lines = {
        "DATABASE_URL": suite.database_url,
        "NATS_URL": suite.nats_url,
        "USAGEBILLING_ADMIN_TOKEN": suite.admin_token,
        "USAGEBILLING_API_KEY": api_key,
        **{f"USAGEBILLING_{s.upper()}_ADDR": suite.address(s) for s in SERVICES},
        **{f"USAGEBILLING_{s.upper()}_PORT": str(suite.ports[s]) for s in SERVICES},
        **{f"USAGEBILLING_{s.upper()}_HTTP_URL": suite.http_url(s) for s in SERVICES},
        **{
            f"USAGEBILLING_{s.upper()}_METRICS_URL": f"http://127.0.0.1:{suite.metrics_ports[s]}/metrics"
            for s in SERVICES
        },
    }
    path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    path.chmod(0o600)
    return path


def _banner(suite: Suite, tenant_id: str, api_key: str, env_path: Path, notes: list[str]) -> str:
    endpoints = "\n".join(
        f"  {s:<8} {suite.address(s)}    HTTP/JSON {suite.http_url(s)}"
        f"    metrics http://127.0.0.1:{suite.metrics_ports[s]}/metrics"
        for s in ("ingest", "meter", "billing")
    )
    moved = "".join(f"  ({note})\n" for note in notes)
    return f"""
usage-billing is running.

Endpoints (gRPC, plaintext; health and reflection on each; HTTP/JSON in the
Connect protocol, OpenAPI at /openapi.json):
{endpoints}
{moved}
Admin token:   {suite.admin_token}
Dev tenant:    {tenant_id}
Dev API key:   {api_key}
Settings:      {env_path}    Logs: {suite.log_dir}/

Try it (another terminal):
  .venv/bin/python examples/quickstart.py

Ctrl-C stops everything.
"""


def _last_line(path: Path) -> str:
    """The last line of a log, shortened, to say why a service stopped."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 4096))
            lines = handle.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


@dataclass
class Restarts:
    """Backoff for one thing that keeps stopping."""

    count: int = 0
    due: float | None = None  # when to start it again
    started: float = field(default_factory=time.monotonic)

    def schedule(self) -> float:
        if time.monotonic() - self.started >= HEALTHY_AFTER:
            self.count = 0
        delay = RESTART_BACKOFF[min(self.count, len(RESTART_BACKOFF) - 1)]
        self.count += 1
        self.due = time.monotonic() + delay
        return delay

    def ready(self) -> bool:
        return self.due is not None and time.monotonic() >= self.due

    def done(self) -> None:
        self.due = None
        self.started = time.monotonic()


def _address(url: str, default_port: int) -> tuple[str, int] | None:
    """(host, port) of the first server of a URL, or None (a Unix socket, or
    a host given in the query, say): then it is not probed."""
    parts = urlsplit(url.split(",")[0])
    try:
        port = parts.port or default_port
    except ValueError:
        return None
    return (parts.hostname, port) if parts.hostname else None


def _reachable(address: tuple[str, int]) -> str | None:
    """None when a TCP connection to `address` opens, else why not."""
    try:
        socket.create_connection(address, timeout=2).close()
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


@dataclass
class Watch:
    """Keeps the suite up (see the module's docstring); `check()` now and then."""

    suite: Suite
    stack: DevStack | None
    services: dict[str, Restarts] = field(default_factory=dict)
    servers: dict[str, Restarts] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    next_probe: float = 0.0

    def check(self) -> None:
        self._services()
        if self.stack is not None:
            self._private_servers(self.stack)
        if time.monotonic() >= self.next_probe:
            self.next_probe = time.monotonic() + DEPENDENCY_CHECK_EVERY
            self._probe_servers()

    def _services(self) -> None:
        for service in SERVICES:
            state = self.services.setdefault(service, Restarts())
            if state.due is None:
                process = self.suite.processes[service]
                if process.poll() is None:
                    continue
                log = self.suite.log_dir / f"{service}.log"
                delay = state.schedule()
                _say(
                    f"{service} exited (code {process.returncode}); starting it again in"
                    f" {delay:.0f} s (restart {state.count}). Last log line ({log}):"
                    f" {_last_line(log)}"
                )
            elif state.ready():
                self.suite.start_service(service)
                state.done()
                _say(f"{service} started again (pid {self.suite.processes[service].pid})")

    def _private_servers(self, stack: DevStack) -> None:
        restart: dict[str, Callable[[], None]] = {
            "PostgreSQL": stack.restart_postgres,
            "NATS": stack.restart_nats,
        }
        dead = stack.dead_servers()
        for name, start in restart.items():
            state = self.servers.setdefault(name, Restarts())
            if state.due is None and name in dead:
                delay = state.schedule()
                where = stack.pg_log if name == "PostgreSQL" else stack.nats_log
                _say(
                    f"the private {name} exited; starting it again in {delay:.0f} s"
                    f" (restart {state.count}; log {where})"
                )
            elif state.ready():
                try:
                    start()
                except Exception as exc:  # reported, tried again
                    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    delay = state.schedule()
                    _say(
                        f"the private {name} did not start: {first}; trying again in {delay:.0f} s"
                    )
                else:
                    state.done()
                    _say(f"the private {name} runs again")

    def _probe_servers(self) -> None:
        targets = {
            "PostgreSQL": ("DATABASE_URL", _address(self.suite.database_url, 5432)),
            "NATS": ("NATS_URL", _address(self.suite.nats_url, 4222)),
        }
        for name, (setting, address) in targets.items():
            if address is None:
                continue
            problem = _reachable(address)
            where = f"{name} at {address[0]}:{address[1]}"
            source = "private" if self.stack is not None else setting
            if problem and name not in self.down:
                self.down.add(name)
                _say(f"{where} ({source}) does not answer: {problem}")
            elif not problem and name in self.down:
                self.down.discard(name)
                _say(f"{where} ({source}) answers again")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.run_suite", description=__doc__)
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=DEFAULT_BASE_DIR,
        help="where the private servers' data, tokens, settings and logs live (default .run/)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    run_dir: Path = _arguments(argv).run_dir.resolve()
    # A plain flag: a threading.Event set from a signal handler can deadlock
    # with the main thread waiting on it.
    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: stopping.append(signum))

    stack: DevStack | None = None
    suite: Suite | None = None
    lock: IO[str] | None = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock(run_dir)
        ports = _grpc_ports()
        metrics_ports, notes = _metrics_ports(set(ports.values()))
        http_ports, http_notes = _metrics_ports(
            {*ports.values(), *metrics_ports.values()}, DEFAULT_HTTP_PORTS, "HTTP"
        )
        notes += http_notes
        database_url, nats_url = os.environ.get("DATABASE_URL"), os.environ.get("NATS_URL")
        if not (database_url and nats_url):
            stack = DevStack(run_dir)
            database_url, nats_url = stack.start()
        suite = Suite(
            database_url,
            nats_url,
            run_dir / "logs",
            _token(run_dir, "USAGEBILLING_ADMIN_TOKEN", "admin-token"),
            ports,
            metrics_ports=metrics_ports,
            http_ports=http_ports,
            # One token per service (<run_dir>/<service>-token unless
            # USAGEBILLING_<SERVICE>_TOKEN is set): each acts for tenants only on
            # the methods services/common/service_identity.py gives it.
            service_tokens={
                s: _token(run_dir, f"USAGEBILLING_{s.upper()}_TOKEN", f"{s}-token")
                for s in SERVICES
            },
            # Without a dev stack: USAGEBILLING_NATS_USER/PASSWORD for every service
            # when set (else the URL as is); with one, each service's own user.
            nats_credentials=None if stack is not None else _outside_nats_credentials(),
            die_with_parent=True,
        )
        suite.start()
        tenant_id, api_key = _dev_key(run_dir, suite)
        env_path = _write_env(run_dir, suite, api_key)
        print(_banner(suite, tenant_id, api_key, env_path, notes), flush=True)
        watch = Watch(suite, stack)
        while not stopping:
            time.sleep(0.2)
            watch.check()
        print("stopping...", flush=True)
        return 0
    except RunError as exc:
        print(f"make run: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # one line; the logs have the rest
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"make run failed: {first}", file=sys.stderr, flush=True)
        return 1
    finally:
        started = suite is not None or stack is not None
        if suite is not None:
            suite.stop()
        if stack is not None:
            with contextlib.suppress(Exception):
                stack.stop()
        if lock is not None:
            lock.close()
        if started:
            print("stopped: nothing left running.", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
