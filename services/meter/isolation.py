"""Finding the events at fault when a fold fails, so that one event that cannot
be stored never holds up the events around it.

A fold that raises is classified (`classify`). A data error is about the
events themselves (PostgreSQL refuses a value, a trigger raises, a number
cannot be encoded): the batch is split, messages first and then one message's
events, until every event that still fails is alone; the rest is committed. A
transient error (serialization failure, deadlock) may also be tied to some
rows, so the messages are split the same way, and a message that fails on its
own is retried later, until it was delivered too often: then its events are
split too and those that still fail are set aside. When the database is
unavailable (connection lost, too many connections, shutting down) nothing is
split: every message is retried. Folding is idempotent per (meter, event), so
parts committed before a retry count once."""

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
    TRANSIENT = "transient"  # about the moment, perhaps the rows: may pass later
    UNAVAILABLE = "unavailable"  # about the database: nothing can be folded now
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
_TRANSIENT_CLASSES = frozenset({"40"})  # transaction rollback: serialization, deadlock
_TRANSIENT_STATES = frozenset({"55P03", "57014"})  # lock not available, query cancelled
_UNAVAILABLE_CLASSES = frozenset(
    {
        "08",  # connection exception
        "53",  # insufficient resources: too many connections, disk full, out of memory
        "57",  # operator intervention: the server shutting down or starting
        "58",  # system error: I/O
    }
)

REASON_LIMIT = 1000


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        if state in _TRANSIENT_STATES or state[:2] in _TRANSIENT_CLASSES:
            return Failure.TRANSIENT
        if state[:2] in _UNAVAILABLE_CLASSES:
            return Failure.UNAVAILABLE
        if state[:2] in _DATA_CLASSES:
            return Failure.DATA
        return Failure.OTHER
    # Connection-level trouble: the driver's, the socket's, a timeout.
    if isinstance(exc, asyncpg.InterfaceError | OSError | TimeoutError):
        return Failure.UNAVAILABLE
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
    the reason it could not be folded, or the error to retry it for (then
    `failed` is to be ignored: the whole batch goes again)."""

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
    of the quarantine: none). An unavailable database retries every batch,
    whatever `retry_on` says: nothing can be set aside either."""

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

    async def _fold_items(self, items: list[_Item], error: BaseException | None) -> None:
        """Folds the items' events together; on a failure, each half on its own,
        down to one item (then its events)."""
        if not items:
            return
        if error is None:
            error = await self._try([r for item in items for rows in item.rows for r in rows])
            if error is None:
                return
        if classify(error) is Failure.UNAVAILABLE:
            for item in items:
                item.outcome.retry = error
        elif len(items) == 1:
            await self._fold_events(items[0], list(range(len(items[0].events))), error)
        else:
            half = len(items) // 2
            await self._fold_items(items[:half], None)
            await self._fold_items(items[half:], None)

    async def _fold_events(self, item: _Item, part: list[int], error: BaseException | None) -> None:
        """Folds these events of one item; on a failure either the item is to
        be retried, or each half is folded on its own, down to single events,
        which are set aside."""
        if item.outcome.retry is not None:
            return  # the whole message goes again
        if error is None:
            error = await self._try([r for i in part for r in item.rows[i]])
            if error is None:
                return
        kind = classify(error)
        if kind is Failure.UNAVAILABLE or kind in item.retry_on:
            item.outcome.retry = error
        elif len(part) == 1:
            item.outcome.failed.append((item.events[part[0]], describe(error)))
        else:
            half = len(part) // 2
            await self._fold_events(item, part[:half], None)
            await self._fold_events(item, part[half:], None)
