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
    # Memory is measured here, not the rate: meter is not started, so ingest
    # would charge every event the unknown-weight cost and refuse most calls.
    suite = Suite(*stack_urls, tmp_path / "logs", extra_env={"USAGEBILLING_INGEST_RATE_LIMIT": "0"})
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
# The same for 150 concurrent streams of maximum-size requests.
STREAMS_PEAK_BOUND_MB = 384


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


STREAMS = 150
STREAM_TENANTS = 5


async def _stream(
    channel: grpc.aio.Channel, secret: str, requests: list[bytes]
) -> tuple[list[int], str, str]:
    """One StreamIngest call: the accepted counts answered, and the final
    status with its retry-after. grpc.aio reports a stream that the server ends
    while the client still writes as a client-side INTERNAL ("Internal error
    from Core"): the server's own statuses are checked in its metrics."""
    call = channel.stream_stream("/usagebilling.ingest.v1.IngestService/StreamIngest", None, None)(
        iter(requests), metadata=(("authorization", f"Bearer {secret}"),), timeout=180
    )
    accepted: list[int] = []
    try:
        async for answer in call:
            accepted.append(ingest_pb2.IngestEventsResponse.FromString(answer).accepted_count)
    except grpc.aio.AioRpcError as error:
        trailers = {key: str(value) for key, value in error.trailing_metadata() or ()}
        return accepted, error.code().name, trailers.get("retry-after", "")
    return accepted, "OK", ""


def _served(suite: Suite, method: str) -> Counter[str]:
    """ingest's own count of calls of `method` by final status (its metrics)."""
    port = suite.metrics_ports["ingest"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
    served: Counter[str] = Counter()
    service, name = method.lstrip("/").split("/")
    for line in text.splitlines():
        if (
            line.startswith("grpc_server_handled_total{")
            and f'grpc_service="{service}"' in line
            and f'grpc_method="{name}"' in line
        ):
            code = line.split('grpc_code="', 1)[1].split('"', 1)[0]
            served[code] += int(float(line.rsplit(" ", 1)[1]))
    return served


async def test_many_maximum_size_streams_stay_within_the_pod_memory_limit(
    ingest: Suite,
) -> None:
    """150 concurrent streams of two maximum-size requests, from 5 tenants:
    requests that would wait for room beyond the limits are refused with
    RESOURCE_EXHAUSTED and a retry hint (nothing of them stored), so ingest's
    memory stays bounded however many streams are open."""
    secrets = [create_tenant(ingest, f"streams-{t}")[1] for t in range(STREAM_TENANTS)]
    base = largest_request()
    requests = [[_distinct(base, 100 + 2 * n + k) for k in range(2)] for n in range(STREAMS)]
    del base
    pid = ingest.processes["ingest"].pid
    channels = [grpc.aio.insecure_channel(ingest.address("ingest")) for _ in range(5)]
    outcomes = await asyncio.gather(
        *(
            _stream(channels[n % len(channels)], secrets[n % STREAM_TENANTS], requests[n])
            for n in range(STREAMS)
        )
    )
    for channel in channels:
        await channel.close()
    peak = _megabytes(pid, "VmHWM")
    codes = Counter(code for _, code, _ in outcomes)
    stored = sum(sum(accepted) for accepted, _, _ in outcomes)
    print(
        f"\n{STREAMS} concurrent streams of 2 x {len(requests[0][0]) / 2**20:.2f} MiB"
        f" from {STREAM_TENANTS} tenants: {dict(codes)}, {stored} events stored;"
        f" ingest peak RSS {peak:.0f} MB (bound {STREAMS_PEAK_BOUND_MB} MB)"
    )
    served = _served(ingest, "/usagebilling.ingest.v1.IngestService/StreamIngest")
    print(f"ingest's own statuses for StreamIngest: {dict(served)}")
    assert set(served) <= {"OK", "ResourceExhausted"}
    assert served["OK"] >= STREAM_TENANTS  # every tenant got through
    for accepted, code, retry_after in outcomes:
        assert all(count == 1000 for count in accepted)  # a request is stored whole or not at all
        if code == "OK":
            assert len(accepted) == 2
        elif code == "RESOURCE_EXHAUSTED":
            assert float(retry_after) > 0
    assert peak < STREAMS_PEAK_BOUND_MB
