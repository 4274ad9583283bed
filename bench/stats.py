"""Small helpers for the benchmark figures."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import psutil


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def cpu_seconds(pid: int | None) -> float:
    """CPU time of a process and of all its children, live and exited
    (PostgreSQL's backends are children of the postmaster)."""
    if pid is None:
        return 0.0
    try:
        process = psutil.Process(pid)
        times = process.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
    except psutil.Error:
        return 0.0
    return float(total)
