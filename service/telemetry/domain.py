"""Pure telemetry rules: meter classification, register differencing and reading validation.

Nothing here does I/O. Every datetime handled must be timezone-aware; results are UTC.

The balance grid itself (``Resolution``, ``SiteType``) lives in :mod:`service.grid`, which
every capability may use.

Readings
    A meter reading carries either a cumulative ``register_wh`` at an instant, or
    ``interval_wh``, the energy of the grid interval that starts at ``timestamp``.
    :func:`check_reading` returns the first broken rule as a :class:`RejectReason`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from service.common.protoconv import EARLIEST_INSTANT, LATEST_INSTANT
from service.common.text import NAME_LENGTH, text_rule
from service.grid import Resolution, SiteType, site_type_is_accurate

_ONE_MICROSECOND = timedelta(microseconds=1)

# ---------------------------------------------------------------------------------------------
# Site and meter classification
# ---------------------------------------------------------------------------------------------


class Measuring(StrEnum):
    READINGS_ACCURATE = "readings_accurate"
    LOAD_PROFILE_ACCURATE = "load_profile_accurate"
    READINGS_INACCURATE = "readings_inaccurate"


class MeterDirection(StrEnum):
    CONSUMER = "consumer"
    PRODUCER = "producer"
    BIDIRECTIONAL = "bidirectional"


class Flow(StrEnum):
    IMPORT = "import"
    EXPORT = "export"


_ACCURATE_MEASURING = frozenset({Measuring.READINGS_ACCURATE, Measuring.LOAD_PROFILE_ACCURATE})


def measuring_allowed(site_type: SiteType, measuring: Measuring) -> bool:
    """Accurate sites need accurate metering; inaccurate sites accept every kind."""
    if site_type_is_accurate(site_type):
        return measuring in _ACCURATE_MEASURING
    return True


def measuring_rule(site_type: SiteType) -> str:
    """Human text of the measuring rule for ``site_type`` (for a field violation)."""
    allowed = [m.value for m in Measuring if measuring_allowed(site_type, m)]
    if len(allowed) == len(Measuring):
        return f"a {site_type.value} site accepts any measuring: " + ", ".join(allowed)
    return f"a {site_type.value} site requires measuring " + " or ".join(allowed)


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


# ---------------------------------------------------------------------------------------------
# Registers and intervals
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Reading validation
# ---------------------------------------------------------------------------------------------


class RejectReason(StrEnum):
    UNKNOWN_METER = "unknown_meter"
    NOT_ON_GRID = "not_on_grid"
    OUTSIDE_METER_DATES = "outside_meter_dates"
    TOO_FAR_IN_FUTURE = "too_far_in_future"
    NON_FINITE_VALUE = "non_finite_value"
    NEGATIVE_VALUE = "negative_value"
    REGISTER_DECREASED = "register_decreased"
    MISSING_VALUE = "missing_value"
    WRONG_VALUE_KIND = "wrong_value_kind"
    FLOW_REQUIRED = "flow_required"
    FLOW_NOT_ALLOWED = "flow_not_allowed"
    TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"


_REASON_TEXTS: dict[RejectReason, str] = {
    RejectReason.UNKNOWN_METER: "the meter does not exist or is not visible to the caller",
    RejectReason.NOT_ON_GRID: (
        "the timestamp is not a grid point of the site's balance resolution in the site's "
        "local time (quarter-hour, full hour or local midnight of the 1st)"
    ),
    RejectReason.OUTSIDE_METER_DATES: (
        "the timestamp (for interval values: the whole interval) lies outside the meter's "
        "start and end date"
    ),
    RejectReason.TOO_FAR_IN_FUTURE: "the timestamp lies too far in the future",
    RejectReason.NON_FINITE_VALUE: "the value is NaN or infinite",
    RejectReason.NEGATIVE_VALUE: "the value is negative",
    RejectReason.REGISTER_DECREASED: (
        "the register value is lower than an earlier or higher than a later register value "
        "of the same meter and flow"
    ),
    RejectReason.MISSING_VALUE: "neither a register value nor an interval value was given",
    RejectReason.WRONG_VALUE_KIND: (
        "load_profile_accurate meters take interval values only, readings_* meters take "
        "register values only"
    ),
    RejectReason.FLOW_REQUIRED: "a bidirectional meter needs the flow (import or export)",
    RejectReason.FLOW_NOT_ALLOWED: (
        "the flow contradicts the meter direction (consumer meters import only, producer "
        "meters export only)"
    ),
    RejectReason.TIMESTAMP_OUT_OF_RANGE: (
        "the timestamp is not an instant from 1900-01-01T00:00:00Z up to (not including) "
        "2200-01-01T00:00:00Z with nanos in 0..999999999"
    ),
}


def reason_text(reason: RejectReason) -> str:
    """Human explanation of a reject reason."""
    return _REASON_TEXTS[reason]


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

    Order: unknown meter, missing value, wrong value kind, non-finite, negative, flow,
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
        if ts >= meter.end_date:
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


# ---------------------------------------------------------------------------------------------
# Meter fields
# ---------------------------------------------------------------------------------------------

MAX_METER_TEXT_LENGTH = NAME_LENGTH
# Partitions are created for every month a meter can have readings in; an earlier start is
# almost certainly a typo (epoch 0 from an unset field) and would create decades of them.
EARLIEST_METER_START = datetime(1990, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class MeterFields:
    """A meter's writable fields; :func:`validate_meter` returns them normalized."""

    identifier: str
    serial: str
    mpo: str
    direction: MeterDirection | None
    measuring: Measuring | None
    start_date: datetime | None
    end_date: datetime | None
    transformer_factor: float | None


