"""Each tenant's fold weights (event name -> row units), learnt from meter.

ingest asks meter's ListMeters on the tenant's behalf (the service token and
the tenant header) and keeps the answer per tenant. No call waits on meter:
`weights` answers from the cache at once and, when the tenant's entry is older
than the refresh interval (or missing), starts one refresh in the background.
When meter cannot be reached the last known weights stay in use; a tenant
whose weights were never learnt pays UNKNOWN_WEIGHT per event (whatever its
name) until an ask succeeds, so ingest keeps accepting while meter is down, and
a tenant whose listing cannot be read is not let off at one unit per event.
Before the first ask of a tenant has ended, an event costs one unit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import grpc

from services.common.auth import on_behalf_of
from services.common.logs import get_logger
from services.ingest.domain.fold_cost import MeterShape, weights
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc

log = get_logger(__name__)

PAGE_SIZE = 1000
# A tenant's meters are few (USAGEBILLING_MAX_METERS_PER_TENANT, 100 by
# default); a runaway listing stops here and keeps what it read.
MAX_PAGES = 100
# What an event costs while its tenant's weights are unknown because asking
# meter failed: 20 plain meters on its name (USAGEBILLING_MAX_METERS_PER_EVENT's
# default), a cautious guess rather than the one unit of an event no meter counts.
UNKNOWN_WEIGHT = 20.0
# The largest ListMeters answer ingest takes (grpc.max_receive_message_length of
# its channel to meter). meter pages its answers at 1 MiB; this leaves room for
# a page holding one meter made before meter bounded a filter's bytes.
MAX_RECEIVE_BYTES = 16 * 1024 * 1024
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),)


class _Every(Mapping[str, float]):
    """The same weight for every event name (and no names to list)."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def __getitem__(self, name: str) -> float:
        return self.weight

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __eq__(self, other: object) -> bool:
        # Mapping's would compare the (no) items: equal to {}, which it is not.
        return isinstance(other, _Every) and other.weight == self.weight

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"_Every({self.weight})"


UNKNOWN: Mapping[str, float] = _Every(UNKNOWN_WEIGHT)


class WeightSource(Protocol):
    """What the ingest use case asks: the tenant's weights now, without waiting."""

    def weights(self, tenant_id: str) -> Mapping[str, float]: ...


def conditions(f: meter_pb2.Filter) -> int:
    """Conditions in a filter tree, nested filters included."""
    return len(f.conditions) + sum(conditions(nested) for nested in f.filters)


def shape(meter: meter_pb2.Meter) -> MeterShape:
    return MeterShape(
        event_name=meter.event_name,
        group_by_keys=len(meter.group_by),
        conditions=conditions(meter.filter),
    )


@dataclass
class _Entry:
    weights: Mapping[str, float]
    fetched_at: float  # when the last attempt ended (success or not)
    used_at: float


class MeterWeights:
    """The cache. `refresh_every`: seconds a tenant's weights are used before
    they are asked again (also the wait after a failed ask); a tenant not seen
    for `forget_after` seconds is dropped."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        service_token: str,
        *,
        refresh_every: float = 5.0,
        forget_after: float = 600.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stub = meter_pb2_grpc.MeterServiceStub(channel)
        self._service_token = service_token
        self._refresh_every = refresh_every
        self._forget_after = forget_after
        self._timeout = timeout
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        # Tenants whose last ask failed: each failure run is logged once.
        self._failing: set[str] = set()

    def weights(self, tenant_id: str) -> Mapping[str, float]:
        """The tenant's last known weights (empty when none are known yet);
        starts a background refresh when they are due. Call from the event loop."""
        now = self._clock()
        entry = self._entries.get(tenant_id)
        if entry is not None:
            entry.used_at = now
        due = entry is None or now - entry.fetched_at >= self._refresh_every
        if due and tenant_id not in self._inflight:
            task = asyncio.get_running_loop().create_task(self.refresh(tenant_id))
            self._inflight[tenant_id] = task
            task.add_done_callback(lambda _: self._inflight.pop(tenant_id, None))
        return entry.weights if entry is not None else {}

    async def fetch(self, tenant_id: str) -> dict[str, float]:
        """The weights from meter's active meters; raises grpc.aio.AioRpcError."""
        shapes: list[MeterShape] = []
        token = ""
        metadata = on_behalf_of(self._service_token, tenant_id)
        for _ in range(MAX_PAGES):
            answer = await self._stub.ListMeters(
                meter_pb2.ListMetersRequest(page_size=PAGE_SIZE, page_token=token),
                metadata=metadata,
                timeout=self._timeout,
            )
            shapes += [shape(m) for m in answer.meters if not m.archived]
            token = answer.next_page_token
            if not token:
                break
        return weights(shapes)

    async def refresh(self, tenant_id: str) -> None:
        """Asks meter once; on failure keeps what was known (never known:
        UNKNOWN, UNKNOWN_WEIGHT per event) and logs the first failure of a run
        of them for this tenant."""
        try:
            fresh: Mapping[str, float] | None = await self.fetch(tenant_id)
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            fresh = None
            if tenant_id not in self._failing:
                self._failing.add(tenant_id)
                log.warning(
                    "fold_weights_unavailable",
                    tenant_id=tenant_id,
                    error=str(exc)[:200],
                    unknown_weight=UNKNOWN_WEIGHT,
                )
        else:
            if tenant_id in self._failing:
                self._failing.discard(tenant_id)
                log.info("fold_weights_available", tenant_id=tenant_id)
        now = self._clock()
        entry = self._entries.get(tenant_id)
        if fresh is not None:
            self._entries[tenant_id] = _Entry(fresh, now, entry.used_at if entry else now)
        elif entry is not None:
            entry.fetched_at = now
        else:
            self._entries[tenant_id] = _Entry(UNKNOWN, now, now)
        self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        idle = [t for t, e in self._entries.items() if now - e.used_at > self._forget_after]
        for tenant_id in idle:
            del self._entries[tenant_id]
            self._failing.discard(tenant_id)

    async def close(self) -> None:
        """Cancels the refreshes in flight (at shutdown)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
