"""Time ranges ``[start, end)`` and their union: what a change queues for rebalancing, and
what a rebalance then covers. Nothing here does I/O."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

TimeRange = tuple[datetime, datetime]


def merge_ranges(ranges: Iterable[TimeRange]) -> list[TimeRange]:
    """Sorted, with overlapping or touching ranges joined (empty ones left out)."""
    merged: list[TimeRange] = []
    for start, end in sorted(ranges):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
