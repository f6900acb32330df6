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


def cover_with_at_most(ranges: Iterable[TimeRange], limit: int) -> list[TimeRange]:
    """At most ``limit`` (>= 1) sorted, disjoint ranges that cover every one of ``ranges``:
    the merged ranges as they are when there are few enough, else joined across the
    smallest gaps between neighbours (each range returned then also covers the gaps it
    closed). For announcing many scattered ranges in a bounded number of messages."""
    merged = merge_ranges(ranges)
    if len(merged) <= limit:
        return merged
    # The limit - 1 widest gaps stay open; ties keep the earlier gap.
    by_width = sorted(range(1, len(merged)), key=lambda i: (merged[i - 1][1] - merged[i][0], i))
    kept = sorted(by_width[: limit - 1])
    covered: list[TimeRange] = []
    first = 0
    for split in [*kept, len(merged)]:
        covered.append((merged[first][0], merged[split - 1][1]))
        first = split
    return covered
