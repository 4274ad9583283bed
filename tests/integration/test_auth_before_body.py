"""Memory before auth (issue 10): ingest refuses a call with a bogus key from
its metadata, before reading its body. 30 concurrent calls of the largest size
ingest accepts once held 1.6 GB; now they cost it a few megabytes each."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from services.common.grpc_server import MAX_MESSAGE_BYTES
from tools.suite import Suite, create_tenant
from usagebilling.ingest.v1 import ingest_pb2

pytestmark = pytest.mark.timeout(240)

CALLS = 30
# README "Limits": ingest's peak RSS under 30 concurrent maximum-size calls
# with a bogus key (measured about 90 MB; the prod pod limit is 512 Mi).
UNAUTHENTICATED_PEAK_BOUND_MB = 256
METHOD = "/usagebilling.ingest.v1.IngestService/IngestEvents"


def _megabytes(pid: int, field: str) -> float:
    """A /proc/<pid>/status memory figure (VmRSS, VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for pid {pid}")


def largest_request() -> bytes:
    """A valid IngestEventsRequest of 1000 events just under MAX_MESSAGE_BYTES."""
    now = datetime.now(UTC)
    request = ingest_pb2.IngestEventsRequest()
    for i in range(1000):
        event = request.events.add(event_id=f"e-{i}", customer_id="c", event_name="big")
        event.timestamp.FromDatetime(now)
        for k in range(50):
            event.metadata[f"k{k:02d}"].string_value = ""
    # Each value's bytes also lengthen two length prefixes: leave room for them.
    per_value = (MAX_MESSAGE_BYTES - request.ByteSize() - 200_000) // 50_000
    for event in request.events:
        for k in range(50):
            event.metadata[f"k{k:02d}"].string_value = "v" * per_value
    data = request.SerializeToString()
    assert MAX_MESSAGE_BYTES - 300_000 < len(data) <= MAX_MESSAGE_BYTES
    return data


@pytest.fixture
def ingest(stack_urls: tuple[str, str], tmp_path: Path) -> Iterator[Suite]:
    """billing (which resolves keys) and ingest, as processes."""
    suite = Suite(*stack_urls, tmp_path / "logs")
    try:
        for service in ("billing", "ingest"):
            suite.start_service(service)
            suite.wait_healthy(service)
        yield suite
    finally:
        suite.stop()


async def test_unauthenticated_maximum_size_calls_are_refused_before_their_body_is_read(
    ingest: Suite,
) -> None:
    data = largest_request()
    pid = ingest.processes["ingest"].pid
    idle = _megabytes(pid, "VmHWM")
    channels = [grpc.aio.insecure_channel(ingest.address("ingest")) for _ in range(3)]
    metadata = (("authorization", "Bearer ubk_bogus-key-of-nobody"),)

    async def call(n: int) -> str:
        send = channels[n % len(channels)].unary_unary(METHOD, None, None)
        try:
            await send(data, metadata=metadata, timeout=60)
        except grpc.aio.AioRpcError as error:
            return error.code().name
        return "OK"

    started = time.monotonic()
    codes = Counter(await asyncio.gather(*(call(n) for n in range(CALLS))))
    seconds = time.monotonic() - started
    peak = _megabytes(pid, "VmHWM")
    for channel in channels:
        await channel.close()
    print(
        f"\n{CALLS} concurrent calls of {len(data) / 2**20:.2f} MiB with a bogus key:"
        f" {dict(codes)} in {seconds:.1f} s; ingest peak RSS {peak:.0f} MB"
        f" (idle {idle:.0f} MB, bound {UNAUTHENTICATED_PEAK_BOUND_MB} MB)"
    )
    assert codes == Counter({"UNAUTHENTICATED": CALLS})
    assert peak < UNAUTHENTICATED_PEAK_BOUND_MB


async def test_a_message_over_the_limit_is_resource_exhausted_for_a_valid_key(
    ingest: Suite,
) -> None:
    _, secret = create_tenant(ingest, "limits")
    oversized = (
        largest_request()
        + ingest_pb2.IngestEventsRequest(
            events=[ingest_pb2.Event(event_id="x" * 400_000)]
        ).SerializeToString()
    )
    async with grpc.aio.insecure_channel(ingest.address("ingest")) as channel:
        send = channel.unary_unary(METHOD, None, None)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await send(oversized, metadata=(("authorization", f"Bearer {secret}"),), timeout=60)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The largest accepted size goes through, and the refusal left the
        # request budget whole.
        answer = ingest_pb2.IngestEventsResponse.FromString(
            await send(
                largest_request(), metadata=(("authorization", f"Bearer {secret}"),), timeout=60
            )
        )
        assert answer.accepted_count == 1000


# README "Limits": ingest's peak RSS under 30 concurrent maximum-size calls with
# a valid key, every event new (so the relay publishes them all, in parts).
AUTHENTICATED_PEAK_BOUND_MB = 256
# The same for 30 concurrent streams, each holding a waiting request's bytes.
STREAMS_PEAK_BOUND_MB = 450


def _distinct(data: bytes, n: int) -> bytes:
    request = ingest_pb2.IngestEventsRequest.FromString(data)
    for event in request.events:
        event.event_id = f"call{n}-{event.event_id}"
    return request.SerializeToString()


async def test_authenticated_maximum_size_calls_stay_within_the_pod_memory_limit(
    ingest: Suite,
) -> None:
    _, secret = create_tenant(ingest, "memory")
    base = largest_request()
    requests = [_distinct(base, n) for n in range(CALLS)]
    del base
    pid = ingest.processes["ingest"].pid
    idle = _megabytes(pid, "VmHWM")
    channels = [grpc.aio.insecure_channel(ingest.address("ingest")) for _ in range(3)]
    metadata = (("authorization", f"Bearer {secret}"),)

    async def call(n: int) -> int:
        send = channels[n % len(channels)].unary_unary(METHOD, None, None)
        answer = await send(requests[n], metadata=metadata, timeout=180)
        return ingest_pb2.IngestEventsResponse.FromString(answer).accepted_count

    started = time.monotonic()
    accepted = await asyncio.gather(*(call(n) for n in range(CALLS)))
    seconds = time.monotonic() - started
    after_calls = _megabytes(pid, "VmHWM")
    # The relay publishes what was accepted; watch its memory until the outbox
    # is empty (the peak of the whole episode counts).
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "outbox_depth 0.0" not in _outbox_metric(ingest):
        await asyncio.sleep(0.5)
    peak = _megabytes(pid, "VmHWM")
    for channel in channels:
        await channel.close()
    print(
        f"\n{CALLS} concurrent calls of {len(requests[0]) / 2**20:.2f} MiB with a valid key:"
        f" {sum(accepted)} events accepted in {seconds:.1f} s; ingest peak RSS {peak:.0f} MB"
        f" (after the calls {after_calls:.0f} MB, idle {idle:.0f} MB,"
        f" bound {AUTHENTICATED_PEAK_BOUND_MB} MB)"
    )
    assert accepted == [1000] * CALLS
    assert peak < AUTHENTICATED_PEAK_BOUND_MB


def _outbox_metric(suite: Suite) -> str:
    port = suite.metrics_ports["ingest"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
    return "\n".join(line for line in text.splitlines() if line.startswith("usagebilling_outbox"))


async def test_authenticated_maximum_size_streams_stay_within_the_pod_memory_limit(
    ingest: Suite,
) -> None:
    """StreamIngest's requests share the same budget as IngestEvents calls."""
    _, secret = create_tenant(ingest, "stream-memory")
    base = largest_request()
    requests = [[_distinct(base, 100 + 2 * n + k) for k in range(2)] for n in range(CALLS)]
    del base
    pid = ingest.processes["ingest"].pid
    channels = [grpc.aio.insecure_channel(ingest.address("ingest")) for _ in range(3)]
    metadata = (("authorization", f"Bearer {secret}"),)
    stream_method = "/usagebilling.ingest.v1.IngestService/StreamIngest"

    async def stream(n: int) -> list[int]:
        call = channels[n % len(channels)].stream_stream(stream_method, None, None)(
            iter(requests[n]), metadata=metadata, timeout=180
        )
        return [
            ingest_pb2.IngestEventsResponse.FromString(answer).accepted_count
            async for answer in call
        ]

    accepted = await asyncio.gather(*(stream(n) for n in range(CALLS)))
    peak = _megabytes(pid, "VmHWM")
    for channel in channels:
        await channel.close()
    print(
        f"\n{CALLS} concurrent streams of 2 x {len(requests[0][0]) / 2**20:.2f} MiB:"
        f" ingest peak RSS {peak:.0f} MB (bound {STREAMS_PEAK_BOUND_MB} MB)"
    )
    assert accepted == [[1000, 1000]] * CALLS
    assert peak < STREAMS_PEAK_BOUND_MB
