"""Starts the three services as processes (as Kubernetes or `make run` would:
`python -m services.<name>` configured by the environment), waits until each
answers its health check, and stops them all on request.

Credentials as a deployment gives them: every service gets its own service
token, the SHA-256 of the tokens of the services that call it
(services/common/service_identity.py) and only the SHA-256 of the admin token
(the plaintext stays with the caller, for TenantService and QuarantineService);
with a dev stack's NATS URL each service connects as its own NATS user
(tools.devstack), otherwise as the URL says."""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.service_identity import callers_of, digest_setting
from tools.devstack import REPO_ROOT, free_port, service_nats_credentials
from usagebilling.billing.v1 import tenant_pb2, tenant_pb2_grpc

SERVICES = ("billing", "meter", "ingest")
DEFAULT_PORTS = {"ingest": 50051, "meter": 50052, "billing": 50053}


@dataclass
class Suite:
    database_url: str
    nats_url: str
    log_dir: Path
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    ports: dict[str, int] = field(default_factory=lambda: {s: free_port() for s in SERVICES})
    metrics_ports: dict[str, int] = field(
        default_factory=lambda: {s: free_port() for s in SERVICES}
    )
    # HTTP/JSON (Connect) ports, services/common/http_gateway.py.
    http_ports: dict[str, int] = field(default_factory=lambda: {s: free_port() for s in SERVICES})
    # service -> its own token, the bearer it presents when it calls another
    # service for a tenant (one each: least privilege between services).
    service_tokens: dict[str, str] = field(
        default_factory=lambda: {s: secrets.token_urlsafe(24) for s in SERVICES}
    )
    # service -> its NATS (user, password); by default the dev stack's users
    # when nats_url is a dev stack's, else none (the URL as is).
    nats_credentials: Mapping[str, tuple[str, str]] | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    # The services get SIGTERM when the process that started them dies. Only
    # for a runner whose main thread starts them (the kernel ties the signal
    # to the thread that forked): `make run`.
    die_with_parent: bool = False
    # The interpreter and working directory of the services: the image check
    # (tools/image_check.py) runs them from a venv and app copy outside the checkout.
    python: str = sys.executable
    cwd: Path = REPO_ROOT
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _logs: dict[str, IO[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nats_credentials is None:
            self.nats_credentials = service_nats_credentials(self.nats_url)

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    def http_url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.http_ports[service]}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("USAGEBILLING_")}
        env.update(
            DATABASE_URL=self.database_url,
            NATS_URL=self.nats_url,
            USAGEBILLING_ADMIN_TOKEN_SHA256=hashlib.sha256(self.admin_token.encode()).hexdigest(),
            USAGEBILLING_HOST="127.0.0.1",
            USAGEBILLING_LOG_FORMAT="json",
            USAGEBILLING_INGEST_ADDR=self.address("ingest"),
            USAGEBILLING_METER_ADDR=self.address("meter"),
            USAGEBILLING_BILLING_ADDR=self.address("billing"),
            # The dev stack's webhooks may reach receivers on this machine.
            USAGEBILLING_WEBHOOK_ALLOWED_CIDRS="127.0.0.0/8,::1/128",
            PYTHONUNBUFFERED="1",
        )
        for service, port in self.ports.items():
            env[f"USAGEBILLING_{service.upper()}_PORT"] = str(port)
        env.update(self.extra_env)
        return env

    def service_env(self, service: str) -> dict[str, str]:
        """`env()` plus what is this service's own: its token, the digests of
        its callers' tokens, its NATS user (if any). extra_env still wins."""
        env = self.env()
        env["USAGEBILLING_SERVICE_TOKEN"] = self.service_tokens[service]
        for caller in callers_of(service):
            token = self.service_tokens[caller]
            env[digest_setting(caller)] = hashlib.sha256(token.encode()).hexdigest()
        env.update(self.extra_env)
        if credentials := (self.nats_credentials or {}).get(service):
            env["USAGEBILLING_NATS_USER"], env["USAGEBILLING_NATS_PASSWORD"] = credentials
            # The URL's own credentials (the dev stack's all-permission user)
            # are not the service's to hold.
            parts = urlsplit(env["NATS_URL"])
            env["NATS_URL"] = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        return env

    def start_service(self, service: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self._logs.get(service) or open(self.log_dir / f"{service}.log", "ab")  # noqa: SIM115
        self._logs[service] = log
        env = self.service_env(service)
        env["USAGEBILLING_METRICS_PORT"] = str(self.metrics_ports[service])
        env.setdefault("USAGEBILLING_HTTP_PORT", str(self.http_ports[service]))
        module = (
            ["tools.launch", f"services.{service}"]
            if self.die_with_parent
            else [f"services.{service}"]
        )
        self.processes[service] = subprocess.Popen(
            [self.python, "-m", *module],
            cwd=self.cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop them in order
        )

    def start(self, timeout: float = 60) -> None:
        for service in SERVICES:
            self.start_service(service)
        for service in SERVICES:
            self.wait_healthy(service, timeout)

    def wait_healthy(self, service: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address(service)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                process = self.processes[service]
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{service} exited with {process.returncode};"
                        f" see {self.log_dir}/{service}.log"
                    )
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{service} did not become healthy in {timeout} s")
                time.sleep(0.1)

    def stop_service(self, service: str, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        process = self.processes.get(service)
        if process is None or process.poll() is not None:
            return process.returncode if process else 0
        process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def stop(self) -> None:
        # Ingest first (stop taking events), billing last (it resolves keys).
        for service in reversed(SERVICES):
            self.stop_service(service)
        for log in self._logs.values():
            log.close()
        self._logs.clear()

    def dead(self) -> list[str]:
        return [s for s, p in self.processes.items() if p.poll() is not None]


def create_tenant(suite: Suite, name: str) -> tuple[str, str]:
    """Creates a tenant and an API key for it; returns (tenant_id, secret)."""
    auth = (("authorization", f"Bearer {suite.admin_token}"),)
    with grpc.insecure_channel(suite.address("billing")) as channel:
        stub = tenant_pb2_grpc.TenantServiceStub(channel)
        tenant = stub.CreateTenant(tenant_pb2.CreateTenantRequest(name=name), metadata=auth)
        key = stub.CreateApiKey(
            tenant_pb2.CreateApiKeyRequest(tenant_id=tenant.id, description="dev key"),
            metadata=auth,
        )
    return tenant.id, key.secret


def key_works(suite: Suite, secret: str) -> bool:
    with grpc.insecure_channel(suite.address("billing")) as channel:
        try:
            tenant_pb2_grpc.AuthServiceStub(channel).WhoAmI(
                tenant_pb2.WhoAmIRequest(), metadata=(("authorization", f"Bearer {secret}"),)
            )
        except grpc.RpcError:
            return False
    return True
