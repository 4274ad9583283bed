"""The request budget: calls wait for room before their request is read, in
order, and every byte reserved comes back however a call ends."""

from __future__ import annotations

import asyncio

import pytest

from services.common.grpc_server import RequestBudget


async def test_calls_beyond_the_budget_wait_in_order() -> None:
    budget = RequestBudget(capacity=30, largest=10)
    for _ in range(3):
        await budget.reserve()
    assert budget.free == 0
    order: list[int] = []

    async def waiter(n: int) -> None:
        await budget.reserve()
        order.append(n)

    tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
    await asyncio.sleep(0.01)
    assert order == []
    budget.release(7)  # a request parsed to 3 bytes: 7 back, still not room for 10
    await asyncio.sleep(0.01)
    assert order == []
    budget.release(3)
    await asyncio.sleep(0.01)
    assert order == [0]
    budget.release(20)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2] and budget.free == 0


async def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    budget = RequestBudget(capacity=10, largest=10)
    await budget.reserve()
    waiting = asyncio.create_task(budget.reserve())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    budget.release(10)
    assert budget.free == 10
    await asyncio.wait_for(budget.reserve(), 1)


async def test_a_waiter_cancelled_as_it_is_granted_gives_its_room_back() -> None:
    budget = RequestBudget(capacity=10, largest=10)
    await budget.reserve()
    waiting = asyncio.create_task(budget.reserve())
    await asyncio.sleep(0.01)
    budget.release(10)  # granted to the waiter...
    waiting.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert budget.free == 10
