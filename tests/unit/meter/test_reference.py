from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from services.meter.domain.aggregation import Aggregation, MeterSpec
from services.meter.domain.filters import Condition, Filter, Operator
from services.meter.domain.reference import RawEvent, Row, aggregate_events
from services.meter.domain.values import MetaValue
from services.meter.domain.windows import WindowSize

D = Decimal
Agg = Aggregation
W = WindowSize


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


_ids = iter(range(10**6))


def ev(
    customer: str,
    ts: datetime,
    metadata: Mapping[str, MetaValue] | None = None,
    name: str = "llm_call",
    event_id: str | None = None,
) -> RawEvent:
    return RawEvent(event_id or f"e{next(_ids)}", customer, name, ts, dict(metadata or {}))


START, END = utc(2024, 5, 1), utc(2024, 6, 1)

EVENTS = [
    ev("acme", utc(2024, 5, 1, 10, 5), {"tokens": D(100), "model": "gpt", "region": "eu"}),
    ev("acme", utc(2024, 5, 1, 10, 50), {"tokens": D("0.5"), "model": "claude", "region": "eu"}),
    ev("acme", utc(2024, 5, 1, 12, 0), {"tokens": "20", "model": "gpt", "region": "us"}),
    ev("acme", utc(2024, 5, 1, 12, 1), {"tokens": "lots", "model": "gpt"}),  # not a number
    ev("acme", utc(2024, 5, 1, 12, 2), {"model": "gpt"}),  # no tokens
    ev("acme", utc(2024, 5, 2, 9), {"tokens": D(7), "model": "gpt", "region": "test"}),
    ev("acme", utc(2024, 5, 2, 9), {"tokens": D(1000)}, name="LLM_CALL"),  # other event name
    ev("acme", utc(2024, 4, 30, 23, 59, 59), {"tokens": D(1000)}),  # before start
    ev("acme", utc(2024, 6, 1), {"tokens": D(1000)}),  # at end: excluded
    ev("zeta", utc(2024, 5, 1, 10, 30), {"tokens": D(3), "model": "gpt", "region": "eu"}),
    ev("beta", utc(2024, 5, 31, 23, 59, 59), {"tokens": D(1), "model": "claude"}),
]

NOT_TEST = Filter(conditions=(Condition("region", Operator.NOT_EQUALS, "test"),))


def query(
    meter: MeterSpec,
    window: WindowSize = W.NONE,
    customer: str | None = None,
    tz: str = "UTC",
    events: list[RawEvent] = EVENTS,
    **kwargs: object,
) -> list[tuple[datetime, datetime, str, dict[str, str], str]]:
    rows = aggregate_events(events, meter, START, END, window, tz, customer, **kwargs)  # type: ignore[arg-type]
    return [(r.window_start, r.window_end, r.customer_id, r.group, r.value) for r in rows]


def test_count_for_one_customer() -> None:
    meter = MeterSpec("llm_call", Agg.COUNT)
    assert query(meter, customer="acme") == [(START, END, "acme", {}, "6")]


def test_count_per_customer_sorted() -> None:
    meter = MeterSpec("llm_call", Agg.COUNT)
    assert query(meter) == [
        (START, END, "acme", {}, "6"),
        (START, END, "beta", {}, "1"),
        (START, END, "zeta", {}, "1"),
    ]
    assert query(meter, customer="") == query(meter)


def test_sum_skips_values_that_are_not_numbers_and_honours_the_filter() -> None:
    meter = MeterSpec("llm_call", Agg.SUM, "tokens")
    assert query(meter, customer="acme") == [(START, END, "acme", {}, "127.5")]
    # NOT_EQUALS fails on a missing key: the event without "region" drops out too.
    filtered = MeterSpec("llm_call", Agg.SUM, "tokens", NOT_TEST)
    assert query(filtered, customer="acme") == [(START, END, "acme", {}, "120.5")]


