"""MeterService servicer: protobuf in, domain calls, protobuf out."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.common.context import current_api_key_id, current_tenant
from services.common.errors import InvalidArgument
from services.common.paging import fetch_bounded_page
from services.meter import convert
from services.meter.domain.query import AnswerLimits
from services.meter.service import AnswerBudget, MeterService
from services.meter.settings import (
    DEFAULT_ANSWER_BUDGET_BYTES,
    DEFAULT_SERVICE_LIMITS,
    DEFAULT_TENANT_LIMITS,
)
from services.meter.store import MeterRecord, MeterStore
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc

# A ListMeters answer stops before the meter that would take it past this many
# encoded bytes (it always holds one meter): a page of 1000 meters is then at
# most about this big in memory and on the wire, far under the 4 MiB a gRPC
# client takes by default. A meter made within today's limits is under 30 KiB.
MAX_LIST_METERS_BYTES = 1024 * 1024


class MeterServicer(meter_pb2_grpc.MeterServiceServicer):
    def __init__(
        self,
        service: MeterService,
        store: MeterStore,
        *,
        tenant_limits: AnswerLimits = DEFAULT_TENANT_LIMITS,
        service_limits: AnswerLimits = DEFAULT_SERVICE_LIMITS,
        budget: AnswerBudget | None = None,
    ) -> None:
        self._service = service
        self._store = store
        self._tenant_limits = tenant_limits
        self._service_limits = service_limits
        self._budget = budget or AnswerBudget(DEFAULT_ANSWER_BUDGET_BYTES)

    async def CreateMeter(
        self, request: meter_pb2.CreateMeterRequest, context: Any
    ) -> meter_pb2.Meter:
        return convert.proto_meter(await self._service.create_meter(current_tenant(), request))

    async def GetMeter(self, request: meter_pb2.GetMeterRequest, context: Any) -> meter_pb2.Meter:
        record, skipped = await self._service.get_meter(current_tenant(), request.id)
        return convert.proto_meter(record, skipped)

    async def ListMeters(
        self, request: meter_pb2.ListMetersRequest, context: Any
    ) -> meter_pb2.ListMetersResponse:
        def cursor(m: MeterRecord) -> tuple[datetime, str]:
            return m.created_at, m.id

        page, token = await fetch_bounded_page(
            request,
            lambda after, limit: self._store.list_meters(current_tenant(), after, limit),
            cursor,
            convert.proto_meter,
            MAX_LIST_METERS_BYTES,
        )
        return meter_pb2.ListMetersResponse(meters=page, next_page_token=token)

    async def ArchiveMeter(
        self, request: meter_pb2.ArchiveMeterRequest, context: Any
    ) -> meter_pb2.Meter:
        if not request.id:
            raise InvalidArgument("id: required")
        return convert.proto_meter(await self._store.archive_meter(current_tenant(), request.id))

    async def QueryUsage(
        self, request: meter_pb2.QueryUsageRequest, context: Any
    ) -> meter_pb2.QueryUsageResponse:
        # The service token (a service acting for a tenant: billing reading every
        # customer's usage) has its own, larger limits; an API key has the tenants'.
        limits = self._service_limits if current_api_key_id() == "" else self._tenant_limits
        hold = self._budget.hold()
        if context is not None:  # None: called in-process (tests), nothing to send
            # The answer's bytes stay reserved until the call has sent them.
            context.add_done_callback(lambda _: hold.release())
        response = meter_pb2.QueryUsageResponse()
        # A window's bounds are converted once, however many customers and groups
        # it has rows for.
        stamps: dict[datetime, Timestamp] = {}

        def stamp(when: datetime) -> Timestamp:
            found = stamps.get(when)
            if found is None:
                found = stamps[when] = convert.to_timestamp(when)
            return found

        def next_page(token: str) -> None:
            response.next_page_token = token

        add = response.rows.add
        # Rows come window by window, and a window's end is the next one's start
        # (the same objects): the last window's Timestamps are reused without a
        # look-up, and its end's as the next start.
        last: tuple[datetime, datetime, Timestamp, Timestamp] | None = None
        try:
            slices = self._service.query_usage(
                current_tenant(), request, limits, hold, next_page_token=next_page
            )
            async with contextlib.aclosing(slices):
                async for rows in slices:
                    for r in rows:
                        begin, end = r.window_start, r.window_end
                        if last is None or begin is not last[0] or end is not last[1]:
                            if last is None or begin is not last[1]:
                                last = (begin, end, stamp(begin), stamp(end))
                            else:
                                last = (begin, end, last[3], stamp(end))
                        # An empty map is left unset: passing group={} costs as much
                        # again as the rest of the row (a month of HOUR rows: 600).
                        row = add(
                            window_start=last[2],
                            window_end=last[3],
                            customer_id=r.customer_id,
                            value=r.value,
                        )
                        if r.group:
                            row.group.update(r.group)
                    del rows
                    await asyncio.sleep(0)  # see store.YIELD_EVERY
        except BaseException:
            # The partial answer is dropped here, not sent.
            hold.release()
            raise
        if context is None:
            hold.release()
        return response
