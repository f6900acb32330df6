"""Unit tests for the batch validator, register group check and meter rules."""

from __future__ import annotations

import math
import random
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st
from openvpp.v1 import telemetry_pb2 as tpb

from service.grid import PT1H, PT15M, SiteType
from service.telemetry.domain import (
    Flow,
    Measuring,
    MeterDirection,
    MeterFields,
    affected_intervals,
    validate_meter,
)
from service.telemetry.validate import (
    check_register_group,
    from_us,
    meter_info,
    to_us,
    validate_batch,
)
from tests.unit.reference_rules import (
    IncomingReading,
    MeterContext,
    RegisterPoint,
    check_reading,
    check_register_sequence,
    find_register_decreases,
)

BERLIN = ZoneInfo("Europe/Berlin")
START = datetime(2025, 3, 29, 23, 0, tzinfo=UTC)
END = datetime(2025, 4, 2, tzinfo=UTC)
NOW = datetime(2025, 3, 31, 12, tzinfo=UTC)


def test_microsecond_conversion_round_trips() -> None:
    for value in (START, END, datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)):
        assert from_us(to_us(value)) == value


def test_batch_validator_agrees_with_check_reading() -> None:
    rng = random.Random(4)
    meters = {}
    contexts = {}
    for direction in MeterDirection:
        for measuring in Measuring:
            meter_id = uuid.uuid4()
            end = END if rng.random() < 0.5 else None
            resolution = PT15M if rng.random() < 0.5 else PT1H
            meters[str(meter_id)] = meter_info(
                id=meter_id,
                org_id=uuid.uuid4(),
                site_id=uuid.uuid4(),
                direction=direction,
                measuring=measuring,
                start_date=START,
                end_date=end,
                transformer_factor=1.0,
                timezone=BERLIN,
                resolution=resolution,
            )
            contexts[str(meter_id)] = MeterContext(
                str(meter_id), "s", direction, measuring, START, end, 1.0, BERLIN, resolution
            )
    ids = [*meters, str(uuid.uuid4())]
    readings = []
    for _ in range(3000):
        at = START + timedelta(
            minutes=rng.choice([-15, 0, 7, 15, 60, 75]) + 15 * rng.randrange(400)
        )
        reading = tpb.Reading(
            meter_id=rng.choice(ids),
            flow=rng.choice([tpb.FLOW_UNSPECIFIED, tpb.FLOW_IMPORT, tpb.FLOW_EXPORT]),
        )
        reading.timestamp.FromDatetime(at)
        value = rng.choice([1.0, 5.0, -1.0, math.nan, math.inf, 1.25e9, 1.3e9, 1e15, 1.1e15])
        draw = rng.random()
        if draw < 0.45:
            reading.register_wh = value
        elif draw < 0.9:
            reading.interval_wh = value
        readings.append(reading)
    checked = validate_batch(readings, meters, to_us(NOW), 3600 * 1_000_000)
    got = dict(checked.rejected)
    for index, reading in enumerate(readings):
        kind = reading.WhichOneof("value")
        incoming = IncomingReading(
            reading.meter_id,
            reading.timestamp.ToDatetime(tzinfo=UTC),
            reading.register_wh if kind == "register_wh" else None,
            reading.interval_wh if kind == "interval_wh" else None,
            {0: None, 1: Flow.IMPORT, 2: Flow.EXPORT}[reading.flow],
        )
        expected = check_reading(
            incoming, contexts.get(reading.meter_id), NOW, timedelta(seconds=3600)
        )
        assert got.get(index) == expected, (index, reading)
    stored = len(checked.rows) + checked.in_batch_duplicates + checked.in_batch_corrections
    assert stored + len(checked.rejected) == len(readings)


def test_repeated_reading_in_batch_last_wins() -> None:
    meter_id = uuid.uuid4()
    info = meter_info(
        id=meter_id,
        org_id=uuid.uuid4(),
        site_id=uuid.uuid4(),
        direction=MeterDirection.CONSUMER,
        measuring=Measuring.LOAD_PROFILE_ACCURATE,
        start_date=START,
        end_date=None,
        transformer_factor=1.0,
        timezone=BERLIN,
        resolution=PT15M,
    )
    readings = []
    for value in (1.0, 1.0, 2.0):
        reading = tpb.Reading(meter_id=str(meter_id), interval_wh=value)
        reading.timestamp.FromDatetime(START)
        readings.append(reading)
    checked = validate_batch(readings, {str(meter_id): info}, to_us(NOW), 0)
    assert checked.rows == [(meter_id, 1, to_us(START), 2.0)]
    assert checked.row_index == [2]
    assert (checked.in_batch_duplicates, checked.in_batch_corrections) == (1, 1)


