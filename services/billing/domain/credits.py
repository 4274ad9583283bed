"""Credits: the pure rules of grants, draw-down, overage, expiry and rollover.

`replay` is the whole engine: given the grants of one customer's balance of one
credit type, the state of the balance at `start` (what each grant had left),
and the usage to draw (per minute and meter, already in credits), it walks the
timeline [start, until) and returns the derived ledger entries (draws,
overages, expiries, rollovers, forfeits, deficit repayments) and the state at
`until`. The settlement task compares these entries with the recorded ones and
records the differences (so a late event corrects later entries by new
entries); the balance answer replays the unsettled minutes the same way.

Order of one instant: grants expiring then close (and roll over), then grants
effective then open (and repay a deficit first), then usage draws, then
debits. A grant is open over [effective, expires). Usage and debits draw from
the open grant that expires first, then the one of higher priority, then the
oldest; what no grant covers is overage under the rule of the usage's price,
and for a debit always a deficit.
"""

from __future__ import annotations

import decimal
import enum
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from typing import Final, ParamSpec, TypeVar

from services.billing.domain.money import EXACT, minor_units
from services.common.errors import InvalidArgument

ZERO: Final = Decimal(0)
MINUTE: Final = timedelta(minutes=1)
# How far ahead of billing's clock a client's "now" may be.
CLOCK_SKEW: Final = timedelta(seconds=5)
# The state's key of the deficit (a balance below zero under DEFICIT); always <= 0.
DEFICIT: Final = "deficit"
MAX_CUSTOM_PRECISION: Final = 3
# Credits amounts stay far inside PostgreSQL numeric and exact arithmetic.
MAX_AMOUNT: Final = Decimal(10) ** 24
# A grant's times: effective at most MAX_AHEAD after now (as far as a
# subscription may start), expiring at most MAX_LIFETIME after it takes
# effect. So every time a grant holds, and every minute arithmetic on it, stays
# far from the end of datetime's range (year 9999: an OverflowError there
# would be an INTERNAL).
MAX_AHEAD: Final = timedelta(days=1827)
MAX_LIFETIME: Final = timedelta(days=3660)
# A price's credit rate: at most 1e12 credits per unit, at most 12 decimals.
MAX_RATE: Final = Decimal(10) ** 12
RATE_DECIMALS: Final = 12
# The arithmetic of credits computed from usage: a minute's usage has no bound
# but ingest's (numbers up to 1e1000) times a credit rate, and the ledger's
# numeric columns have none that matters (131072 digits before the point), so
# sums and products are exact (no amount reaches this precision) and rounding
# happens only where asked (quantize), never at the default 28 digits (which
# made quantize raise InvalidOperation, and a sum round silently). No
# division under it: a quotient that does not end would not fit.
WIDE: Final = decimal.Context(
    prec=decimal.MAX_PREC,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    rounding=ROUND_HALF_UP,
    traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow],
)

P = ParamSpec("P")
T = TypeVar("T")


def wide(function: Callable[P, T]) -> Callable[P, T]:
    """Runs `function` under WIDE (credits' sums exact, whatever the caller's context)."""

    @functools.wraps(function)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        with decimal.localcontext(WIDE):
            return function(*args, **kwargs)

    return run


class Overage(enum.Enum):
    FORGIVE = "FORGIVE"
    BILL = "BILL"
    DEFICIT = "DEFICIT"


class EntryKind(enum.Enum):
    GRANTED = "GRANTED"
    DRAWN = "DRAWN"
    EXPIRED = "EXPIRED"
    ROLLED_OVER = "ROLLED_OVER"
    FORFEITED = "FORFEITED"
    ADJUSTED = "ADJUSTED"
    OVERAGE = "OVERAGE"


# --- units and amounts ---


def precision_of(kind: str, precision: int, currency: str) -> int:
    """Decimals of a credit type: 0..3 for CUSTOM, the currency's minor units."""
    if kind == "CURRENCY":
        return minor_units(currency)
    if not 0 <= precision <= MAX_CUSTOM_PRECISION:
        raise InvalidArgument(f"precision: must be 0 to {MAX_CUSTOM_PRECISION}, got {precision}")
    return precision


