"""The readiness watcher's rule, with dependencies that are plain functions:
ready after a good round, not ready only after `failures` bad rounds in a row,
a slow check counts as failed, a non-gating dependency is reported but does
not decide; and the settings it reads."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from services.common import readiness
from services.common.config import ConfigError, EnvReader
from services.common.metrics import REGISTRY
from services.common.readiness import Dependency, ReadinessWatcher


class Switch:
    """A dependency check that fails while `up` is false (or hangs while `hang`)."""

    def __init__(self) -> None:
        self.up = True
        self.hang = False
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(60)
        if not self.up:
            raise ConnectionRefusedError("down")


class Published:
    def __init__(self) -> None:
        self.values: list[bool] = []

    async def __call__(self, ready: bool) -> None:
        self.values.append(ready)


def _gauge(dependency: str) -> float | None:
    return REGISTRY.get_sample_value("usagebilling_ready", {"dependency": dependency})


async def test_flips_after_consecutive_failures_and_back_after_one_success() -> None:
    db, bus = Switch(), Switch()
    published = Published()
    watcher = ReadinessWatcher(
        [Dependency("unit-db", db), Dependency("unit-bus", bus)],
        published,
        interval=1,
        failures=2,
    )
    assert watcher.ready is False  # not ready before the first round
    assert await watcher.check_once() is True
    assert _gauge("unit-db") == 1

    db.up = False
    assert await watcher.check_once() is True  # one failed round: still ready
    assert watcher.errors.keys() == {"unit-db"}
    assert _gauge("unit-db") == 0
    assert await watcher.check_once() is False  # the second in a row flips it
    assert await watcher.check_once() is False

    db.up = True
    assert await watcher.check_once() is True
    assert watcher.errors == {}
    assert published.values == [True, True, False, False, True]

    # A failure between two good rounds restarts the count.
    bus.up = False
    assert await watcher.check_once() is True
    bus.up = True
    assert await watcher.check_once() is True
    bus.up = False
    assert await watcher.check_once() is True
    assert await watcher.check_once() is False


async def test_first_round_failing_stays_not_ready() -> None:
    db = Switch()
    db.up = False
    watcher = ReadinessWatcher([Dependency("unit-db", db)], Published(), interval=1, failures=3)
    assert await watcher.check_once() is False
    db.up = True
    assert await watcher.check_once() is True


async def test_a_check_that_does_not_answer_within_the_timeout_fails() -> None:
    slow = Switch()
    slow.hang = True
    watcher = ReadinessWatcher(
        [Dependency("unit-slow", slow)], Published(), interval=5, failures=1, timeout=0.2
    )
    started = asyncio.get_running_loop().time()
    assert await watcher.check_once() is False
    assert asyncio.get_running_loop().time() - started < 5  # bounded, not the 60 s hang
    assert "no answer within 0.2 s" in watcher.errors["unit-slow"]


async def test_a_non_gating_dependency_is_reported_but_does_not_decide() -> None:
    db, bus = Switch(), Switch()
    watcher = ReadinessWatcher(
        [Dependency("unit-db", db), Dependency("unit-bus2", bus, gating=False)],
        Published(),
        interval=1,
        failures=1,
    )
    bus.up = False
    assert await watcher.check_once() is True
    assert "unit-bus2" in watcher.errors
    assert _gauge("unit-bus2") == 0
    db.up = False
    assert await watcher.check_once() is False


async def test_run_checks_every_interval() -> None:
    db = Switch()
    published = Published()
    watcher = ReadinessWatcher([Dependency("unit-db", db)], published, interval=0.1)
    task = asyncio.create_task(watcher.run())
    await asyncio.sleep(1.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # About 11 rounds; a loaded machine may run fewer, never many more.
    assert 3 <= db.calls <= 12
    assert published.values and all(published.values)


def test_settings_defaults_and_limits() -> None:
    defaults = readiness.read(EnvReader({}))
    assert defaults == readiness.ReadinessSettings(timedelta(seconds=2), 2, True)
    reader = EnvReader(
        {
            readiness.INTERVAL: "500ms",
            readiness.FAILURES: "3",
            readiness.REQUIRES_NATS: "false",
        }
    )
    assert readiness.read(reader) == readiness.ReadinessSettings(
        timedelta(milliseconds=500), 3, False
    )
    reader.check()
    bad = EnvReader({readiness.INTERVAL: "10ms", readiness.FAILURES: "0"})
    readiness.read(bad)
    with pytest.raises(ConfigError) as caught:
        bad.check()
    assert readiness.INTERVAL in str(caught.value)
    assert readiness.FAILURES in str(caught.value)
