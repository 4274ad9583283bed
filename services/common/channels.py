"""gRPC channels from one service to another.

A plain channel to a Kubernetes ClusterIP Service keeps one HTTP/2 connection
to whichever pod the first connection landed on, so every call of a replica
goes to that one pod. Given a target that resolves to every pod (a headless
Service, `dns:///meter-peers:50052`), round_robin keeps a connection to each
ready pod and spreads the calls. Servers end connections after
`MAX_CONNECTION_AGE` (see grpc_server), which makes clients resolve again and
find pods added since. With a single address (127.0.0.1:50052, a ClusterIP)
it behaves as a plain channel.

With USAGEBILLING_TLS_CA set the channels use TLS (services/common/tls.py):
the authority checked against the peer's certificate is the target's host
name (`meter-peers` for `dns:///meter-peers:50052`), whichever pod answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from services.common.tls import TlsSettings, channel_credentials
from services.common.tracing import ClientInterceptor

BALANCED: Sequence[tuple[str, Any]] = (
    ("grpc.lb_policy_name", "round_robin"),
    # Dead connections are noticed between calls, not at the next call's deadline.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # After a peer restarts, reconnect within seconds (gRPC's default backoff
    # grows to two minutes, during which calls fail at once).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


def internal_channel(
    target: str,
    options: Sequence[tuple[str, Any]] = (),
    *,
    tls: TlsSettings | None = None,
) -> grpc.aio.Channel:
    """A channel to another service: plaintext, or TLS (and a client
    certificate) as `tls` says. Its calls carry the request id and trace of
    the call being served (services/common/tracing.py)."""
    credentials = channel_credentials(tls) if tls is not None else None
    interceptors: list[Any] = [ClientInterceptor()]  # grpc-stubs types them partially
    if credentials is None:
        return grpc.aio.insecure_channel(
            target, options=[*BALANCED, *options], interceptors=interceptors
        )
    return grpc.aio.secure_channel(
        target, credentials, options=[*BALANCED, *options], interceptors=interceptors
    )
