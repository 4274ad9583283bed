"""MeterService servicer: protobuf in, domain calls, protobuf out."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.common.context import current_tenant
from services.common.errors import InvalidArgument
from services.common.paging import fetch_page
from services.meter import convert
from services.meter.service import MeterService
from services.meter.store import YIELD_EVERY, MeterStore
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc


class MeterServicer(meter_pb2_grpc.MeterServiceServicer):
    def __init__(self, service: MeterService, store: MeterStore) -> None:
        self._service = service
        self._store = store

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
        meters, token = await fetch_page(
            request,
            lambda after, limit: self._store.list_meters(current_tenant(), after, limit),
            lambda m: (m.created_at, m.id),
        )
        return meter_pb2.ListMetersResponse(
            meters=[convert.proto_meter(m) for m in meters], next_page_token=token
        )

    async def ArchiveMeter(
        self, request: meter_pb2.ArchiveMeterRequest, context: Any
    ) -> meter_pb2.Meter:
        if not request.id:
            raise InvalidArgument("id: required")
        return convert.proto_meter(await self._store.archive_meter(current_tenant(), request.id))

    async def QueryUsage(
        self, request: meter_pb2.QueryUsageRequest, context: Any
    ) -> meter_pb2.QueryUsageResponse:
        rows = await self._service.query_usage(current_tenant(), request)
        response = meter_pb2.QueryUsageResponse()
        # A window's bounds are converted once, however many customers and groups
        # it has rows for.
        stamps: dict[datetime, Timestamp] = {}

        def stamp(when: datetime) -> Timestamp:
            found = stamps.get(when)
            if found is None:
                found = stamps[when] = convert.to_timestamp(when)
            return found

        for i, r in enumerate(rows, 1):
            response.rows.add(
                window_start=stamp(r.window_start),
                window_end=stamp(r.window_end),
                customer_id=r.customer_id,
                group=r.group,
                value=r.value,
            )
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # see store.YIELD_EVERY
        return response
