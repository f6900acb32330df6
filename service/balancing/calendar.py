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
from functools import lru_cache
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


# tzdata's closest offset changes are ~4 days apart (Africa/Freetown, 1939; DST rules
# months apart), so sampling the offset once a day finds every change.
_SAMPLE_SECONDS = 86_400


def _offset_at(seconds: int, tz: ZoneInfo) -> int:
    return _offset_seconds(_EPOCH + timedelta(seconds=seconds), tz)


@lru_cache(maxsize=4096)
def _offset_changes(tz: ZoneInfo, year: int) -> tuple[tuple[int, int], ...]:
    """Every offset change of ``tz`` in the UTC year ``year`` (its end included): the
    instant, in seconds (zone data changes on whole seconds), and the offset from then on,
    in microseconds. About 400 offset look-ups, once per zone and year."""
    first = int((datetime(year, 1, 1, tzinfo=UTC) - _EPOCH).total_seconds())
    last = int((datetime(year + 1, 1, 1, tzinfo=UTC) - _EPOCH).total_seconds())
    changes: list[tuple[int, int]] = []
    at, offset = first, _offset_at(first, tz)
    while at < last:
        upto = min(at + _SAMPLE_SECONDS, last)
        later = _offset_at(upto, tz)
        if later != offset:
            before, after = at, upto  # the offset changes in (before, after]
            while after - before > 1:
                middle = (before + after) // 2
                if _offset_at(middle, tz) == offset:
                    before = middle
                else:
                    after = middle
            changes.append((after, later * US_PER_SECOND))
        at, offset = upto, later
    return tuple(changes)


def offset_spans(start_us: int, end_us: int, tz: ZoneInfo) -> Iterator[tuple[int, int, int]]:
    """``[start, end)`` cut where the offset of ``tz`` changes: ``(from_us, to_us,
    offset_us)`` ascending, each with one offset throughout."""
    if end_us <= start_us:
        return
    at = start_us
    offset = _offset_seconds(from_us(at), tz) * US_PER_SECOND
    year = from_us(at).year
    while at < end_us:
        for change_s, later in _offset_changes(tz, year):
            change_us = change_s * US_PER_SECOND
            if change_us <= at:
                continue
            if change_us >= end_us:
                break
            yield at, change_us, offset
            at, offset = change_us, later
        year += 1
        year_end = to_us(datetime(year, 1, 1, tzinfo=UTC))
        if year_end >= end_us:
            break
    yield at, end_us, offset


def _fixed_grid(
    start_us: int, end_us: int, tz: ZoneInfo, step_us: int, limit: int | None = None
) -> NDArray[np.int64]:
    """The first ``limit`` (all if None) instants in ``[start, end)`` whose local wall time
    is a whole multiple of the step: per span of one offset, a plain arithmetic sequence."""
    parts: list[NDArray[np.int64]] = []
    left = limit
    for span_start, span_end, offset in offset_spans(start_us, end_us, tz):
        if left == 0:
            break
        first = span_start + (-(span_start + offset)) % step_us
        stop = span_end if left is None else min(span_end, first + left * step_us)
        points = np.arange(first, stop, step_us, dtype=np.int64)
        parts.append(points)
        if left is not None:
            left -= len(points)
    if not parts:
        return np.empty(0, dtype=np.int64)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def grid_starts(
    start: datetime, end: datetime, tz: ZoneInfo, resolution: Resolution
) -> NDArray[np.int64]:
    """Balance grid points in ``[start, end)`` as UTC microseconds.

    A fixed step's grid points are the instants whose local wall time is a whole number of
    steps: between two offset changes of the zone a plain arithmetic sequence in UTC, so
    the grid is one ``numpy.arange`` per offset (also in zones whose offset is no whole
    number of steps, like Lord Howe's +10:30 in winter for PT1H). Months are walked.
    """
    step = resolution.step
    if step is not None:
        step_us = int(step.total_seconds()) * US_PER_SECOND
        return _fixed_grid(to_us(start), to_us(end), tz, step_us)
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
        step_us = int(fixed.step.total_seconds()) * US_PER_SECOND
        # last_end is a grid point itself: included, it closes the range's last interval.
        return _fixed_grid(to_us(first), to_us(last_end) + 1, tz, step_us, count + 1)
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
    "from_us",
    "grid_starts",
    "iter_blocks",
    "local_day",
    "local_midnight",
    "merge_ranges",
    "offset_spans",
    "on_grid",
    "output_bounds",
    "output_floor",
    "output_next",
    "output_range",
    "parse_output_interval",
    "take_in_off_grid_blocks",
    "to_us",
]
