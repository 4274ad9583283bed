"""QueryUsage pages by customer: a page holds every row of up to `page_size`
customers (those with usage, in the bytewise order of their ids), and its
token names the last customer served.

The token is a signed page token (services.common.paging) of [query, customer]:
`query` is the request's digest (paging.request_digest: the tenant and every
field of the request but the page fields), so that a token is refused
(INVALID_ARGUMENT naming page_token) when it comes back with another query,
meter or tenant: the customer it names only means "done up to here" for the
query it was made for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from services.common.errors import InvalidArgument
from services.common.paging import decode_token, encode_token, request_digest
from services.meter.domain.query import UsageQuery
from usagebilling.meter.v1 import meter_pb2

# Customers one page holds at most; a larger page_size is taken as this.
MAX_PAGE_CUSTOMERS: Final = 10_000
# The longest customer id ingest takes (a token holding more is not ours).
_MAX_CUSTOMER_CHARS: Final = 255
_NOT_OURS: Final = "page_token: not a token returned by this API"
_OTHER_QUERY: Final = (
    "page_token: made for another query; pass it with the tenant, meter_id and every"
    " other field (page_size aside) of the request that returned it"
)


@dataclass
class UsagePage:
    """One page's request (`size` customers after `after`; size None: unpaged)
    and, once answered, the next page's token."""

    size: int | None
    after: str
    digest: str
    next_page_token: str = ""

    def finish(self, customers: set[str], query: UsageQuery) -> None:
        """Sets the next page's token from the customers this page served: a
        full page may have more after it (a query for one customer never does)."""
        if self.size is None or query.customer_id or len(customers) < self.size:
            return
        # Python orders str by code point, as PostgreSQL's COLLATE "C" orders UTF-8 bytes.
        self.next_page_token = encode_token([self.digest, max(customers)])


def usage_page(request: meter_pb2.QueryUsageRequest, tenant_id: str) -> UsagePage:
    """The page a request asks for; INVALID_ARGUMENT naming page_size or
    page_token when they cannot be served."""
    page_size, page_token = request.page_size, request.page_token
    if page_size < 0:
        raise InvalidArgument("page_size: must not be negative")
    if page_size == 0:
        if page_token:
            raise InvalidArgument("page_size: required with page_token (customers per page)")
        # Unpaged: no token is made or read, so no digest (most reads, billing's
        # per customer ones among them, are unpaged).
        return UsagePage(None, "", "")
    digest = request_digest(request, tenant_id)
    cursor = decode_token(page_token, 2)
    after = ""
    if cursor is not None:
        made_for, after = cursor
        if not isinstance(made_for, str) or not isinstance(after, str):
            raise InvalidArgument(_NOT_OURS)
        if made_for != digest:
            raise InvalidArgument(_OTHER_QUERY)
        if not after or len(after) > _MAX_CUSTOMER_CHARS or "\x00" in after:
            raise InvalidArgument(_NOT_OURS)
    return UsagePage(min(page_size, MAX_PAGE_CUSTOMERS), after, digest)
