"""The vectorised grid and interval energy equal the per-point derivations they replace."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from service.grid import P1M, PT1H, PT15M, Resolution
from service.grid.arrays import from_epoch_us, grid_bounds_us, grid_starts_us, to_epoch_us
from service.identifiers.ids import MeterId
from service.telemetry.domain import Measuring, MeterDirection
from service.telemetry.energy import (
    FLOW_EXPORT,
    FLOW_IMPORT,
    IntervalEnergyAccumulator,
    MeterColumns,
    interval_energy,
    meter_column,
)
from tests.unit.reference_rules import RegisterPoint, registers_to_intervals

ZONES = [
    "Europe/Berlin",
    "Europe/London",
    "America/Los_Angeles",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "UTC",
]


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("resolution", [PT15M, PT1H, P1M], ids=lambda r: r.iso)
def test_grid_points_equal_iter_starts(zone: str, resolution: Resolution) -> None:
    tz = ZoneInfo(zone)
    # Both DST changes of the northern and southern hemisphere, odd range ends.
    for start, end in (
        (utc(2026, 3, 20, 0, 7), utc(2026, 4, 10, 3, 0)),
        (utc(2026, 9, 25), utc(2026, 11, 5, 12, 30)),
        (utc(2025, 12, 31, 23), utc(2026, 1, 1, 1)),
    ):
        if resolution is P1M:
            start, end = start - timedelta(days=200), end + timedelta(days=200)
        expected = [to_epoch_us(p) for p in resolution.iter_starts(start, end, tz)]
        assert grid_starts_us(resolution, tz, start, end).tolist() == expected
        bounds = grid_bounds_us(resolution, tz, start, end)
        assert bounds[:-1].tolist() == expected
        last_end = resolution.next_start(from_epoch_us(expected[-1]), tz)
        assert int(bounds[-1]) == to_epoch_us(last_end)


def test_grid_of_an_empty_range() -> None:
    tz = ZoneInfo("Europe/Berlin")
    at = utc(2026, 1, 1, 0, 1)
    assert grid_bounds_us(PT15M, tz, at, at + timedelta(minutes=5)).tolist() == []


def test_a_berlin_site_year_has_the_dst_days_right() -> None:
    tz = ZoneInfo("Europe/Berlin")
    start = datetime(2026, 1, 1, tzinfo=tz)
    end = datetime(2027, 1, 1, tzinfo=tz)
    starts = grid_starts_us(PT15M, tz, start, end)
    assert len(starts) == 365 * 96  # 92 on 29 March and 100 on 25 October
    spring = datetime(2026, 3, 29, tzinfo=tz), datetime(2026, 3, 30, tzinfo=tz)
    fall = datetime(2026, 10, 25, tzinfo=tz), datetime(2026, 10, 26, tzinfo=tz)
    for (day_start, day_end), count in ((spring, 92), (fall, 100)):
        inside = (starts >= to_epoch_us(day_start)) & (starts < to_epoch_us(day_end))
        assert int(inside.sum()) == count


def _random_meter_data(
    rng: random.Random,
    stamps: list[datetime],
    load_profile: bool,
    flows: tuple[int, ...],
) -> dict[int, list[tuple[datetime, float]]]:
    """Per flow, (timestamp, value) on the grid with random gaps (some long)."""
    data: dict[int, list[tuple[datetime, float]]] = {}
    for flow in flows:
        points = []
        register = rng.uniform(0, 1e6)
        skip_until = -1
        for index, at in enumerate(stamps):
            if index < skip_until:
                continue
            if rng.random() < 0.02:
                skip_until = index + rng.randint(1, 12)
                continue
            step = rng.uniform(0, 500)
            if load_profile:
                points.append((at, step))
            else:
                register += step
                points.append((at, register))
        data[flow] = points
    return data


@pytest.mark.parametrize("resolution", [PT15M, PT1H], ids=lambda r: r.iso)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_interval_energy_equals_the_per_meter_derivation(resolution: Resolution, seed: int) -> None:
    rng = random.Random(seed)
    tz = ZoneInfo("Europe/Berlin")
    # Across the fall-back day (100 quarter-hours) and into the spring-forward one (92).
    for start, end in (
        (datetime(2026, 10, 24, 5, tzinfo=tz), datetime(2026, 10, 27, tzinfo=tz)),
        (datetime(2026, 3, 28, 22, tzinfo=tz), datetime(2026, 3, 30, 2, tzinfo=tz)),
    ):
        bounds = grid_bounds_us(resolution, tz, start, end)
        # Readings from before the range to after it: those outside play no part.
        stamps = list(
            resolution.iter_starts(start - timedelta(hours=3), end + timedelta(hours=3), tz)
        )
        kinds = [
            (MeterDirection.CONSUMER, Measuring.READINGS_ACCURATE, 1.0),
            (MeterDirection.PRODUCER, Measuring.LOAD_PROFILE_ACCURATE, 40.0),
            (MeterDirection.BIDIRECTIONAL, Measuring.READINGS_INACCURATE, 2.5),
            (MeterDirection.BIDIRECTIONAL, Measuring.LOAD_PROFILE_ACCURATE, 1.0),
            (MeterDirection.CONSUMER, Measuring.READINGS_ACCURATE, 0.1),
        ]
        columns = []
        rows: list[tuple[int, int, int, float]] = []
        expected = {
            flow: np.full((len(bounds) - 1, len(kinds)), np.nan)
            for flow in (FLOW_IMPORT, FLOW_EXPORT)
        }
        index_of = {int(b): i for i, b in enumerate(bounds[:-1])}
        for column, (direction, measuring, factor) in enumerate(kinds):
            load_profile = measuring == Measuring.LOAD_PROFILE_ACCURATE
            flows = {
                MeterDirection.CONSUMER: (FLOW_IMPORT,),
                MeterDirection.PRODUCER: (FLOW_EXPORT,),
                MeterDirection.BIDIRECTIONAL: (FLOW_IMPORT, FLOW_EXPORT),
            }[direction]
            columns.append(
                meter_column(MeterId(uuid.uuid4()), direction, measuring, factor, 0, None)
            )
            for flow, points in _random_meter_data(rng, stamps, load_profile, flows).items():
                rows.extend((column, flow, to_epoch_us(at), value) for at, value in points)
                if load_profile:
                    reference = [(at, value * factor) for at, value in points]
                else:
                    reference = [
                        (i.interval_start, i.energy_wh)
                        for i in registers_to_intervals(
                            [RegisterPoint(at, value) for at, value in points],
                            resolution,
                            tz,
                            factor,
                        )
                    ]
                for at, energy in reference:
                    slot = index_of.get(to_epoch_us(at))
                    if slot is not None:
                        expected[flow][slot, column] = energy
        rng.shuffle(rows)
        meters = MeterColumns.of(columns)
        columns_of = np.array([r[0] for r in rows], dtype=np.intp)
        flows_of = np.array([r[1] for r in rows], dtype=np.int16)
        ts_us = np.array([r[2] for r in rows], dtype=np.int64)
        value = np.array([r[3] for r in rows], dtype=np.float64)
        imported, exported = interval_energy(bounds, meters, columns_of, flows_of, ts_us, value)
        # Exactly equal (the same float operations), NaN where the reference has nothing.
        np.testing.assert_array_equal(imported, expected[FLOW_IMPORT])
        np.testing.assert_array_equal(exported, expected[FLOW_EXPORT])
        assert np.isnan(imported).any()
        assert not np.isnan(imported).all()

        # Fed in chunks (as a COPY arrives), the result is the same.
        accumulator = IntervalEnergyAccumulator(bounds, meters)
        cuts = sorted(rng.sample(range(1, len(rows)), 5))
        for lo, hi in zip([0, *cuts], [*cuts, len(rows)], strict=True):
            accumulator.add(columns_of[lo:hi], flows_of[lo:hi], ts_us[lo:hi], value[lo:hi])
        chunked = accumulator.energy()
        np.testing.assert_array_equal(chunked[0], imported)
        np.testing.assert_array_equal(chunked[1], exported)


def test_absent_flows_and_dates_are_zero_missing_data_is_nan() -> None:
    tz = ZoneInfo("UTC")
    start = utc(2026, 1, 1)
    bounds = grid_bounds_us(PT1H, tz, start, start + timedelta(hours=4))
    hour = 3600 * 1_000_000
    t0 = int(bounds[0])
    consumer = meter_column(
        MeterId(uuid.uuid4()), MeterDirection.CONSUMER, Measuring.READINGS_ACCURATE, 1.0, 0, None
    )
    # Lives from 01:30 to 03:00: intervals 00-01 and 03-04 are outside, 01-02 overlaps.
    producer = meter_column(
        MeterId(uuid.uuid4()),
        MeterDirection.PRODUCER,
        Measuring.LOAD_PROFILE_ACCURATE,
        2.0,
        t0 + hour + hour // 2,
        t0 + 3 * hour,
    )
    bidirectional = meter_column(
        MeterId(uuid.uuid4()),
        MeterDirection.BIDIRECTIONAL,
        Measuring.READINGS_ACCURATE,
        1.0,
        0,
        None,
    )
    meters = MeterColumns.of([consumer, producer, bidirectional])
    accumulator = IntervalEnergyAccumulator(bounds, meters)
    accumulator.add(
        np.array([0, 0, 1, 2, 2], dtype=np.intp),
        np.array([1, 1, 2, 2, 2], dtype=np.int16),
        np.array([t0, t0 + hour, t0 + 2 * hour, t0, t0 + hour], dtype=np.int64),
        np.array([10.0, 14.0, 5.0, 1.0, 3.0]),
    )
    energy = accumulator.site_energy()
    assert energy.meter_ids == meters.ids
    assert energy.interval_starts.tolist() == bounds[:-1].tolist()
    nan = float("nan")
    np.testing.assert_array_equal(
        energy.import_wh,
        [[4.0, 0.0, nan], [nan, 0.0, nan], [nan, 0.0, nan], [nan, 0.0, nan]],
    )
    np.testing.assert_array_equal(
        energy.export_wh,
        [[0.0, 0.0, 2.0], [0.0, nan, nan], [0.0, 10.0, nan], [0.0, 0.0, nan]],
    )


def test_no_meters_or_no_intervals() -> None:
    tz = ZoneInfo("UTC")
    start = utc(2026, 1, 1)
    empty = MeterColumns.of([])
    bounds = grid_bounds_us(PT15M, tz, start, start + timedelta(hours=1))
    energy = IntervalEnergyAccumulator(bounds, empty).site_energy()
    assert energy.import_wh.shape == (4, 0)
    one = MeterColumns.of(
        [
            meter_column(
                MeterId(uuid.uuid4()),
                MeterDirection.CONSUMER,
                Measuring.READINGS_ACCURATE,
                1.0,
                0,
                None,
            )
        ]
    )
    none = grid_bounds_us(PT15M, tz, start, start)
    energy = IntervalEnergyAccumulator(none, one).site_energy()
    assert energy.import_wh.shape == (0, 1)
    assert energy.interval_starts.tolist() == []
