"""CreditService's servicer, and the credit parts of products: protobuf in,
use-case calls, protobuf out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from services.billing import api, convert
from services.billing.catalog import Catalog
from services.billing.credits import Credits, decorate_product, product_credits, proto_entry
from services.billing.credits_store import CreditStore, CreditTypeRecord, GrantRecord
from services.billing.domain.credits import EntryKind
from services.billing.store import BillingStore, ProductRecord
from services.common.context import current_tenant
from services.common.errors import InvalidArgument
from services.common.ids import parse_uuid
from services.common.paging import fetch_page
from usagebilling.billing.v1 import credit_pb2, credit_pb2_grpc, product_pb2

_KINDS = {
    "CUSTOM": credit_pb2.CREDIT_UNIT_KIND_CUSTOM,
    "CURRENCY": credit_pb2.CREDIT_UNIT_KIND_CURRENCY,
}
_ENTRY_KINDS = {getattr(credit_pb2, f"CREDIT_ENTRY_KIND_{k.value}"): k.value for k in EntryKind}


def _now() -> datetime:
    return datetime.now(UTC)


def _text(value: Any) -> str:
    return "" if value is None else format(value, "f")


def proto_type(record: CreditTypeRecord) -> credit_pb2.CreditType:
    message = credit_pb2.CreditType(
        id=record.id,
        name=record.name,
        kind=_KINDS[record.kind],
        precision=record.precision,
        currency=record.currency,
        low_balance_threshold=_text(record.low_balance_threshold),
    )
    message.create_time.FromDatetime(record.created_at)
    return message


def proto_grant(record: GrantRecord) -> credit_pb2.CreditGrant:
    message = credit_pb2.CreditGrant(
        id=record.id,
        customer_id=record.customer_id,
        credit_type_id=record.credit_type_id,
        amount=_text(record.amount),
        priority=record.priority,
        description=record.description,
        source=record.source,
        price_minor=record.price_minor,
        price_currency=record.price_currency,
        invoice_id=record.invoice_id,
        subscription_id=record.subscription_id,
    )
    message.effective_time.FromDatetime(record.effective_at)
    if record.expires_at is not None:
        message.expire_time.FromDatetime(record.expires_at)
    if record.period_start is not None:
        message.period_start.FromDatetime(record.period_start)
    return message


class CreditCatalog(Catalog):
    """The catalog, also storing a product's credits (validated first)."""

    def __init__(self, store: BillingStore, meters: Any, credits: CreditStore) -> None:
        super().__init__(store, meters)
        self._credits = credits

    async def create_product(
        self, tenant_id: str, request: product_pb2.CreateProductRequest
    ) -> ProductRecord:
        credits = await product_credits(self._credits, tenant_id, request)
        record = await super().create_product(tenant_id, request)
        if credits:
            # Products are immutable: the one write that completes it follows
            # at once. (A crash in between leaves a product whose id the client
            # never received, without credits.)
            await self._credits.set_product_credits(tenant_id, record.id, credits)
        return record


class CreditProductServicer(api.ProductServicer):
    """ProductService whose answers show each product's credits."""

    def __init__(self, catalog: Catalog, store: BillingStore, credits: CreditStore) -> None:
        super().__init__(catalog, store)
        self._credits = credits

    async def _decorate(self, products: list[product_pb2.Product]) -> None:
        if not products:
            return
        one = products[0].id if len(products) == 1 else ""
        found = await self._credits.product_credits(current_tenant(), one)
        for product in products:
            if product.id in found:
                decorate_product(product, found[product.id])

    async def CreateProduct(
        self, request: product_pb2.CreateProductRequest, context: Any
    ) -> product_pb2.Product:
        product = await super().CreateProduct(request, context)
        await self._decorate([product])
        return product

    async def GetProduct(
        self, request: product_pb2.GetProductRequest, context: Any
    ) -> product_pb2.Product:
        product = await super().GetProduct(request, context)
        await self._decorate([product])
        return product

    async def ListProducts(
        self, request: product_pb2.ListProductsRequest, context: Any
    ) -> product_pb2.ListProductsResponse:
        answer = await super().ListProducts(request, context)
        await self._decorate(list(answer.products))
        return answer


