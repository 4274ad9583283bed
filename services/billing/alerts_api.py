"""UsageAlertService's servicer: protobuf in, store calls, protobuf out."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from services.billing.alerts import proto_alert
from services.billing.alerts_store import AlertStore
from services.billing.meter_client import Meters
from services.billing.store import BillingStore
from services.common.context import current_tenant
from services.common.errors import InvalidArgument
from services.common.paging import fetch_page
from usagebilling.billing.v1 import alert_pb2, alert_pb2_grpc


def _quantity(text: str) -> Decimal | None:
    if not text:
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise InvalidArgument(f"quantity: {text[:64]!r} is not a decimal number") from None
    if not value.is_finite() or value <= 0:
        raise InvalidArgument("quantity: must be a positive number")
    return value


class UsageAlertServicer(alert_pb2_grpc.UsageAlertServiceServicer):
    def __init__(self, alerts: AlertStore, billing: BillingStore, meters: Meters) -> None:
        self._alerts = alerts
        self._billing = billing
        self._meters = meters

    async def CreateUsageAlert(
        self, request: alert_pb2.CreateUsageAlertRequest, context: Any
    ) -> alert_pb2.UsageAlert:
        tenant_id = current_tenant()
        quantity = _quantity(request.quantity)
        if request.amount_minor < 0:
            raise InvalidArgument("amount_minor: must be positive")
        if (quantity is None) == (request.amount_minor == 0):
            raise InvalidArgument("threshold: set exactly one of quantity and amount_minor")
        if not request.meter_id:
            raise InvalidArgument("meter_id: required")
        await self._meters.meter_name(tenant_id, request.meter_id, "meter_id")
        if request.customer_id:
            await self._billing.get_customer(tenant_id, request.customer_id)
        record = await self._alerts.create(
            tenant_id,
            request.meter_id,
            request.customer_id,
            quantity,
            request.amount_minor or None,
        )
        return proto_alert(record)

    async def ListUsageAlerts(
        self, request: alert_pb2.ListUsageAlertsRequest, context: Any
    ) -> alert_pb2.ListUsageAlertsResponse:
        rows, token = await fetch_page(
            request,
            lambda after, limit: self._alerts.page(current_tenant(), after, limit),
            lambda r: (r.created_at, r.id),
        )
        return alert_pb2.ListUsageAlertsResponse(
            alerts=[proto_alert(r) for r in rows], next_page_token=token
        )

    async def DeleteUsageAlert(
        self, request: alert_pb2.DeleteUsageAlertRequest, context: Any
    ) -> alert_pb2.DeleteUsageAlertResponse:
        await self._alerts.delete(current_tenant(), request.id)
        return alert_pb2.DeleteUsageAlertResponse()
