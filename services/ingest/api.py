"""IngestService servicer: protobuf in, domain calls, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from services.common.context import current_tenant
from services.common.errors import InvalidArgument
from services.common.paging import decode_time_cursor, page_size, request_digest, time_token
from services.ingest import convert
from services.ingest.service import Ingestor, IngestResult
from services.ingest.store import IngestStore
from usagebilling.ingest.v1 import ingest_pb2, ingest_pb2_grpc

# A ListEvents page stops before its events pass this many encoded bytes (it
# always has at least one event), whatever its page_size: a page of wide
# events is then a few MiB in memory, not tens (README, "Limits").
LIST_PAGE_BYTES = 1024 * 1024


def _response(result: IngestResult) -> ingest_pb2.IngestEventsResponse:
    return ingest_pb2.IngestEventsResponse(
        accepted_count=result.accepted,
        duplicate_count=result.duplicates,
        rejections=[
            ingest_pb2.EventRejection(index=r.index, event_id=r.event_id, reason=r.reason)
            for r in result.rejections
        ],
    )


def _optional_time(request: Any, field: str) -> datetime | None:
    if not request.HasField(field):
        return None
    try:
        return convert.to_datetime(getattr(request, field))
    except (ValueError, OverflowError, OSError):
        raise InvalidArgument(f"{field}: not a valid timestamp") from None


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, ingestor: Ingestor, store: IngestStore) -> None:
        self._ingestor = ingestor
        self._store = store

    async def IngestEvents(
        self, request: ingest_pb2.IngestEventsRequest, context: Any
    ) -> ingest_pb2.IngestEventsResponse:
        result = await self._ingestor.ingest(current_tenant(), request.events, datetime.now(UTC))
        return _response(result)

    async def StreamIngest(
        self, request_iterator: AsyncIterator[ingest_pb2.IngestEventsRequest], context: Any
    ) -> AsyncIterator[ingest_pb2.IngestEventsResponse]:
        # Each request is one call to the rate limit: one over it ends the
        # stream with RESOURCE_EXHAUSTED (and `retry-after`); the answers sent
        # before it say what was stored, the refused request stored nothing.
        tenant = current_tenant()
        async for request in request_iterator:
            result = await self._ingestor.ingest(tenant, request.events, datetime.now(UTC))
            yield _response(result)

    async def GetEvent(self, request: ingest_pb2.GetEventRequest, context: Any) -> ingest_pb2.Event:
        if not request.event_id:
            raise InvalidArgument("event_id: required")
        return convert.proto_event(await self._store.get_event(current_tenant(), request.event_id))

    async def ListEvents(
        self, request: ingest_pb2.ListEventsRequest, context: Any
    ) -> ingest_pb2.ListEventsResponse:
        start = _optional_time(request, "start_time")
        end = _optional_time(request, "end_time")
        if start is not None and end is not None and end < start:
            raise InvalidArgument("end_time: must not be before start_time")
        limit = page_size(request.page_size)
        query = request_digest(request)
        after = decode_time_cursor(request.page_token, query, uuid_key=False)
        rows, cut = await self._store.list_events(
            current_tenant(),
            customer_id=request.customer_id,
            event_name=request.event_name,
            start=start,
            end=end,
            after=after,
            limit=limit + 1,
            max_bytes=2 * LIST_PAGE_BYTES,  # an estimate; measured exactly below
        )
        events: list[ingest_pb2.Event] = []
        size = 0
        for row in rows[:limit]:
            event = convert.proto_event(row)
            # The event's bytes in the response: the field's tag and length too.
            grows = event.ByteSize() + 6
            if events and size + grows > LIST_PAGE_BYTES:
                break
            events.append(event)
            size += grows
        token = ""
        if len(events) < len(rows) or cut:
            last = rows[len(events) - 1]
            token = time_token(last.event_time, last.event_id, query)
        return ingest_pb2.ListEventsResponse(events=events, next_page_token=token)

    async def ReplayEvents(
        self, request: ingest_pb2.ReplayEventsRequest, context: Any
    ) -> AsyncIterator[ingest_pb2.Event]:
        if not request.event_names:
            raise InvalidArgument("event_names: at least one event name is required")
        start = _optional_time(request, "start_time") or datetime(1970, 1, 1, tzinfo=UTC)
        end = _optional_time(request, "end_time") or datetime.now(UTC)
        if end <= start:
            raise InvalidArgument("end_time: must be after start_time")
        async for event in self._store.replay(current_tenant(), request.event_names, start, end):
            yield convert.proto_event(event)
