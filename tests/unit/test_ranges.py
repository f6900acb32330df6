"""Covering many ranges with a bounded number of them (what a balancing commit announces)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from service.grid.ranges import TimeRange, cover_with_at_most, merge_ranges

EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


def _ranges(pairs: list[tuple[int, int]]) -> list[TimeRange]:
    return [
        (EPOCH + timedelta(minutes=15 * start), EPOCH + timedelta(minutes=15 * (start + length)))
        for start, length in pairs
    ]


scattered = st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 20)), max_size=60).map(_ranges)


@given(scattered, st.integers(1, 40))
def test_the_cover_is_bounded_sorted_disjoint_and_covers_every_range(
    ranges: list[TimeRange], limit: int
) -> None:
    covered = cover_with_at_most(ranges, limit)
    merged = merge_ranges(ranges)
    assert len(covered) == min(limit, len(merged))
    assert covered == sorted(covered)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(covered))
    for start, end in merged:
        assert any(c_start <= start and end <= c_end for c_start, c_end in covered)
    # Nothing before the first range or after the last one is claimed.
    if merged:
        assert (covered[0][0], covered[-1][1]) == (merged[0][0], merged[-1][1])
    if len(merged) <= limit:
        assert covered == merged


def test_the_smallest_gaps_are_closed_first() -> None:
    ranges = _ranges([(0, 1), (2, 1), (10, 1), (11, 1), (30, 1)])
    assert cover_with_at_most(ranges, 3) == _ranges([(0, 3), (10, 2), (30, 1)])
    assert cover_with_at_most(ranges, 2) == _ranges([(0, 12), (30, 1)])
    assert cover_with_at_most(ranges, 1) == _ranges([(0, 31)])