def check_amount(value: Decimal, precision: int, field_name: str, *, sign: str = "+") -> Decimal:
    """An amount at most `precision` decimals; sign "+" positive, "0+" not
    negative, "!0" non-zero. InvalidArgument naming the field otherwise."""
    if not value.is_finite() or abs(value) >= MAX_AMOUNT:
        raise InvalidArgument(
            f"{field_name}: out of range (its magnitude must be below 10^24), got {_short(value)}"
        )
    if value != value.quantize(Decimal(1).scaleb(-precision), rounding=ROUND_DOWN):
        raise InvalidArgument(f"{field_name}: finer than the credit type's {precision} decimals")
    if sign == "+" and value <= 0:
        raise InvalidArgument(f"{field_name}: must be positive")
    if sign == "0+" and value < 0:
        raise InvalidArgument(f"{field_name}: must not be negative")
    if sign == "!0" and value == 0:
        raise InvalidArgument(f"{field_name}: must not be zero")
    return value + ZERO  # normalizes -0


def _short(value: Decimal) -> str:
    text = str(value)
    return text if len(text) <= 40 else f"{text[:40]}..."


def check_grant_times(
    now: datetime,
    effective: datetime | None,
    expires: datetime | None,
    after: timedelta | None,
) -> tuple[datetime, datetime | None]:
    """A grant's (effective, expiry) in whole minutes from what the request
    gives (None: not given; effective defaults to now; no expiry: never), or
    InvalidArgument naming the field. Effective: not before now less
    CLOCK_SKEW, at most MAX_AHEAD after now, rounded up (never before now).
    Expiry: at least a minute after effective and at most MAX_LIFETIME after it,
    rounded down; `expires` and `after` are not both given."""
    if effective is not None:
        if effective < now - CLOCK_SKEW:
            raise InvalidArgument("effective_time: must not be in the past")
        if effective > now + MAX_AHEAD:
            raise InvalidArgument(f"effective_time: at most {MAX_AHEAD.days} days after now")
    start = ceil_minute(max(effective or now, now))
    if expires is not None and after is not None:
        raise InvalidArgument("expire_after: give expire_time or expire_after, not both")
    end = None
    if after is not None:
        if after < MINUTE:
            raise InvalidArgument("expire_after: at least one minute")
        if after > MAX_LIFETIME:
            raise InvalidArgument(f"expire_after: at most {MAX_LIFETIME.days} days")
        end = floor_minute(start + after)
    elif expires is not None:
        if expires > start + MAX_LIFETIME:
            raise InvalidArgument(
                f"expire_time: at most {MAX_LIFETIME.days} days after effective_time"
            )
        end = floor_minute(expires)
        if end <= start:
            since = "effective_time" if effective is not None else "now (effective_time's default)"
            raise InvalidArgument(
                f"expire_time: must be at least a minute after {since}, once both are"
                " whole minutes (effective rounded up, expiry down)"
            )
    return start, end


def check_rate(value: Decimal, field_name: str) -> Decimal:
    """A price's credit rate (credits per unit of usage): positive, at most
    MAX_RATE, at most RATE_DECIMALS decimals (a finer rate would round every
    minute's draw to nothing). InvalidArgument naming the field otherwise."""
    if not value.is_finite() or value <= 0:
        raise InvalidArgument(f"{field_name}: must be positive")
    if value > MAX_RATE:
        raise InvalidArgument(f"{field_name}: at most {MAX_RATE:f}")
    if value != value.quantize(Decimal(1).scaleb(-RATE_DECIMALS), rounding=ROUND_DOWN):
        raise InvalidArgument(f"{field_name}: at most {RATE_DECIMALS} decimals")
    return value


