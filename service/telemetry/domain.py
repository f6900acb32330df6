"""Pure telemetry rules: meter classification, reject reasons, meter fields. No I/O.

Every datetime handled must be timezone-aware; results are UTC. The balance grid itself
(``Resolution``, ``SiteType``) lives in :mod:`service.grid`, which every capability may use.

A meter reading carries either a cumulative ``register_wh`` at an instant, or
``interval_wh``, the energy of the grid interval that starts at ``timestamp``. A batch is
validated by :mod:`service.telemetry.validate`, interval energy derived by
:mod:`service.telemetry.energy`; their one-reading-at-a-time specifications are in
``tests/unit/reference_rules.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from service.common.text import NAME_LENGTH, text_rule
from service.grid import P1M, PT1H, PT15M, Resolution, SiteType, site_type_is_accurate

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


# ---------------------------------------------------------------------------------------------
# Reading validation
# ---------------------------------------------------------------------------------------------


# A value no meter can have measured (a unit mix-up, a corrupt register) is refused before
# it reaches balancing, whose arithmetic is exact only for plausible energies (see
# service.balancing.engine.MAX_INTERVAL_WH). The largest grid connections are a few GW (a
# nuclear plant's), so no connection delivers or takes 5 GW on average over an interval. 5,
# not more: an hour of it (5e9 Wh) must stay within the engine's exact range (2**33 Wh,
# 8.6e9), so that every reading a PT15M or PT1H site accepts is one it can balance.
MAX_CONNECTION_POWER_W = 5_000_000_000
# A month counts as 32 days: the longest calendar month plus the hours a time-zone change
# can add to it.
_LONGEST_MONTH = timedelta(days=32)
# A cumulative register: 1 PWh, 5 GW for more than 22 years, far above any meter's
# register, and below 2**53 Wh, so a register still holds whole Wh exactly in the double it
# is sent and stored as (and the difference of two registers is exact).
MAX_REGISTER_WH = 1e15


def max_interval_wh(resolution: Resolution) -> float:
    """The largest ``interval_wh`` a meter of a site at ``resolution`` can report: 5 GW
    over the longest interval of that resolution (1.25e9 Wh a quarter-hour)."""
    longest = resolution.step or resolution.months * _LONGEST_MONTH
    return MAX_CONNECTION_POWER_W * (longest / timedelta(hours=1))


def _wh(value: float) -> str:
    """``1.25e9``: a bound as the rule text shows it."""
    mantissa, exponent = f"{value:.3g}".split("e+")
    return f"{mantissa}e{int(exponent)}"


def max_value_wh(measuring: Measuring, resolution: Resolution) -> float:
    """The largest value a reading of such a meter may carry (interval or register)."""
    if measuring == Measuring.LOAD_PROFILE_ACCURATE:
        return max_interval_wh(resolution)
    return MAX_REGISTER_WH


class RejectReason(StrEnum):
    UNKNOWN_METER = "unknown_meter"
    NOT_ON_GRID = "not_on_grid"
    OUTSIDE_METER_DATES = "outside_meter_dates"
    TOO_FAR_IN_FUTURE = "too_far_in_future"
    NON_FINITE_VALUE = "non_finite_value"
    NEGATIVE_VALUE = "negative_value"
    VALUE_TOO_LARGE = "value_too_large"
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
    RejectReason.VALUE_TOO_LARGE: (
        "the value is more than one grid connection can measure: interval_wh at most "
        f"{MAX_CONNECTION_POWER_W / 1e9:g} GW over the interval "
        f"({_wh(max_interval_wh(PT15M))} Wh a quarter-hour, {_wh(max_interval_wh(PT1H))} Wh "
        f"an hour, {_wh(max_interval_wh(P1M))} Wh a month), register_wh at most "
        f"{_wh(MAX_REGISTER_WH)} Wh"
    ),
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


# ---------------------------------------------------------------------------------------------
# Meter fields
# ---------------------------------------------------------------------------------------------

MAX_METER_TEXT_LENGTH = NAME_LENGTH
# Partitions are created for every month a meter can have readings in; an earlier start is
# almost certainly a typo (epoch 0 from an unset field) and would create decades of them.
EARLIEST_METER_START = datetime(1990, 1, 1, tzinfo=UTC)
# Current times voltage transformer ratios reach a few million at transmission level; beyond
# this a reading's energy (bounded per reading) could overflow to an infinity in the API.
MAX_TRANSFORMER_FACTOR = 100_000_000


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
    if factor is not None and not (math.isfinite(factor) and 0 < factor <= MAX_TRANSFORMER_FACTOR):
        violations.append(
            (prefix + "transformer_factor", f"must be > 0 and at most {MAX_TRANSFORMER_FACTOR:,}")
        )
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
