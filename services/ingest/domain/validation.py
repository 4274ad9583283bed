"""Event validation: each event of a batch is judged on its own, so that a bad
event never blocks the valid ones beside it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from services.common.errors import InvalidArgument
from services.common.values import RawValue, value_problem

MAX_BATCH = 1000
MAX_EVENT_ID = 255
MAX_NAME = 255
MAX_METADATA_KEYS = 50
MAX_KEY_LENGTH = 100
MAX_FUTURE = timedelta(minutes=5)


@dataclass(frozen=True)
class InvalidTime:
    """A timestamp outside what a datetime can hold."""

    seconds: int


@dataclass(frozen=True)
class IncomingEvent:
    event_id: str
    customer_id: str
    event_name: str
    timestamp: datetime | InvalidTime | None  # None: the server's time
    metadata: Mapping[str, RawValue] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejection:
    index: int
    event_id: str
    reason: str


@dataclass(frozen=True)
class Triage:
    """Indexes of the batch that may be stored, first occurrences only."""

    valid: list[int]
    duplicate_in_batch: list[int]
    rejections: list[Rejection]


def check_batch_size(count: int) -> None:
    if count > MAX_BATCH:
        raise InvalidArgument(
            f"events: {count} events in one call; at most {MAX_BATCH} are allowed, none was stored"
        )


def _text_problem(name: str, value: str, limit: int) -> str | None:
    if not value:
        return f"{name} is required"
    if len(value) > limit:
        return f"{name} is {len(value)} characters long; at most {limit} are allowed"
    if "\x00" in value:
        return f"{name} contains a NUL character"
    return None


def _metadata_problem(metadata: Mapping[str, RawValue]) -> str | None:
    if len(metadata) > MAX_METADATA_KEYS:
        return f"metadata has {len(metadata)} keys; at most {MAX_METADATA_KEYS} are allowed"
    for key, value in metadata.items():
        problem = _text_problem("a metadata key", key, MAX_KEY_LENGTH)
        if problem:
            return f"{problem} (key {key[:40]!r})"
        # The one rule every stage shares (services.common.values): what passes
        # here, meter can fold and the event log can store and give back.
        problem = value_problem(value)
        if problem:
            return f"metadata[{key!r}] {problem}"
    return None


def event_problem(event: IncomingEvent, now: datetime, backdate_window: timedelta) -> str | None:
    """Why the event cannot be accepted, in words a person can act on; None if it can."""
    for name, value, limit in (
        ("event_id", event.event_id, MAX_EVENT_ID),
        ("customer_id", event.customer_id, MAX_NAME),
        ("event_name", event.event_name, MAX_NAME),
    ):
        problem = _text_problem(name, value, limit)
        if problem:
            return problem
    if isinstance(event.timestamp, InvalidTime):
        return f"timestamp ({event.timestamp.seconds} s since 1970) is not a valid time"
    if event.timestamp is not None:
        if event.timestamp > now + MAX_FUTURE:
            return (
                f"timestamp {event.timestamp.isoformat()} is more than 5 minutes in the future"
                f" (server time {now.isoformat()})"
            )
        if event.timestamp < now - backdate_window:
            return (
                f"timestamp {event.timestamp.isoformat()} is older than the backdating window"
                f" of {backdate_window.days} days"
            )
    return _metadata_problem(event.metadata)


def effective_time(event: IncomingEvent, now: datetime) -> datetime:
    """The time an accepted event is counted at: its own, or the server's."""
    if isinstance(event.timestamp, InvalidTime):
        raise ValueError("an event with an invalid timestamp is never accepted")
    return event.timestamp or now


def triage(events: Sequence[IncomingEvent], now: datetime, backdate_window: timedelta) -> Triage:
    """Splits a batch into valid events, repeats of an event_id earlier in the
    batch, and rejections. Repeats across calls are found by the store."""
    check_batch_size(len(events))
    valid: list[int] = []
    repeats: list[int] = []
    rejections: list[Rejection] = []
    seen: set[str] = set()
    for index, event in enumerate(events):
        problem = event_problem(event, now, backdate_window)
        if problem:
            rejections.append(Rejection(index, event.event_id[:MAX_EVENT_ID], problem))
        elif event.event_id in seen:
            repeats.append(index)
        else:
            seen.add(event.event_id)
            valid.append(index)
    return Triage(valid=valid, duplicate_in_batch=repeats, rejections=rejections)
