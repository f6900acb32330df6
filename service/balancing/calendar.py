"""Blocks (the unit results are stored in) and output intervals, in a site's time zone.

A block is a local day for PT15M and PT1H sites and a local month for P1M sites, so a
stored block never straddles a day (P1D) or month (P1M) output interval, DST days hold
92 or 100 quarter-hours, and a setting or policy (which change at local midnight) is
constant inside a day block. Times are UTC microseconds in numpy arrays. No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
from numpy.typing import NDArray

from service.grid import P1M, PT1H, PT15M, Resolution, local_midnight

US_PER_SECOND = 1_000_000
OUTPUT_INTERVALS: tuple[str, ...] = ("PT15M", "PT1H", "P1D", "P1M")
# How coarse each output interval is, to refuse one finer than the site's resolution.
_COARSENESS = {"PT15M": 0, "PT1H": 1, "P1D": 2, "P1M": 3}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MICROSECOND = timedelta(microseconds=1)

TimeRange = tuple[datetime, datetime]


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


def merge_ranges(ranges: Iterable[TimeRange]) -> list[TimeRange]:
    """Sorted, with overlapping or touching ranges joined."""
    merged: list[TimeRange] = []
    for start, end in sorted(ranges):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


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
    written = merge_ranges(
        [(s, e) for r in ranges for s, e in iter_blocks(r[0], r[1], tz, resolution)]
    )
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
            cover = (
                block_of(block.start, tz, resolution)[0],
                block_of(block.end - _ONE_MICROSECOND, tz, resolution)[1],
            )
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


def _offset_seconds(instant: datetime, tz: ZoneInfo) -> int:
    offset = instant.astimezone(tz).utcoffset()
    assert offset is not None
    return int(offset.total_seconds())


def grid_starts(
    start: datetime, end: datetime, tz: ZoneInfo, resolution: Resolution
) -> NDArray[np.int64]:
    """Balance grid points in ``[start, end)`` as UTC microseconds.

    When the zone's offset at both ends is a whole number of steps (every zone for PT15M
    except a handful), the grid is a plain arithmetic sequence in UTC even across a DST
    change; otherwise the grid arithmetic of :mod:`service.grid` walks it.
    """
    step = resolution.step
    if step is not None:
        step_s = int(step.total_seconds())
        last = end - timedelta(microseconds=1)
        if _offset_seconds(start, tz) % step_s == 0 and _offset_seconds(last, tz) % step_s == 0:
            step_us = step_s * US_PER_SECOND
            first = -(-to_us(start) // step_us) * step_us
            return np.arange(first, to_us(end), step_us, dtype=np.int64)
    return np.array([to_us(t) for t in resolution.iter_starts(start, end, tz)], dtype=np.int64)


def parse_output_interval(text: str, balance_resolution: Resolution) -> str | None:
    """The output interval for ``text`` ("" = the site's resolution); None if unknown or
    finer than the site's balance resolution."""
    chosen = text or balance_resolution.iso
    if chosen not in _COARSENESS:
        return None
    if _COARSENESS[chosen] < _COARSENESS[balance_resolution.iso]:
        return None
    return chosen


def output_starts(start: datetime, end: datetime, tz: ZoneInfo, interval: str) -> NDArray[np.int64]:
    """Starts of the output intervals from the one containing ``start`` up to ``end``,
    plus the end of the last one (so ``len - 1`` intervals), as UTC microseconds."""
    if interval == "P1D":
        first_day = local_day(start, tz)
        points = []
        day = first_day
        while True:
            midnight = local_midnight(day, tz)
            points.append(to_us(midnight))
            if midnight >= end:
                break
            day += timedelta(days=1)
        if len(points) == 1:
            points.append(to_us(local_midnight(first_day + timedelta(days=1), tz)))
        return np.array(points, dtype=np.int64)
    resolution = {"PT15M": PT15M, "PT1H": PT1H, "P1M": P1M}[interval]
    first = resolution.floor(start, tz)
    last_end = resolution.ceil(end, tz)
    if last_end <= first:
        last_end = resolution.next_start(first, tz)
    if resolution.is_calendar:
        points_dt = [first]
        while points_dt[-1] < last_end:
            points_dt.append(resolution.next_start(points_dt[-1], tz))
        return np.array([to_us(p) for p in points_dt], dtype=np.int64)
    starts = grid_starts(first, last_end, tz, resolution)
    return np.append(starts, np.int64(to_us(last_end)))


__all__ = [
    "OUTPUT_INTERVALS",
    "StoredBlock",
    "TimeRange",
    "block_day",
    "block_of",
    "from_us",
    "grid_starts",
    "iter_blocks",
    "local_day",
    "local_midnight",
    "merge_ranges",
    "on_grid",
    "output_starts",
    "parse_output_interval",
    "take_in_off_grid_blocks",
    "to_us",
]
