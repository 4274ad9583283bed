"""SEATS_MAX's pre-aggregation (domain.gauges Span, span, combine): a window's
most at one instant, from the level before it and the spans of its pieces,
cut anywhere and combined at any depth (minutes into hours into days), is the
oracle's (gauges.peak), same-instant ties and boundaries on an event included."""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from services.meter.domain import gauges
from services.meter.domain.gauges import Held, Span

D = Decimal
T0 = datetime(2024, 6, 1, tzinfo=UTC)
US = timedelta(microseconds=1)


def steps(events: list[Held]) -> list[tuple[datetime, Decimal]]:
    """Each event's time and step (its value minus its line's previous one)."""
    last: dict[Hashable, Decimal] = {}
    out = []
    for e in sorted(events, key=lambda e: (e.timestamp, e.event_id)):
        out.append((e.timestamp, e.value - last.get(e.line, D(0))))
        last[e.line] = e.value
    return out


def peak(events: list[Held], start: datetime, end: datetime, cuts: list[datetime]) -> D | None:
    """The window's peak from the spans of [start, end) cut at `cuts`, the
    first half of the pieces combined first (as minutes into an hour)."""
    all_steps = steps(events)
    if not any(t < end for t, _ in all_steps):
        return None
    before = sum((s for t, s in all_steps if t < start), D(0))
    bounds = [start, *sorted(c for c in set(cuts) if start < c < end), end]
    spans = [
        gauges.span(a, [(t, s) for t, s in all_steps if a <= t < b])
        for a, b in itertools.pairwise(bounds)
    ]
    # Pieces without steps hold no bucket (as the store's).
    kept = [
        s
        for s, (a, b) in zip(spans, itertools.pairwise(bounds), strict=True)
        if s != Span(a, D(0), D(0))
    ]
    half = len(kept) // 2
    inner = [gauges.combine(start, kept[:half])] if half else []
    outer = gauges.combine(start, inner + kept[half:])
    return before + outer.peak


times = st.builds(
    lambda s, us: T0 + timedelta(seconds=s, microseconds=us),
    st.integers(0, 40),
    st.sampled_from([0, 0, 1, 999_999]),
)


@st.composite
def seat_events(draw: st.DrawFn) -> list[Held]:
    n = draw(st.integers(0, 14))
    out = []
    for i in range(n):
        item = draw(st.sampled_from(["u1", "u2", "u3"]))
        out.append(
            Held(
                draw(times),
                draw(st.sampled_from(["a", "b", "c"])) + str(i),
                item,
                D(draw(st.sampled_from([0, 1, 1]))),
            )
        )
    return out


@settings(deadline=None, max_examples=600)
@given(
    events=seat_events(),
    start=times,
    length=st.sampled_from([US, timedelta(seconds=1), timedelta(seconds=7), timedelta(seconds=45)]),
    cuts=st.lists(times, max_size=6),
)
def test_spans_give_the_oracles_peak(
    events: list[Held], start: datetime, length: timedelta, cuts: list[datetime]
) -> None:
    end = start + length
    assert peak(events, start, end, cuts) == gauges.peak(events, start, end)


def test_added_and_removed_at_one_instant_is_never_active() -> None:
    t = T0 + timedelta(seconds=5)
    events = [Held(t, "a", "u1", D(1)), Held(t, "b", "u1", D(0))]
    assert gauges.span(T0, steps(events)) == Span(T0, D(0), D(0))
    # Removed at the window's start, after one before: the level before does not count.
    events = [Held(T0, "a", "u1", D(1)), Held(t, "b", "u1", D(0))]
    assert peak(events, t, t + US, []) == gauges.peak(events, t, t + US) == 0
    assert gauges.span(t, [(t, D(-1))]) == Span(t, D(-1), D(-1))
    # Nothing at the start: the level before counts (0 on top of it).
    assert gauges.span(t - US, [(t, D(-1))]) == Span(t - US, D(-1), D(0))
