"""Run a command with DATABASE_URL and NATS_URL pointing at a private stack.

    python -m tools.with_stack CMD [ARGS...]

When DATABASE_URL and NATS_URL are both set, CMD simply runs with them (exec).
Otherwise a DevStack starts in a fresh folder `.run/test-<pid>/`, CMD runs with
the two variables set, and afterwards, whatever happened (CMD failing, SIGINT,
SIGTERM, SIGHUP), the stack stops and the folder is removed. The exit status is
CMD's (128 + N when CMD died of signal N).

This is what `make test` runs: `python -m tools.with_stack python -m pytest -q`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import FrameType

from tools.devstack import (
    DEFAULT_BASE_DIR,
    NATS_USERS_ENV,
    DevStack,
    DevStackError,
    pid_alive,
)

# Signals that end the run: they are passed on to CMD, then the stack stops.
FORWARDED = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
# si_code of a signal the kernel sent, e.g. the terminal's SIGINT on Ctrl-C, which
# the whole foreground process group (CMD too) receives: no need to pass it on.
_SI_KERNEL = 0x80
# After this many ending signals, CMD is killed.
_KILL_AFTER = 3


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _log(message: str) -> None:
    print(f"with_stack: {message}", file=sys.stderr, flush=True)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signum)


def child_environment(
    database_url: str, nats_url: str, nats_users: Path | None = None
) -> dict[str, str]:
    """The environment for CMD: ours, pointed at the private stack (and, with
    `nats_users`, at the file of its NATS users, for the services' credentials)."""
    env = dict(os.environ)
    # A per-service database URL would bypass the private stack.
    for key in sorted(env):
        if key.startswith("USAGEBILLING_") and key.endswith("_DATABASE_URL"):
            _log(f"ignoring {key} (the private stack is used)")
            del env[key]
    env["DATABASE_URL"] = database_url
    env["NATS_URL"] = nats_url
    if nats_users is not None:
        env[NATS_USERS_ENV] = str(nats_users)
    return env


def remove_abandoned_runs() -> None:
    """Clean up the folders (and servers) of runs that were killed before they could."""
    for run_dir in sorted(DEFAULT_BASE_DIR.glob("test-*")):
        owner = run_dir.name.removeprefix("test-")
        if not owner.isdigit() or (int(owner) != os.getpid() and pid_alive(int(owner))):
            continue
        try:
            DevStack(run_dir).stop_leftovers()
        except DevStackError as exc:
            _log(f"leaving {run_dir} alone: {exc}")
            continue
        shutil.rmtree(run_dir, ignore_errors=True)
        _log(f"removed {run_dir}, left behind by a killed run")


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _run_child(argv: Sequence[str], env: Mapping[str, str], mask: Iterable[int]) -> int:
    """Run CMD with the ending signals blocked in this process, and pass them on.

    The signals are taken with sigtimedwait, which tells who sent them: one from
    the terminal has reached CMD already; one sent to this process alone (kill)
    is passed on. SIGCHLD ends the wait as soon as CMD exits.
    """

    def restore_mask() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    try:
        proc = subprocess.Popen(list(argv), env=dict(env), preexec_fn=restore_mask)
    except OSError as exc:
        _log(f"cannot run {argv[0]}: {exc}")
        return 127 if isinstance(exc, FileNotFoundError) else 126
    received = 0
    waited = {*FORWARDED, signal.SIGCHLD}
    while True:
        returncode = proc.poll()
        if returncode is not None:
            return _exit_status(returncode)
        info = signal.sigtimedwait(waited, 1.0)
        if info is None or info.si_signo == signal.SIGCHLD:
            continue
        received += 1
        name = signal.Signals(info.si_signo).name
        if received >= _KILL_AFTER:
            _log(f"{name} again: killing {argv[0]} (pid {proc.pid})")
            proc.kill()
        elif info.si_code == _SI_KERNEL:
            _log(f"{name} from the terminal: waiting for {argv[0]} to finish")
        else:
            _log(f"{name}: passing it on to {argv[0]} (pid {proc.pid})")
            proc.send_signal(info.si_signo)


def main(argv: Sequence[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    if not command:
        print(f"usage: {sys.executable} -m tools.with_stack CMD [ARGS...]", file=sys.stderr)
        return 2
    if os.environ.get("DATABASE_URL") and os.environ.get("NATS_URL"):
        _log("using DATABASE_URL and NATS_URL from the environment")
        try:
            os.execvp(command[0], command)
        except OSError as exc:
            _log(f"cannot run {command[0]}: {exc}")
            return 127 if isinstance(exc, FileNotFoundError) else 126

    run_dir = DEFAULT_BASE_DIR / f"test-{os.getpid()}"
    stack = DevStack(run_dir)
    # Until the child runs, an ending signal interrupts whatever we do (SIGINT
    # raises KeyboardInterrupt already); the finally block below cleans up.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupted)
    status = 1
    stopped = False
    try:
        remove_abandoned_runs()
        database_url, nats_url = stack.start()
        original_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {*FORWARDED, signal.SIGCHLD})
        environment = child_environment(database_url, nats_url, stack.nats_users_file)
        status = _run_child(command, environment, original_mask)
    except _Interrupted as exc:
        _log(f"{exc}: stopping")
        status = 128 + exc.signum
    except KeyboardInterrupt:
        _log("SIGINT: stopping")
        status = 128 + signal.SIGINT
    except DevStackError as exc:
        _log(f"could not start the private stack: {exc}")
        status = 1
    finally:
        # Nothing may interrupt the clean-up.
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            stack.stop()
            stopped = True
        except Exception as exc:
            _log(f"could not stop the private stack: {exc}; leaving {run_dir} in place")
        if stopped:
            shutil.rmtree(run_dir, ignore_errors=True)
    return status if stopped or status != 0 else 1


if __name__ == "__main__":
    sys.exit(main())
