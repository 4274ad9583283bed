"""Each tenant's fold weights (event name -> row units), learnt from meter.

ingest asks meter's ListMeters on the tenant's behalf (the service token and
the tenant header) and keeps the answer per tenant. No call waits on meter:
`weights` answers from the cache at once and, when the tenant's entry is older
than the refresh interval (or missing), starts one refresh in the background.
When meter cannot be reached the last known weights stay in use (none known:
every event costs one unit), so ingest keeps accepting while meter is down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
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
        self._unreachable = False

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
        """Asks meter once; on failure keeps what was known (and logs the
        first failure of a run of them)."""
        try:
            fresh: Mapping[str, float] | None = await self.fetch(tenant_id)
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            fresh = None
            if not self._unreachable:
                self._unreachable = True
                log.warning("fold_weights_unavailable", error=str(exc)[:200])
        else:
            if self._unreachable:
                self._unreachable = False
                log.info("fold_weights_available")
        now = self._clock()
        entry = self._entries.get(tenant_id)
        if fresh is not None:
            self._entries[tenant_id] = _Entry(fresh, now, entry.used_at if entry else now)
        elif entry is not None:
            entry.fetched_at = now
        else:
            self._entries[tenant_id] = _Entry({}, now, now)
        self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        idle = [t for t, e in self._entries.items() if now - e.used_at > self._forget_after]
        for tenant_id in idle:
            del self._entries[tenant_id]

    async def close(self) -> None:
        """Cancels the refreshes in flight (at shutdown)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
