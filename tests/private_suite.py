"""The services on a PostgreSQL and NATS of their own, for tests that must not
share them: tests that kill or pause services, change their settings, or count
what they do (another test's events, folded by the shared meter, would change
the count). A module-scoped fixture wraps it:

    @pytest.fixture(scope="module")
    def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
        with private_suite(tmp_path_factory, "hooks", {"USAGEBILLING_...": "..."}) as s:
            yield s
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator, Mapping

import pytest

from tools.devstack import DevStack
from tools.suite import Suite


@contextlib.contextmanager
def private_suite(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    env: Mapping[str, str] | None = None,
    *,
    timeout: float = 60,
) -> Iterator[Suite]:
    """Its own stack and the three services with `env` (billing's scheduler off
    unless `env` turns it on), healthy within `timeout` seconds; all stopped
    after, a service a test left paused (SIGSTOP) included. The suite's
    database_url and nats_url are the stack's."""
    stack = DevStack(tmp_path_factory.mktemp(f"{name}-stack"))
    database_url, nats_url = stack.start()
    try:
        suite = Suite(
            database_url,
            nats_url,
            tmp_path_factory.mktemp(f"{name}-logs"),
            extra_env={"USAGEBILLING_SCHEDULER_ENABLED": "false", **(env or {})},
        )
        try:
            suite.start(timeout=timeout)
            yield suite
        finally:
            for process in suite.processes.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGCONT)
            suite.stop()
    finally:
        stack.stop()
