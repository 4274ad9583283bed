"""Asks meter (over gRPC, on the tenant's behalf) for meters and usage."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import grpc

from services.common.auth import on_behalf_of
from services.common.errors import InvalidArgument, Unavailable
from services.common.logs import get_logger
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc

log = get_logger(__name__)


class MeterClient:
    def __init__(self, channel: grpc.aio.Channel, admin_token: str) -> None:
        self._stub = meter_pb2_grpc.MeterServiceStub(channel)
        self._admin_token = admin_token

    async def meter_name(self, tenant_id: str, meter_id: str, field: str) -> str:
        """The meter's name; InvalidArgument naming `field` when the tenant has no such meter."""
        try:
            meter = await self._stub.GetMeter(
                meter_pb2.GetMeterRequest(id=meter_id),
                metadata=on_behalf_of(self._admin_token, tenant_id),
                timeout=10,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise InvalidArgument(f"{field}: no meter {meter_id!r}") from exc
            raise Unavailable(f"meter service: {exc.code().name}") from exc
        return str(meter.name)

    async def consumed(
        self,
        tenant_id: str,
        meter_id: str,
        customer_external_id: str,
        start: datetime,
        end: datetime,
    ) -> Decimal:
        request = meter_pb2.QueryUsageRequest(
            meter_id=meter_id,
            customer_id=customer_external_id,
            window_size=meter_pb2.WINDOW_SIZE_NONE,
        )
        request.start_time.FromDatetime(start)
        request.end_time.FromDatetime(end)
        try:
            answer = await self._stub.QueryUsage(
                request, metadata=on_behalf_of(self._admin_token, tenant_id), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"meter service: {exc.code().name}: {exc.details()}") from exc
        # WINDOW_SIZE_NONE with a customer_id answers exactly one row.
        return Decimal(answer.rows[0].value) if answer.rows else Decimal(0)