def to_credits(quantity: Decimal, rate: Decimal, precision: int) -> Decimal:
    """Usage in credits, rounded once per minute entry, half-up, to the
    precision; exact however large (see WIDE)."""
    with decimal.localcontext(EXACT):
        exact = quantity * rate
    # Rounding is the point here: under WIDE, as EXACT traps Inexact.
    return exact.quantize(Decimal(1).scaleb(-precision), rounding=ROUND_HALF_UP, context=WIDE)


def coverage(
    consumed: Decimal, drawn: Decimal, rate: Decimal, rule: Overage
) -> tuple[Decimal, Decimal]:
    """(covered, billable) of a line's usage: `covered` the quantity that
    `drawn` credits paid for at `rate` credits a unit (at most `consumed`),
    `billable` the rest under Overage.BILL, else 0. The division keeps 40
    significant digits past the larger of `consumed` and `drawn`, however large
    (the quantity column keeps what a price can multiply exactly)."""
    with decimal.localcontext() as context:
        context.prec = 40 + max(_digits(consumed), _digits(drawn))
        covered = min(consumed, drawn / rate)
        return covered, consumed - covered if rule is Overage.BILL else Decimal(0)


def _digits(value: Decimal) -> int:
    """Digits of a finite decimal before its point (at least 1)."""
    return max(value.adjusted() + 1, 1) if value else 1


@wide
def total_drawn(amounts: Iterable[Decimal]) -> Decimal:
    """What ledger entries of these amounts drew (minus their sum), exactly."""
    return -sum(amounts, Decimal(0))


# --- minutes ---


def floor_minute(when: datetime) -> datetime:
    return when.replace(second=0, microsecond=0)


def ceil_minute(when: datetime) -> datetime:
    floor = floor_minute(when)
    return floor if floor == when else floor + MINUTE


def floor_day(when: datetime) -> datetime:
    """The UTC midnight at or before `when`."""
    return when.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def ceil_day(when: datetime) -> datetime:
    """The UTC midnight at or after `when`."""
    floor = floor_day(when)
    return floor if floor == when else floor + timedelta(days=1)


