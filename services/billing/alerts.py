"""Usage alerts: a loop (every USAGEBILLING_ALERT_INTERVAL, 1 s by default)
reads, for each alert and each subscription it watches, the meter's usage in
the subscription's current period, and fires usage.threshold_reached when it
is at or over the threshold.

Why a loop reading meter rather than a signal from meter: meter pre-aggregates
(rollups), so one read costs about the same whatever the usage, and billing
already holds what a signal would need (subscriptions, periods, thresholds);
meter stays free of billing's notions. The cost is one QueryUsage per
(alert, subscription) not yet fired per interval; fired ones are skipped.
Once per period is the firing's primary key (alert, customer, period start),
recorded before the message is published (with Nats-Msg-Id derived from the
same key), and published again until JetStream acks it (an outbox)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from services.billing.alerts_store import AlertRecord, AlertStore
from services.billing.convert import price_from_json
from services.billing.domain.alerts import reached
from services.billing.domain.money import minor_units
from services.billing.domain.periods import Interval, period_containing
from services.billing.meter_client import Meters
from services.billing.store import BillingStore, SubscriptionRecord
from services.common.jetstream import BILLING_SUBJECT_PREFIX
from services.common.logs import get_logger
from usagebilling.billing.v1 import alert_pb2

log = get_logger(__name__)

SUBJECT = f"{BILLING_SUBJECT_PREFIX}.usage.threshold_reached"
PUBLISH_TIMEOUT = 5.0


def proto_alert(record: AlertRecord) -> alert_pb2.UsageAlert:
    message = alert_pb2.UsageAlert(
        id=record.id,
        meter_id=record.meter_id,
        customer_id=record.customer_id,
        quantity=format(record.quantity, "f") if record.quantity is not None else "",
        amount_minor=record.amount_minor or 0,
    )
    message.create_time.FromDatetime(record.created_at)
    return message


def msg_id(alert_id: str, customer_id: str, period_start: datetime) -> str:
    return f"alert-{alert_id}-{customer_id}-{period_start.astimezone(UTC).isoformat()}"


class Alerts:
    def __init__(
        self,
        alerts: AlertStore,
        billing: BillingStore,
        meters: Meters,
        js: Any,
        interval: timedelta,
    ) -> None:
        self._alerts = alerts
        self._billing = billing
        self._meters = meters
        self._js = js
        self._interval = interval

    async def _watched(self, alert: AlertRecord) -> list[SubscriptionRecord]:
        """The subscriptions whose product prices the alert's meter."""
        subscriptions = await self._billing.subscriptions(alert.tenant_id, alert.customer_id)
        products = {p.id: p for p in await self._billing.products_of(alert.tenant_id)}
        return [
            s
            for s in subscriptions
            if s.product_id in products
            and any(
                p.get("meter_id") == alert.meter_id for p in products[s.product_id].usage_prices
            )
        ]

    async def check(self, alert: AlertRecord, now: datetime) -> int:
        """Fires the alert for each watched subscription over its threshold
        in its current period; returns how many fired."""
        fired = 0
        products = {p.id: p for p in await self._billing.products_of(alert.tenant_id)}
        for subscription in await self._watched(alert):
            if subscription.start_time > now or (
                subscription.end_time is not None and subscription.end_time <= now
            ):
                continue
            product = products[subscription.product_id]
            start, end, _ = period_containing(
                subscription.start_time, Interval[product.billing_interval], now
            )
            if subscription.end_time is not None:
                end = min(end, subscription.end_time)
            if await self._alerts.fired(alert.id, subscription.customer_id, start):
                continue
            usage = await self._meters.consumed(
                alert.tenant_id, alert.meter_id, subscription.customer_external_id, start, end
            )
            prices = [p for p in product.usage_prices if p.get("meter_id") == alert.meter_id]
            price = price_from_json(prices[0]) if prices else None
            digits = minor_units(product.currency)
            if not reached(usage, alert.quantity, alert.amount_minor, price, digits):
                continue
            payload = alert_pb2.UsageThresholdReached(
                tenant_id=alert.tenant_id,
                alert=proto_alert(alert),
                customer_id=subscription.customer_id,
                customer_external_id=subscription.customer_external_id,
                subscription_id=subscription.id,
                usage=format(usage, "f"),
            )
            payload.period_start.FromDatetime(start)
            payload.period_end.FromDatetime(end)
            payload.reached_time.FromDatetime(now)
            if await self._alerts.fire(
                alert.tenant_id,
                alert.id,
                subscription.customer_id,
                start,
                payload.SerializeToString(),
            ):
                fired += 1
                log.info(
                    "usage_threshold_reached",
                    tenant_id=alert.tenant_id,
                    alert_id=alert.id,
                    customer_id=subscription.customer_id,
                    usage=str(usage),
                )
        return fired

    async def publish_pending(self) -> int:
        if self._js is None:
            return 0
        published = 0
        for alert_id, customer_id, period_start, payload in await self._alerts.unpublished(100):
            try:
                await self._js.publish(
                    SUBJECT,
                    payload,
                    headers={"Nats-Msg-Id": msg_id(alert_id, customer_id, period_start)},
                    timeout=PUBLISH_TIMEOUT,
                )
            except Exception as exc:
                log.warning("alert_publish_failed", alert_id=alert_id, error=repr(exc))
                break
            await self._alerts.mark_published(alert_id, customer_id, period_start)
            published += 1
        return published

    async def tick(self) -> None:
        now = datetime.now(UTC)
        for alert in await self._alerts.all_alerts():
            try:
                await self.check(alert, now)
            except Exception as exc:  # one alert's trouble must not stop the others
                log.warning("alert_check_failed", alert_id=alert.id, error=repr(exc))
        await self.publish_pending()

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:
                log.warning("alerts_failed", error=repr(exc))
            await asyncio.sleep(self._interval.total_seconds())
