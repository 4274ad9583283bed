"""What each service's NATS user may publish and subscribe to: the one table
that the dev stack's nats-server config is written from, and that a
deployment's NATS authorization must match (README, "Security model").

- ingest publishes events (usagebilling.events.v1.>) and manages the EVENTS
  stream; it reads the info of the stream's consumers (meter's backlog cuts
  the rate limit: services/ingest/meter_backlog.py) but cannot read the
  stream back, act on a consumer or publish billing messages.
- meter consumes EVENTS (consumer create/info, pull requests, acks) and
  manages the stream's configuration; it publishes no message of its own.
- billing publishes billing messages (usagebilling.billing.v1.>), manages
  the BILLING stream and consumes it (webhook deliveries); it cannot publish
  events nor read them.

Every service gets JetStream's answers in its own inboxes (`_INBOX.<service>.>`,
services/common/jetstream.connect sets the prefix), so none can read another's
replies, such as the events a pull consumer is sent.
"""

from __future__ import annotations

from services.common.jetstream import (
    BILLING_STREAM,
    BILLING_SUBJECT_PREFIX,
    EVENTS_STREAM,
    EVENTS_SUBJECT_PREFIX,
    inbox_prefix,
)

_JS = "$JS.API"


def _manage_stream(stream: str) -> list[str]:
    # ensure_stream: stream info, then create or update (services/common/jetstream.py).
    return [f"{_JS}.STREAM.{verb}.{stream}" for verb in ("INFO", "CREATE", "UPDATE")]


# service -> {"publish": [...], "subscribe": [...]} (allow lists; all else denied).
PERMISSIONS: dict[str, dict[str, list[str]]] = {
    "ingest": {
        "publish": [
            f"{EVENTS_SUBJECT_PREFIX}.>",
            *_manage_stream(EVENTS_STREAM),
            f"{_JS}.CONSUMER.INFO.{EVENTS_STREAM}.>",
        ],
        "subscribe": [f"{inbox_prefix('ingest')}.>"],
    },
    "meter": {
        "publish": [
            *_manage_stream(EVENTS_STREAM),
            f"{_JS}.CONSUMER.INFO.{EVENTS_STREAM}.>",
            f"{_JS}.CONSUMER.CREATE.{EVENTS_STREAM}.>",
            f"{_JS}.CONSUMER.DURABLE.CREATE.{EVENTS_STREAM}.>",
            f"{_JS}.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.>",
            # ack, nak and term of a delivered message are publishes to its reply subject.
            f"$JS.ACK.{EVENTS_STREAM}.>",
        ],
        "subscribe": [f"{inbox_prefix('meter')}.>"],
    },
    "billing": {
        "publish": [
            f"{BILLING_SUBJECT_PREFIX}.>",
            *_manage_stream(BILLING_STREAM),
            # Webhooks read the stream back (services/billing/webhooks.py).
            f"{_JS}.CONSUMER.INFO.{BILLING_STREAM}.>",
            f"{_JS}.CONSUMER.CREATE.{BILLING_STREAM}.>",
            f"{_JS}.CONSUMER.DURABLE.CREATE.{BILLING_STREAM}.>",
            f"{_JS}.CONSUMER.MSG.NEXT.{BILLING_STREAM}.>",
            f"$JS.ACK.{BILLING_STREAM}.>",
        ],
        "subscribe": [f"{inbox_prefix('billing')}.>"],
    },
}
SERVICE_USERS = tuple(PERMISSIONS)
