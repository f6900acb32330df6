"""Reference rules for telemetry, one reading at a time: what the vectorised code must equal.

The service validates whole batches (``service.telemetry.validate``) and derives interval
energy with numpy (``service.telemetry.energy``); these readable per-reading versions are
the specification the tests cross-check them against. Nothing in ``service/`` uses them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from service.common.protoconv import EARLIEST_INSTANT, LATEST_INSTANT
from service.grid import Resolution
from service.telemetry.domain import Flow, Measuring, MeterDirection, RejectReason, max_value_wh


def effective_flow(direction: MeterDirection, flow: Flow | None) -> Flow | None:
    """The flow a reading counts for: consumers default to IMPORT, producers to EXPORT.

    A given flow is returned unchanged (even when it contradicts the direction; that is
    :attr:`RejectReason.FLOW_NOT_ALLOWED`). Bidirectional meters have no default: ``None``.
    """
    if flow is not None:
        return flow
    if direction == MeterDirection.CONSUMER:
        return Flow.IMPORT
    if direction == MeterDirection.PRODUCER:
        return Flow.EXPORT
    return None


@dataclass(frozen=True)
class RegisterPoint:
    """A cumulative register value (Wh) at an instant."""

    timestamp: datetime
    register_wh: float


@dataclass(frozen=True)
class IntervalEnergy:
    """Energy (Wh) of the grid interval starting at ``interval_start`` (UTC)."""

    interval_start: datetime
    energy_wh: float


def registers_to_intervals(
    points: Sequence[RegisterPoint],
    resolution: Resolution,
    tz: ZoneInfo,
    transformer_factor: float = 1.0,
) -> list[IntervalEnergy]:
    """Interval energies from register values, one per pair of adjacent grid points.

    Points are sorted by time here. Only pairs whose timestamps are consecutive grid points
    yield an interval (``(b - a) * transformer_factor``, starting at ``a``, in UTC); a
    missing grid point leaves the intervals around it out: nothing is interpolated. Points
    off the grid never start an interval. Monotonicity is not checked here (see
    :func:`check_register_sequence`).
    """
    ordered = sorted(points, key=lambda p: p.timestamp)
    result: list[IntervalEnergy] = []
    for first, second in itertools.pairwise(ordered):
        if not resolution.is_on_grid(first.timestamp, tz):
            continue
        if resolution.next_start(first.timestamp, tz) != second.timestamp:
            continue
        energy = (second.register_wh - first.register_wh) * transformer_factor
        result.append(IntervalEnergy(first.timestamp.astimezone(UTC), energy))
    return result


@dataclass(frozen=True)
class MeterContext:
    """What validation needs to know about the meter a reading is for."""

    meter_id: str
    site_id: str
    direction: MeterDirection
    measuring: Measuring
    start_date: datetime
    end_date: datetime | None
    transformer_factor: float
    timezone: ZoneInfo
    resolution: Resolution


@dataclass(frozen=True)
class IncomingReading:
    """A reading as received; exactly one of ``register_wh`` and ``interval_wh`` is expected."""

    meter_id: str
    timestamp: datetime
    register_wh: float | None
    interval_wh: float | None
    flow: Flow | None


def _flow_reason(direction: MeterDirection, flow: Flow | None) -> RejectReason | None:
    if direction == MeterDirection.BIDIRECTIONAL:
        return RejectReason.FLOW_REQUIRED if flow is None else None
    expected = effective_flow(direction, None)
    if flow is not None and flow != expected:
        return RejectReason.FLOW_NOT_ALLOWED
    return None


def check_reading(
    reading: IncomingReading,
    meter: MeterContext | None,
    now: datetime,
    max_future: timedelta,
) -> RejectReason | None:
    """The first rule ``reading`` breaks, or ``None`` when it is acceptable.

    Order: unknown meter, missing value, wrong value kind, non-finite, negative, too large
    (more than one grid connection can measure: ``max_value_wh``), flow,
    timestamp out of range, not on grid, outside meter dates, too far in future. Register
    monotonicity needs the stored neighbours and is checked separately
    (:func:`find_register_decreases`).
    Raises ``ValueError`` for a naive timestamp.
    """
    if meter is None:
        return RejectReason.UNKNOWN_METER
    if reading.register_wh is None and reading.interval_wh is None:
        return RejectReason.MISSING_VALUE
    load_profile = meter.measuring == Measuring.LOAD_PROFILE_ACCURATE
    if load_profile and reading.register_wh is not None:
        return RejectReason.WRONG_VALUE_KIND
    if not load_profile and reading.interval_wh is not None:
        return RejectReason.WRONG_VALUE_KIND
    value = reading.interval_wh if load_profile else reading.register_wh
    assert value is not None
    if not math.isfinite(value):
        return RejectReason.NON_FINITE_VALUE
    if value < 0:
        return RejectReason.NEGATIVE_VALUE
    if value > max_value_wh(meter.measuring, meter.resolution):
        return RejectReason.VALUE_TOO_LARGE
    flow_reason = _flow_reason(meter.direction, reading.flow)
    if flow_reason is not None:
        return flow_reason
    ts = reading.timestamp
    if ts.tzinfo is None:
        raise ValueError("the reading timestamp must be timezone-aware")
    if not EARLIEST_INSTANT <= ts < LATEST_INSTANT:
        return RejectReason.TIMESTAMP_OUT_OF_RANGE
    if not meter.resolution.is_on_grid(ts, meter.timezone):
        return RejectReason.NOT_ON_GRID
    if ts < meter.start_date:
        return RejectReason.OUTSIDE_METER_DATES
    if meter.end_date is not None:
        # A register at the end date is the meter's last value; an interval value starting
        # there is past it.
        if ts > meter.end_date or (load_profile and ts == meter.end_date):
            return RejectReason.OUTSIDE_METER_DATES
        if load_profile and meter.resolution.next_start(ts, meter.timezone) > meter.end_date:
            return RejectReason.OUTSIDE_METER_DATES
    if ts > now + max_future:
        return RejectReason.TOO_FAR_IN_FUTURE
    return None


def find_register_decreases(
    previous: RegisterPoint | None,
    following: RegisterPoint | None,
    candidate: RegisterPoint,
) -> bool:
    """True when ``candidate`` breaks monotonicity against its stored neighbours.

    ``previous`` is the latest stored point before the candidate, ``following`` the earliest
    after it (same meter and flow); a candidate below ``previous`` or above ``following``
    would make the register decrease somewhere.
    """
    if previous is not None and candidate.register_wh < previous.register_wh:
        return True
    return following is not None and candidate.register_wh > following.register_wh


def check_register_sequence(points: Sequence[RegisterPoint]) -> list[int]:
    """Indexes (into ``points``, ascending) of points that make the register decrease.

    ``points`` belong to one meter and flow. Walking them in time order (ties keep the given
    order), a point lower than the last accepted value is rejected; the earlier value stands.
    """
    order = sorted(range(len(points)), key=lambda i: points[i].timestamp)
    rejected: list[int] = []
    highest: float | None = None
    for index in order:
        value = points[index].register_wh
        if highest is not None and value < highest:
            rejected.append(index)
        else:
            highest = value
    return sorted(rejected)
