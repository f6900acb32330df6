"""The ingest hot path's validation: plain functions over a batch, no I/O.

Applies the rules of ``check_reading`` (tests/unit/reference_rules.py; same order, same
reasons) to a whole batch without building a datetime or a reading object per reading:
timestamps stay integer microseconds since the epoch, meter facts are precomputed once per
meter (:class:`MeterInfo`), and the grid test is cached per (grid, second). A unit test
cross-checks it against ``check_reading``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

from service.common.protoconv import MAX_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS
from service.grid import Resolution
from service.telemetry.domain import Measuring, MeterDirection, RejectReason, max_value_wh

MIN_SECONDS = MIN_TIMESTAMP_SECONDS
MAX_SECONDS = MAX_TIMESTAMP_SECONDS
_NANOS = 1_000_000_000
FLOW_IMPORT = 1
FLOW_EXPORT = 2
_US = 1_000_000
_INF = math.inf


@dataclass(frozen=True, slots=True)
class MeterInfo:
    """What validation and storage need about one meter, computed once per cache fill."""

    id: UUID
    org_id: UUID
    site_id: UUID
    direction: MeterDirection
    measuring: Measuring
    start_us: int
    end_us: int | None
    transformer_factor: float
    timezone: ZoneInfo
    resolution: Resolution
    # 0 for bidirectional meters (the reading must name the flow).
    default_flow: int
    load_profile: bool
    # The largest value its readings may carry (interval energy or register).
    max_value: float
    # Grid membership per epoch second, shared by every meter on the same grid.
    grid: dict[int, bool]

    @property
    def grid_key(self) -> tuple[str, str]:
        return (self.timezone.key, self.resolution.iso)


def to_us(value: datetime) -> int:
    delta = value.astimezone(UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * _US + delta.microseconds


def from_us(value: int) -> datetime:
    return datetime.fromtimestamp(value // _US, UTC).replace(microsecond=value % _US)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def meter_info(
    *,
    id: UUID,
    org_id: UUID,
    site_id: UUID,
    direction: MeterDirection,
    measuring: Measuring,
    start_date: datetime,
    end_date: datetime | None,
    transformer_factor: float,
    timezone: ZoneInfo,
    resolution: Resolution,
) -> MeterInfo:
    default_flow = {
        MeterDirection.CONSUMER: FLOW_IMPORT,
        MeterDirection.PRODUCER: FLOW_EXPORT,
        MeterDirection.BIDIRECTIONAL: 0,
    }[direction]
    return MeterInfo(
        id=id,
        org_id=org_id,
        site_id=site_id,
        direction=direction,
        measuring=measuring,
        start_us=to_us(start_date),
        end_us=to_us(end_date) if end_date is not None else None,
        transformer_factor=transformer_factor,
        timezone=timezone,
        resolution=resolution,
        default_flow=default_flow,
        load_profile=measuring == Measuring.LOAD_PROFILE_ACCURATE,
        max_value=max_value_wh(measuring, resolution),
        grid=_grid_for(timezone.key, resolution.iso),
    )


# Shared per (zone, resolution); each is cleared when it grows past this many seconds.
_MAX_GRID_ENTRIES = 200_000
_GRIDS: dict[tuple[str, str], dict[int, bool]] = {}


def _grid_for(zone: str, resolution: str) -> dict[int, bool]:
    grid = _GRIDS.get((zone, resolution))
    if grid is None:
        grid = _GRIDS[(zone, resolution)] = {}
    return grid


def on_grid(info: MeterInfo, seconds: int) -> bool:
    """Whether ``seconds`` (epoch) is a grid point of the meter's site, cached."""
    grid = info.grid
    known = grid.get(seconds)
    if known is None:
        if len(grid) >= _MAX_GRID_ENTRIES:
            grid.clear()
        instant = datetime.fromtimestamp(seconds, UTC)
        known = grid[seconds] = info.resolution.is_on_grid(instant, info.timezone)
    return known


