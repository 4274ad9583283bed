"""billing's servicers: protobuf in, use-case calls, protobuf out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from services.billing import convert
from services.billing.accounts import Accounts
from services.billing.catalog import Catalog
from services.billing.domain.fields import check_text
from services.billing.invoicing import Invoicing
from services.billing.store import BillingStore, CustomerRecord, ProductRecord
from services.common.context import current_api_key_id, current_tenant
from services.common.errors import InvalidArgument
from services.common.paging import fetch_bounded_page, fetch_page
from usagebilling.billing.v1 import (
    customer_pb2,
    customer_pb2_grpc,
    invoice_pb2,
    invoice_pb2_grpc,
    product_pb2,
    product_pb2_grpc,
    subscription_pb2,
    subscription_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)

# A ListProducts answer stops before the product that would take it past this
# many encoded bytes (it always holds one product). A product within today's
# limits (50 usage prices of 100 tiers, decimals of 100 characters) can pass
# 1 MB, so a page of them passed the 4 MiB a gRPC client takes by default.
MAX_LIST_PRODUCTS_BYTES = 1024 * 1024


def _now() -> datetime:
    return datetime.now(UTC)


def _required(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field}: required")
    return value


async def _customer_named(
    store: BillingStore, customer_id: str, id_field: str, external_id: str
) -> CustomerRecord:
    """The customer named by exactly one of its id and its external_id."""
    if customer_id and external_id:
        raise InvalidArgument(f"{id_field}, external_id: set one of the two, not both")
    if external_id:
        check_text("external_id", external_id, required=True)
        return await store.get_customer_by_external_id(current_tenant(), external_id)
    if not customer_id:
        raise InvalidArgument(f"{id_field}, external_id: one of the two is required")
    return await store.get_customer(current_tenant(), customer_id)


class TenantServicer(tenant_pb2_grpc.TenantServiceServicer):
    def __init__(self, accounts: Accounts, store: BillingStore) -> None:
        self._accounts = accounts
        self._store = store

    async def CreateTenant(
        self, request: tenant_pb2.CreateTenantRequest, context: Any
    ) -> tenant_pb2.Tenant:
        tenant_id = await self._accounts.create_tenant(request.name)
        return tenant_pb2.Tenant(id=tenant_id, name=request.name)

    async def CreateApiKey(
        self, request: tenant_pb2.CreateApiKeyRequest, context: Any
    ) -> tenant_pb2.ApiKey:
        key_id, secret = await self._accounts.create_api_key(request.tenant_id, request.description)
        return tenant_pb2.ApiKey(
            id=key_id, tenant_id=request.tenant_id, secret=secret, description=request.description
        )

    async def RevokeApiKey(
        self, request: tenant_pb2.RevokeApiKeyRequest, context: Any
    ) -> tenant_pb2.ApiKey:
        key = await self._store.revoke_api_key(_required(request.id, "id"))
        return tenant_pb2.ApiKey(
            id=key.id, tenant_id=key.tenant_id, description=key.description, revoked=True
        )


class AuthServicer(tenant_pb2_grpc.AuthServiceServicer):
    async def WhoAmI(
        self, request: tenant_pb2.WhoAmIRequest, context: Any
    ) -> tenant_pb2.WhoAmIResponse:
        # The auth interceptor resolved the caller's key already. Called with
        # the service token and a tenant header, it answers only for a tenant
        # that exists (NOT_FOUND otherwise): how ingest and meter check one.
        return tenant_pb2.WhoAmIResponse(
            tenant_id=current_tenant(), api_key_id=current_api_key_id()
        )


class CustomerServicer(customer_pb2_grpc.CustomerServiceServicer):
    def __init__(self, accounts: Accounts, store: BillingStore) -> None:
        self._accounts = accounts
        self._store = store

    async def CreateCustomer(
        self, request: customer_pb2.CreateCustomerRequest, context: Any
    ) -> customer_pb2.Customer:
        record = await self._accounts.create_customer(
            current_tenant(), request.external_id, request.name, request.email
        )
        return convert.proto_customer(record)

    async def GetCustomer(
        self, request: customer_pb2.GetCustomerRequest, context: Any
    ) -> customer_pb2.Customer:
        record = await _customer_named(self._store, request.id, "id", request.external_id)
        return convert.proto_customer(record)

    async def ListCustomers(
        self, request: customer_pb2.ListCustomersRequest, context: Any
    ) -> customer_pb2.ListCustomersResponse:
        rows, token = await fetch_page(
            request,
            lambda after, limit: self._store.list_customers(current_tenant(), after, limit),
            lambda r: (r.created_at, r.id),
        )
        return customer_pb2.ListCustomersResponse(
            customers=[convert.proto_customer(r) for r in rows], next_page_token=token
        )


class ProductServicer(product_pb2_grpc.ProductServiceServicer):
    def __init__(self, catalog: Catalog, store: BillingStore) -> None:
        self._catalog = catalog
        self._store = store

    async def CreateProduct(
        self, request: product_pb2.CreateProductRequest, context: Any
    ) -> product_pb2.Product:
        return convert.proto_product(await self._catalog.create_product(current_tenant(), request))

    async def GetProduct(
        self, request: product_pb2.GetProductRequest, context: Any
    ) -> product_pb2.Product:
        record = await self._store.get_product(current_tenant(), _required(request.id, "id"))
        return convert.proto_product(record)

    async def ListProducts(
        self, request: product_pb2.ListProductsRequest, context: Any
    ) -> product_pb2.ListProductsResponse:
        def cursor(r: ProductRecord) -> tuple[datetime, str]:
            return r.created_at, r.id

        page, token = await fetch_bounded_page(
            request,
            lambda after, limit: self._store.list_products(current_tenant(), after, limit),
            cursor,
            convert.proto_product,
            MAX_LIST_PRODUCTS_BYTES,
        )
        return product_pb2.ListProductsResponse(products=page, next_page_token=token)


class SubscriptionServicer(subscription_pb2_grpc.SubscriptionServiceServicer):
    def __init__(self, catalog: Catalog, invoicing: Invoicing, store: BillingStore) -> None:
        self._catalog = catalog
        self._invoicing = invoicing
        self._store = store

    async def _proto(self, tenant_id: str, record: Any) -> subscription_pb2.Subscription:
        now = _now()
        if record.end_time is not None and record.end_time <= now:
            status = subscription_pb2.SUBSCRIPTION_STATUS_CANCELED
        elif record.end_time is not None:
            status = subscription_pb2.SUBSCRIPTION_STATUS_CANCELING
        else:
            status = subscription_pb2.SUBSCRIPTION_STATUS_ACTIVE
        message = subscription_pb2.Subscription(
            id=record.id,
            customer_id=record.customer_id,
            product_id=record.product_id,
            start_time=convert.to_timestamp(record.start_time),
            status=status,
        )
        if status != subscription_pb2.SUBSCRIPTION_STATUS_CANCELED:
            start, end = await self._catalog.current_period(tenant_id, record, now)
            message.current_period_start.CopyFrom(convert.to_timestamp(start))
            message.current_period_end.CopyFrom(convert.to_timestamp(end))
        if record.end_time is not None:
            message.end_time.CopyFrom(convert.to_timestamp(record.end_time))
        if record.commitment is not None:
            message.commitment.CopyFrom(convert.proto_commitment(record.commitment))
        return message

    async def CreateSubscription(
        self, request: subscription_pb2.CreateSubscriptionRequest, context: Any
    ) -> subscription_pb2.Subscription:
        tenant = current_tenant()
        now = _now()
        start = (
            convert.to_datetime(request.start_time, "start_time")
            if request.HasField("start_time")
            else now
        )
        record = await self._catalog.create_subscription(
            tenant,
            request.customer_id,
            request.product_id,
            start,
            now,
            convert.commitment(request.commitment) if request.HasField("commitment") else None,
        )
        return await self._proto(tenant, record)

    async def GetSubscription(
        self, request: subscription_pb2.GetSubscriptionRequest, context: Any
    ) -> subscription_pb2.Subscription:
        tenant = current_tenant()
        record = await self._store.get_subscription(tenant, _required(request.id, "id"))
        return await self._proto(tenant, record)

    async def CancelSubscription(
        self, request: subscription_pb2.CancelSubscriptionRequest, context: Any
    ) -> subscription_pb2.Subscription:
        tenant = current_tenant()
        record = await self._invoicing.cancel(
            tenant, request.id, immediately=request.immediately, now=_now()
        )
        return await self._proto(tenant, record)


class InvoiceServicer(invoice_pb2_grpc.InvoiceServiceServicer):
    def __init__(self, invoicing: Invoicing, store: BillingStore) -> None:
        self._invoicing = invoicing
        self._store = store

    async def PreviewInvoice(
        self, request: invoice_pb2.PreviewInvoiceRequest, context: Any
    ) -> invoice_pb2.Invoice:
        subscription, draft = await self._invoicing.preview(
            current_tenant(), request.subscription_id, _now()
        )
        return convert.preview_invoice(draft, subscription.customer_id, subscription.id)

    async def RunBillingCycle(
        self, request: invoice_pb2.RunBillingCycleRequest, context: Any
    ) -> invoice_pb2.RunBillingCycleResponse:
        now = _now()
        as_of = convert.to_datetime(request.as_of, "as_of") if request.HasField("as_of") else now
        report = await self._invoicing.cycle(current_tenant(), as_of, now)
        return invoice_pb2.RunBillingCycleResponse(
            invoice_ids=report.invoice_ids,
            failures=[convert.proto_failure(f) for f in report.failures],
            more_pending=report.more_pending,
        )

    async def GetInvoice(
        self, request: invoice_pb2.GetInvoiceRequest, context: Any
    ) -> invoice_pb2.Invoice:
        record = await self._store.get_invoice(current_tenant(), _required(request.id, "id"))
        return convert.proto_invoice(record)

    async def ListInvoices(
        self, request: invoice_pb2.ListInvoicesRequest, context: Any
    ) -> invoice_pb2.ListInvoicesResponse:
        rows, token = await fetch_page(
            request,
            lambda after, limit: self._store.list_invoices(
                current_tenant(),
                customer_id=request.customer_id,
                subscription_id=request.subscription_id,
                after=after,
                limit=limit,
            ),
            lambda r: (r.period_start, r.id),
        )
        return invoice_pb2.ListInvoicesResponse(
            invoices=[convert.proto_invoice(r) for r in rows], next_page_token=token
        )

    async def VoidInvoice(
        self, request: invoice_pb2.VoidInvoiceRequest, context: Any
    ) -> invoice_pb2.Invoice:
        record = await self._invoicing.void(
            current_tenant(), request.id, reissue=request.reissue, now=_now()
        )
        return convert.proto_invoice(record)

    async def GetCustomerUsage(
        self, request: invoice_pb2.GetCustomerUsageRequest, context: Any
    ) -> invoice_pb2.GetCustomerUsageResponse:
        customer_id = request.customer_id
        if not customer_id and not request.external_id:
            raise InvalidArgument("customer_id, external_id: one of the two is required")
        if request.external_id:
            named = await _customer_named(
                self._store, customer_id, "customer_id", request.external_id
            )
            customer_id = named.id
        usage = await self._invoicing.customer_usage(current_tenant(), customer_id, _now())
        return invoice_pb2.GetCustomerUsageResponse(
            customer_id=customer_id,
            subscription_id=usage.subscription.id,
            period_start=convert.to_timestamp(usage.period_start),
            period_end=convert.to_timestamp(usage.period_end),
            currency=usage.currency,
            usages=[
                invoice_pb2.MeterUsage(
                    meter_id=u.meter_id,
                    meter_name=u.meter_name,
                    consumed=convert.text(u.consumed),
                    free=convert.text(u.free),
                    chargeable=convert.text(u.chargeable),
                    amount_minor=u.amount_minor,
                )
                for u in usage.usages
            ],
        )