def test_register_group_matches_sequence_rules_without_stored() -> None:
    rng = random.Random(7)
    for _ in range(200):
        values = [float(rng.randrange(20)) for _ in range(8)]
        stamps = rng.sample(range(100), 8)
        candidates = list(zip(stamps, values, strict=True))
        points = [RegisterPoint(datetime.fromtimestamp(ts, UTC), value) for ts, value in candidates]
        assert check_register_group(candidates, []) == check_register_sequence(points)


def test_register_group_against_stored_neighbours() -> None:
    stored = [(10, 100.0), (20, 200.0), (30, 300.0)]
    candidates = [(15, 150.0), (16, 90.0), (25, 310.0), (20, 250.0), (35, 299.0)]
    # 16 is below 150 before it; 25 is above the stored 300 after it; 20 replaces the stored
    # 200 and fits; 35 is below the stored 300 before it.
    assert check_register_group(candidates, stored) == [1, 2, 4]
    previous = RegisterPoint(datetime.fromtimestamp(10, UTC), 100.0)
    assert find_register_decreases(previous, None, RegisterPoint(previous.timestamp, 99.0))


def test_a_rejected_correction_leaves_its_stored_value_to_bound_the_others() -> None:
    # Stored 100 and 200; the batch corrects 200 down to 50 (refused) and adds 150 after it:
    # with the stored 200 standing, 150 would take the register backwards.
    assert check_register_group([(2, 50.0), (3, 150.0)], [(1, 100.0), (2, 200.0)]) == [0, 1]
    # The same with a correction refused for being too high.
    stored = [(1, 100.0), (2, 200.0), (3, 300.0)]
    assert check_register_group([(2, 400.0), (3, 150.0)], stored) == [0, 1]
    # A correction above a stored value after it is refused even when the batch corrects
    # that one too (one walk cannot know yet whether it will); the later one fits.
    stored = [(1, 100.0), (2, 200.0), (3, 210.0)]
    assert check_register_group([(2, 250.0), (3, 260.0)], stored) == [0]
    # Resent once the later one is stored, it fits.
    stored = [(1, 100.0), (2, 200.0), (3, 260.0)]
    assert check_register_group([(2, 250.0)], stored) == []


@settings(max_examples=400, deadline=None)
@given(
    stored=st.lists(st.integers(0, 40), max_size=8, unique=True).flatmap(
        lambda stamps: st.lists(st.floats(0, 1000), min_size=len(stamps), max_size=len(stamps)).map(
            lambda values: list(zip(sorted(stamps), sorted(values), strict=True))
        )
    ),
    candidates=st.dictionaries(st.integers(0, 40), st.floats(0, 1000), min_size=1, max_size=8),
)
def test_what_the_register_check_accepts_never_takes_the_register_backwards(
    stored: list[tuple[int, float]], candidates: dict[int, float]
) -> None:
    batch = list(candidates.items())
    rejected = set(check_register_group(batch, stored))
    series = dict(stored)
    series.update(pair for position, pair in enumerate(batch) if position not in rejected)
    values = [series[ts] for ts in sorted(series)]
    assert values == sorted(values)


def test_affected_intervals() -> None:
    at = datetime(2025, 3, 30, 1, 0, tzinfo=UTC)  # 03:00 CEST, right after the spring gap
    assert affected_intervals(at, False, PT1H, BERLIN) == (at,)
    assert affected_intervals(at, True, PT1H, BERLIN) == (at - timedelta(hours=1), at)
    assert affected_intervals(at, True, PT15M, BERLIN) == (at - timedelta(minutes=15), at)


def test_validate_meter_rules() -> None:
    good = MeterFields(
        "1ISK0001",
        "1ISK0001",
        "MPO",
        MeterDirection.CONSUMER,
        Measuring.READINGS_ACCURATE,
        START,
        None,
        None,
    )
    assert validate_meter(good, SiteType.BALANCED_ACCURATE) == []
    sparse = MeterFields(**{**good.__dict__, "measuring": Measuring.READINGS_INACCURATE})
    assert [f for f, _ in validate_meter(sparse, SiteType.BALANCED_ACCURATE)] == ["measuring"]
    assert validate_meter(sparse, SiteType.UNBALANCED_INACCURATE) == []
    bad = MeterFields("", "", "", None, None, START, START, -1.0)
    fields = [f for f, _ in validate_meter(bad, None)]
    assert fields == ["identifier", "direction", "measuring", "end_date", "transformer_factor"]
