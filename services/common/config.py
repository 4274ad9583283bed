"""Typed configuration read from environment variables.

Each service declares a frozen dataclass and fills it through an `EnvReader`,
which collects every problem and reports them all at once at start-up, and
remembers which variables it read (so the deployment checks can compare the
manifests with what the code reads).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from services.common import readiness as readiness_settings
from services.common import service_identity
from services.common import tls as tls_settings

_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class ConfigError(Exception):
    """Raised with every configuration problem, one per line."""


class EnvReader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self.errors: list[str] = []
        self.names: set[str] = set()
        self.required: set[str] = set()

    def _raw(self, name: str, required: bool) -> str | None:
        self.names.add(name)
        if required:
            self.required.add(name)
        value = self._env.get(name, "").strip()
        if not value:
            if required:
                self.errors.append(f"{name}: required but not set")
            return None
        return value

    def text(self, name: str, default: str = "", *, required: bool = False) -> str:
        value = self._raw(name, required)
        return default if value is None else value

    def integer(self, name: str, default: int, *, minimum: int = 0, maximum: int = 2**31) -> int:
        value = self._raw(name, False)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            self.errors.append(f"{name}: {value!r} is not an integer")
            return default
        if not minimum <= number <= maximum:
            self.errors.append(f"{name}: {number} is outside [{minimum}, {maximum}]")
            return default
        return number

    def boolean(self, name: str, default: bool) -> bool:
        value = self._raw(name, False)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        self.errors.append(f"{name}: {value!r} is not a boolean (true/false)")
        return default

    def duration(
        self, name: str, default: timedelta, *, maximum: timedelta | None = None
    ) -> timedelta:
        """Reads durations such as 500ms, 30s, 5m, 1h, 35d."""
        value = self._raw(name, False)
        if value is None:
            return default
        match = _DURATION.match(value)
        if not match:
            self.errors.append(f"{name}: {value!r} is not a duration such as 30s, 5m, 1h or 35d")
            return default
        parsed = timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
        if maximum is not None and parsed > maximum:
            self.errors.append(f"{name}: {value} is more than the allowed {maximum}")
            return default
        return parsed

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default)
        if value not in choices:
            self.errors.append(f"{name}: {value!r} is not one of {', '.join(choices)}")
            return default
        return value

    def check(self) -> None:
        if self.errors:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(self.errors))


DEFAULT_PORTS = {"ingest": 50051, "meter": 50052, "billing": 50053}
# Distinct by default so that the three can share one machine; 0 turns it off.
DEFAULT_METRICS_PORTS = {"ingest": 9091, "meter": 9092, "billing": 9093}
# HTTP/JSON (services/common/http_gateway.py): distinct likewise; 0 turns it off.
DEFAULT_HTTP_PORTS = {"ingest": 8081, "meter": 8082, "billing": 8083}


@dataclass(frozen=True)
class CommonSettings:
    """What every service reads."""

    service: str
    database_url: str
    nats_url: str
    # NATS user and password of this service (both or neither); empty: the URL as is.
    nats_user: str
    nats_password: str
    # The admin token is only verified, never sent: a service holds its SHA-256.
    admin_token_sha256: str
    # This service's own token: the bearer it presents when it calls another
    # service for a tenant.
    service_token: str
    # The services that call this one for a tenant -> SHA-256 (hex) of their
    # tokens (service_identity.callers_of; what each may call is there too).
    caller_token_sha256: dict[str, str]
    host: str
    port: int
    log_level: str
    log_format: str
    shutdown_grace: timedelta
    stream_replicas: int
    auto_migrate: bool
    auth_cache_ttl: timedelta
    metrics_port: int
    # Health checks of PostgreSQL and NATS (services/common/readiness.py).
    readiness: readiness_settings.ReadinessSettings
    # gRPC and NATS TLS (services/common/tls.py); all off when unset.
    tls: tls_settings.TlsSettings
    # The HTTP/JSON port (Connect protocol) beside gRPC; 0: none.
    http_port: int = 0


# The tokens are random secrets; a short one is a mistake (or a guessable word).
MIN_TOKEN_CHARS = 16
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def _admin_token_sha256(reader: EnvReader) -> str:
    """The admin token's SHA-256 (hex), from USAGEBILLING_ADMIN_TOKEN_SHA256, or
    computed from USAGEBILLING_ADMIN_TOKEN (the dev stack's way; a deployment
    gives its pods only the digest, so no pod can administer tenants)."""
    digest = reader.text("USAGEBILLING_ADMIN_TOKEN_SHA256").lower()
    token = reader.text("USAGEBILLING_ADMIN_TOKEN")
    if digest and token:
        reader.errors.append(
            "USAGEBILLING_ADMIN_TOKEN, USAGEBILLING_ADMIN_TOKEN_SHA256: set one, not both"
        )
    if token:
        if len(token) < MIN_TOKEN_CHARS:
            reader.errors.append(
                f"USAGEBILLING_ADMIN_TOKEN: at least {MIN_TOKEN_CHARS} characters (a random secret)"
            )
        return hashlib.sha256(token.encode()).hexdigest()
    if not digest:
        reader.errors.append(
            "USAGEBILLING_ADMIN_TOKEN_SHA256: required (or USAGEBILLING_ADMIN_TOKEN) but not set"
        )
    elif not _SHA256_HEX.match(digest):
        reader.errors.append("USAGEBILLING_ADMIN_TOKEN_SHA256: not 64 hexadecimal digits")
    return digest


def _caller_token_sha256(
    reader: EnvReader, service: str, own_sha256: str, admin_sha256: str
) -> dict[str, str]:
    """The digests of the tokens of the services that call `service` (each
    required: without one, that caller's calls would all be refused)."""
    digests = {}
    for caller in service_identity.callers_of(service):
        name = service_identity.digest_setting(caller)
        digest = reader.text(name, required=True).lower()
        if not digest:
            continue
        if not _SHA256_HEX.match(digest):
            reader.errors.append(f"{name}: not 64 hexadecimal digits")
        elif digest == own_sha256:
            # Two services with one token could each act as the other.
            reader.errors.append(f"{name}: equals this service's own token's: each has its own")
        elif digest == admin_sha256:
            reader.errors.append(f"{name}: equals the admin token's: a service token must differ")
        digests[caller] = digest
    return digests


def read_common(reader: EnvReader, service: str) -> CommonSettings:
    upper = service.upper()
    # A service's schema may live in its own database: <SERVICE>_DATABASE_URL wins.
    database_url = reader.text(f"USAGEBILLING_{upper}_DATABASE_URL") or reader.text(
        "DATABASE_URL", required=True
    )
    nats_user = reader.text("USAGEBILLING_NATS_USER")
    nats_password = reader.text("USAGEBILLING_NATS_PASSWORD")
    if bool(nats_user) != bool(nats_password):
        reader.errors.append(
            "USAGEBILLING_NATS_USER, USAGEBILLING_NATS_PASSWORD: set both or neither"
        )
    service_token = reader.text("USAGEBILLING_SERVICE_TOKEN", required=True)
    if service_token and len(service_token) < MIN_TOKEN_CHARS:
        reader.errors.append(
            f"USAGEBILLING_SERVICE_TOKEN: at least {MIN_TOKEN_CHARS} characters (a random secret)"
        )
    admin_token_sha256 = _admin_token_sha256(reader)
    own_sha256 = hashlib.sha256(service_token.encode()).hexdigest() if service_token else ""
    if own_sha256 and own_sha256 == admin_token_sha256:
        # Equal tokens would let the admin act for any tenant again.
        reader.errors.append("USAGEBILLING_SERVICE_TOKEN: must differ from the admin token")
    caller_token_sha256 = _caller_token_sha256(reader, service, own_sha256, admin_token_sha256)
    return CommonSettings(
        service=service,
        database_url=database_url,
        nats_url=reader.text("NATS_URL", required=True),
        nats_user=nats_user,
        nats_password=nats_password,
        admin_token_sha256=admin_token_sha256,
        service_token=service_token,
        caller_token_sha256=caller_token_sha256,
        host=reader.text("USAGEBILLING_HOST", "0.0.0.0"),
        port=reader.integer(
            f"USAGEBILLING_{upper}_PORT", DEFAULT_PORTS[service], minimum=1, maximum=65535
        ),
        log_level=reader.choice(
            "USAGEBILLING_LOG_LEVEL", "info", ("debug", "info", "warning", "error")
        ),
        log_format=reader.choice("USAGEBILLING_LOG_FORMAT", "auto", ("auto", "json", "console")),
        shutdown_grace=reader.duration("USAGEBILLING_SHUTDOWN_GRACE", timedelta(seconds=8)),
        stream_replicas=reader.integer("USAGEBILLING_STREAM_REPLICAS", 1, minimum=1, maximum=5),
        auto_migrate=reader.boolean("USAGEBILLING_AUTO_MIGRATE", True),
        # How long ingest and meter trust a key billing resolved: a revoked key
        # stops working within this time (at most 60 s allowed).
        auth_cache_ttl=reader.duration(
            "USAGEBILLING_AUTH_CACHE_TTL", timedelta(seconds=30), maximum=timedelta(seconds=60)
        ),
        metrics_port=reader.integer(
            "USAGEBILLING_METRICS_PORT", DEFAULT_METRICS_PORTS[service], maximum=65535
        ),
        readiness=readiness_settings.read(reader),
        tls=tls_settings.read(reader),
        http_port=reader.integer(
            "USAGEBILLING_HTTP_PORT", DEFAULT_HTTP_PORTS[service], maximum=65535
        ),
    )
