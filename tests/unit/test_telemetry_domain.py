"""Unit tests for the pure telemetry rules in ``service.telemetry.domain``."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from service.grid import (
    P1M,
    PT1H,
    PT15M,
    Resolution,
    SiteType,
)
from service.telemetry.domain import (
    Flow,
    Measuring,
    MeterDirection,
    RejectReason,
    max_interval_wh,
    measuring_allowed,
    measuring_rule,
    reason_text,
)
from tests.unit.reference_rules import (
    IncomingReading,
    IntervalEnergy,
    MeterContext,
    RegisterPoint,
    check_reading,
    check_register_sequence,
    effective_flow,
    find_register_decreases,
    registers_to_intervals,
)
from tests.unit.time_helpers import BERLIN, local, local_day, utc

# ---------------------------------------------------------------------------------------------
# Enums and measuring rules
# ---------------------------------------------------------------------------------------------


def test_enum_values_are_lowercase_names() -> None:
    for enum in (SiteType, Measuring, MeterDirection, Flow, RejectReason):
        for member in enum:
            assert member.value == member.name.lower()
    assert SiteType("balanced_accurate") is SiteType.BALANCED_ACCURATE
    assert Measuring("readings_inaccurate") is Measuring.READINGS_INACCURATE
    assert Flow("import") is Flow.IMPORT
    assert Flow("export") is Flow.EXPORT


@pytest.mark.parametrize("site_type", [SiteType.BALANCED_ACCURATE, SiteType.UNBALANCED_ACCURATE])
def test_accurate_sites_refuse_inaccurate_readings(site_type: SiteType) -> None:
    assert measuring_allowed(site_type, Measuring.READINGS_ACCURATE)
    assert measuring_allowed(site_type, Measuring.LOAD_PROFILE_ACCURATE)
    assert not measuring_allowed(site_type, Measuring.READINGS_INACCURATE)
    rule = measuring_rule(site_type)
    assert site_type.value in rule
    assert "readings_accurate" in rule
    assert "load_profile_accurate" in rule
    assert "readings_inaccurate" not in rule


@pytest.mark.parametrize(
    "site_type", [SiteType.BALANCED_INACCURATE, SiteType.UNBALANCED_INACCURATE]
)
def test_inaccurate_sites_allow_every_measuring(site_type: SiteType) -> None:
    for measuring in Measuring:
        assert measuring_allowed(site_type, measuring)
    rule = measuring_rule(site_type)
    assert site_type.value in rule
    assert all(m.value in rule for m in Measuring)


def test_effective_flow() -> None:
    assert effective_flow(MeterDirection.CONSUMER, None) is Flow.IMPORT
    assert effective_flow(MeterDirection.PRODUCER, None) is Flow.EXPORT
    assert effective_flow(MeterDirection.BIDIRECTIONAL, None) is None
    for direction in MeterDirection:
        for flow in Flow:
            assert effective_flow(direction, flow) is flow


# ---------------------------------------------------------------------------------------------
# registers_to_intervals
# ---------------------------------------------------------------------------------------------


def test_registers_to_intervals_simple_and_unsorted() -> None:
    points = [
        RegisterPoint(utc(2025, 6, 1, 10, 30), 130.0),
        RegisterPoint(utc(2025, 6, 1, 10, 0), 100.0),
        RegisterPoint(utc(2025, 6, 1, 10, 15), 112.5),
    ]
    assert registers_to_intervals(points, PT15M, BERLIN) == [
        IntervalEnergy(utc(2025, 6, 1, 10, 0), 12.5),
        IntervalEnergy(utc(2025, 6, 1, 10, 15), 17.5),
    ]


def test_registers_to_intervals_trivial_inputs() -> None:
    assert registers_to_intervals([], PT15M, BERLIN) == []
    assert registers_to_intervals([RegisterPoint(utc(2025, 6, 1), 1.0)], PT15M, BERLIN) == []


def test_registers_to_intervals_gap_is_not_interpolated() -> None:
    points = [
        RegisterPoint(utc(2025, 6, 1, 10, 0), 100.0),
        RegisterPoint(utc(2025, 6, 1, 10, 15), 110.0),
        # 10:30 missing: neither 10:15-10:30 nor 10:30-10:45 can be computed
        RegisterPoint(utc(2025, 6, 1, 10, 45), 150.0),
        RegisterPoint(utc(2025, 6, 1, 11, 0), 155.0),
    ]
    assert registers_to_intervals(points, PT15M, BERLIN) == [
        IntervalEnergy(utc(2025, 6, 1, 10, 0), 10.0),
        IntervalEnergy(utc(2025, 6, 1, 10, 45), 5.0),
    ]


def test_registers_to_intervals_transformer_factor() -> None:
    points = [
        RegisterPoint(local(BERLIN, 2025, 6, 1, 10), 1.0),
        RegisterPoint(local(BERLIN, 2025, 6, 1, 11), 3.5),
    ]
    result = registers_to_intervals(points, PT1H, BERLIN, transformer_factor=40.0)
    assert result == [IntervalEnergy(utc(2025, 6, 1, 8), 100.0)]
    assert result[0].interval_start.tzinfo is UTC


def test_registers_to_intervals_skips_off_grid_points() -> None:
    points = [
        RegisterPoint(utc(2025, 6, 1, 9, 52), 90.0),  # off grid, next grid point is 10:00
        RegisterPoint(utc(2025, 6, 1, 10, 0), 100.0),
        RegisterPoint(utc(2025, 6, 1, 10, 15), 110.0),
    ]
    assert registers_to_intervals(points, PT15M, BERLIN) == [
        IntervalEnergy(utc(2025, 6, 1, 10, 0), 10.0)
    ]


def test_registers_to_intervals_duplicate_timestamp_yields_no_zero_interval() -> None:
    points = [
        RegisterPoint(utc(2025, 6, 1, 10, 0), 100.0),
        RegisterPoint(utc(2025, 6, 1, 10, 0), 100.0),
        RegisterPoint(utc(2025, 6, 1, 10, 15), 104.0),
    ]
    assert registers_to_intervals(points, PT15M, BERLIN) == [
        IntervalEnergy(utc(2025, 6, 1, 10, 0), 4.0)
    ]


@pytest.mark.parametrize(("day", "expected"), [((2025, 3, 30), 92), ((2025, 10, 26), 100)])
def test_registers_to_intervals_full_dst_day(day: tuple[int, int, int], expected: int) -> None:
    start, end = local_day(BERLIN, *day)
    grid = [*PT15M.iter_starts(start, end, BERLIN), end.astimezone(UTC)]
    assert len(grid) == expected + 1
    points = [RegisterPoint(ts, 1000.0 + 2.5 * i + (i % 3)) for i, ts in enumerate(grid)]
    factor = 2.0
    intervals = registers_to_intervals(points[::-1], PT15M, BERLIN, transformer_factor=factor)
    assert len(intervals) == expected
    assert [iv.interval_start for iv in intervals] == grid[:-1]
    total = sum(iv.energy_wh for iv in intervals)
    assert math.isclose(total, (points[-1].register_wh - points[0].register_wh) * factor)
    # the repeated local hour contributes 8 distinct quarter-hours on the fall-back day
    repeated = [
        iv
        for iv in intervals
        if iv.interval_start.astimezone(BERLIN).hour == 2 and iv.interval_start.day == 26
    ]
    assert len(repeated) == (8 if expected == 100 else 0)


def test_registers_to_intervals_monthly() -> None:
    points = [
        RegisterPoint(utc(2025, 2, 28, 23), 0.0),
        RegisterPoint(utc(2025, 3, 31, 22), 300.0),
        RegisterPoint(utc(2025, 4, 30, 22), 500.0),
        RegisterPoint(utc(2025, 6, 30, 22), 900.0),  # May 31 22:00 missing
    ]
    assert registers_to_intervals(points, P1M, BERLIN) == [
        IntervalEnergy(utc(2025, 2, 28, 23), 300.0),
        IntervalEnergy(utc(2025, 3, 31, 22), 200.0),
    ]


# ---------------------------------------------------------------------------------------------
# check_reading
# ---------------------------------------------------------------------------------------------

NOW = utc(2025, 6, 1, 12, 0)
TEN = utc(2025, 6, 1, 10, 0)
MAX_FUTURE = timedelta(hours=1)
METER_START = utc(2025, 1, 1, 0, 0)
METER_END = utc(2025, 12, 31, 23, 0)


def meter(
    measuring: Measuring = Measuring.READINGS_ACCURATE,
    direction: MeterDirection = MeterDirection.CONSUMER,
    *,
    start: datetime = METER_START,
    end: datetime | None = METER_END,
    resolution: Resolution = PT15M,
) -> MeterContext:
    return MeterContext(
        meter_id="m-1",
        site_id="s-1",
        direction=direction,
        measuring=measuring,
        start_date=start,
        end_date=end,
        transformer_factor=1.0,
        timezone=BERLIN,
        resolution=resolution,
    )


def reading(
    timestamp: datetime = TEN,
    *,
    register_wh: float | None = 100.0,
    interval_wh: float | None = None,
    flow: Flow | None = None,
) -> IncomingReading:
    return IncomingReading(
        meter_id="m-1",
        timestamp=timestamp,
        register_wh=register_wh,
        interval_wh=interval_wh,
        flow=flow,
    )


def interval(timestamp: datetime = TEN, value: float = 5.0) -> IncomingReading:
    return reading(timestamp, register_wh=None, interval_wh=value)


LP = Measuring.LOAD_PROFILE_ACCURATE


def check(r: IncomingReading, m: MeterContext | None) -> RejectReason | None:
    return check_reading(r, m, NOW, MAX_FUTURE)


def test_valid_readings_pass() -> None:
    assert check(reading(), meter()) is None
    assert check(reading(), meter(Measuring.READINGS_INACCURATE)) is None
    assert check(interval(), meter(LP)) is None
    assert check(reading(register_wh=0.0), meter()) is None
    assert check(interval(value=0.0), meter(LP)) is None


def test_unknown_meter() -> None:
    assert check(reading(), None) is RejectReason.UNKNOWN_METER
    # unknown meter wins over every other problem
    assert check(reading(register_wh=None), None) is RejectReason.UNKNOWN_METER
    assert check(reading(), meter()) is None


def test_missing_value() -> None:
    assert check(reading(register_wh=None), meter()) is RejectReason.MISSING_VALUE
    assert check(reading(register_wh=None), meter(LP)) is RejectReason.MISSING_VALUE
    # missing value wins over an off-grid timestamp
    off_grid = reading(utc(2025, 6, 1, 10, 1), register_wh=None)
    assert check(off_grid, meter()) is RejectReason.MISSING_VALUE
    assert check(reading(register_wh=1.0), meter()) is None


@pytest.mark.parametrize("measuring", [Measuring.READINGS_ACCURATE, Measuring.READINGS_INACCURATE])
def test_wrong_value_kind_for_readings_meter(measuring: Measuring) -> None:
    assert check(interval(), meter(measuring)) is RejectReason.WRONG_VALUE_KIND
    both = reading(register_wh=1.0, interval_wh=1.0)
    assert check(both, meter(measuring)) is RejectReason.WRONG_VALUE_KIND
    assert check(reading(), meter(measuring)) is None


def test_wrong_value_kind_for_load_profile_meter() -> None:
    assert check(reading(), meter(LP)) is RejectReason.WRONG_VALUE_KIND
    assert check(reading(register_wh=1.0, interval_wh=1.0), meter(LP)) is (
        RejectReason.WRONG_VALUE_KIND
    )
    # wrong kind is reported before the (ignored) value is looked at
    assert check(reading(register_wh=math.nan), meter(LP)) is RejectReason.WRONG_VALUE_KIND
    assert check(interval(), meter(LP)) is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_value(bad: float) -> None:
    assert check(reading(register_wh=bad), meter()) is RejectReason.NON_FINITE_VALUE
    assert check(interval(value=bad), meter(LP)) is RejectReason.NON_FINITE_VALUE
    assert check(reading(register_wh=1e15), meter()) is None


def test_negative_value() -> None:
    assert check(reading(register_wh=-0.001), meter()) is RejectReason.NEGATIVE_VALUE
    assert check(interval(value=-1.0), meter(LP)) is RejectReason.NEGATIVE_VALUE
    # negative before flow and grid problems
    bad = reading(utc(2025, 6, 1, 10, 1), register_wh=-1.0, flow=Flow.EXPORT)
    assert check(bad, meter()) is RejectReason.NEGATIVE_VALUE
    assert check(reading(register_wh=-0.0), meter()) is None


def test_value_beyond_what_one_grid_connection_measures() -> None:
    too_large = RejectReason.VALUE_TOO_LARGE
    # Registers: 1e15 Wh, whatever the resolution.
    assert check(reading(register_wh=1e15), meter()) is None
    assert check(reading(register_wh=math.nextafter(1e15, math.inf)), meter()) is too_large
    assert check(reading(register_wh=9.3e18), meter(Measuring.READINGS_INACCURATE)) is too_large
    # Intervals: 5 GW over the interval.
    assert check(interval(value=1.25e9), meter(LP)) is None
    assert check(interval(value=math.nextafter(1.25e9, math.inf)), meter(LP)) is too_large
    assert check(interval(value=2.01e16), meter(LP)) is too_large
    hourly = meter(LP, resolution=PT1H)
    assert check(interval(value=5e9), hourly) is None
    assert check(interval(value=5.0001e9), hourly) is too_large
    # An hour's bound is inside the balancing engine's exact range (2**33 Wh).
    assert max_interval_wh(PT1H) < 2**33
    monthly = meter(LP, resolution=P1M, end=None)
    first_of_june = local(BERLIN, 2025, 6, 1)
    assert check(interval(first_of_june, 3.84e12), monthly) is None
    assert check(interval(first_of_june, 3.85e12), monthly) is too_large
    # Too large before flow and grid problems, after the other value rules.
    bad = reading(utc(2025, 6, 1, 10, 1), register_wh=1e16, flow=Flow.EXPORT)
    assert check(bad, meter()) is too_large
    assert check(reading(register_wh=-1e16), meter()) is RejectReason.NEGATIVE_VALUE
    rule = reason_text(too_large)
    assert "interval_wh" in rule
    assert "1.25e9 Wh" in rule
    assert "register_wh" in rule


def test_flow_required_for_bidirectional_meter() -> None:
    bidi = meter(direction=MeterDirection.BIDIRECTIONAL)
    assert check(reading(), bidi) is RejectReason.FLOW_REQUIRED
    assert check(reading(utc(2025, 6, 1, 10, 1)), bidi) is RejectReason.FLOW_REQUIRED
    assert check(reading(flow=Flow.IMPORT), bidi) is None
    assert check(reading(flow=Flow.EXPORT), bidi) is None


def test_flow_not_allowed() -> None:
    consumer = meter(direction=MeterDirection.CONSUMER)
    producer = meter(direction=MeterDirection.PRODUCER)
    assert check(reading(flow=Flow.EXPORT), consumer) is RejectReason.FLOW_NOT_ALLOWED
    assert check(reading(flow=Flow.IMPORT), producer) is RejectReason.FLOW_NOT_ALLOWED
    # flow is checked before the grid
    off_grid = reading(utc(2025, 6, 1, 10, 1), flow=Flow.IMPORT)
    assert check(off_grid, producer) is RejectReason.FLOW_NOT_ALLOWED
    assert check(reading(flow=Flow.IMPORT), consumer) is None
    assert check(reading(flow=None), consumer) is None
    assert check(reading(flow=Flow.EXPORT), producer) is None
    assert check(reading(flow=None), producer) is None


def test_not_on_grid() -> None:
    assert check(reading(utc(2025, 6, 1, 10, 1)), meter()) is RejectReason.NOT_ON_GRID
    assert check(reading(utc(2025, 6, 1, 10, 15)), meter(resolution=PT1H)) is (
        RejectReason.NOT_ON_GRID
    )
    # grid is checked before the meter dates and the future limit
    assert check(reading(utc(2024, 6, 1, 10, 1)), meter()) is RejectReason.NOT_ON_GRID
    assert check(reading(utc(2025, 6, 2, 10, 1)), meter()) is RejectReason.NOT_ON_GRID
    assert check(reading(utc(2025, 6, 1, 10, 15)), meter()) is None
    # the second 02:15 of the fall-back day is a grid point of its own
    assert check(reading(local(BERLIN, 2025, 10, 26, 2, 15, fold=1)), meter()) is not (
        RejectReason.NOT_ON_GRID
    )


def test_outside_meter_dates_for_registers() -> None:
    m = meter()
    assert check(reading(METER_START - timedelta(minutes=15)), m) is (
        RejectReason.OUTSIDE_METER_DATES
    )
    assert check(reading(METER_START), m) is None
    late = meter(end=utc(2025, 6, 1, 11, 0))
    # The register at the end date is the meter's last value (its last interval needs it).
    assert check(reading(utc(2025, 6, 1, 11, 0)), late) is None
    assert check(reading(utc(2025, 6, 1, 11, 15)), late) is RejectReason.OUTSIDE_METER_DATES
    assert check(reading(utc(2025, 6, 1, 10, 45)), late) is None
    # outside dates is reported before too far in future
    ended = meter(end=utc(2025, 6, 1, 11, 0))
    assert check(reading(utc(2025, 6, 5)), ended) is RejectReason.OUTSIDE_METER_DATES
    assert check(reading(utc(2030, 1, 1)), meter(end=None)) is RejectReason.TOO_FAR_IN_FUTURE


def test_outside_meter_dates_for_intervals() -> None:
    m = meter(LP, end=utc(2025, 6, 1, 11, 0))
    assert check(interval(utc(2025, 6, 1, 10, 45)), m) is None  # ends exactly at end_date
    assert check(interval(utc(2025, 6, 1, 11, 0)), m) is RejectReason.OUTSIDE_METER_DATES
    # end date not on the grid: the interval would stick out of the meter's life
    odd_end = meter(LP, end=utc(2025, 6, 1, 10, 50))
    assert check(interval(utc(2025, 6, 1, 10, 45)), odd_end) is RejectReason.OUTSIDE_METER_DATES
    assert check(interval(utc(2025, 6, 1, 10, 30)), odd_end) is None
    assert check(interval(METER_START - timedelta(minutes=15)), meter(LP)) is (
        RejectReason.OUTSIDE_METER_DATES
    )
    # a monthly interval must end by the end date too
    monthly = meter(LP, end=utc(2025, 6, 15), resolution=P1M)
    june = utc(2025, 5, 31, 22)
    assert check(interval(june), monthly) is RejectReason.OUTSIDE_METER_DATES
    assert check(interval(utc(2025, 4, 30, 22)), monthly) is None


def test_too_far_in_future() -> None:
    m = meter(end=None)
    assert check(reading(NOW + MAX_FUTURE), m) is None
    assert check(reading(NOW + MAX_FUTURE + timedelta(minutes=15)), m) is (
        RejectReason.TOO_FAR_IN_FUTURE
    )
    assert check_reading(reading(utc(2025, 6, 1, 12, 15)), m, NOW, timedelta(0)) is (
        RejectReason.TOO_FAR_IN_FUTURE
    )
    assert check_reading(reading(utc(2025, 6, 1, 12, 0)), m, NOW, timedelta(0)) is None


def test_check_reading_rejects_naive_timestamp() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        check(reading(datetime(2025, 6, 1, 10, 0)), meter())


def test_every_reason_has_a_text() -> None:
    texts = {reason: reason_text(reason) for reason in RejectReason}
    assert all(texts.values())
    assert len(set(texts.values())) == len(RejectReason)
    assert "bidirectional" in reason_text(RejectReason.FLOW_REQUIRED)


# ---------------------------------------------------------------------------------------------
# Register monotonicity
# ---------------------------------------------------------------------------------------------


def point(minute: int, value: float) -> RegisterPoint:
    return RegisterPoint(utc(2025, 6, 1, 10) + timedelta(minutes=minute), value)


def test_find_register_decreases() -> None:
    prev, nxt = point(0, 100.0), point(30, 120.0)
    assert find_register_decreases(prev, nxt, point(15, 99.9))
    assert find_register_decreases(prev, nxt, point(15, 120.1))
    assert not find_register_decreases(prev, nxt, point(15, 110.0))
    assert not find_register_decreases(prev, nxt, point(15, 100.0))
    assert not find_register_decreases(prev, nxt, point(15, 120.0))
    assert find_register_decreases(prev, None, point(15, 50.0))
    assert not find_register_decreases(prev, None, point(15, 1e9))
    assert find_register_decreases(None, nxt, point(15, 200.0))
    assert not find_register_decreases(None, nxt, point(15, 0.0))
    assert not find_register_decreases(None, None, point(15, 0.0))


def test_check_register_sequence() -> None:
    assert check_register_sequence([]) == []
    assert check_register_sequence([point(0, 1.0), point(15, 1.0), point(30, 2.0)]) == []
    # the later, lower point is rejected; the sequence continues from the last accepted value
    assert check_register_sequence([point(0, 10.0), point(15, 5.0), point(30, 12.0)]) == [1]
    assert check_register_sequence([point(0, 10.0), point(15, 5.0), point(30, 7.0)]) == [1, 2]


def test_check_register_sequence_indexes_refer_to_given_order() -> None:
    points = [point(30, 5.0), point(0, 10.0), point(45, 20.0), point(15, 11.0)]
    # time order: 0 (10), 15 (11), 30 (5: decrease), 45 (20)
    assert check_register_sequence(points) == [0]
