"""A small gRPC client for the tests: one channel per service, the bearer set."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import grpc

from usagebilling.billing.v1 import (
    customer_pb2_grpc,
    invoice_pb2_grpc,
    product_pb2_grpc,
    subscription_pb2_grpc,
    tenant_pb2_grpc,
)
from usagebilling.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from usagebilling.meter.v1 import meter_pb2_grpc

T = TypeVar("T")


class Client:
    def __init__(self, addresses: dict[str, str], token: str) -> None:
        self.channels = {name: grpc.aio.insecure_channel(a) for name, a in addresses.items()}
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.ingest = ingest_pb2_grpc.IngestServiceStub(self.channels["ingest"])
        self.meter = meter_pb2_grpc.MeterServiceStub(self.channels["meter"])
        billing = self.channels["billing"]
        self.tenants = tenant_pb2_grpc.TenantServiceStub(billing)
        self.auth = tenant_pb2_grpc.AuthServiceStub(billing)
        self.customers = customer_pb2_grpc.CustomerServiceStub(billing)
        self.products = product_pb2_grpc.ProductServiceStub(billing)
        self.subscriptions = subscription_pb2_grpc.SubscriptionServiceStub(billing)
        self.invoices = invoice_pb2_grpc.InvoiceServiceStub(billing)

    async def call(self, method: Callable[..., Any], request: Any) -> Any:
        return await method(request, metadata=self.metadata, timeout=30)

    async def send_events(self, events: list[ingest_pb2.Event], timeout: float = 120) -> Any:
        """IngestEvents as a well-behaved client sends it: a call refused over the
        tenant's rate (RESOURCE_EXHAUSTED; ingest cuts the rate while meter has a
        backlog) is sent again after its `retry-after`, until `timeout`."""
        request = ingest_pb2.IngestEventsRequest(events=events)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                return await self.call(self.ingest.IngestEvents, request)
            except grpc.aio.AioRpcError as error:
                late = asyncio.get_running_loop().time() > deadline
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or late:
                    raise
                trailers = dict(error.trailing_metadata() or ())
                await asyncio.sleep(float(trailers.get("retry-after", 0.1)))

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()


def event(
    event_id: str, customer_id: str, name: str, when: datetime, **metadata: Any
) -> ingest_pb2.Event:
    message = ingest_pb2.Event(event_id=event_id, customer_id=customer_id, event_name=name)
    message.timestamp.FromDatetime(when)
    for key, value in metadata.items():
        slot = message.metadata[key]
        if isinstance(value, bool):
            slot.bool_value = value
        elif isinstance(value, int):
            slot.int_value = value
        elif isinstance(value, float):
            slot.number_value = value
        else:
            slot.string_value = str(value)
    return message


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float = 60
) -> T:
    """Polls `probe` until `done(result)`; returns the last result either way."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await probe()
        if done(result) or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(0.1)


def status_of(error: BaseException) -> grpc.StatusCode | None:
    return error.code() if isinstance(error, grpc.aio.AioRpcError) else None
