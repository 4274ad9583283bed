"""Readiness: whether this replica can reach what it needs, PostgreSQL and NATS.

A watcher checks each dependency every USAGEBILLING_READINESS_INTERVAL (2 s),
each check bounded by that same interval, and publishes the result to the gRPC
health service (GrpcServer.set_ready): "readiness", "" and every registered
service name are SERVING after a round in which every dependency answered, and
NOT_SERVING after USAGEBILLING_READINESS_FAILURES (2) rounds in a row in which
one did not; one good round makes the replica ready again. So an outage shows
within about (failures + 1) x interval (6 s by default), and one slow answer
does not make the replica flap. "liveness" is not touched: it answers while the
event loop does.

PostgreSQL: `SELECT 1` on a connection of the watcher's own. NATS: the
connection is up and JetStream answers STREAM.INFO for the streams the service
uses. With USAGEBILLING_READINESS_REQUIRES_NATS=false, NATS is still checked,
logged and exported but does not make the replica NOT_SERVING (ingest's outbox
can accept events through a NATS outage; see the README's health section).

The services never check one another here: a replica that is fine should not
leave the load balancer because another service is down (that would cascade).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from services.common import db, jetstream, metrics
from services.common.logs import get_logger

if TYPE_CHECKING:
    from services.common.config import EnvReader

log = get_logger(__name__)

INTERVAL = "USAGEBILLING_READINESS_INTERVAL"
FAILURES = "USAGEBILLING_READINESS_FAILURES"
REQUIRES_NATS = "USAGEBILLING_READINESS_REQUIRES_NATS"


@dataclass(frozen=True)
class ReadinessSettings:
    """How often the dependencies are checked (each check is bounded by the
    same interval), after how many failed rounds in a row the replica is not
    ready, and whether NATS being unreachable counts (it is always checked)."""

    interval: timedelta = timedelta(seconds=2)
    failures: int = 2
    requires_nats: bool = True


def read(reader: EnvReader) -> ReadinessSettings:
    default = ReadinessSettings()
    interval = reader.duration(INTERVAL, default.interval, maximum=timedelta(minutes=1))
    if interval < timedelta(milliseconds=100):
        reader.errors.append(f"{INTERVAL}: at least 100ms")
        interval = default.interval
    return ReadinessSettings(
        interval=interval,
        failures=reader.integer(FAILURES, default.failures, minimum=1, maximum=100),
        requires_nats=reader.boolean(REQUIRES_NATS, default.requires_nats),
    )


# Raises (anything) when the dependency cannot be reached; bounded by the watcher.
Check = Callable[[], Awaitable[None]]
Publish = Callable[[bool], Awaitable[None]]


@dataclass(frozen=True)
class Dependency:
    """A dependency the watcher checks. When `gating` is false its state is
    still checked, logged and exported (usagebilling_ready), but does not make
    the replica NOT_SERVING."""

    name: str
    check: Check
    gating: bool = True


def postgres_check(pool: Any) -> Check:
    """`SELECT 1` through `pool`: give it a pool of its own (one connection),
    so that the check does not queue behind the service's own queries when the
    service pool is busy (a loaded replica is not an unreachable database). The
    pool replaces a connection the server closed, so the check also proves
    that a new connection can be made once the old one is gone."""

    async def check() -> None:
        await pool.fetchval("SELECT 1")

    return check


def nats_check(nc: Any, js: Any, streams: Sequence[str]) -> Check:
    """The NATS connection is up and JetStream answers for each of `streams`
    (STREAM.INFO, which each service's NATS user may already call since it
    creates the streams at start). With no streams, a PING/PONG round trip.
    `js` should carry a short request timeout (nc.jetstream(timeout=...)), so
    that a request gives up and cleans up by itself."""

    async def check() -> None:
        if not nc.is_connected:
            raise ConnectionError("not connected to NATS")
        if not streams:
            await nc.flush()
        for stream in streams:
            await js.stream_info(stream)

    return check


class ReadinessWatcher:
    """Checks the dependencies every `interval` seconds and publishes readiness:
    ready after a round where every gating dependency answered, not ready after
    `failures` consecutive rounds where one did not (unready until the first
    good round)."""

    def __init__(
        self,
        dependencies: Sequence[Dependency],
        publish: Publish,
        *,
        interval: float,
        failures: int = 2,
        timeout: float | None = None,
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if interval <= 0 or failures < 1:
            raise ValueError("interval must be positive and failures at least 1")
        self._dependencies = list(dependencies)
        self._publish = publish
        self._interval = interval
        self._failures = failures
        self._timeout = interval if timeout is None else timeout
        self._close = close
        self._failed_rounds = 0
        self._errors: dict[str, str] = {}
        self.ready = False

    @property
    def errors(self) -> dict[str, str]:
        """The dependencies whose last check failed, with the error (a copy)."""
        return dict(self._errors)

    async def check_once(self) -> bool:
        """Runs one round of checks, publishes the resulting state, returns it."""
        results = await asyncio.gather(*(self._check(d) for d in self._dependencies))
        failing: list[str] = []
        for dependency, error in zip(self._dependencies, results, strict=True):
            metrics.READY.labels(dependency.name).set(0 if error else 1)
            was = self._errors.get(dependency.name)
            if error is None:
                if was is not None:
                    log.info("dependency_reachable", dependency=dependency.name)
                self._errors.pop(dependency.name, None)
                continue
            if was is None:
                log.warning("dependency_unreachable", dependency=dependency.name, error=error)
            self._errors[dependency.name] = error
            if dependency.gating:
                failing.append(dependency.name)
        self._failed_rounds = self._failed_rounds + 1 if failing else 0
        ready = self.ready
        if not failing:
            ready = True
        elif self._failed_rounds >= self._failures:
            ready = False
        if ready != self.ready:
            if ready:
                log.info("ready")
            else:
                log.warning("not_ready", failing=failing, rounds=self._failed_rounds)
        self.ready = ready
        # Published every round, not only on a change: cheap, and the health
        # service ignores it once graceful shutdown has begun.
        await self._publish(ready)
        return ready

    async def run(self) -> None:
        """Checks until cancelled, a round every `interval` seconds."""
        while True:
            started = time.monotonic()
            await self.check_once()
            await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - started)))

    async def close(self) -> None:
        """Releases what the checks hold (the check pool)."""
        if self._close is not None:
            await self._close()

    async def _check(self, dependency: Dependency) -> str | None:
        """None when `dependency` answered within the timeout, else the error."""
        try:
            async with asyncio.timeout(self._timeout):
                await dependency.check()
        except TimeoutError:
            return f"no answer within {self._timeout:g} s"
        except Exception as exc:
            return repr(exc)
        return None


async def create(
    service: str, database_url: str, nc: Any, settings: ReadinessSettings, publish: Publish
) -> ReadinessWatcher:
    """The watcher of `service`: PostgreSQL through a one-connection pool of
    its own, NATS through `nc` with the streams the service uses
    (jetstream.STREAMS_OF: ingest's relay publishes to EVENTS, meter consumes
    it, billing publishes to BILLING).
    close() the watcher at shutdown."""
    timeout = settings.interval.total_seconds()
    # No minimum size: the pool would keep reconnecting (and logging each
    # failure) through an outage by itself; the checks reconnect every round.
    pool = await db.create_pool(database_url, min_size=0, max_size=1)
    dependencies = [
        Dependency("postgres", postgres_check(pool)),
        Dependency(
            "nats",
            nats_check(nc, nc.jetstream(timeout=timeout), jetstream.STREAMS_OF.get(service, ())),
            gating=settings.requires_nats,
        ),
    ]
    return ReadinessWatcher(
        dependencies,
        publish,
        interval=timeout,
        failures=settings.failures,
        close=pool.close,
    )
