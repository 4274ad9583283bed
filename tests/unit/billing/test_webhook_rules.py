"""services/billing/domain/webhooks.py: signing (checked by the standardwebhooks
package), the retry schedule, URL and address rules."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks.webhooks import Webhook

from services.billing.domain import webhooks as w

NOW = datetime(2026, 12, 1, 6, 0, tzinfo=UTC)


def test_signature_verifies_with_standardwebhooks() -> None:
    secret = w.new_secret(bytes(range(32)))
    body = json.dumps({"type": "invoice.finalized"}).encode()
    headers = w.headers([secret], "msg_1", datetime.now(UTC), body)
    assert Webhook(secret).verify(body, headers) == {"type": "invoice.finalized"}


def test_a_rotated_secret_still_verifies_during_the_overlap() -> None:
    old, new = w.new_secret(b"a" * 32), w.new_secret(b"b" * 32)
    body = b"{}"
    headers = w.headers([new, old], "msg_2", datetime.now(UTC), body)
    assert Webhook(old).verify(body, headers) == {}
    assert Webhook(new).verify(body, headers) == {}


def test_known_signature() -> None:
    # The example of the Standard Webhooks specification.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert w.sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0s,5s,5m", (0, 5, 300)), ("1h, 2d", (3600, 172800))],
)
def test_parse_schedule(text: str, expected: tuple[int, ...]) -> None:
    assert tuple(int(d.total_seconds()) for d in w.parse_schedule(text)) == expected


@pytest.mark.parametrize("text", ["", "5", "5x", "-1s", "s"])
def test_parse_schedule_refuses(text: str) -> None:
    with pytest.raises(w.WebhookRuleError, match=r"^schedule:"):
        w.parse_schedule(text)


def test_default_schedule_spans_about_three_days() -> None:
    total = sum(w.DEFAULT_SCHEDULE, timedelta())
    assert timedelta(days=2.5) < total < timedelta(days=3.5)


def test_next_attempt_and_end_of_schedule() -> None:
    schedule = w.parse_schedule("0s,5s,1m")
    assert w.next_attempt(schedule, 1, NOW) == NOW + timedelta(seconds=5)
    assert w.next_attempt(schedule, 3, NOW) is None


def test_should_disable() -> None:
    assert not w.should_disable(None, NOW, timedelta(days=5))
    assert not w.should_disable(NOW - timedelta(days=1), NOW, timedelta(days=5))
    assert w.should_disable(NOW - timedelta(days=5), NOW, timedelta(days=5))


@pytest.mark.parametrize(
    "url", ["", "ftp://x.example", "http://", "https://u:p@x.example/", "http://x:99999/"]
)
def test_check_url_refuses(url: str) -> None:
    with pytest.raises(w.WebhookRuleError, match=r"^url:"):
        w.check_url(url)


def test_check_event_types() -> None:
    assert w.check_event_types(["invoice.voided", "invoice.finalized", "invoice.voided"]) == [
        "invoice.finalized",
        "invoice.voided",
    ]
    with pytest.raises(w.WebhookRuleError, match=r"^event_types:"):
        w.check_event_types(["invoice.paid"])
    with pytest.raises(w.WebhookRuleError, match=r"^event_types:"):
        w.check_event_types([])


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "172.16.0.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "100.64.0.1",
        "224.0.0.1",
    ],
)
def test_private_addresses_refused(address: str) -> None:
    assert not w.address_allowed(address, ())


def test_public_and_allowlisted_addresses() -> None:
    assert w.address_allowed("93.184.216.34", ())
    assert w.address_allowed("2606:2800:220:1::1", ())
    allow = w.parse_allowlist("127.0.0.0/8, ::1/128")
    assert w.address_allowed("127.0.0.1", allow)
    assert w.address_allowed("::1", allow)
    assert not w.address_allowed("10.0.0.1", allow)
    with pytest.raises(w.WebhookRuleError, match=r"^allowlist:"):
        w.parse_allowlist("nope")