def merged(spans: Iterable[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """The union of half-open ranges, as disjoint ranges in order (touching
    ranges join)."""
    out: list[tuple[datetime, datetime]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


# --- grants ---


@dataclass(frozen=True)
class Rollover:
    percent: Decimal  # 0..100
    cap: Decimal | None
    max_rollovers: int


@dataclass(frozen=True)
class Grant:
    id: str
    amount: Decimal
    effective: datetime  # a whole minute
    expires: datetime | None  # a whole minute, after effective; None: never
    priority: int = 0
    seq: int = 0  # creation order: a lower seq is older
    # Included credits of a subscription: the chain is the subscription and
    # credit type; a rollover goes into the chain's grant effective at this
    # grant's expiry, as a new grant expiring with it.
    chain: str = ""
    rollover: Rollover | None = None
    rollovers: int = 0  # how many times these credits rolled over already

    def open_at(self, when: datetime) -> bool:
        return self.effective <= when and (self.expires is None or when < self.expires)


_NEVER: Final = datetime(9999, 12, 31, tzinfo=UTC)


def rollover_id(grant_id: str) -> str:
    return f"{grant_id}.r"


def _draw_order(grant: Grant) -> tuple[bool, datetime, int, datetime, int]:
    # A grant that never expires sorts after every one that does (the flag);
    # among them the time compared is the same constant.
    when = grant.expires or _NEVER
    return (grant.expires is None, when, -grant.priority, grant.effective, grant.seq)


def _rolled(parent: Grant, successor: Grant) -> Grant:
    """The grant that carries `parent`'s rollover (its amount is in the state)."""
    return Grant(
        id=rollover_id(parent.id),
        amount=ZERO,
        effective=successor.effective,
        expires=successor.expires,
        priority=parent.priority,
        seq=parent.seq,  # rolled-over credits are the older: drawn first
        chain=parent.chain,
        rollover=parent.rollover,
        rollovers=parent.rollovers + 1,
    )


def expand_rollovers(grants: Sequence[Grant]) -> list[Grant]:
    """The grants with, for each grant that may roll over into a successor (the
    chain's grant effective at its expiry), the rollover grant it would make."""
    starts = {(g.chain, g.effective): g for g in grants if g.chain and g.id.find(".") < 0}
    out = list(grants)
    queue = list(grants)
    while queue:
        grant = queue.pop()
        policy = grant.rollover
        if policy is None or grant.expires is None or grant.rollovers >= policy.max_rollovers:
            continue
        if policy.percent <= 0:
            continue
        successor = starts.get((grant.chain, grant.expires))
        if successor is None:
            continue
        rolled = _rolled(grant, successor)
        out.append(rolled)
        queue.append(rolled)
    return out


# --- usage and the ledger ---


def draw_key(meter_id: str, minute: datetime, subscription_id: str = "") -> str:
    """The key of one meter's usage drawn at one minute (UTC): with the
    subscription's id when several subscriptions' prices draw that minute
    (each draws it: one entry each), without it otherwise."""
    key = f"draw:{meter_id}:{minute.astimezone(UTC).isoformat()}"
    return f"{key}:{subscription_id}" if subscription_id else key


@dataclass(frozen=True)
class Draw:
    """Credits to draw at one minute: one meter's usage of that minute, or a
    manual debit (kind ADJUSTED: its `rule` is not used, see _draw). Within a
    minute, usage draws in key order (meter id), then debits in key order."""

    key: str  # unique per balance: draw_key(...) or "debit:<id>"
    at: datetime
    credits: Decimal
    rule: Overage
    meter_id: str = ""
    quantity: Decimal = ZERO  # the meter's quantity (for the entry)
    kind: EntryKind = EntryKind.DRAWN


def debit(debit_id: str, at: datetime, credits: Decimal) -> Draw:
    """A manual debit of `credits` (> 0) at the minute `at`; ids sort in the
    order the debits were made (a minute's debits are taken in that order)."""
    return Draw(f"debit:{debit_id}", at, credits, Overage.DEFICIT, kind=EntryKind.ADJUSTED)


@dataclass(frozen=True)
class Entry:
    """A derived ledger entry (or what a recorded one says, summed per key)."""

    key: str
    kind: EntryKind
    at: datetime
    amount: Decimal
    allocations: Mapping[str, Decimal] = field(default_factory=dict)
    grant_id: str = ""
    meter_id: str = ""
    quantity: Decimal = ZERO
    uncovered: Decimal = ZERO


def _add(target: dict[str, Decimal], key: str, amount: Decimal) -> None:
    target[key] = target.get(key, ZERO) + amount


@dataclass
class _Balance:
    remaining: dict[str, Decimal]
    entries: list[Entry]

    def open_grant(self, grant: Grant, at: datetime) -> None:
        if not grant.id.endswith(".r"):
            self.remaining[grant.id] = self.remaining.get(grant.id, ZERO) + grant.amount
        deficit = -self.remaining.get(DEFICIT, ZERO)
        left = self.remaining.get(grant.id, ZERO)
        repay = min(deficit, left)
        if repay > 0:
            self.remaining[grant.id] = left - repay
            self.remaining[DEFICIT] = -(deficit - repay)
            self.entries.append(
                Entry(
                    f"repay:{grant.id}",
                    EntryKind.GRANTED,
                    at,
                    ZERO,
                    {grant.id: -repay, DEFICIT: repay},
                    grant_id=grant.id,
                )
            )


@wide
def replay(
    grants: Sequence[Grant],
    draws: Iterable[Draw],
    state: Mapping[str, Decimal],
    start: datetime,
    until: datetime,
    precision: int,
) -> tuple[list[Entry], dict[str, Decimal]]:
    """The entries derived from [start, until) and the state at `until`.

    `state` maps grant ids (and DEFICIT) to what they had left at `start`, as
    the ledger's allocations sum it up; grants effective within the range are
    opened with their amount (their GRANTED entry is recorded when granted).
    Never mutates its inputs."""
    every = expand_rollovers(grants)
    by_id = {g.id: g for g in every}
    starts = {(g.chain, g.effective): g for g in grants if g.chain}
    balance = _Balance({k: v for k, v in state.items() if v != 0 or k == DEFICIT}, [])
    entries = balance.entries
    moments: set[datetime] = set()
    for g in every:
        if start <= g.effective < until:
            moments.add(g.effective)
        if g.expires is not None and start <= g.expires < until:
            moments.add(g.expires)
    by_minute: dict[datetime, list[Draw]] = {}
    for d in draws:
        if start <= d.at < until:
            by_minute.setdefault(d.at, []).append(d)
            moments.add(d.at)
    quantum = Decimal(1).scaleb(-precision)
    for moment in sorted(moments):
        for g in every:
            if g.expires == moment and g.effective < moment:
                _close(balance, g, starts, moment, quantum)
        for g in sorted(every, key=lambda g: (g.effective, g.seq, g.id)):
            if g.effective == moment:
                balance.open_grant(g, moment)
        for d in sorted(by_minute.get(moment, []), key=_draw_turn):
            _draw(balance, d, [by_id[k] for k in balance.remaining if k in by_id], moment)
    final = {k: v for k, v in balance.remaining.items() if v != 0}
    return entries, final


def _draw_turn(draw: Draw) -> tuple[bool, str]:
    # A minute's usage (meter id order), then its debits (in the order made:
    # their keys carry it), so a debit never comes before usage already shown.
    return (draw.kind is EntryKind.ADJUSTED, draw.key)


def _close(
    balance: _Balance,
    grant: Grant,
    starts: Mapping[tuple[str, datetime], Grant],
    at: datetime,
    quantum: Decimal,
) -> None:
    left = balance.remaining.pop(grant.id, ZERO)
    if left <= 0:
        return
    policy = grant.rollover
    successor = starts.get((grant.chain, at)) if grant.chain else None
    carry = ZERO
    if (
        policy is not None
        and successor is not None
        and grant.rollovers < policy.max_rollovers
        and policy.percent > 0
    ):
        with decimal.localcontext(EXACT):
            share = (left * policy.percent).scaleb(-2)
            carry = share.quantize(quantum, rounding=ROUND_DOWN, context=WIDE)
        if policy.cap is not None:
            carry = min(carry, policy.cap)
    entries = balance.entries
    if carry > 0:
        target = rollover_id(grant.id)
        balance.remaining[target] = balance.remaining.get(target, ZERO) + carry
        entries.append(
            Entry(
                f"rollover:{grant.id}",
                EntryKind.ROLLED_OVER,
                at,
                ZERO,
                {grant.id: -carry, target: carry},
                grant_id=grant.id,
            )
        )
    rest = left - carry
    if rest > 0:
        kind = EntryKind.FORFEITED if policy is not None else EntryKind.EXPIRED
        entries.append(
            Entry(f"expire:{grant.id}", kind, at, -rest, {grant.id: -rest}, grant_id=grant.id)
        )


def _draw(balance: _Balance, draw: Draw, candidates: list[Grant], at: datetime) -> None:
    need = draw.credits
    taken: dict[str, Decimal] = {}
    for g in sorted((g for g in candidates if g.open_at(at)), key=_draw_order):
        if need <= 0:
            break
        left = balance.remaining.get(g.id, ZERO)
        if left <= 0:
            continue
        take = min(left, need)
        balance.remaining[g.id] = left - take
        taken[g.id] = -take
        need -= take
    covered = draw.credits - need
    entries = balance.entries
    if draw.kind is EntryKind.ADJUSTED:
        # A debit always takes its whole amount: what no grant covers is a
        # deficit (whatever the prices' overage rule, which is about usage),
        # repaid first by the next grant; one entry, never an OVERAGE.
        if need > 0:
            taken[DEFICIT] = -need
            _add(balance.remaining, DEFICIT, -need)
        entries.append(Entry(draw.key, draw.kind, at, -draw.credits, taken, uncovered=need))
        return
    if covered > 0 or draw.credits == 0:
        entries.append(
            Entry(
                draw.key,
                draw.kind,
                at,
                -covered,
                taken,
                meter_id=draw.meter_id,
                quantity=draw.quantity,
            )
        )
    if need > 0:
        deficit = draw.rule is Overage.DEFICIT
        amount = -need if deficit else ZERO
        allocations = {DEFICIT: -need} if deficit else {}
        if deficit:
            _add(balance.remaining, DEFICIT, -need)
        entries.append(
            Entry(
                f"over:{draw.key}",
                EntryKind.OVERAGE,
                at,
                amount,
                allocations,
                meter_id=draw.meter_id,
                quantity=ZERO if covered > 0 else draw.quantity,
                uncovered=need,
            )
        )


@wide
def available(
    grants: Sequence[Grant], state: Mapping[str, Decimal], now: datetime
) -> tuple[Decimal, list[tuple[Grant, Decimal]]]:
    """The balance at `now` from the state at `now`: the open grants' remainders
    plus the deficit, and (grant, remaining) of open and future grants in draw order."""
    every = {g.id: g for g in expand_rollovers(grants)}
    total = state.get(DEFICIT, ZERO)
    listed: list[tuple[Grant, Decimal]] = []
    for gid, left in state.items():
        grant = every.get(gid)
        if grant is not None and grant.open_at(now) and left != 0:
            total += left
            listed.append((grant, left))
    for grant in grants:
        if grant.effective > now and not grant.id.endswith(".r"):
            listed.append((grant, grant.amount))
    listed.sort(key=lambda pair: (pair[0].effective > now, *_draw_order(pair[0])))
    return total, listed


# --- corrections ---


@wide
def corrections(desired: Sequence[Entry], recorded: Sequence[Entry]) -> list[Entry]:
    """What to record so that the recorded entries (summed per key) equal the
    desired ones: one entry per key that differs, carrying the difference."""
    have: dict[str, Entry] = {}
    for e in recorded:
        have[e.key] = _sum(have.get(e.key), e)
    want: dict[str, Entry] = {}
    for e in desired:
        want[e.key] = _sum(want.get(e.key), e)
    out: list[Entry] = []
    for key in sorted(set(have) | set(want), key=lambda k: ((want.get(k) or have[k]).at, k)):
        w, h = want.get(key), have.get(key)
        base = w or h
        assert base is not None
        delta = Entry(
            key,
            base.kind,
            base.at,
            (w.amount if w else ZERO) - (h.amount if h else ZERO),
            _minus(w.allocations if w else {}, h.allocations if h else {}),
            grant_id=base.grant_id,
            meter_id=base.meter_id,
            quantity=(w.quantity if w else ZERO) - (h.quantity if h else ZERO),
            uncovered=(w.uncovered if w else ZERO) - (h.uncovered if h else ZERO),
        )
        if delta.amount or delta.allocations or delta.quantity or delta.uncovered:
            out.append(delta)
    return out


def _sum(a: Entry | None, b: Entry) -> Entry:
    if a is None:
        return b
    allocations = dict(a.allocations)
    for k, v in b.allocations.items():
        _add(allocations, k, v)
    return Entry(
        a.key,
        a.kind,
        a.at,
        a.amount + b.amount,
        {k: v for k, v in allocations.items() if v != 0},
        grant_id=a.grant_id,
        meter_id=a.meter_id,
        quantity=a.quantity + b.quantity,
        uncovered=a.uncovered + b.uncovered,
    )


def _minus(a: Mapping[str, Decimal], b: Mapping[str, Decimal]) -> dict[str, Decimal]:
    out = dict(a)
    for k, v in b.items():
        _add(out, k, -v)
    return {k: v for k, v in out.items() if v != 0}


@wide
def state_of(entries: Iterable[Entry]) -> dict[str, Decimal]:
    """What each grant (and the deficit) has left after these entries."""
    state: dict[str, Decimal] = {}
    for e in entries:
        for k, v in e.allocations.items():
            _add(state, k, v)
    return {k: v for k, v in state.items() if v != 0}
