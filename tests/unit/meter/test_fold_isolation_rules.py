"""The pure parts of meter's fold isolation: which numbers meter can store, what
a value PostgreSQL cannot hold makes of a row, and how a failure is classified."""

from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest

from services.meter.consumer import nak_delay
from services.meter.domain.aggregation import Aggregation, MeterSpec
from services.meter.domain.matching import SKIP_CONTAINS_NUL, Matcher
from services.meter.domain.values import MetaValue, to_number
from services.meter.isolation import Failure, classify, describe
from services.meter.quarantine import events_fingerprint

WHEN = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "value",
    [
        "0e-20000",  # measured: the driver cannot encode a zero of that scale
        Decimal("0e-20000"),
        "0e+20000",
        "1" * 1001,  # more digits than services.common.values allows
        "1e-1001",
    ],
)
def test_numbers_meter_cannot_store_are_not_numbers(value: MetaValue) -> None:
    assert to_number(value) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", Decimal(0)), ("0.000", Decimal("0.000")), ("0e-1000", Decimal("0e-1000"))],
)
def test_zeros_within_the_bounds_are_numbers(value: str, expected: Decimal) -> None:
    number = to_number(value)
    assert number == expected and number is not None
    assert number.as_tuple().exponent == expected.as_tuple().exponent


def test_a_stored_text_with_nul_skips_the_row() -> None:
    unique = MeterSpec("api.call", Aggregation.UNIQUE_COUNT, "user")
    grouped = MeterSpec("api.call", Aggregation.COUNT, group_by=("model",))
    matcher = Matcher([(1, unique), (2, grouped)])

    def fold(metadata: dict[str, MetaValue]) -> dict[int, tuple[object, ...]]:
        rows = matcher.fold(
            event_id="e", customer_id="c", event_name="api.call", event_time=WHEN, metadata=metadata
        )
        return {r.meter_key: (r.value, r.text_value, r.dims, r.skip_reason) for r in rows}

    assert fold({"user": "a\x00b", "model": "gpt\x00"}) == {
        1: (None, None, None, SKIP_CONTAINS_NUL),
        2: (None, None, None, SKIP_CONTAINS_NUL),
    }
    assert fold({"user": "ab", "model": "gpt"}) == {
        1: (None, "ab", None, None),
        2: (Decimal(1), None, {"model": "gpt"}, None),
    }


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (asyncpg.exceptions.RaiseError("trigger"), Failure.DATA),
        (asyncpg.exceptions.NumericValueOutOfRangeError("out of range"), Failure.DATA),
        (asyncpg.exceptions.CheckViolationError("check"), Failure.DATA),
        (asyncpg.exceptions.NotNullViolationError("not null"), Failure.DATA),
        (asyncpg.exceptions.CharacterNotInRepertoireError("0x00"), Failure.DATA),
        (asyncpg.exceptions.ProgramLimitExceededError("index row too large"), Failure.DATA),
        (ValueError("cannot encode Decimal value into numeric"), Failure.DATA),
        (OverflowError("int too big"), Failure.DATA),
        (asyncpg.exceptions.SerializationError("serialize"), Failure.TRANSIENT),
        (asyncpg.exceptions.DeadlockDetectedError("deadlock"), Failure.TRANSIENT),
        (asyncpg.exceptions.QueryCanceledError("statement timeout"), Failure.TRANSIENT),
        (asyncpg.exceptions.TooManyConnectionsError("too many"), Failure.UNAVAILABLE),
        (asyncpg.exceptions.ConnectionDoesNotExistError("closed"), Failure.UNAVAILABLE),
        (asyncpg.exceptions.AdminShutdownError("shutdown"), Failure.UNAVAILABLE),
        (asyncpg.exceptions.InterfaceError("connection is closed"), Failure.UNAVAILABLE),
        (ConnectionRefusedError(), Failure.UNAVAILABLE),
        (TimeoutError(), Failure.UNAVAILABLE),
        (asyncpg.exceptions.UndefinedTableError("no table"), Failure.OTHER),
        (TypeError("a bug"), Failure.OTHER),
    ],
)
def test_failures_are_classified_by_type(error: BaseException, kind: Failure) -> None:
    assert classify(error) is kind


def test_a_reason_names_the_error_and_holds_no_nul() -> None:
    reason = describe(asyncpg.exceptions.RaiseError("bad \x00 event"))
    assert reason.startswith("RaiseError (P0001): bad ")
    assert "\x00" not in reason
    assert len(describe(ValueError("x" * 5000))) == 1000


def test_nak_delays_grow_and_are_bounded() -> None:
    assert [nak_delay(n) for n in (1, 2, 3, 4, 5, 6, 20)] == [1, 2, 4, 8, 16, 30, 30]


def test_the_same_events_set_aside_again_find_their_row() -> None:
    assert events_fingerprint("t", ["b", "a"]) == events_fingerprint("t", ["a", "b"])
    assert events_fingerprint("t", ["a"]) != events_fingerprint("u", ["a"])
    assert events_fingerprint("t", ["a", "b"]) != events_fingerprint("t", ["a\x00b"])
