"""`make run` (tools/run_suite.py) as a user meets it, with real processes: one
line for a busy port or a second run, free metrics ports when 9091-9093 are
taken, and a suite kept up when a service, PostgreSQL or NATS dies."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tools.devstack import DevStack, free_port, pid_alive, port_busy

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]
BANNER_END = "Ctrl-C stops everything."
# Generous: three services and maybe a private stack on a loaded 2-core machine.
START_WITHIN = 240.0
RECOVER_WITHIN = 180.0


class Run:
    """`python -m tools.run_suite --run-dir <dir>` with its output collected."""

    def __init__(self, run_dir: Path, env: dict[str, str]) -> None:
        self.run_dir = run_dir
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tools.run_suite", "--run-dir", str(run_dir)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float, after: int = 0) -> re.Match[str]:
        """The first line from `after` on that matches `pattern`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[after:]:
                    if found := re.search(pattern, line):
                        return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no line matching {pattern!r} in {timeout} s; output:\n" + self.output()
                    )
                self._changed.wait(min(left, 1.0))

    def output(self) -> str:
        return "\n".join(self.lines)

    def child(self, fragment: str) -> int:
        """The pid of run_suite's child whose command line holds `fragment`."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            parent = int(stat[stat.rfind(")") + 2 :].split()[1])
            if parent == self.process.pid and fragment in command and pid_alive(int(entry.name)):
                return int(entry.name)
        raise AssertionError(f"no child of run_suite runs {fragment!r}")

    def interrupt(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("USAGEBILLING_") and k not in ("DATABASE_URL", "NATS_URL")
    }
    ports = {"INGEST": free_port(), "METER": free_port(), "BILLING": free_port()}
    env.update({f"USAGEBILLING_{s}_PORT": str(p) for s, p in ports.items()})
    env.update(extra)
    return env


def _one_line_error(run_dir: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tools.run_suite", "--run-dir", str(run_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@contextlib.contextmanager
def _listening(port: int | None = None) -> Iterator[int]:
    """A socket listening on `port` (a free one if None) while the block runs;
    nothing when something else already listens there."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(("127.0.0.1", port or free_port()))
            sock.listen()
        except OSError:
            assert port is not None and port_busy(port)
        yield port or sock.getsockname()[1]
    finally:
        sock.close()


def _serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="liveness"), timeout=10
            )
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def _eventually_serving(port: int) -> None:
    deadline = time.monotonic() + RECOVER_WITHIN
    while not _serving(port):
        assert time.monotonic() < deadline, f"nothing serving on {port}"
        time.sleep(0.5)


def _nothing_left(run_dir: Path) -> None:
    left = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and pid_alive(int(entry.name)):
            with contextlib.suppress(OSError):
                if str(run_dir).encode() in (entry / "cmdline").read_bytes():
                    left.append(int(entry.name))
    assert left == []


def test_a_busy_grpc_port_is_one_line_naming_its_setting(tmp_path: Path) -> None:
    with _listening() as port:
        line = _one_line_error(tmp_path / "run", _env(USAGEBILLING_METER_PORT=str(port)))
    assert line == (
        f"make run: port {port} (meter gRPC, USAGEBILLING_METER_PORT) is in use by another"
        " process: stop it, or set USAGEBILLING_METER_PORT to a free port"
    )
    line = _one_line_error(tmp_path / "run", _env(USAGEBILLING_METER_PORT="x"))
    assert line == "make run: USAGEBILLING_METER_PORT='x' is not a port number (1-65535)"


def test_make_run_keeps_the_suite_up(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = _env()
    meter_port = int(env["USAGEBILLING_METER_PORT"])
    # 9091 taken (as by a Pushgateway): ingest's metrics go elsewhere, and say so.
    with _listening(9091):
        run = Run(run_dir, env)
        try:
            run.wait_for(re.escape(BANNER_END), START_WITHIN)
            ingest = run.wait_for(r"^  ingest .* metrics http://127\.0\.0\.1:(\d+)/metrics$", 1)
            assert int(ingest[1]) != 9091
            run.wait_for(rf"^  \(ingest metrics: 9091 is in use, took {ingest[1]}\)$", 1)

            # A second make run on the same folder: one line, the first one untouched.
            line = _one_line_error(run_dir, _env())
            assert line.startswith(f"make run: already running on {run_dir} (pid ")

            # A service that dies is started again.
            mark = len(run.lines)
            os.kill(run.child("services.meter"), signal.SIGKILL)
            run.wait_for(r"meter exited \(code -9\); starting it again in 1 s", 30, mark)
            run.wait_for(r"meter started again", RECOVER_WITHIN, mark)
            _eventually_serving(meter_port)

            # So are the private NATS and PostgreSQL, by name.
            mark = len(run.lines)
            os.kill(run.child("nats-server"), signal.SIGKILL)
            run.wait_for(r"the private NATS exited; starting it again", 30, mark)
            run.wait_for(r"the private NATS runs again", RECOVER_WITHIN, mark)

            mark = len(run.lines)
            postmaster = (run_dir / "pg" / "data" / "postmaster.pid").read_text().split()[0]
            os.kill(int(postmaster), signal.SIGKILL)
            run.wait_for(r"the private PostgreSQL exited; starting it again", 30, mark)
            run.wait_for(r"the private PostgreSQL runs again", RECOVER_WITHIN, mark)
            _eventually_serving(meter_port)
            assert run.process.poll() is None
        finally:
            code = run.interrupt()
            if code != 0:
                DevStack(run_dir).stop_leftovers()
    assert code == 0, run.output()
    assert run.lines[-1] == "stopped: nothing left running."
    assert "Traceback" not in run.output()
    _nothing_left(run_dir)


def test_an_outside_server_that_stops_answering_is_named(tmp_path: Path) -> None:
    stack = DevStack(tmp_path / "outside")
    database_url, nats_url = stack.start()
    run_dir = tmp_path / "run"
    run = Run(run_dir, _env(DATABASE_URL=database_url, NATS_URL=nats_url))
    try:
        run.wait_for(re.escape(BANNER_END), START_WITHIN)
        nats_port = nats_url.rsplit(":", 1)[1]
        mark = len(run.lines)
        stack.stop_nats()
        run.wait_for(rf"NATS at 127\.0\.0\.1:{nats_port} \(NATS_URL\) does not answer", 60, mark)
        stack.restart_nats()
        run.wait_for(rf"NATS at 127\.0\.0\.1:{nats_port} \(NATS_URL\) answers again", 60, mark)
        assert run.process.poll() is None
    finally:
        code = run.interrupt()
        stack.stop()
    assert code == 0, run.output()
    _nothing_left(run_dir)
