"""services/billing/webhooks.py: private addresses refused at create (after
DNS) and at delivery (the resolver the connection uses)."""

from __future__ import annotations

import pytest

from services.billing.domain import webhooks as rules
from services.billing.webhooks import (
    GuardedResolver,
    RefusedAddress,
    check_destination,
    check_literal,
)


def _nothing_private(address: str) -> bool:
    return rules.address_allowed(address, ())


async def test_a_name_resolving_to_loopback_is_refused_at_create() -> None:
    with pytest.raises(rules.WebhookRuleError, match=r"^url: 'localhost' is a loopback"):
        await check_destination("http://localhost:8080/hook", _nothing_private)
    with pytest.raises(rules.WebhookRuleError, match=r"^url: '127.0.0.1'"):
        await check_destination("http://127.0.0.1/hook", _nothing_private)
    allow = rules.parse_allowlist("127.0.0.0/8,::1/128")
    await check_destination("http://localhost:8080/hook", lambda a: rules.address_allowed(a, allow))


async def test_the_delivery_resolver_refuses_private_answers() -> None:
    resolver = GuardedResolver(_nothing_private)
    try:
        with pytest.raises(RefusedAddress):
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()
    allowing = GuardedResolver(lambda _: True)
    try:
        assert await allowing.resolve("localhost", 80)
    finally:
        await allowing.close()


async def test_an_ip_literal_is_checked_before_connecting() -> None:
    with pytest.raises(RefusedAddress):
        await check_literal("http://10.0.0.1/x", _nothing_private)
    await check_literal("http://93.184.216.34/x", _nothing_private)
