"""TLS for gRPC (servers and the channels between services) and for NATS.

Everything is off unless configured, as in the dev stack (plaintext on
loopback). The certificates are PEM files, in Kubernetes a Secret mounted as
files; they are read once at start-up, so a renewed certificate takes effect
when the pod restarts.

- USAGEBILLING_TLS_CERT + USAGEBILLING_TLS_KEY: the gRPC server speaks TLS only;
  the same pair is the client certificate this service presents when it dials
  another one.
- USAGEBILLING_TLS_CLIENT_CA: the server requires a client certificate signed by
  this CA (mTLS); a caller without one fails its handshake.
- USAGEBILLING_TLS_CA: the channels to the other services use TLS, trusting only
  this CA (the target's host name must be in the peer's certificate).
- NATS: a tls:// NATS_URL requires TLS (system trust, or
  USAGEBILLING_NATS_TLS_CA); USAGEBILLING_NATS_TLS_CERT + _KEY add a client
  certificate.

PostgreSQL's TLS needs nothing here: asyncpg reads sslmode, sslrootcert,
sslcert and sslkey from the DSN (DATABASE_URL) itself.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc
import nats.aio.client
import nats.errors

if TYPE_CHECKING:
    from services.common.config import EnvReader

CERT = "USAGEBILLING_TLS_CERT"
KEY = "USAGEBILLING_TLS_KEY"
CLIENT_CA = "USAGEBILLING_TLS_CLIENT_CA"
CA = "USAGEBILLING_TLS_CA"
NATS_CA = "USAGEBILLING_NATS_TLS_CA"
NATS_CERT = "USAGEBILLING_NATS_TLS_CERT"
NATS_KEY = "USAGEBILLING_NATS_TLS_KEY"


@dataclass(frozen=True)
class TlsSettings:
    """Paths of PEM files; None where not configured (checked readable and
    parseable by `read`)."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    ca: Path | None = None
    nats_ca: Path | None = None
    nats_cert: Path | None = None
    nats_key: Path | None = None

    @property
    def server_enabled(self) -> bool:
        return self.cert is not None and self.key is not None


def _no_password() -> bytes:
    # An encrypted key cannot be given to gRPC: fail on it rather than let
    # OpenSSL prompt on a terminal.
    return b""


def _check_pair(
    reader: EnvReader, cert_name: str, key_name: str
) -> tuple[Path | None, Path | None]:
    cert, key = _path(reader, cert_name), _path(reader, key_name)
    if (cert is None) != (key is None):
        given, missing = (cert_name, key_name) if cert is not None else (key_name, cert_name)
        reader.errors.append(f"{missing}: required when {given} is set (set both or neither)")
        return None, None
    if cert is None or key is None:
        return None, None
    if not (_readable(reader, cert_name, cert) and _readable(reader, key_name, key)):
        return None, None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            cert, key, password=_no_password
        )
    except (ssl.SSLError, OSError) as exc:
        reader.errors.append(
            f"{cert_name}, {key_name}: not a PEM certificate (chain) and its unencrypted"
            f" private key: {exc}"
        )
        return None, None
    return cert, key


def _check_ca(reader: EnvReader, name: str) -> Path | None:
    path = _path(reader, name)
    if path is None or not _readable(reader, name, path):
        return None
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, OSError) as exc:
        reader.errors.append(f"{name}: {path} holds no PEM CA certificate: {exc}")
        return None
    return path


def _path(reader: EnvReader, name: str) -> Path | None:
    value = reader.text(name)
    return Path(value) if value else None


def _readable(reader: EnvReader, name: str, path: Path) -> bool:
    try:
        path.read_bytes()
    except OSError as exc:
        reader.errors.append(f"{name}: cannot read {path}: {exc.strerror or exc}")
        return False
    return True


def read(reader: EnvReader) -> TlsSettings:
    """The TLS settings, with every problem (a missing half of a pair, an
    unreadable or unparseable file, a client CA without a server certificate)
    added to the reader's errors, each naming its variable."""
    cert, key = _check_pair(reader, CERT, KEY)
    client_ca = _check_ca(reader, CLIENT_CA)
    if client_ca is not None and not (reader.text(CERT) or reader.text(KEY)):
        reader.errors.append(f"{CLIENT_CA}: requires {CERT} and {KEY} (mTLS is on top of TLS)")
    nats_cert, nats_key = _check_pair(reader, NATS_CERT, NATS_KEY)
    return TlsSettings(
        cert=cert,
        key=key,
        client_ca=client_ca,
        ca=_check_ca(reader, CA),
        nats_ca=_check_ca(reader, NATS_CA),
        nats_cert=nats_cert,
        nats_key=nats_key,
    )


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """The gRPC server's credentials, None for plaintext. With a client CA,
    a client must present a certificate that it signed."""
    if tls.cert is None or tls.key is None:
        return None
    pair = [(tls.key.read_bytes(), tls.cert.read_bytes())]
    if tls.client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(
        pair, root_certificates=tls.client_ca.read_bytes(), require_client_auth=True
    )


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials | None:
    """Credentials of the channels to the other services, None for plaintext:
    TLS trusting USAGEBILLING_TLS_CA, presenting this service's certificate
    when it has one (so that peers requiring mTLS accept it)."""
    if tls.ca is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes() if tls.key else None,
        certificate_chain=tls.cert.read_bytes() if tls.cert else None,
    )


def nats_requires_tls(url: str) -> bool:
    """Whether any server of a NATS URL (or comma-separated list) is tls://."""
    return any(urlsplit(part.strip()).scheme == "tls" for part in url.split(","))


def nats_context(tls: TlsSettings, url: str) -> ssl.SSLContext | None:
    """The SSL context for NATS, None when neither the URL nor a NATS TLS
    setting asks for TLS. Verifies the server's certificate and host name."""
    if not (nats_requires_tls(url) or tls.nats_ca or tls.nats_cert):
        return None
    context = ssl.create_default_context(cafile=str(tls.nats_ca) if tls.nats_ca else None)
    if tls.nats_cert is not None and tls.nats_key is not None:
        context.load_cert_chain(tls.nats_cert, tls.nats_key, password=_no_password)
    return context


class NatsClient(nats.aio.client.Client):
    """nats-py's client, refusing to go on in plaintext with a tls:// server.

    nats-py upgrades to TLS only when the server's INFO says tls_required, so
    whoever answers in the server's place could have the client send its
    credentials in clear. Here a tls:// server whose INFO does not require TLS
    fails the connection attempt before the CONNECT (and its password) is sent.
    """

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        server = self._current_server
        if (
            initial_connection
            and server is not None
            and server.uri.scheme == "tls"
            and not info.get("tls_required")
        ):
            raise nats.errors.Error(f"nats: {server.uri.netloc} does not offer TLS (tls:// URL)")
        await super()._process_info(info, initial_connection)