@dataclass
class ValidatedBatch:
    """Result of :func:`validate_batch`.

    ``rows`` are the readings to store as (meter id, flow code, epoch µs, value), one per
    (meter, flow, timestamp), the last of the batch winning; ``row_index`` is each row's
    index in the batch and ``row_meter`` its meter. ``registers`` groups register rows by
    (meter id, flow) as lists of row positions for the monotonicity check.
    """

    rows: list[tuple[UUID, int, int, float]] = field(default_factory=list)
    row_index: list[int] = field(default_factory=list)
    row_meter: list[MeterInfo] = field(default_factory=list)
    rejected: list[tuple[int, RejectReason]] = field(default_factory=list)
    in_batch_duplicates: int = 0
    in_batch_corrections: int = 0
    registers: dict[tuple[UUID, int], list[int]] = field(default_factory=dict)
    # The same for interval rows: (meter id, flow) -> [first µs, last µs].
    intervals: dict[tuple[UUID, int], list[int]] = field(default_factory=dict)
    # Row position -> the earlier readings of its key in the batch, as (index, whether it
    # was counted a duplicate rather than a correction): refused with the row, they are
    # refused too, and no longer counted as repeated or corrected.
    superseded: dict[int, list[tuple[int, bool]]] = field(default_factory=dict)

    def superseded_by(self, rejected_rows: Iterable[int]) -> list[tuple[int, bool]]:
        """The earlier readings of the rows at ``rejected_rows`` (positions)."""
        return [earlier for p in rejected_rows for earlier in self.superseded.get(p, ())]


def validate_batch(
    readings: Sequence[Any],
    meters: Mapping[str, MeterInfo | None],
    now_us: int,
    max_future_us: int,
) -> ValidatedBatch:
    """Checks every reading (``openvpp.v1.Reading`` messages); see the module docstring.

    Register monotonicity is not checked here (it needs stored values): see
    :func:`check_register_group`.
    """
    out = ValidatedBatch()
    rows = out.rows
    row_index = out.row_index
    row_meter = out.row_meter
    rejected = out.rejected
    registers = out.registers
    intervals = out.intervals
    positions: dict[tuple[UUID, int, int], int] = {}
    limit_us = now_us + max_future_us
    isfinite = math.isfinite
    for index, reading in enumerate(readings):
        info = meters.get(reading.meter_id)
        if info is None:
            rejected.append((index, RejectReason.UNKNOWN_METER))
            continue
        kind = reading.WhichOneof("value")
        if kind is None:
            rejected.append((index, RejectReason.MISSING_VALUE))
            continue
        if kind == "register_wh":
            if info.load_profile:
                rejected.append((index, RejectReason.WRONG_VALUE_KIND))
                continue
            value = reading.register_wh
        else:
            if not info.load_profile:
                rejected.append((index, RejectReason.WRONG_VALUE_KIND))
                continue
            value = reading.interval_wh
        if not isfinite(value):
            rejected.append((index, RejectReason.NON_FINITE_VALUE))
            continue
        if value < 0:
            rejected.append((index, RejectReason.NEGATIVE_VALUE))
            continue
        if not value:
            value = 0.0  # -0.0 passes `< 0`: stored as sent, it would read back as "-0"
        if value > info.max_value:
            rejected.append((index, RejectReason.VALUE_TOO_LARGE))
            continue
        flow = reading.flow
        default_flow = info.default_flow
        if flow == 0:
            if default_flow == 0:
                rejected.append((index, RejectReason.FLOW_REQUIRED))
                continue
            flow = default_flow
        elif (default_flow and flow != default_flow) or flow not in (FLOW_IMPORT, FLOW_EXPORT):
            rejected.append((index, RejectReason.FLOW_NOT_ALLOWED))
            continue
        stamp = reading.timestamp
        seconds = stamp.seconds
        nanos = stamp.nanos
        # Before any datetime is made of it (grid and interval arithmetic would overflow).
        if not (MIN_SECONDS <= seconds < MAX_SECONDS and 0 <= nanos < _NANOS):
            rejected.append((index, RejectReason.TIMESTAMP_OUT_OF_RANGE))
            continue
        if nanos:
            rejected.append((index, RejectReason.NOT_ON_GRID))
            continue
        on = info.grid.get(seconds)
        if on is None:
            on = on_grid(info, seconds)
        if not on:
            rejected.append((index, RejectReason.NOT_ON_GRID))
            continue
        ts_us = seconds * _US
        if ts_us < info.start_us:
            rejected.append((index, RejectReason.OUTSIDE_METER_DATES))
            continue
        end_us = info.end_us
        # A register's value at the end is the meter's last (its reading on removal): the
        # last interval's energy needs it. An interval value is labelled by its start and
        # must lie wholly before the end.
        if end_us is not None and (
            ts_us > end_us
            or (
                info.load_profile
                and (
                    ts_us == end_us
                    or to_us(info.resolution.next_start(from_us(ts_us), info.timezone)) > end_us
                )
            )
        ):
            rejected.append((index, RejectReason.OUTSIDE_METER_DATES))
            continue
        if ts_us > limit_us:
            rejected.append((index, RejectReason.TOO_FAR_IN_FUTURE))
            continue
        meter_id = info.id
        key = (meter_id, flow, ts_us)
        earlier = positions.get(key)
        if earlier is not None:
            # The last reading of a (meter, flow, timestamp) in the batch wins.
            duplicate = rows[earlier][3] == value
            if duplicate:
                out.in_batch_duplicates += 1
            else:
                out.in_batch_corrections += 1
                rows[earlier] = (meter_id, flow, ts_us, value)
            out.superseded.setdefault(earlier, []).append((row_index[earlier], duplicate))
            row_index[earlier] = index
            continue
        position = len(rows)
        positions[key] = position
        rows.append((meter_id, flow, ts_us, value))
        row_index.append(index)
        row_meter.append(info)
        if not info.load_profile:
            group = registers.get((meter_id, flow))
            if group is None:
                registers[(meter_id, flow)] = [position]
            else:
                group.append(position)
        else:
            span = intervals.get((meter_id, flow))
            if span is None:
                intervals[(meter_id, flow)] = [ts_us, ts_us]
            elif ts_us < span[0]:
                span[0] = ts_us
            elif ts_us > span[1]:
                span[1] = ts_us
    return out


