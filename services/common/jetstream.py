"""NATS JetStream: connection and idempotent stream set-up."""

from __future__ import annotations

import ssl
from datetime import timedelta
from typing import Any

import nats
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

from services.common.logs import get_logger
from services.common.tls import NatsClient

log = get_logger(__name__)

EVENTS_STREAM = "EVENTS"
EVENTS_SUBJECT_PREFIX = "usagebilling.events.v1"
BILLING_STREAM = "BILLING"
BILLING_SUBJECT_PREFIX = "usagebilling.billing.v1"


async def connect(url: str, name: str, *, tls: ssl.SSLContext | None = None) -> Any:
    """Connects, retrying without end. With `tls` (services/common/tls.py
    nats_context) the connection is TLS; a tls:// URL requires it."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats_error", error=str(exc))

    async def on_disconnect() -> None:
        log.warning("nats_disconnected")

    async def on_reconnect() -> None:
        log.info("nats_reconnected")

    client = NatsClient()
    await client.connect(
        url,
        name=name,
        tls=tls,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,  # type: ignore[arg-type]  # seconds; annotated int upstream
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    return client


async def ensure_stream(
    js: Any, name: str, subjects: list[str], *, replicas: int, duplicate_window: timedelta
) -> None:
    """Creates the stream, or updates it to this configuration when it exists."""
    config = StreamConfig(
        name=name,
        subjects=subjects,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=duplicate_window.total_seconds(),
    )
    try:
        await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(config)
        log.info("stream_created", stream=name, replicas=replicas)
        return
    await js.update_stream(config)


async def ensure_streams(js: Any, *, replicas: int) -> None:
    await ensure_stream(
        js,
        EVENTS_STREAM,
        [f"{EVENTS_SUBJECT_PREFIX}.>"],
        replicas=replicas,
        duplicate_window=timedelta(minutes=10),
    )
    await ensure_stream(
        js,
        BILLING_STREAM,
        [f"{BILLING_SUBJECT_PREFIX}.>"],
        replicas=replicas,
        duplicate_window=timedelta(hours=1),
    )
