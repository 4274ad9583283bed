"""What an event costs meter to fold, in row units (pure).

meter folds an event into one row per active meter on its name, and a row's
cost grows with the meter's shape: a group-by key adds a jsonb entry to the
row, a filter condition a test per event. One row unit is a plain meter's row;
the weights below come from `python -m bench.fold_weights` (figures in the
README's "Fair share" section). An event costs at least one unit, even when no
meter counts it: ingest stores and publishes it all the same.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Extra row units per group-by key and per filter condition of a meter.
GROUP_BY_KEY_UNITS = 0.5
CONDITION_UNITS = 0.15


@dataclass(frozen=True)
class MeterShape:
    """What decides a meter's fold cost: its event name, how many group-by
    keys it has and how many filter conditions (nested filters included)."""

    event_name: str
    group_by_keys: int = 0
    conditions: int = 0


def meter_units(meter: MeterShape) -> float:
    """Row units of one (meter, event) row: 1 for a plain meter, more for a
    wide group-by or a long filter."""
    return 1.0 + GROUP_BY_KEY_UNITS * meter.group_by_keys + CONDITION_UNITS * meter.conditions


def weights(meters: Iterable[MeterShape]) -> dict[str, float]:
    """Event name -> row units one event of that name costs to fold (the sum
    over the active meters on that name). Names without a meter are absent."""
    by_name: dict[str, float] = defaultdict(float)
    for meter in meters:
        by_name[meter.event_name] += meter_units(meter)
    return dict(by_name)


def call_cost(event_names: Iterable[str], weights: Mapping[str, float]) -> int:
    """Row units of a call: the sum over its events of max(1, weight of the
    event's name), rounded up to a whole unit. Events that will be rejected
    or are duplicates count too: the limit is taken before they are judged."""
    total = 0.0
    for name in event_names:
        total += max(1.0, weights.get(name, 0.0))
    return math.ceil(total - 1e-9)
