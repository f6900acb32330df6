"""Blocks (the unit results are stored in) and output intervals, in a site's time zone.

A block is a local day for PT15M and PT1H sites and a local month for P1M sites, so a
stored block never straddles a day (P1D) or month (P1M) output interval, DST days hold
92 or 100 quarter-hours, and a setting or policy (which change at local midnight) is
constant inside a day block. Times are UTC microseconds in numpy arrays. No I/O.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
from numpy.typing import NDArray

from service.grid import P1M, PT1H, PT15M, Resolution, local_midnight
from service.grid.arrays import grid_starts_us
from service.grid.ranges import TimeRange, merge_ranges

US_PER_SECOND = 1_000_000
OUTPUT_INTERVALS: tuple[str, ...] = ("PT15M", "PT1H", "P1D", "P1M")
# How coarse each output interval is, to refuse one finer than the site's resolution.
_COARSENESS = {"PT15M": 0, "PT1H": 1, "P1D": 2, "P1M": 3}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MICROSECOND = timedelta(microseconds=1)
_ONE_DAY = timedelta(days=1)


def to_us(value: datetime) -> int:
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * US_PER_SECOND + delta.microseconds


def from_us(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(value))


def local_day(instant: datetime, tz: ZoneInfo) -> date:
    return instant.astimezone(tz).date()


def block_of(instant: datetime, tz: ZoneInfo, resolution: Resolution) -> tuple[datetime, datetime]:
    """The block containing ``instant``: ``[start, end)`` in UTC."""
    if resolution.is_calendar:
        start = P1M.floor(instant, tz)
        return start, P1M.next_start(start, tz)
    day = local_day(instant, tz)
    return local_midnight(day, tz), local_midnight(day + timedelta(days=1), tz)


def iter_blocks(
    start: datetime, end: datetime, tz: ZoneInfo, resolution: Resolution
) -> Iterator[tuple[datetime, datetime]]:
    """Blocks overlapping ``[start, end)``, ascending."""
    if end <= start:
        return
    block_start, block_end = block_of(start, tz, resolution)
    while block_start < end:
        yield block_start, block_end
        block_start, block_end = block_of(block_end, tz, resolution)


def blocks_cover(start: datetime, end: datetime, tz: ZoneInfo, resolution: Resolution) -> TimeRange:
    """``[start, end)`` widened to whole blocks: from the start of the block holding
    ``start`` to the end of the block holding the last instant before ``end``."""
    return block_of(start, tz, resolution)[0], block_of(end - _ONE_MICROSECOND, tz, resolution)[1]


@dataclass(frozen=True)
class StoredBlock:
    """Where a stored block lies: its bounds and how many balance intervals it holds."""

    start: datetime
    end: datetime
    intervals: int


def on_grid(block: StoredBlock, tz: ZoneInfo, resolution: Resolution) -> bool:
    """Whether a stored block is a block of the site's grid now: false after a change of
    time zone (other local days) or resolution (months, or other intervals in a day)."""
    if block_of(block.start, tz, resolution) != (block.start, block.end):
        return False
    return len(grid_starts(block.start, block.end, tz, resolution)) == block.intervals


def _overlaps(ranges: Sequence[TimeRange], start: datetime, end: datetime) -> bool:
    return any(s < end and start < e for s, e in ranges)


def take_in_off_grid_blocks(
    ranges: Sequence[TimeRange],
    stored: Sequence[StoredBlock],
    tz: ZoneInfo,
    resolution: Resolution,
) -> tuple[list[TimeRange], list[datetime]]:
    """The ranges to re-balance so that no stored block of an old grid overlaps a block
    written on the current one, and the starts of the old blocks to delete.

    Re-balancing writes whole current blocks, so an old block overlapping one of them is
    deleted, and the current blocks covering the rest of it are written too (else its other
    intervals would have no results); those may overlap further old blocks, and so on
    (Berlin's days each straddle two London days): the ranges grow to the whole run of old
    blocks. Old blocks that overlap nothing written are left for their own re-balancing.
    """
    written = merge_ranges(blocks_cover(start, end, tz, resolution) for start, end in ranges)
    off_grid = sorted((b for b in stored if not on_grid(b, tz, resolution)), key=lambda b: b.start)
    # Old block start -> the current blocks covering it, as one range.
    taken: dict[datetime, TimeRange] = {}
    grown = True
    while grown:
        grown = False
        # Alternating directions follow a run of old blocks both ways in a few passes.
        for block in off_grid:
            if block.start in taken or not _overlaps(written, block.start, block.end):
                continue
            cover = blocks_cover(block.start, block.end, tz, resolution)
            taken[block.start] = cover
            written = merge_ranges([*written, cover])
            grown = True
        off_grid.reverse()
    if not taken:
        return list(ranges), []
    return merge_ranges([*ranges, *taken.values()]), sorted(taken)


def block_day(block_start: datetime, tz: ZoneInfo) -> date:
    """The local day whose settings and policy a block uses (a month block: its 1st)."""
    return local_day(block_start, tz)


def grid_starts(
    start: datetime, end: datetime, tz: ZoneInfo, resolution: Resolution
) -> NDArray[np.int64]:
    """Balance grid points in ``[start, end)`` as UTC microseconds: the same layout as the
    interval energy's (``service.grid.grid_starts_us``), which the rebalance matches them
    against point for point."""
    return grid_starts_us(resolution, tz, start, end)


def parse_output_interval(text: str, balance_resolution: Resolution) -> str | None:
    """The output interval for ``text`` ("" = the site's resolution); None if unknown or
    finer than the site's balance resolution."""
    chosen = text or balance_resolution.iso
    if chosen not in _COARSENESS:
        return None
    if _COARSENESS[chosen] < _COARSENESS[balance_resolution.iso]:
        return None
    return chosen


_FIXED_OUTPUTS = {"PT15M": PT15M, "PT1H": PT1H}


def output_floor(instant: datetime, tz: ZoneInfo, interval: str) -> datetime:
    """Start (UTC) of the output interval that contains ``instant``."""
    if interval == "P1D":
        return local_midnight(local_day(instant, tz), tz)
    if interval == "P1M":
        return P1M.floor(instant, tz)
    return _FIXED_OUTPUTS[interval].floor(instant, tz)


def output_next(start: datetime, tz: ZoneInfo, interval: str) -> datetime:
    """End (UTC) of the output interval that starts at ``start``."""
    if interval == "P1D":
        return local_midnight(local_day(start, tz) + timedelta(days=1), tz)
    if interval == "P1M":
        return P1M.next_start(start, tz)
    return _FIXED_OUTPUTS[interval].next_start(start, tz)


def output_range(
    start: datetime, end: datetime, tz: ZoneInfo, interval: str
) -> tuple[datetime, datetime]:
    """The output intervals of a request: from the one containing ``start`` up to ``end``
    (at least one), as the first one's start and the last one's end."""
    first = output_floor(start, tz, interval)
    floor_end = output_floor(end, tz, interval)
    last_end = floor_end if floor_end == end else output_next(floor_end, tz, interval)
    if last_end <= first:
        last_end = output_next(first, tz, interval)
    return first, last_end


def output_bounds(
    first: datetime, last_end: datetime, tz: ZoneInfo, interval: str, count: int
) -> NDArray[np.int64]:
    """At most ``count`` consecutive output intervals from the one starting at ``first``,
    up to ``last_end`` (an output interval's end): their starts, then the end of the last
    one, as UTC microseconds (at most ``count + 1`` values; none when ``first`` is at or
    after ``last_end``). The work is that of ``count`` intervals, whatever the range."""
    if first >= last_end or count < 1:
        return np.empty(0, dtype=np.int64)
    fixed = _FIXED_OUTPUTS.get(interval)
    if fixed is not None:
        assert fixed.step is not None
        # count + 1 steps from first, and a day for an offset change on the way, bound the
        # layout; last_end is a grid point itself: included, it closes the last interval.
        end = min(last_end + _ONE_MICROSECOND, first + (count + 1) * fixed.step + _ONE_DAY)
        return grid_starts_us(fixed, tz, first, end)[: count + 1]
    points = [first]
    while len(points) <= count and points[-1] < last_end:
        points.append(output_next(points[-1], tz, interval))
    return np.array([to_us(p) for p in points], dtype=np.int64)


__all__ = [
    "OUTPUT_INTERVALS",
    "StoredBlock",
    "TimeRange",
    "block_day",
    "block_of",
    "blocks_cover",
    "from_us",
    "grid_starts",
    "iter_blocks",
    "local_day",
    "local_midnight",
    "merge_ranges",
    "on_grid",
    "output_bounds",
    "output_floor",
    "output_next",
    "output_range",
    "parse_output_interval",
    "take_in_off_grid_blocks",
    "to_us",
]
