"""QuarantineService: the admin RPCs over a stage's dead letters.

A stage (ingest's relay, meter's fold) sets aside a message it could not
process after bounded retries so that the messages behind it flow on. Each
stage keeps its quarantine in its own schema and implements
`QuarantineBackend`; this servicer only validates requests and maps records to
protobuf. The admin-token check is the auth interceptor's (the service is in
`auth.ADMIN_METHOD_PREFIXES`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from services.common.errors import InvalidArgument, NotFound
from services.common.grpc_server import Registration
from services.common.ids import parse_uuid
from services.common.paging import fetch_page
from usagebilling.common.v1 import quarantine_pb2, quarantine_pb2_grpc

MAX_IDS = 100


@dataclass(frozen=True)
class QuarantinedRecord:
    """One message set aside by a stage.

    `id` is a canonical lower-case UUID; `stage` is "relay" or "fold";
    `reason` is the error of the last attempt; `attempts` counts every try,
    replays included; times are timezone-aware; `size_bytes` is the size of the
    stored message."""

    id: str
    tenant_id: str
    stage: str
    reason: str
    event_ids: tuple[str, ...]
    attempts: int
    quarantine_time: datetime
    last_attempt_time: datetime
    size_bytes: int


class QuarantineBackend(Protocol):
    """What a stage provides. Ids given to `replay` and `discard` are already
    validated (canonical lower-case UUIDs, 1..100, no repeats); ids that are not
    quarantined are ignored."""

    async def list_records(
        self, tenant_id: str | None, after: tuple[datetime, str] | None, limit: int
    ) -> list[QuarantinedRecord]:
        """Up to `limit` records, newest first by (quarantine_time, id),
        strictly after the cursor `after` (the last record seen); only
        `tenant_id`'s when it is given."""

    async def replay(self, ids: Sequence[str]) -> tuple[list[str], list[QuarantinedRecord]]:
        """Processes the named records again now. Returns the ids that
        succeeded (they left the quarantine) and the records that failed again
        (kept, with their new reason and attempts + 1)."""

    async def discard(self, ids: Sequence[str]) -> int:
        """Deletes the named records for good; returns how many there were."""


def _timestamp(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def proto_message(record: QuarantinedRecord) -> quarantine_pb2.QuarantinedMessage:
    return quarantine_pb2.QuarantinedMessage(
        id=record.id,
        tenant_id=record.tenant_id,
        stage=record.stage,
        reason=record.reason,
        event_ids=list(record.event_ids),
        attempts=record.attempts,
        quarantine_time=_timestamp(record.quarantine_time),
        last_attempt_time=_timestamp(record.last_attempt_time),
        size_bytes=record.size_bytes,
    )


def parse_ids(ids: Sequence[str]) -> list[str]:
    """1..100 canonical UUIDs, lower-cased, repeats dropped (order kept);
    INVALID_ARGUMENT naming the field otherwise."""
    if not ids:
        raise InvalidArgument("ids: at least one id is required")
    if len(ids) > MAX_IDS:
        raise InvalidArgument(f"ids: at most {MAX_IDS} ids per call, got {len(ids)}")
    parsed = [parse_uuid(value, f"ids[{i}]") for i, value in enumerate(ids)]
    return list(dict.fromkeys(parsed))


class QuarantineServicer(quarantine_pb2_grpc.QuarantineServiceServicer):
    def __init__(self, backend: QuarantineBackend) -> None:
        self._backend = backend

    async def ListQuarantined(
        self, request: quarantine_pb2.ListQuarantinedRequest, context: Any
    ) -> quarantine_pb2.ListQuarantinedResponse:
        tenant = parse_uuid(request.tenant_id, "tenant_id") if request.tenant_id else None
        rows, token = await fetch_page(
            request,
            lambda after, limit: self._backend.list_records(tenant, after, limit),
            lambda r: (r.quarantine_time, r.id),
        )
        return quarantine_pb2.ListQuarantinedResponse(
            messages=[proto_message(r) for r in rows], next_page_token=token
        )

    async def ReplayQuarantined(
        self, request: quarantine_pb2.ReplayQuarantinedRequest, context: Any
    ) -> quarantine_pb2.ReplayQuarantinedResponse:
        replayed, failed = await self._backend.replay(parse_ids(request.ids))
        if not replayed and not failed:
            raise NotFound("ids: none of these ids is quarantined")
        return quarantine_pb2.ReplayQuarantinedResponse(
            replayed_ids=replayed, failed=[proto_message(r) for r in failed]
        )

    async def DiscardQuarantined(
        self, request: quarantine_pb2.DiscardQuarantinedRequest, context: Any
    ) -> quarantine_pb2.DiscardQuarantinedResponse:
        count = await self._backend.discard(parse_ids(request.ids))
        return quarantine_pb2.DiscardQuarantinedResponse(discarded_count=count)


def registration(backend: QuarantineBackend) -> Registration:
    """The servicer over `backend`, ready for a service's Wiring.registrations."""
    return Registration.of(
        quarantine_pb2,
        "QuarantineService",
        quarantine_pb2_grpc.add_QuarantineServiceServicer_to_server,
        QuarantineServicer(backend),
    )
