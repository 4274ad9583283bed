"""Dodo Payments' ingest request over HTTP: `POST /events/ingest` with
`{"events": [{"event_id", "customer_id", "event_name", "timestamp",
"metadata"}]}` and the bearer API key, answered `{"ingested_count": N}`, so
that a user of Dodo's usage billing switches by changing the base URL and the
key. It is IngestEvents underneath (same validation, limits and errors);
metadata is plain JSON as on every HTTP path (http_gateway.plain_value)."""

from __future__ import annotations

import grpc
from aiohttp import web

from services.common import http_gateway
from services.common.http_gateway import ClientError, Gateway, Handler, error_response
from usagebilling.ingest.v1 import ingest_pb2

PATH = "/events/ingest"
_RPC = "/usagebilling.ingest.v1.IngestService/IngestEvents"


def handler(gateway: Gateway) -> Handler:
    async def ingest(request: web.Request) -> web.StreamResponse:
        if not request.headers.get("authorization"):
            return error_response(
                grpc.StatusCode.UNAUTHENTICATED, "missing 'Authorization: Bearer <api key>' header"
            )
        try:
            message = http_gateway.parse_request(
                await request.read(), ingest_pb2.IngestEventsRequest()
            )
        except ClientError as exc:
            return error_response(exc.code, str(exc))
        try:
            answer = await gateway.call_unary(_RPC, message, request)
        except grpc.aio.AioRpcError as exc:
            return error_response(exc.code(), exc.details() or "")
        assert isinstance(answer, ingest_pb2.IngestEventsResponse)
        return web.json_response(
            {
                "ingested_count": answer.accepted_count,
                # Beyond Dodo's answer: resent event_ids, and events refused alone.
                "duplicate_count": answer.duplicate_count,
                "rejections": [
                    {"index": r.index, "event_id": r.event_id, "reason": r.reason}
                    for r in answer.rejections
                ],
            }
        )

    return ingest