def test_sum_by_hour_and_model() -> None:
    meter = MeterSpec("llm_call", Agg.SUM, "tokens", NOT_TEST, ("model",))
    assert query(meter, W.HOUR, group_by=("model",)) == [
        (utc(2024, 5, 1, 10), utc(2024, 5, 1, 11), "acme", {"model": "claude"}, "0.5"),
        (utc(2024, 5, 1, 10), utc(2024, 5, 1, 11), "acme", {"model": "gpt"}, "100"),
        (utc(2024, 5, 1, 12), utc(2024, 5, 1, 13), "acme", {"model": "gpt"}, "20"),
        (utc(2024, 5, 1, 10), utc(2024, 5, 1, 11), "zeta", {"model": "gpt"}, "3"),
    ]


def test_day_windows_in_a_zone_are_clipped_to_the_range() -> None:
    # In Asia/Tokyo (+9) the range starts at 09:00 on 1 May: the first day is clipped.
    meter = MeterSpec("llm_call", Agg.COUNT)
    assert query(meter, W.DAY, customer="acme", tz="Asia/Tokyo") == [
        (START, utc(2024, 5, 1, 15), "acme", {}, "5"),
        (utc(2024, 5, 1, 15), utc(2024, 5, 2, 15), "acme", {}, "1"),
    ]


def test_group_filter_and_missing_dimensions() -> None:
    meter = MeterSpec("llm_call", Agg.COUNT, group_by=("region",))
    assert query(meter, customer="acme", group_by=("region",)) == [
        (START, END, "acme", {"region": ""}, "2"),
        (START, END, "acme", {"region": "eu"}, "2"),
        (START, END, "acme", {"region": "test"}, "1"),
        (START, END, "acme", {"region": "us"}, "1"),
    ]
    assert query(meter, customer="acme", group_filter={"region": "eu"}) == [
        (START, END, "acme", {}, "2")
    ]
    assert query(meter, group_filter={"region": ""}) == [
        (START, END, "acme", {}, "2"),
        (START, END, "beta", {}, "1"),
    ]


def test_none_window_with_customer_always_gives_a_row() -> None:
    for kind in Aggregation:
        meter = MeterSpec("llm_call", kind, "tokens")
        assert query(meter, customer="nobody") == [(START, END, "nobody", {}, "0")]
    # The zero row keeps the shape of a grouped row, echoing the group filter.
    assert query(
        MeterSpec("llm_call", Agg.COUNT, group_by=("model", "region")),
        customer="nobody",
        group_by=("model", "region"),
        group_filter={"region": "eu"},
    ) == [(START, END, "nobody", {"model": "", "region": "eu"}, "0")]
    # Without a customer, or with sized windows, nothing matched means no rows.
    meter = MeterSpec("no_such_event", Agg.COUNT)
    assert query(meter) == []
    assert query(meter, W.DAY, customer="acme") == []


def test_min_max_avg() -> None:
    events = [
        ev("c", utc(2024, 5, 3), {"v": D(1)}),
        ev("c", utc(2024, 5, 4), {"v": "2"}),
        ev("c", utc(2024, 5, 5), {"v": D("-0.5")}),
        ev("c", utc(2024, 5, 6), {"v": True}),  # not a number: skipped, also for AVG
    ]
    expected = {Agg.MIN: "-0.5", Agg.MAX: "2", Agg.AVG: "0.8" + "3" * 49}
    for kind, value in expected.items():
        assert query(MeterSpec("llm_call", kind, "v"), events=events)[0][4] == value


def test_ten_tenths() -> None:
    events = [ev("c", utc(2024, 5, 3, i), {"v": D(repr(0.1))}) for i in range(10)]
    assert query(MeterSpec("llm_call", Agg.SUM, "v"), events=events)[0][4] == "1"
    assert query(MeterSpec("llm_call", Agg.AVG, "v"), events=events)[0][4] == "0.1"


