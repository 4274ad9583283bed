"""An answer's size is estimated row by row, from above, closely enough to be a
limit; AnswerSize refuses the row that passes a limit; AnswerBudget bounds what
a replica holds of all answers at once."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from services.common.errors import ResourceExhausted
from services.meter.domain.query import AnswerLimits, AnswerSize, row_bytes
from services.meter.service import AnswerBudget
from usagebilling.meter.v1 import meter_pb2


def _row(rng: random.Random) -> tuple[str, dict[str, str], str]:
    def text(n: int) -> str:
        alphabet = "abcXYZ019-_" + ("é€𝄞" if rng.random() < 0.3 else "")
        return "".join(rng.choice(alphabet) for _ in range(n))

    group = {
        text(rng.randint(1, 40)): text(rng.choice([0, 1, 20, 500]))
        for _ in range(rng.randint(0, 10))
    }
    return text(rng.choice([1, 36, 255])), group, str(rng.randint(0, 10**30))


def test_row_bytes_is_an_upper_estimate_within_a_quarter() -> None:
    rng = random.Random(7)
    for _ in range(300):
        customer, group, value = _row(rng)
        response = meter_pb2.QueryUsageResponse()
        row = response.rows.add(customer_id=customer, group=group, value=value)
        row.window_start.FromSeconds(253_370_764_800)  # 9999-01-01, the largest seconds
        row.window_end.FromSeconds(253_370_764_800)
        row.window_end.nanos = 999_999_999
        actual = response.ByteSize()
        estimate = row_bytes(customer, group, value)
        assert actual <= estimate
        # Wide rows (the ones that make an answer large) are estimated closely.
        if actual > 1_000:
            assert estimate < actual * 1.1


def test_answer_size_refuses_the_row_past_a_limit_naming_it() -> None:
    size = AnswerSize(AnswerLimits(max_rows=3, max_bytes=1_000))
    for _ in range(3):
        size.add(100)
    with pytest.raises(ResourceExhausted, match=r"more than 3 rows.*start_time.*window_size"):
        size.add(100)
    size = AnswerSize(AnswerLimits(max_rows=100, max_bytes=1_000))
    size.add(600)
    with pytest.raises(ResourceExhausted, match=r"more than 1,000 bytes after 2 rows") as caught:
        size.add(600)
    assert "group_by" in str(caught.value) and "customer_id" in str(caught.value)
    assert caught.value.retry_after is None  # narrowing helps, waiting does not


async def test_the_budget_makes_answers_wait_for_room() -> None:
    budget = AnswerBudget(1_000, wait=10.0)
    first, second = budget.hold(), budget.hold()
    await first.take(400)
    await first.take(450)  # grows within the budget
    await second.take(500)
    assert budget.held == 950
    # The second answer's next slice waits for the first to end.
    waiting = asyncio.ensure_future(second.take(600))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    first.release()
    first.release()  # idempotent
    await asyncio.wait_for(waiting, 10)
    assert budget.held == 600
    # One that could never fit is refused without waiting.
    with pytest.raises(ResourceExhausted, match="answers in flight"):
        await asyncio.wait_for(budget.hold().take(2_000), 1)


async def test_when_every_answer_waits_the_newest_is_refused_and_the_oldest_goes_on() -> None:
    budget = AnswerBudget(1_000, wait=30.0)
    old, new = budget.hold(), budget.hold()
    await old.take(500)
    await new.take(400)
    growing = asyncio.ensure_future(old.take(700))
    await asyncio.sleep(0.2)
    assert not growing.done()  # waits: the new answer may end
    started = time.monotonic()
    with pytest.raises(ResourceExhausted) as caught:
        await new.take(600)  # both would wait on each other: refused at once
    assert time.monotonic() - started < 5  # not the 30 s wait
    assert caught.value.retry_after == 1.0
    new.release()  # the call ends, as the servicer does on the error
    await asyncio.wait_for(growing, 10)
    assert budget.held == 700


async def test_a_new_answer_that_finds_no_room_in_time_is_refused_with_retry_after() -> None:
    budget = AnswerBudget(1_000, wait=0.2)
    await budget.hold().take(900)
    with pytest.raises(ResourceExhausted) as caught:
        await budget.hold().take(200)
    assert caught.value.retry_after == 1.0
    assert budget.held == 900
