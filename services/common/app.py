"""Runs one service: logging, PostgreSQL pool and migrations, NATS, the gRPC
server and the service's background tasks; stops it all gracefully on
SIGINT/SIGTERM. Each service's __main__ supplies only its wiring."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from services.common import db, http_gateway, jetstream, logs, metrics, paging, tls, tracing
from services.common import readiness as readiness_watch
from services.common.auth import Authenticator, KeyResolver
from services.common.config import CommonSettings, ConfigError
from services.common.grpc_server import GrpcServer, Registration

log = logs.get_logger(__name__)


@dataclass
class Runtime:
    """What a service's wiring gets to build its parts from."""

    settings: CommonSettings
    pool: asyncpg.Pool
    nc: Any
    js: Any


class Worker(Protocol):
    async def run(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class Wiring:
    registrations: list[Registration]
    resolver: KeyResolver
    # POST routes of the HTTP gateway beyond the RPCs (ingest's Dodo-shaped
    # /events/ingest), each given the gateway to call the RPCs through.
    http_routes: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    # Long-running loops (relay, scheduler, gauges); cancelled on shutdown
    # after the gRPC server stopped taking calls.
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    # Loops that hold work in flight (the consumer): on shutdown they are asked
    # to stop, and given a few seconds to commit and ack what they hold.
    workers: list[Worker] = field(default_factory=list)
    # Run last, in order (close channels and the like).
    cleanup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


Wire = Callable[[Runtime], Awaitable[Wiring]]


def load_or_exit(loader: Callable[[], Any]) -> Any:
    try:
        return loader()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from exc


async def migrate_only(settings: CommonSettings, migrations: Path) -> None:
    pool = await db.create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        applied = await db.migrate(pool, settings.service, migrations)
        log.info("migrations_done", schema=settings.service, applied=applied)
    finally:
        await pool.close()


async def _wait_for_migrations(pool: asyncpg.Pool, settings: CommonSettings, path: Path) -> None:
    while pending := await db.pending_migrations(pool, settings.service, path):
        log.info("waiting_for_migrations", schema=settings.service, pending=pending)
        await asyncio.sleep(2)


async def serve(settings: CommonSettings, migrations: Path, wire: Wire) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(logs.asyncio_exception_handler)
    if tracing.configure(settings.service):
        log.info("tracing_on", service=settings.service)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    pool = await db.create_pool(settings.database_url)
    if settings.auto_migrate:
        await db.migrate(pool, settings.service, migrations)
    else:
        await _wait_for_migrations(pool, settings, migrations)
    nc = await jetstream.connect(
        settings.nats_url,
        name=settings.service,
        tls=tls.nats_context(settings.tls, settings.nats_url),
        user=settings.nats_user,
        password=settings.nats_password,
    )
    js = nc.jetstream()
    await jetstream.ensure_streams(
        js, replicas=settings.stream_replicas, names=jetstream.STREAMS_OF[settings.service]
    )

    paging.configure(settings.service_token, settings.service)
    wiring = await wire(Runtime(settings=settings, pool=pool, nc=nc, js=js))
    server = GrpcServer(
        settings.host,
        settings.port,
        wiring.registrations,
        Authenticator(settings.admin_token_sha256, settings.caller_token_sha256, wiring.resolver),
        tls=settings.tls,
    )
    gateway = None
    if settings.http_port:
        gateway = http_gateway.Gateway(
            [r.service_name for r in wiring.registrations], settings.host, settings.http_port
        )
        gateway.add_routes(wiring.http_routes)
        server.add_local_socket(gateway.grpc_target)
    # Not ready until the first round of checks passes (at once, as both were
    # just reached); liveness is SERVING from the start.
    readiness = await readiness_watch.create(
        settings.service, settings.database_url, nc, settings.readiness, server.set_ready
    )
    await server.start(ready=False)
    if gateway is not None:
        await gateway.start()
    metrics.serve(settings.service, settings.host, settings.metrics_port)
    _tune_garbage_collector()
    tasks = [asyncio.create_task(run()) for run in [readiness.run, *wiring.background]]
    working = [asyncio.create_task(worker.run()) for worker in wiring.workers]

    def failed(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("background_task_failed", error=repr(task.exception()))
            stop.set()

    for task in [*tasks, *working]:
        task.add_done_callback(failed)
    log.info("serving", service=settings.service, address=server.address)
    await stop.wait()
    log.info("stopping", service=settings.service)
    if gateway is not None:
        await _bounded(gateway.stop(), "http_stop", settings.shutdown_grace.total_seconds() + 1)
    await server.stop(settings.shutdown_grace.total_seconds())
    for worker in wiring.workers:
        await worker.stop()
    if working:
        await asyncio.wait(working, timeout=5)
    # What did not finish is cancelled; its uncommitted work is redone by
    # whoever takes over (nothing acknowledged is lost).
    for task in [*tasks, *working]:
        task.cancel()
    await asyncio.gather(*tasks, *working, return_exceptions=True)
    # Every step is bounded: a dependency that is down must not hang the exit.
    for close in wiring.cleanup:
        await _bounded(close(), "cleanup")
    await _bounded(readiness.close(), "readiness_close")
    # Not nc.drain(): it waits for each subscription's unprocessed messages,
    # which the stopped consumer will never take, and when cut short it leaves
    # a cancelled future whose traceback asyncio prints. Every publish was
    # awaited to its JetStream ack, and what was fetched but not acked is
    # redelivered, so a flush and a close lose nothing.
    await _bounded(nc.flush(), "nats_flush")
    await _bounded(nc.close(), "nats_close")
    if not await _bounded(pool.close(), "pool_close"):
        pool.terminate()
    tracing.shutdown()  # exports the spans still buffered
    log.info("stopped", service=settings.service)


def _tune_garbage_collector() -> None:
    """The services allocate many short-lived objects per batch (events, rows,
    decimals) and few reference cycles: with the default thresholds the cyclic
    collector took about a tenth of meter's CPU. Objects alive after start-up
    (modules, descriptors, pools) are frozen out of every later collection."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


async def _bounded(step: Awaitable[Any], name: str, seconds: float = 3.0) -> bool:
    try:
        await asyncio.wait_for(step, seconds)
    except Exception as exc:
        log.warning("shutdown_step_failed", step=name, error=repr(exc))
        return False
    return True


def main(argv: list[str], settings: CommonSettings, migrations: Path, wire: Wire) -> None:
    """`python -m services.<name> [serve|migrate]`."""
    logs.configure(settings.log_level, settings.log_format)
    command = argv[1] if len(argv) > 1 else "serve"
    if command == "migrate":
        asyncio.run(migrate_only(settings, migrations))
    elif command == "serve":
        try:
            asyncio.run(serve(settings, migrations, wire))
        except ConfigError as exc:  # found only when serving starts (a busy port)
            print(exc, file=sys.stderr)
            raise SystemExit(2) from exc
    else:
        print(f"usage: python -m services.{settings.service} [serve|migrate]", file=sys.stderr)
        raise SystemExit(2)