def test_unique_count_per_day() -> None:
    events = [
        ev("c", utc(2024, 5, 3, 1), {"user": D(1)}),
        ev("c", utc(2024, 5, 3, 2), {"user": D("1.0")}),
        ev("c", utc(2024, 5, 3, 3), {"user": "1"}),
        ev("c", utc(2024, 5, 3, 4), {"user": "alice"}),
        ev("c", utc(2024, 5, 3, 5), {}),  # no user: skipped
        ev("c", utc(2024, 5, 4, 1), {"user": "alice"}),
    ]
    meter = MeterSpec("llm_call", Agg.UNIQUE_COUNT, "user")
    assert query(meter, W.DAY, events=events) == [
        (utc(2024, 5, 3), utc(2024, 5, 4), "c", {}, "2"),
        (utc(2024, 5, 4), utc(2024, 5, 5), "c", {}, "1"),
    ]
    assert query(meter, events=events)[0][4] == "2"


def test_latest_by_timestamp_then_event_id_whatever_the_order() -> None:
    events = [
        ev("c", utc(2024, 5, 3, 12), {"seats": D(5)}, event_id="b"),
        ev("c", utc(2024, 5, 3, 12), {"seats": D(7)}, event_id="c"),  # tie: "c" > "b"
        ev("c", utc(2024, 5, 3, 9), {"seats": D(9)}, event_id="z"),
        ev("c", utc(2024, 5, 3, 13), {"seats": "x"}, event_id="y"),  # not a number
        ev("c", utc(2024, 5, 4, 8), {"seats": D(2)}, event_id="a"),
    ]
    meter = MeterSpec("llm_call", Agg.LATEST, "seats")
    for order in (events, list(reversed(events))):
        assert query(meter, W.DAY, events=order) == [
            (utc(2024, 5, 3), utc(2024, 5, 4), "c", {}, "7"),
            (utc(2024, 5, 4), utc(2024, 5, 5), "c", {}, "2"),
        ]
        assert query(meter, events=order)[0][4] == "2"


def test_berlin_dst_day_gathers_23_hours() -> None:
    events = [
        ev("c", utc(2024, 3, 30, 22, 59), {}),  # 30 March 23:59 CET
        ev("c", utc(2024, 3, 30, 23, 0), {}),  # 31 March 00:00 CET
        ev("c", utc(2024, 3, 31, 21, 59), {}),  # 31 March 23:59 CEST
        ev("c", utc(2024, 3, 31, 22, 0), {}),  # 1 April 00:00 CEST
    ]
    rows = aggregate_events(
        events,
        MeterSpec("llm_call", Agg.COUNT),
        utc(2024, 3, 30),
        utc(2024, 4, 2),
        W.DAY,
        "Europe/Berlin",
        None,
    )
    assert rows == [
        Row(utc(2024, 3, 30), utc(2024, 3, 30, 23), "c", {}, "1"),
        Row(utc(2024, 3, 30, 23), utc(2024, 3, 31, 22), "c", {}, "2"),
        Row(utc(2024, 3, 31, 22), utc(2024, 4, 1, 22), "c", {}, "1"),
    ]


def test_duplicate_event_ids_are_refused() -> None:
    events = [ev("c", utc(2024, 5, 3), event_id="x"), ev("c", utc(2024, 5, 4), event_id="x")]
    with pytest.raises(ValueError, match="twice"):
        query(MeterSpec("llm_call", Agg.COUNT), events=events)


def test_inputs_are_not_mutated() -> None:
    events = list(EVENTS)
    snapshot = [(e, dict(e.metadata)) for e in events]
    group_filter = {"region": "eu"}
    query(
        MeterSpec("llm_call", Agg.SUM, "tokens"), W.HOUR, events=events, group_filter=group_filter
    )
    assert [(e, dict(e.metadata)) for e in events] == snapshot
    assert group_filter == {"region": "eu"}