def validate_meter(
    meter: MeterFields, site_type: SiteType | None, prefix: str = ""
) -> list[tuple[str, str]]:
    """Every broken rule as (field, rule); empty when the meter is valid for its site."""
    violations: list[tuple[str, str]] = []
    identifier = meter.identifier.strip()
    if not identifier:
        violations.append((prefix + "identifier", "is required (unique per site)"))
    for name, value in (
        ("identifier", meter.identifier),
        ("serial", meter.serial),
        ("mpo", meter.mpo),
    ):
        rule = text_rule(value.strip(), MAX_METER_TEXT_LENGTH)
        if rule is not None:
            violations.append((prefix + name, rule))
    if meter.direction is None:
        violations.append((prefix + "direction", "must be CONSUMER, PRODUCER or BIDIRECTIONAL"))
    if meter.measuring is None:
        violations.append(
            (
                prefix + "measuring",
                "must be READINGS_ACCURATE, LOAD_PROFILE_ACCURATE or READINGS_INACCURATE",
            )
        )
    elif site_type is not None and not measuring_allowed(site_type, meter.measuring):
        violations.append((prefix + "measuring", measuring_rule(site_type)))
    if meter.start_date is None:
        violations.append((prefix + "start_date", "is required"))
    elif meter.start_date < EARLIEST_METER_START:
        violations.append((prefix + "start_date", "must not be before 1990-01-01"))
    elif meter.end_date is not None and meter.end_date <= meter.start_date:
        violations.append((prefix + "end_date", "must be after start_date"))
    factor = meter.transformer_factor
    if factor is not None and not (math.isfinite(factor) and factor > 0):
        violations.append((prefix + "transformer_factor", "must be a finite number > 0"))
    return violations


def normalized_meter(meter: MeterFields) -> MeterFields:
    """Trimmed text, transformer factor defaulted to 1."""
    return MeterFields(
        identifier=meter.identifier.strip(),
        serial=meter.serial.strip(),
        mpo=meter.mpo.strip(),
        direction=meter.direction,
        measuring=meter.measuring,
        start_date=meter.start_date,
        end_date=meter.end_date,
        transformer_factor=1.0 if meter.transformer_factor is None else meter.transformer_factor,
    )


def affected_intervals(
    ts: datetime, is_register: bool, resolution: Resolution, tz: ZoneInfo
) -> tuple[datetime, ...]:
    """Site balance intervals (starts, UTC) whose energy changes with a value at ``ts``.

    An interval value changes its own interval. A register value is the end of the interval
    before it and the start of the one after it, so both change.
    """
    start = resolution.floor(ts, tz)
    if not is_register or start != ts.astimezone(UTC):
        return (start,)
    previous = resolution.floor(ts - _ONE_MICROSECOND, tz)
    return (previous, start)
