"""The usual start of a credits test, over the real services (a tenant's
Client): a tokens meter, a TOKENS credit type and a customer. The product that
draws the credits is tools.credit_setup.credit_product's."""

from __future__ import annotations

from tests.client import Client
from usagebilling.billing.v1 import credit_pb2, credit_pb2_grpc, customer_pb2
from usagebilling.meter.v1 import meter_pb2


def credits_of(client: Client) -> credit_pb2_grpc.CreditServiceStub:
    return credit_pb2_grpc.CreditServiceStub(client.channels["billing"])


async def tokens_setup(client: Client, external_id: str) -> tuple[str, str, str]:
    """A SUM meter of `llm.call` events' `tokens`, a custom credit type of
    precision 0 (both named tokens-<external_id>) and a customer of that
    external id: (meter id, credit type id, customer id)."""
    meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name=f"tokens-{external_id}",
            event_name="llm.call",
            aggregation=meter_pb2.AGGREGATION_SUM,
            property="tokens",
        ),
    )
    kind = await client.call(
        credits_of(client).CreateCreditType,
        credit_pb2.CreateCreditTypeRequest(
            name=f"tokens-{external_id}", kind=credit_pb2.CREDIT_UNIT_KIND_CUSTOM, precision=0
        ),
    )
    customer = await client.call(
        client.customers.CreateCustomer, customer_pb2.CreateCustomerRequest(external_id=external_id)
    )
    return meter.id, kind.id, customer.id
