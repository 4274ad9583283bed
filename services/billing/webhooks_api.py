"""WebhookService's servicer: protobuf in, store calls, protobuf out."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from services.billing.domain import webhooks as rules
from services.billing.domain.webhooks import Policy
from services.billing.webhooks import check_destination, proto_endpoint
from services.billing.webhooks_store import DeliveryRecord, EndpointRecord, WebhookStore
from services.common.context import current_tenant
from services.common.errors import InvalidArgument
from services.common.paging import fetch_page
from usagebilling.billing.v1 import webhook_pb2, webhook_pb2_grpc

# How long the old secret still signs after RotateWebhookSecret.
ROTATION_OVERLAP = timedelta(hours=24)
MAX_DESCRIPTION = 500

_STATUS = {
    "PENDING": webhook_pb2.WEBHOOK_DELIVERY_STATUS_PENDING,
    "SUCCEEDED": webhook_pb2.WEBHOOK_DELIVERY_STATUS_SUCCEEDED,
    "FAILED": webhook_pb2.WEBHOOK_DELIVERY_STATUS_FAILED,
}


def proto_delivery(record: DeliveryRecord) -> webhook_pb2.WebhookDelivery:
    message = webhook_pb2.WebhookDelivery(
        id=record.id,
        endpoint_id=record.endpoint_id,
        message_id=record.message_id,
        event_type=record.event_type,
        status=_STATUS[record.status],
        attempt=record.attempts,
        response_status_code=record.status_code,
        latency_ms=record.latency_ms,
        response_body=record.response_body,
        error=record.error,
        payload=record.payload,
    )
    if record.status == "PENDING" and record.next_attempt_at is not None:
        message.next_attempt_time.FromDatetime(record.next_attempt_at)
    if record.last_attempt_at is not None:
        message.last_attempt_time.FromDatetime(record.last_attempt_at)
    message.create_time.FromDatetime(record.created_at)
    return message


def _new_secret() -> str:
    return rules.new_secret(secrets.token_bytes(32))


def _with_secret(record: EndpointRecord) -> webhook_pb2.CreateWebhookEndpointResponse:
    return webhook_pb2.CreateWebhookEndpointResponse(
        endpoint=proto_endpoint(record), secret=record.secret
    )


class WebhookServicer(webhook_pb2_grpc.WebhookServiceServicer):
    def __init__(self, store: WebhookStore, policy: Policy) -> None:
        self._store = store
        self._policy = policy

    async def CreateWebhookEndpoint(
        self, request: webhook_pb2.CreateWebhookEndpointRequest, context: Any
    ) -> webhook_pb2.CreateWebhookEndpointResponse:
        try:
            types = rules.check_event_types(list(request.event_types))
            await check_destination(request.url, self._policy.allowed)
        except rules.WebhookRuleError as exc:
            raise InvalidArgument(str(exc)) from None
        if len(request.description) > MAX_DESCRIPTION:
            raise InvalidArgument(f"description: at most {MAX_DESCRIPTION} characters")
        record = await self._store.create_endpoint(
            current_tenant(), request.url, types, request.description, _new_secret()
        )
        return _with_secret(record)

    async def GetWebhookEndpoint(
        self, request: webhook_pb2.GetWebhookEndpointRequest, context: Any
    ) -> webhook_pb2.WebhookEndpoint:
        return proto_endpoint(await self._store.get_endpoint(current_tenant(), request.id))

    async def ListWebhookEndpoints(
        self, request: webhook_pb2.ListWebhookEndpointsRequest, context: Any
    ) -> webhook_pb2.ListWebhookEndpointsResponse:
        rows, token = await fetch_page(
            request,
            lambda after, limit: self._store.list_endpoints(current_tenant(), after, limit),
            lambda r: (r.created_at, r.id),
        )
        return webhook_pb2.ListWebhookEndpointsResponse(
            endpoints=[proto_endpoint(r) for r in rows], next_page_token=token
        )

    async def RotateWebhookSecret(
        self, request: webhook_pb2.RotateWebhookSecretRequest, context: Any
    ) -> webhook_pb2.CreateWebhookEndpointResponse:
        until = datetime.now(UTC) + ROTATION_OVERLAP
        record = await self._store.rotate_secret(current_tenant(), request.id, _new_secret(), until)
        return _with_secret(record)

    async def DisableWebhookEndpoint(
        self, request: webhook_pb2.DisableWebhookEndpointRequest, context: Any
    ) -> webhook_pb2.WebhookEndpoint:
        record = await self._store.set_enabled(
            current_tenant(), request.id, False, "disabled by request"
        )
        return proto_endpoint(record)

    async def EnableWebhookEndpoint(
        self, request: webhook_pb2.EnableWebhookEndpointRequest, context: Any
    ) -> webhook_pb2.WebhookEndpoint:
        return proto_endpoint(await self._store.set_enabled(current_tenant(), request.id, True, ""))

    async def DeleteWebhookEndpoint(
        self, request: webhook_pb2.DeleteWebhookEndpointRequest, context: Any
    ) -> webhook_pb2.DeleteWebhookEndpointResponse:
        await self._store.delete_endpoint(current_tenant(), request.id)
        return webhook_pb2.DeleteWebhookEndpointResponse()

    async def ListWebhookDeliveries(
        self, request: webhook_pb2.ListWebhookDeliveriesRequest, context: Any
    ) -> webhook_pb2.ListWebhookDeliveriesResponse:
        endpoint_id = request.endpoint_id
        if not endpoint_id:
            raise InvalidArgument("endpoint_id: required")
        rows, token = await fetch_page(
            request,
            lambda after, limit: self._store.list_deliveries(
                current_tenant(), endpoint_id, after, limit
            ),
            lambda r: (r.created_at, r.id),
        )
        return webhook_pb2.ListWebhookDeliveriesResponse(
            deliveries=[proto_delivery(r) for r in rows], next_page_token=token
        )

    async def RetryWebhookDelivery(
        self, request: webhook_pb2.RetryWebhookDeliveryRequest, context: Any
    ) -> webhook_pb2.WebhookDelivery:
        record = await self._store.retry(current_tenant(), request.id, datetime.now(UTC))
        return proto_delivery(record)
