"""The credentials every service reads: the service token, the admin token's
digest (or the token, hashed at once), and an optional NATS user."""

from __future__ import annotations

import hashlib

import pytest

from services.common.config import ConfigError
from services.meter import settings as meter_settings

ADMIN = "admin-token-of-the-test"
SERVICE = "service-token-of-the-test"
BASE = {"DATABASE_URL": "postgresql://db/x", "NATS_URL": "nats://n:4222"}


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


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