def check_register_group(
    candidates: Sequence[tuple[int, float]], stored: Sequence[tuple[int, float]]
) -> list[int]:
    """Positions (into ``candidates``) of register values that would make the register go
    backwards, for one meter and flow.

    ``candidates`` are (epoch µs, value) of the batch, distinct timestamps; ``stored`` the
    stored (epoch µs, value) around them, in any order. A candidate at a stored timestamp
    replaces that value. Walking in time order, a candidate lower than the highest earlier
    value (stored or accepted candidate) or higher than the next later stored value is
    rejected; the values already there stand, including the one a rejected candidate would
    have replaced. The later bound counts the stored values later candidates of the batch
    may replace (it is one walk, in O(n log n)), so a batch raising several stored registers
    at once may see some of them refused; resent, they fit.
    """
    if len(stored) <= 1:
        # The common append: at most the register before the batch is stored.
        floor = stored[0] if stored else None
        highest = -_INF
        last_ts = -1
        ordered = True
        for ts, value in candidates:
            if ts <= last_ts or value < highest:
                ordered = False
                break
            last_ts, highest = ts, value
        if ordered and (
            floor is None or (floor[0] < candidates[0][0] and floor[1] <= candidates[0][1])
        ):
            return []
    candidate_at = {ts for ts, _ in candidates}
    stored_value = dict(stored)
    kept = sorted(stored)
    order = sorted(range(len(candidates)), key=lambda i: candidates[i][0])
    rejected: list[int] = []
    highest = -_INF
    cursor = 0
    # Minimum of the stored values at or after each stored position: the "later" bound. It
    # counts the stored values later candidates may replace: whether they will is not known
    # yet, and one that stands must not end up below this candidate.
    suffix_min = [0.0] * len(kept)
    running = _INF
    for i in range(len(kept) - 1, -1, -1):
        running = min(running, kept[i][1])
        suffix_min[i] = running
    for position in order:
        ts, value = candidates[position]
        while cursor < len(kept) and kept[cursor][0] < ts:
            # A stored value at a candidate's timestamp was judged with that candidate.
            if kept[cursor][0] not in candidate_at:
                highest = max(highest, kept[cursor][1])
            cursor += 1
        after = cursor + 1 if cursor < len(kept) and kept[cursor][0] == ts else cursor
        later = suffix_min[after] if after < len(kept) else _INF
        if value < highest or value > later:
            rejected.append(position)
            # Refused, it replaces nothing: the stored value at its timestamp stands.
            highest = max(highest, stored_value.get(ts, -_INF))
        else:
            highest = value
    return sorted(rejected)
