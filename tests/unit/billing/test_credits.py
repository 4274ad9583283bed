"""Credits' pure rules: cases worked by hand, then properties against an
independent per-event oracle (grants, expiries at and between minutes,
rollovers, the three overage rules, manual debits, events exactly at expiry
and at period boundaries, late events corrected by new entries)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.billing.domain.credits import (
    DEFICIT,
    Draw,
    Entry,
    EntryKind,
    Grant,
    Overage,
    Rollover,
    available,
    ceil_minute,
    check_amount,
    corrections,
    debit,
    draw_key,
    floor_minute,
    precision_of,
    replay,
    state_of,
    to_credits,
)
from services.common.errors import InvalidArgument

D = Decimal
T0 = datetime(2026, 1, 1, tzinfo=UTC)
M = timedelta(minutes=1)
FAR = T0 + timedelta(days=365)


def at(minutes: int) -> datetime:
    return T0 + minutes * M


def draw(minute: int, credits: int, rule: Overage = Overage.FORGIVE, meter: str = "m") -> Draw:
    return Draw(f"draw:{meter}:{minute}", at(minute), D(credits), rule, meter, D(credits))


def granted(g: Grant) -> Entry:
    return Entry(f"grant:{g.id}", EntryKind.GRANTED, g.effective, g.amount, {g.id: g.amount})


def test_amounts_are_checked_at_the_types_precision() -> None:
    assert check_amount(D("1.25"), 2, "amount") == D("1.25")
    with pytest.raises(InvalidArgument, match="amount: finer"):
        check_amount(D("1.255"), 2, "amount")
    with pytest.raises(InvalidArgument, match="amount: must be positive"):
        check_amount(D(0), 0, "amount")
    with pytest.raises(InvalidArgument, match="precision"):
        precision_of("CUSTOM", 4, "")
    assert precision_of("CURRENCY", 0, "JPY") == 0
    assert precision_of("CURRENCY", 0, "KWD") == 3
    assert to_credits(D(3), D("0.5"), 0) == D(2)  # 1.5 rounds half-up
    assert ceil_minute(T0 + timedelta(seconds=1)) == at(1)
    assert floor_minute(T0 + timedelta(seconds=59)) == T0


def test_draws_expiring_first_then_priority_then_oldest() -> None:
    never = Grant("never", D(100), at(0), None, priority=9, seq=1)
    late = Grant("late", D(100), at(0), at(100), priority=0, seq=2)
    soon_low = Grant("soon_low", D(10), at(0), at(50), priority=0, seq=3)
    soon_high = Grant("soon_high", D(10), at(0), at(50), priority=5, seq=4)
    grants = [never, late, soon_low, soon_high]
    state = {g.id: g.amount for g in grants}
    entries, after = replay(grants, [draw(1, 25)], state, at(1), at(2), 0)
    # soon_high (10), soon_low (10), then late (5); never untouched.
    assert entries == [
        Entry(
            "draw:m:1",
            EntryKind.DRAWN,
            at(1),
            D(-25),
            {"soon_high": D(-10), "soon_low": D(-10), "late": D(-5)},
            meter_id="m",
            quantity=D(25),
        )
    ]
    assert after == {"never": D(100), "late": D(95)}


def test_usage_exactly_at_expiry_does_not_draw_and_the_rest_expires() -> None:
    g = Grant("g", D(10), at(0), at(5))
    entries, after = replay([g], [draw(4, 3), draw(5, 3)], {}, at(0), at(10), 0)
    kinds = [(e.kind, e.amount, e.uncovered) for e in entries]
    assert kinds == [
        (EntryKind.DRAWN, D(-3), D(0)),
        (EntryKind.EXPIRED, D(-7), D(0)),
        (EntryKind.OVERAGE, D(0), D(3)),  # FORGIVE: not a balance change
    ]
    assert after == {}


def test_deficit_is_repaid_first_by_the_next_grant() -> None:
    g1 = Grant("g1", D(10), at(0), None)
    g2 = Grant("g2", D(50), at(3), None, seq=1)
    entries, after = replay([g1, g2], [draw(1, 25, Overage.DEFICIT)], {}, at(0), at(5), 0)
    assert after == {"g2": D(35)}
    assert sum(e.amount for e in entries) + D(60) == D(35)
    assert available([g1, g2], after, at(5))[0] == D(35)
    # Before g2 the balance is -15.
    _, mid = replay([g1, g2], [draw(1, 25, Overage.DEFICIT)], {}, at(0), at(2), 0)
    assert mid == {DEFICIT: D(-15)}
    assert available([g1, g2], mid, at(2))[0] == D(-15)


def test_rollover_fifty_percent_capped_and_the_rest_forfeited() -> None:
    policy = Rollover(D(50), D(20), 1)
    p1 = Grant("p1", D(100), at(0), at(10), chain="s", rollover=policy)
    p2 = Grant("p2", D(100), at(10), at(20), seq=1, chain="s", rollover=policy)
    p3 = Grant("p3", D(100), at(20), at(30), seq=2, chain="s", rollover=policy)
    entries, after = replay([p1, p2, p3], [draw(1, 70)], {}, at(0), at(30), 0)
    # 30 left of p1: 15 rolls over (50 %, under the cap), 15 forfeited.
    # p2 unused: 100 left, 50 % = 50 capped at 20; p1.r (15) has rolled once: expires.
    summary = [(e.key, e.kind, e.amount, dict(e.allocations)) for e in entries[1:]]
    assert summary == [
        ("rollover:p1", EntryKind.ROLLED_OVER, D(0), {"p1": D(-15), "p1.r": D(15)}),
        ("expire:p1", EntryKind.FORFEITED, D(-15), {"p1": D(-15)}),
        ("rollover:p2", EntryKind.ROLLED_OVER, D(0), {"p2": D(-20), "p2.r": D(20)}),
        ("expire:p2", EntryKind.FORFEITED, D(-80), {"p2": D(-80)}),
        ("expire:p1.r", EntryKind.FORFEITED, D(-15), {"p1.r": D(-15)}),
    ]
    assert after == {"p3": D(100), "p2.r": D(20)}


def test_a_debit_takes_from_the_open_grants_in_draw_order_and_later_usage_sees_it() -> None:
    soon = Grant("soon", D(10), at(0), at(50), seq=1)
    late = Grant("late", D(100), at(0), at(100), seq=2)
    never = Grant("never", D(100), at(0), None, priority=9, seq=3)
    grants = [soon, late, never]
    state = {g.id: g.amount for g in grants}
    debits = [debit("d1", at(2), D(25))]
    entries, after = replay(grants, [*debits, draw(3, 90)], state, at(1), at(5), 0)
    # The debit: soon 10, late 15 (at minute 2). Usage of 90 at minute 3: late
    # has 85 left, never gives 5.
    assert entries == [
        Entry("debit:d1", EntryKind.ADJUSTED, at(2), D(-25), {"soon": D(-10), "late": D(-15)}),
        Entry(
            "draw:m:3",
            EntryKind.DRAWN,
            at(3),
            D(-90),
            {"late": D(-85), "never": D(-5)},
            meter_id="m",
            quantity=D(90),
        ),
    ]
    assert after == {"never": D(95)}


def test_a_debit_beyond_the_balance_is_a_deficit_the_next_grant_repays_under_any_rule() -> None:
    g1 = Grant("g1", D(10), at(0), None)
    g2 = Grant("g2", D(50), at(3), None, seq=1)
    draws = [debit("d1", at(1), D(25)), draw(2, 5, Overage.FORGIVE)]
    entries, after = replay([g1, g2], draws, {}, at(0), at(5), 0)
    summary = [(e.key, e.kind, e.amount, dict(e.allocations), e.uncovered) for e in entries]
    assert summary == [
        # 10 from g1, 15 a deficit: one ADJUSTED entry of the whole amount.
        ("debit:d1", EntryKind.ADJUSTED, D(-25), {"g1": D(-10), DEFICIT: D(-15)}, D(15)),
        # Usage under FORGIVE finds nothing open with credits left: forgiven.
        ("over:draw:m:2", EntryKind.OVERAGE, D(0), {}, D(5)),
        # g2 opens and repays the 15 first.
        ("repay:g2", EntryKind.GRANTED, D(0), {"g2": D(-15), DEFICIT: D(15)}, D(0)),
    ]
    assert after == {"g2": D(35)}
    ledger = [granted(g1), granted(g2), *entries]
    assert sum(e.amount for e in ledger) == D(35) == available([g1, g2], after, at(5))[0]
    _, mid = replay([g1, g2], draws, {}, at(0), at(3), 0)
    assert available([g1, g2], mid, at(2))[0] == D(-15)


def test_a_minutes_debits_go_after_its_usage_in_order_made_not_from_a_grant_expiring_then() -> None:
    g = Grant("g", D(10), at(0), None)
    expiring = Grant("x", D(50), at(0), at(1), seq=1)
    draws = [debit("2", at(1), D(4)), debit("1", at(1), D(5)), draw(1, 8, meter="z")]
    entries, after = replay([g, expiring], draws, {}, at(0), at(2), 0)
    summary = [(e.key, e.amount, dict(e.allocations), e.uncovered) for e in entries]
    # Usage 8 of g's 10 (FORGIVE: nothing uncovered), then debit 1 (2 of g,
    # 3 a deficit), then debit 2 (all a deficit); x expired at the minute.
    assert summary == [
        ("expire:x", D(-50), {"x": D(-50)}, D(0)),
        ("draw:z:1", D(-8), {"g": D(-8)}, D(0)),
        ("debit:1", D(-5), {"g": D(-2), DEFICIT: D(-3)}, D(3)),
        ("debit:2", D(-4), {DEFICIT: D(-4)}, D(4)),
    ]
    assert after == {DEFICIT: D(-7)}


def test_late_usage_before_a_debit_corrects_it_by_a_new_entry_of_amount_zero() -> None:
    a = Grant("a", D(10), at(0), at(30))
    b = Grant("b", D(100), at(0), None, seq=1)
    grants = [a, b]
    first, _ = replay(grants, [debit("d1", at(5), D(8))], {}, at(0), at(10), 0)
    assert [dict(e.allocations) for e in first] == [{"a": D(-8)}]
    # Usage of 6 at minute 2 arrives late: it takes a first, the debit then 4 of a and 4 of b.
    desired, state = replay(grants, [draw(2, 6), debit("d1", at(5), D(8))], {}, at(0), at(10), 0)
    fixes = corrections(desired, first)
    assert [(e.key, e.kind, e.amount, dict(e.allocations)) for e in fixes] == [
        ("draw:m:2", EntryKind.DRAWN, D(-6), {"a": D(-6)}),
        ("debit:d1", EntryKind.ADJUSTED, D(0), {"a": D(4), "b": D(-4)}),
    ]
    assert state_of([granted(a), granted(b), *first, *fixes]) == state == {"b": D(96)}


# --- properties ---


def oracle(
    grants: list[Grant], events: list[tuple[datetime, str, int, Overage]], until: datetime
) -> tuple[dict[str, Decimal], Decimal]:
    """Per event, in (minute, meter, time) order, with the rules written out
    plainly: what each grant has left at `until`, and the total uncovered.
    An event of "meter" "debit:<id>" is a manual debit: it goes after the
    minute's usage (in id order), takes from the grants in the same order,
    and what they lack is always a deficit (not counted as uncovered usage)."""
    left: dict[str, Decimal] = {}
    deficit = D(0)
    uncovered = D(0)
    meta: dict[str, Grant] = {g.id: g for g in grants}
    opened: set[str] = set()
    closed: set[str] = set()
    successor = {(g.chain, g.effective): g for g in grants if g.chain}

    def advance(now: datetime) -> None:
        nonlocal deficit
        # Everything that happens at or before `now`, in time order.
        while True:
            times = [g.expires for g in meta.values() if g.id not in closed and g.id in opened]
            times += [g.effective for g in meta.values() if g.id not in opened]
            due = sorted(t for t in times if t is not None and t <= now)
            if not due:
                return
            moment = due[0]
            for g in list(meta.values()):
                if g.id in opened and g.id not in closed and g.expires == moment:
                    closed.add(g.id)
                    rest = left.pop(g.id, D(0))
                    nxt = successor.get((g.chain, moment)) if g.chain else None
                    p = g.rollover
                    if rest > 0 and p and nxt and g.rollovers < p.max_rollovers and p.percent:
                        carry = (rest * p.percent / 100).quantize(D(1), rounding="ROUND_DOWN")
                        carry = min(carry, p.cap) if p.cap is not None else carry
                        if carry > 0:
                            rid = g.id + ".r"
                            meta[rid] = Grant(
                                rid, carry, moment, nxt.expires, g.priority, g.seq,
                                g.chain, p, g.rollovers + 1,
                            )  # fmt: skip
            for g in sorted(meta.values(), key=lambda g: (g.effective, g.seq, g.id)):
                if g.id not in opened and g.effective == moment:
                    opened.add(g.id)
                    amount = g.amount
                    repay = min(deficit, amount)
                    deficit -= repay
                    left[g.id] = amount - repay

    def turn(e: tuple[datetime, str, int, Overage]) -> tuple[datetime, bool, str, datetime]:
        return (floor_minute(e[0]), e[1].startswith("debit:"), e[1], e[0])

    for when, _meter, qty, rule in sorted(events, key=turn):
        minute = floor_minute(when)
        advance(minute)
        need = D(qty)
        order = sorted(
            (meta[i] for i in left if meta[i].open_at(minute)),
            key=lambda g: (g.expires is None, g.expires or T0, -g.priority, g.effective, g.seq),
        )
        for g in order:
            take = min(left[g.id], need)
            left[g.id] -= take
            need -= take
        if need and _meter.startswith("debit:"):
            deficit += need
        elif need:
            uncovered += need
            if rule is Overage.DEFICIT:
                deficit += need
    advance(until - timedelta(microseconds=1))
    state = {k: v for k, v in left.items() if v}
    if deficit:
        state[DEFICIT] = -deficit
    return state, uncovered


@st.composite
def scenarios(draw_: st.DrawFn) -> tuple[list[Grant], list[tuple[datetime, str, int, Overage]]]:
    policy = draw_(
        st.one_of(
            st.none(),
            st.builds(
                Rollover,
                st.sampled_from([D(0), D(50), D(100), D("33.3")]),
                st.sampled_from([None, D(5), D(20)]),
                st.integers(1, 3),
            ),
        )
    )
    grants: list[Grant] = []
    # Included credits per period of 10 minutes (a chain), like a subscription.
    for p in range(draw_(st.integers(0, 4))):
        grants.append(
            Grant(f"p{p}", D(draw_(st.integers(1, 40))), at(10 * p), at(10 * p + 10),
                  priority=draw_(st.integers(0, 2)), seq=p, chain="s", rollover=policy)
        )  # fmt: skip
    for i in range(draw_(st.integers(0, 4))):
        start = draw_(st.integers(0, 45))
        life = draw_(st.one_of(st.none(), st.integers(1, 30)))
        grants.append(
            Grant(f"a{i}", D(draw_(st.integers(1, 40))), at(start),
                  None if life is None else at(start + life),
                  priority=draw_(st.integers(0, 2)), seq=10 + i)
        )  # fmt: skip
    events = draw_(
        st.lists(
            st.tuples(
                # Seconds too: minute 10 exactly is a period boundary and an expiry.
                st.integers(0, 50 * 60 - 1).map(lambda s: T0 + timedelta(seconds=s)),
                st.sampled_from(["m1", "m2"]),
                st.integers(1, 15),
                st.sampled_from(list(Overage)),
            ),
            max_size=40,
        )
    )
    # One rule per meter, as a product's price sets it.
    rules = {"m1": events[0][3] if events else Overage.FORGIVE, "m2": Overage.DEFICIT}
    debits = draw_(
        st.lists(
            st.tuples(st.integers(0, 50 * 60 - 1), st.integers(1, 30)),
            max_size=4,
        )
    )
    return grants, [(w, m, q, rules[m]) for w, m, q, _ in events] + [
        (T0 + timedelta(seconds=s), f"debit:d{i}", q, Overage.FORGIVE)
        for i, (s, q) in enumerate(debits)
    ]


def minute_draws(events: list[tuple[datetime, str, int, Overage]]) -> list[Draw]:
    summed: dict[tuple[datetime, str], tuple[int, Overage]] = {}
    debits: list[Draw] = []
    for when, meter, qty, rule in events:
        if meter.startswith("debit:"):
            debits.append(debit(meter.removeprefix("debit:"), floor_minute(when), D(qty)))
            continue
        key = (floor_minute(when), meter)
        summed[key] = (summed.get(key, (0, rule))[0] + qty, rule)
    return debits + [
        Draw(f"draw:{m}:{w.isoformat()}", w, D(q), r, m, D(q)) for (w, m), (q, r) in summed.items()
    ]


END = at(60)
LAST = END - timedelta(microseconds=1)  # the last instant the replay covers


@settings(deadline=None, max_examples=300)
@given(scenarios())
def test_the_ledger_agrees_with_the_per_event_oracle(
    case: tuple[list[Grant], list[tuple[datetime, str, int, Overage]]],
) -> None:
    grants, events = case
    entries, state = replay(grants, minute_draws(events), {}, T0, END, 0)
    expected, uncovered = oracle(grants, events, END)
    assert state == expected
    ledger = [granted(g) for g in grants] + entries
    # The balance is the sum of the ledger, and each grant's part too.
    assert state_of(ledger) == state
    assert available(grants, state, LAST)[0] == sum(e.amount for e in ledger)
    assert sum(e.uncovered for e in entries if e.kind is EntryKind.OVERAGE) == uncovered
    assert sum(e.quantity for e in entries) == sum(
        q for _, m, q, _ in events if not m.startswith("debit:")
    )
    # Each debit is one ADJUSTED entry of its whole amount.
    debited = sorted(q for _, m, q, _ in events if m.startswith("debit:"))
    assert sorted(-e.amount for e in entries if e.kind is EntryKind.ADJUSTED) == debited


@settings(deadline=None, max_examples=200)
@given(scenarios(), st.integers(1, 59), st.data())
def test_settling_in_steps_with_late_events_converges_to_the_oracle(
    case: tuple[list[Grant], list[tuple[datetime, str, int, Overage]]],
    cut: int,
    data: st.DataObject,
) -> None:
    """Settle [0, cut) with only some events, then settle again from a recheck
    point with all of them (late ones within the window): corrections are new
    entries, and the ledger ends where the oracle does."""
    grants, events = case
    recheck = at(data.draw(st.integers(0, cut)))
    # Late events are within the window: at or after the recheck point.
    candidates = [i for i, e in enumerate(events) if e[0] >= recheck]
    late = data.draw(st.sets(st.sampled_from(candidates))) if candidates else set()
    early = [e for i, e in enumerate(events) if i not in late]
    recorded = [granted(g) for g in grants]
    first, _ = replay(grants, minute_draws(early), {}, T0, at(cut), 0)
    recorded += first
    start_state = state_of(e for e in recorded if e.at < recheck)
    desired, _ = replay(grants, minute_draws(events), start_state, recheck, END, 0)
    derived_since = [e for e in recorded if e.at >= recheck and not e.key.startswith("grant:")]
    recorded += corrections(desired, derived_since)
    expected, _ = oracle(grants, events, END)
    assert state_of(recorded) == expected
    assert sum(e.amount for e in recorded) == available(grants, expected, LAST)[0]


def test_draw_keys_name_the_subscription_only_where_prices_share_a_minute() -> None:
    minute = datetime(2026, 3, 1, 12, 5, tzinfo=UTC)
    assert draw_key("m1", minute) == "draw:m1:2026-03-01T12:05:00+00:00"
    shared = draw_key("m1", minute, "sub-a")
    assert shared == "draw:m1:2026-03-01T12:05:00+00:00:sub-a"
    assert shared != draw_key("m1", minute, "sub-b")
    # Two subscriptions' draws of one minute are two entries, each its own
    # quantity and amount; corrections sum per key.
    one = Draw(shared, minute, D(100), Overage.BILL, "m1", D(100))
    two = Draw(draw_key("m1", minute, "sub-b"), minute, D(200), Overage.BILL, "m1", D(100))
    grant = Grant("g", D(1000), minute - timedelta(hours=1), None)
    entries, state = replay(
        [grant], [one, two], {"g": D(1000)}, minute, minute + timedelta(minutes=1), 0
    )
    assert sorted((e.key, e.amount, e.quantity) for e in entries) == [
        (shared, D(-100), D(100)),
        (draw_key("m1", minute, "sub-b"), D(-200), D(100)),
    ]
    assert state == {"g": D(700)}