class CreditServicer(credit_pb2_grpc.CreditServiceServicer):
    def __init__(self, credits: Credits, store: CreditStore) -> None:
        self._credits = credits
        self._store = store

    async def CreateCreditType(
        self, request: credit_pb2.CreateCreditTypeRequest, context: Any
    ) -> credit_pb2.CreditType:
        return proto_type(await self._credits.create_type(current_tenant(), request))

    async def GetCreditType(
        self, request: credit_pb2.GetCreditTypeRequest, context: Any
    ) -> credit_pb2.CreditType:
        return proto_type(await self._store.get_credit_type(current_tenant(), request.id, "id"))

    async def ListCreditTypes(
        self, request: credit_pb2.ListCreditTypesRequest, context: Any
    ) -> credit_pb2.ListCreditTypesResponse:
        rows, token = await fetch_page(
            request,
            lambda after, limit: self._store.list_credit_types(current_tenant(), after, limit),
            lambda r: (r.created_at, r.id),
        )
        return credit_pb2.ListCreditTypesResponse(
            credit_types=[proto_type(r) for r in rows], next_page_token=token
        )

    async def GrantCredits(
        self, request: credit_pb2.GrantCreditsRequest, context: Any
    ) -> credit_pb2.CreditGrant:
        return proto_grant(await self._credits.grant(current_tenant(), request, _now()))

    async def GetCreditBalance(
        self, request: credit_pb2.GetCreditBalanceRequest, context: Any
    ) -> credit_pb2.CreditBalance:
        now = _now()
        customer_id, balance = await self._credits.balance(
            current_tenant(), request.customer_id, request.credit_type_id, now
        )
        message = credit_pb2.CreditBalance(
            customer_id=customer_id,
            # The id as stored (lower case), however the request spelled it;
            # balance() has already refused one that is not a UUID.
            credit_type_id=parse_uuid(request.credit_type_id, "credit_type_id"),
            available=_text(balance.available),
            overage_this_period=_text(balance.overage),
        )
        for grant, left in balance.grants:
            item = message.grants.add(grant_id=grant.id, remaining=_text(left))
            item.effective_time.FromDatetime(grant.effective)
            if grant.expires is not None:
                item.expire_time.FromDatetime(grant.expires)
        if balance.next_expiry is not None:
            message.next_expire_time.FromDatetime(balance.next_expiry)
        message.as_of.FromDatetime(now)
        if balance.settled_until is not None:
            message.settled_until.FromDatetime(balance.settled_until)
        return message

    async def ListCreditLedger(
        self, request: credit_pb2.ListCreditLedgerRequest, context: Any
    ) -> credit_pb2.ListCreditLedgerResponse:
        tenant = current_tenant()
        customer_id = None
        if request.customer_id:
            customer_id, _ = await self._store.customer(tenant, request.customer_id, "customer_id")
        type_id = None
        if request.credit_type_id:
            type_id = (await self._store.get_credit_type(tenant, request.credit_type_id)).id
        kind = None
        if request.kind:
            if request.kind not in _ENTRY_KINDS:
                raise InvalidArgument("kind: not a CREDIT_ENTRY_KIND_* value")
            kind = _ENTRY_KINDS[request.kind]
        start = (
            convert.to_datetime(request.start_time, "start_time")
            if request.HasField("start_time")
            else None
        )
        end = (
            convert.to_datetime(request.end_time, "end_time")
            if request.HasField("end_time")
            else None
        )
        if start is not None and end is not None and end < start:
            raise InvalidArgument("end_time: must not be before start_time")
        rows, token = await fetch_page(
            request,
            lambda after, limit: self._store.ledger_page(
                tenant,
                customer_id=customer_id,
                type_id=type_id,
                kind=kind,
                start=start,
                end=end,
                after=after,
                limit=limit,
            ),
            lambda r: (r.created_at, r.id),
            uuid_key=False,
        )
        return credit_pb2.ListCreditLedgerResponse(
            entries=[proto_entry(r) for r in rows], next_page_token=token
        )

    async def AdjustCredits(
        self, request: credit_pb2.AdjustCreditsRequest, context: Any
    ) -> credit_pb2.CreditLedgerEntry:
        return proto_entry(await self._credits.adjust(current_tenant(), request, _now()))
