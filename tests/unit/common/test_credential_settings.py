"""The credentials every service reads: its own service token, the digests of
its callers' tokens, the admin token's digest (or the token, hashed at once),
and an optional NATS user."""

from __future__ import annotations

import hashlib

import pytest

from services.common.config import ConfigError
from services.meter import settings as meter_settings

ADMIN = "admin-token-of-the-test"
SERVICE = "service-token-of-the-test"
INGEST = "ingest-token-of-the-test"
BILLING = "billing-token-of-the-test"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# meter's callers: ingest (ListMeters) and billing (GetMeter, QueryUsage).
CALLERS = {
    "USAGEBILLING_INGEST_TOKEN_SHA256": _digest(INGEST),
    "USAGEBILLING_BILLING_TOKEN_SHA256": _digest(BILLING),
}
BASE = {"DATABASE_URL": "postgresql://db/x", "NATS_URL": "nats://n:4222", **CALLERS}


def _errors(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        meter_settings.load({**BASE, **env})
    return str(caught.value)


def test_a_service_holds_the_admin_tokens_digest_only() -> None:
    digest = _digest(ADMIN)
    for given in (
        {"USAGEBILLING_ADMIN_TOKEN_SHA256": digest.upper()},
        {"USAGEBILLING_ADMIN_TOKEN": ADMIN},
    ):
        common = meter_settings.load(
            {**BASE, "USAGEBILLING_SERVICE_TOKEN": SERVICE, **given}
        ).common
        assert common.admin_token_sha256 == digest
        assert ADMIN not in repr(common)
        assert common.service_token == SERVICE
        assert common.caller_token_sha256 == {
            "ingest": _digest(INGEST),
            "billing": _digest(BILLING),
        }
        assert (common.nats_user, common.nats_password) == ("", "")


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"USAGEBILLING_ADMIN_TOKEN": ADMIN}, "USAGEBILLING_SERVICE_TOKEN: required but not set"),
        ({"USAGEBILLING_SERVICE_TOKEN": SERVICE}, "USAGEBILLING_ADMIN_TOKEN_SHA256: required"),
        (
            {"USAGEBILLING_SERVICE_TOKEN": SERVICE, "USAGEBILLING_ADMIN_TOKEN_SHA256": "abc"},
            "USAGEBILLING_ADMIN_TOKEN_SHA256: not 64 hexadecimal digits",
        ),
        (
            {
                "USAGEBILLING_SERVICE_TOKEN": SERVICE,
                "USAGEBILLING_ADMIN_TOKEN": ADMIN,
                "USAGEBILLING_ADMIN_TOKEN_SHA256": _digest(ADMIN),
            },
            "set one, not both",
        ),
        (
            {
                "USAGEBILLING_SERVICE_TOKEN": ADMIN,
                "USAGEBILLING_ADMIN_TOKEN_SHA256": _digest(ADMIN),
            },
            "USAGEBILLING_SERVICE_TOKEN: must differ from the admin token",
        ),
        (
            {"USAGEBILLING_SERVICE_TOKEN": "short", "USAGEBILLING_ADMIN_TOKEN": ADMIN},
            "USAGEBILLING_SERVICE_TOKEN: at least 16 characters",
        ),
        (
            {
                "USAGEBILLING_SERVICE_TOKEN": SERVICE,
                "USAGEBILLING_ADMIN_TOKEN": ADMIN,
                "USAGEBILLING_NATS_USER": "meter",
            },
            "USAGEBILLING_NATS_USER, USAGEBILLING_NATS_PASSWORD: set both or neither",
        ),
    ],
)
def test_credential_mistakes_are_refused(env: dict[str, str], error: str) -> None:
    assert error in _errors(env)


@pytest.mark.parametrize(
    ("given", "error"),
    [
        ({"USAGEBILLING_INGEST_TOKEN_SHA256": ""}, "USAGEBILLING_INGEST_TOKEN_SHA256: required"),
        (
            {"USAGEBILLING_BILLING_TOKEN_SHA256": "xyz"},
            "USAGEBILLING_BILLING_TOKEN_SHA256: not 64 hexadecimal digits",
        ),
        (
            {"USAGEBILLING_INGEST_TOKEN_SHA256": _digest(SERVICE)},
            "USAGEBILLING_INGEST_TOKEN_SHA256: equals this service's own token's",
        ),
        (
            {"USAGEBILLING_BILLING_TOKEN_SHA256": _digest(ADMIN)},
            "USAGEBILLING_BILLING_TOKEN_SHA256: equals the admin token's",
        ),
    ],
)
def test_caller_digest_mistakes_are_refused(given: dict[str, str], error: str) -> None:
    env = {"USAGEBILLING_SERVICE_TOKEN": SERVICE, "USAGEBILLING_ADMIN_TOKEN": ADMIN, **given}
    assert error in _errors(env)


def test_a_service_reads_only_its_callers_digests() -> None:
    """ingest is called by meter alone: it neither needs nor reads the others'."""
    from services.ingest import settings as ingest_settings

    env = {
        "DATABASE_URL": "postgresql://db/x",
        "NATS_URL": "nats://n:4222",
        "USAGEBILLING_SERVICE_TOKEN": INGEST,
        "USAGEBILLING_ADMIN_TOKEN": ADMIN,
        "USAGEBILLING_METER_TOKEN_SHA256": _digest(SERVICE),
    }
    common = ingest_settings.load(env).common
    assert common.caller_token_sha256 == {"meter": _digest(SERVICE)}


def test_a_nats_user_is_read() -> None:
    common = meter_settings.load(
        {
            **BASE,
            "USAGEBILLING_SERVICE_TOKEN": SERVICE,
            "USAGEBILLING_ADMIN_TOKEN": ADMIN,
            "USAGEBILLING_NATS_USER": "meter",
            "USAGEBILLING_NATS_PASSWORD": "secret",
        }
    ).common
    assert (common.nats_user, common.nats_password) == ("meter", "secret")
