"""Asks meter (over gRPC, on the tenant's behalf) for meters and usage."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Protocol

import grpc

from services.common.auth import on_behalf_of
from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.common.logs import get_logger
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc

log = get_logger(__name__)

# Usage is read a page of customers at a time (a few MiB at most); the larger
# limit is for a meter that predates paging and answers every customer at once.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


class Meters(Protocol):
    """What billing needs from meter; MeterClient over gRPC, a fake in tests."""

    async def meter_name(self, tenant_id: str, meter_id: str, field: str) -> str: ...

    async def consumed(
        self,
        tenant_id: str,
        meter_id: str,
        customer_external_id: str,
        start: datetime,
        end: datetime,
    ) -> Decimal: ...

    async def consumed_page(
        self,
        tenant_id: str,
        meter_id: str,
        start: datetime,
        end: datetime,
        *,
        page_size: int,
        page_token: str = "",
    ) -> tuple[dict[str, Decimal], str]: ...


class PricingMeters(Meters, Protocol):
    """What pricing needs beyond totals: a PERCENTAGE price's transactions."""

    async def group_by(self, tenant_id: str, meter_id: str, field: str) -> tuple[str, ...]: ...

    async def consumed_by_group(
        self,
        tenant_id: str,
        meter_id: str,
        customer_external_id: str,
        start: datetime,
        end: datetime,
        key: str,
    ) -> list[Decimal]: ...


class MeterClient:
    def __init__(self, channel: grpc.aio.Channel, service_token: str) -> None:
        self._stub = meter_pb2_grpc.MeterServiceStub(channel)
        self._service_token = service_token

    async def meter_name(self, tenant_id: str, meter_id: str, field: str) -> str:
        """The meter's name; InvalidArgument naming `field` when the tenant has no such meter."""
        return str((await self._meter(tenant_id, meter_id, field)).name)

    async def group_by(self, tenant_id: str, meter_id: str, field: str) -> tuple[str, ...]:
        """The meter's group_by keys; InvalidArgument as for meter_name."""
        return tuple((await self._meter(tenant_id, meter_id, field)).group_by)

    async def _meter(self, tenant_id: str, meter_id: str, field: str) -> meter_pb2.Meter:
        try:
            meter = await self._stub.GetMeter(
                meter_pb2.GetMeterRequest(id=meter_id),
                metadata=on_behalf_of(self._service_token, tenant_id),
                timeout=10,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise InvalidArgument(f"{field}: no meter {meter_id!r}") from exc
            raise Unavailable(f"meter service: {exc.code().name}") from exc
        return meter

    async def _query(
        self,
        tenant_id: str,
        meter_id: str,
        customer_external_id: str,
        start: datetime,
        end: datetime,
        group_by: str = "",
        *,
        page_size: int = 0,
        page_token: str = "",
    ) -> meter_pb2.QueryUsageResponse:
        request = meter_pb2.QueryUsageRequest(
            meter_id=meter_id,
            customer_id=customer_external_id,
            window_size=meter_pb2.WINDOW_SIZE_NONE,
            group_by=[group_by] if group_by else [],
            page_size=page_size,
            page_token=page_token,
        )
        request.start_time.FromDatetime(start)
        request.end_time.FromDatetime(end)
        try:
            answer: meter_pb2.QueryUsageResponse = await self._stub.QueryUsage(
                request, metadata=on_behalf_of(self._service_token, tenant_id), timeout=60
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and (
                group_by or not customer_external_id
            ):
                # The answer for every customer (or every transaction) is over
                # meter's limits for the service token (or meter is busy with
                # other large answers).
                raise ResourceExhausted(f"meter service: {exc.details()}") from exc
            raise Unavailable(f"meter service: {exc.code().name}: {exc.details()}") from exc
        return answer

    async def consumed(
        self,
        tenant_id: str,
        meter_id: str,
        customer_external_id: str,
        start: datetime,
        end: datetime,
    ) -> Decimal:
        """The meter's value for one customer over [start, end)."""
        answer = await self._query(tenant_id, meter_id, customer_external_id, start, end)
        # WINDOW_SIZE_NONE with a customer_id answers exactly one row.
        return Decimal(answer.rows[0].value) if answer.rows else Decimal(0)

    async def consumed_by_group(
        self,
        tenant_id: str,
        meter_id: str,
        customer_external_id: str,
        start: datetime,
        end: datetime,
        key: str,
    ) -> list[Decimal]:
        """The meter's value over [start, end) for one customer, one value per
        distinct value of the group_by `key` (events without it form one
        group): each transaction's amount, for a PERCENTAGE price."""
        answer = await self._query(tenant_id, meter_id, customer_external_id, start, end, key)
        return [Decimal(row.value) for row in answer.rows]

    async def consumed_page(
        self,
        tenant_id: str,
        meter_id: str,
        start: datetime,
        end: datetime,
        *,
        page_size: int,
        page_token: str = "",
    ) -> tuple[dict[str, Decimal], str]:
        """One page of the meter's values over [start, end) by customer: up to
        `page_size` customers with usage, after those of `page_token`, in the
        bytewise order of their external ids; and the next page's token (empty
        after the last). ResourceExhausted when meter refuses the page (over its
        limits for the service token, or busy with other large answers): ask
        per customer instead."""
        answer = await self._query(
            tenant_id, meter_id, "", start, end, page_size=page_size, page_token=page_token
        )
        return {row.customer_id: Decimal(row.value) for row in answer.rows}, answer.next_page_token
