"""Finding the events at fault when a fold fails, so that one event that cannot
be stored never holds up the events around it.

A fold that raises is classified (`classify`): a data error is about the
events themselves (PostgreSQL refuses a value, a trigger raises, a number
cannot be encoded), so the batch is split, messages first and then one
message's events, until every event that still fails is alone; the rest is
committed. A transient error (connection lost, serialization failure, too
many connections) says nothing about the events: the message is retried
later, unless it has been delivered too often, when its events are set aside
too. Folding is idempotent per (meter, event), so parts committed before a
retry count once."""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg

from services.meter import convert
from services.meter.domain.matching import FoldedEvent, Matcher
from services.meter.store import MeterStore
from usagebilling.ingest.v1 import ingest_pb2


class Failure(enum.Enum):
    DATA = "data"  # about the events: the same events fail again
    TRANSIENT = "transient"  # about the moment: the same events may pass later
    OTHER = "other"  # unknown: retried like a transient error, then isolated


# PostgreSQL error classes (the first two characters of SQLSTATE).
_DATA_CLASSES = frozenset(
    {
        "22",  # data exception: a value out of range, invalid text, ...
        "23",  # integrity constraint violation: check, not-null, foreign key
        "54",  # program limit exceeded: an index row too large, ...
        "P0",  # PL/pgSQL: RAISE EXCEPTION in a trigger
        "2F",  # SQL routine exception
        "38",  # external routine exception
        "39",  # external routine invocation exception
    }
)
_TRANSIENT_CLASSES = frozenset(
    {
        "08",  # connection exception
        "40",  # transaction rollback: serialization failure, deadlock
        "53",  # insufficient resources: too many connections, disk full
        "57",  # operator intervention: query cancelled, server shutting down
        "58",  # system error: I/O
    }
)
_TRANSIENT_STATES = frozenset({"55P03"})  # lock not available

REASON_LIMIT = 1000


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        if state in _TRANSIENT_STATES or state[:2] in _TRANSIENT_CLASSES:
            return Failure.TRANSIENT
        if state[:2] in _DATA_CLASSES:
            return Failure.DATA
        return Failure.OTHER
    # Connection-level trouble: the driver's, the socket's, a timeout.
    if isinstance(exc, asyncpg.InterfaceError | OSError | TimeoutError):
        return Failure.TRANSIENT
    # The driver refusing to encode a value, or a conversion of ours failing.
    if isinstance(exc, ValueError | ArithmeticError):
        return Failure.DATA
    return Failure.OTHER


def describe(exc: BaseException) -> str:
    """A reason for the quarantine: the error's class, SQLSTATE and message,
    at most REASON_LIMIT characters, without NUL (a text column cannot hold one)."""
    state = getattr(exc, "sqlstate", None) if isinstance(exc, asyncpg.PostgresError) else None
    text = f"{type(exc).__name__}{f' ({state})' if state else ''}: {exc}"
    return text.replace("\x00", "\\x00")[:REASON_LIMIT]


@dataclass
class Outcome:
    """What became of one batch (one message): the events set aside, each with
    the reason it could not be folded, or the error to retry it for."""

    failed: list[tuple[ingest_pb2.Event, str]] = field(default_factory=list)
    retry: BaseException | None = None


@dataclass
class _Item:
    outcome: Outcome
    retry_on: Collection[Failure]
    events: list[ingest_pb2.Event]
    rows: list[list[FoldedEvent]]  # per event, aligned with `events`


def fold_rows(matcher: Matcher, events: Iterable[ingest_pb2.Event]) -> list[FoldedEvent]:
    """What the events contribute to the meters of `matcher`. The consumer's
    hot path: only the metadata keys some meter reads are converted, and only
    for events that some meter counts."""
    rows: list[FoldedEvent] = []
    for event in events:
        keys = matcher.keys_for(event.event_name)
        if keys is None:
            continue
        raw = event.metadata
        rows += matcher.fold(
            event_id=event.event_id,
            customer_id=event.customer_id,
            event_name=event.event_name,
            event_time=convert.to_datetime(event.timestamp),
            metadata={k: convert.meta_value(raw[k]) for k in keys if k in raw},
        )
    return rows


class Isolator:
    """Folds batches part by part until each event that fails is alone.

    `retry_on[i]` names the failures for which batch i is better retried later
    than isolated now (the consumer: transient and unknown errors until the
    message was delivered too often; the backfill: transient errors; a replay
    of the quarantine: none)."""

    def __init__(self, store: MeterStore, matchers: Mapping[str, Matcher]) -> None:
        self._store = store
        self._matchers = matchers
        self.folded = 0  # new (meter, event) rows stored

    async def fold(
        self,
        batches: Sequence[ingest_pb2.EventBatch],
        retry_on: Sequence[Collection[Failure]],
        error: BaseException | None = None,
    ) -> list[Outcome]:
        """One Outcome per batch. `error`, when given, is the failure of
        folding all the batches at once (so that is not tried again)."""
        items: list[_Item] = []
        for batch, retry in zip(batches, retry_on, strict=True):
            item = _Item(Outcome(), retry, [], [])
            items.append(item)
            matcher = self._matchers.get(batch.tenant_id)
            if matcher is None:
                continue
            for event in batch.events:
                try:
                    rows = fold_rows(matcher, (event,))
                except Exception as exc:  # pure code: this event fails every time
                    item.outcome.failed.append((event, describe(exc)))
                    continue
                if rows:
                    item.events.append(event)
                    item.rows.append(rows)
        await self._fold_items([i for i in items if i.events], error)
        return [item.outcome for item in items]

    async def _try(self, rows: list[FoldedEvent]) -> BaseException | None:
        try:
            self.folded += await self._store.fold(rows)
        except Exception as exc:
            return exc
        return None

    def _retry(self, items: list[_Item], error: BaseException) -> list[_Item]:
        """Marks for a retry the items that retry this kind of failure; returns
        the others, which must be isolated now."""
        kind = classify(error)
        left = []
        for item in items:
            if kind in item.retry_on:
                item.outcome.retry = error
            else:
                left.append(item)
        return left

    async def _fold_items(self, items: list[_Item], error: BaseException | None) -> None:
        if not items:
            return
        if error is None:
            error = await self._try([r for item in items for rows in item.rows for r in rows])
            if error is None:
                return
        left = self._retry(items, error)
        if len(left) < len(items):
            error = None  # perhaps it was theirs: the rest is tried on its own
        items = left
        if len(items) == 1:
            await self._fold_events(items[0], list(range(len(items[0].events))), error)
        elif items:
            half = len(items) // 2
            await self._fold_items(items[:half], None)
            await self._fold_items(items[half:], None)

    async def _fold_events(self, item: _Item, part: list[int], error: BaseException | None) -> None:
        if item.outcome.retry is not None:
            return  # the whole message goes again
        if error is None:
            error = await self._try([r for i in part for r in item.rows[i]])
            if error is None:
                return
        kind = classify(error)
        if kind in item.retry_on:
            item.outcome.retry = error
            return
        # Alone, or a failure that splitting cannot locate: set aside.
        if len(part) == 1 or kind is Failure.TRANSIENT:
            reason = describe(error)
            item.outcome.failed.extend((item.events[i], reason) for i in part)
            return
        half = len(part) // 2
        await self._fold_events(item, part[:half], None)
        await self._fold_events(item, part[half:], None)
