"""Balancing rules without I/O: histories by date, share sums, blocks and output grids."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from uuid import UUID
from zoneinfo import ZoneInfo

import numpy as np

from service.balancing.calendar import (
    StoredBlock,
    block_of,
    from_us,
    grid_starts,
    iter_blocks,
    merge_ranges,
    on_grid,
    output_bounds,
    output_range,
    parse_output_interval,
    take_in_off_grid_blocks,
    to_us,
)
from service.balancing.domain import (
    BalancingRole,
    Period,
    Policy,
    Setting,
    method_on,
    overlap_violation,
    participants_on,
    static_share_excess,
)
from service.balancing.engine import AllocationMethod
from service.common.errors import ViolationCollector
from service.grid import P1M, PT1H, PT15M

BERLIN = ZoneInfo("Europe/Berlin")
CREATED = datetime(2025, 1, 1, tzinfo=UTC)


def setting(
    meter: int,
    start: date,
    end: date | None = None,
    priority: int | None = None,
    share: float | None = None,
    role: BalancingRole = BalancingRole.PARTICIPANT,
) -> Setting:
    return Setting(
        UUID(int=1000 + meter * 10 + start.day),
        UUID(int=1),
        UUID(int=meter),
        role,
        Period(start, end),
        priority,
        share,
        CREATED,
    )


def policy(method: AllocationMethod, start: date, end: date | None = None) -> Policy:
    return Policy(UUID(int=start.toordinal()), UUID(int=1), method, Period(start, end), CREATED)


def test_an_overlap_names_start_date_or_end_date() -> None:
    january = Period(date(2025, 1, 1), date(2025, 2, 1))
    open_march = Period(date(2025, 3, 1), None)
    for candidate, field in [
        (Period(date(2025, 1, 15), date(2025, 1, 20)), "start_date"),
        (Period(date(2024, 12, 1), date(2025, 1, 2)), "end_date"),
        (Period(date(2025, 2, 1), None), "end_date"),
        (Period(date(2026, 1, 1), None), "start_date"),
    ]:
        errors = ViolationCollector()
        overlap_violation(errors, candidate, [january, open_march], "setting")
        assert [v.field for v in errors.violations] == [field], candidate
    for fine in [
        Period(date(2025, 2, 1), date(2025, 3, 1)),
        Period(date(2024, 1, 1), january.start),
    ]:
        errors = ViolationCollector()
        overlap_violation(errors, fine, [january, open_march], "setting")
        assert errors.violations == []


def test_participants_and_method_of_a_day() -> None:
    settings = [
        setting(1, date(2025, 1, 1), date(2025, 1, 15)),
        setting(1, date(2025, 1, 15), role=BalancingRole.EXCLUDED),
        setting(2, date(2025, 1, 10)),
    ]
    assert [s.meter_id.int for s in participants_on(settings, date(2025, 1, 5))] == [1]
    assert [s.meter_id.int for s in participants_on(settings, date(2025, 1, 12))] == [1, 2]
    assert [s.meter_id.int for s in participants_on(settings, date(2025, 1, 15))] == [2]
    policies = [policy(AllocationMethod.STATIC, date(2025, 2, 1), date(2025, 3, 1))]
    assert method_on(policies, date(2025, 1, 31)) is AllocationMethod.EQUAL
    assert method_on(policies, date(2025, 2, 1)) is AllocationMethod.STATIC
    assert method_on(policies, date(2025, 3, 1)) is AllocationMethod.EQUAL


def test_static_shares_are_summed_per_tier_on_static_days_only() -> None:
    settings = [
        setting(1, date(2025, 1, 1), share=0.7, priority=1),
        setting(2, date(2025, 1, 1), share=0.7, priority=2),
        setting(3, date(2025, 1, 20), share=0.4, priority=1),
        setting(4, date(2025, 1, 1), share=0.1 + 0.2),  # float noise stays within 1
        setting(5, date(2025, 1, 1), share=0.7),
    ]
    assert static_share_excess(settings, []) is None
    assert (
        static_share_excess(settings, [policy(AllocationMethod.PRO_RATA, date(2025, 1, 1))]) is None
    )
    excess = static_share_excess(
        settings, [policy(AllocationMethod.STATIC_REDISTRIBUTED, date(2025, 1, 10))]
    )
    assert excess is not None
    assert (excess.day, excess.tier) == (date(2025, 1, 20), 1)
    assert abs(excess.total - 1.1) < 1e-9
    assert (
        static_share_excess(
            settings, [policy(AllocationMethod.STATIC, date(2025, 1, 1), date(2025, 1, 20))]
        )
        is None
    )


def test_day_blocks_hold_92_96_and_100_quarter_hours_in_berlin() -> None:
    start = datetime(2025, 3, 29, tzinfo=BERLIN).astimezone(UTC)
    end = datetime(2025, 4, 1, tzinfo=BERLIN).astimezone(UTC)
    counts = [
        len(grid_starts(s, e, BERLIN, PT15M)) for s, e in iter_blocks(start, end, BERLIN, PT15M)
    ]
    assert counts == [96, 92, 96]
    autumn = datetime(2025, 10, 26, tzinfo=BERLIN).astimezone(UTC)
    (block,) = iter_blocks(autumn, autumn + timedelta(hours=1), BERLIN, PT15M)
    assert len(grid_starts(*block, BERLIN, PT15M)) == 100
    assert len(grid_starts(*block, BERLIN, PT1H)) == 25
    # The fast arithmetic path equals the grid's own walk, also in a half-hour zone.
    kolkata = ZoneInfo("Asia/Kolkata")
    for zone in (BERLIN, kolkata):
        for resolution in (PT15M, PT1H):
            a, b = block
            walked = [to_us(t) for t in resolution.iter_starts(a, b, zone)]
            assert grid_starts(a, b, zone, resolution).tolist() == walked
    (month,) = iter_blocks(autumn, autumn + timedelta(hours=1), BERLIN, P1M)
    assert month[0] == datetime(2025, 10, 1, tzinfo=BERLIN).astimezone(UTC)
    assert month[1] == datetime(2025, 11, 1, tzinfo=BERLIN).astimezone(UTC)


def output_starts(start: datetime, end: datetime, interval: str) -> list[int]:
    """Every output interval of a request in Berlin: starts, then the last one's end."""
    first, last_end = output_range(start, end, BERLIN, interval)
    return [int(t) for t in output_bounds(first, last_end, BERLIN, interval, 10_000)]


def test_output_intervals_follow_the_local_calendar() -> None:
    start = datetime(2025, 3, 30, 5, tzinfo=BERLIN).astimezone(UTC)
    days = output_starts(start, start + timedelta(days=2), "P1D")
    assert [from_us(d).astimezone(BERLIN).day for d in days] == [30, 31, 1, 2]
    assert days[1] - days[0] == 23 * 3600 * 1_000_000
    months = output_starts(start, start + timedelta(days=40), "P1M")
    # Starts of March, April and May, then the end of May.
    assert [from_us(m).astimezone(BERLIN).month for m in months] == [3, 4, 5, 6]
    hours = output_starts(start, start + timedelta(minutes=1), "PT1H")
    assert len(hours) == 2
    assert np.all(np.diff(hours) == 3600 * 1_000_000)
    assert parse_output_interval("", PT15M) == "PT15M"
    assert parse_output_interval("P1D", PT1H) == "P1D"
    assert parse_output_interval("PT15M", PT1H) is None
    assert parse_output_interval("P1D", P1M) is None
    assert parse_output_interval("PT5M", PT15M) is None


def test_ranges_merge_when_they_touch() -> None:
    t = datetime(2025, 1, 1, tzinfo=UTC)
    q = timedelta(minutes=15)
    assert merge_ranges(
        [(t + 2 * q, t + 3 * q), (t, t + q), (t + q, t + 2 * q), (t + 5 * q, t + 6 * q)]
    ) == [
        (t, t + 3 * q),
        (t + 5 * q, t + 6 * q),
    ]
    assert merge_ranges([(t, t)]) == []


LONDON = ZoneInfo("Europe/London")


def _berlin_days(first: date, count: int) -> list[StoredBlock]:
    blocks = []
    for n in range(count):
        start, end = block_of(
            datetime.combine(first + timedelta(days=n), datetime.min.time(), BERLIN), BERLIN, PT15M
        )
        blocks.append(StoredBlock(start, end, int((end - start) / timedelta(minutes=15))))
    return blocks


def test_a_block_is_on_the_grid_only_with_its_zones_bounds_and_its_resolutions_intervals() -> None:
    (day,) = _berlin_days(date(2025, 3, 4), 1)
    assert on_grid(day, BERLIN, PT15M)
    assert not on_grid(day, LONDON, PT15M)  # other local days
    assert not on_grid(day, BERLIN, PT1H)  # the same day, 96 intervals instead of 24
    assert not on_grid(day, BERLIN, P1M)
    # Paris keeps Berlin's days: a change between them moves nothing.
    assert on_grid(day, ZoneInfo("Europe/Paris"), PT15M)


def test_old_blocks_are_taken_in_along_their_whole_run_both_ways() -> None:
    run = _berlin_days(date(2025, 3, 1), 10)
    apart = _berlin_days(date(2025, 6, 2), 1)
    at = datetime(2025, 3, 5, 9, tzinfo=UTC)
    ranges, old = take_in_off_grid_blocks(
        [(at, at + timedelta(minutes=15))], run + apart, LONDON, PT15M
    )
    # Every Berlin day of the run straddles two London days; the one in June overlaps
    # nothing written and waits for its own re-balancing.
    assert old == [b.start for b in run]
    assert ranges == [
        (
            datetime(2025, 2, 28, tzinfo=LONDON).astimezone(UTC),
            datetime(2025, 3, 11, tzinfo=LONDON).astimezone(UTC),
        )
    ]


def test_a_month_block_is_replaced_by_all_its_days_and_its_days_by_the_month() -> None:
    march = block_of(datetime(2025, 3, 1, tzinfo=BERLIN), BERLIN, P1M)
    month = StoredBlock(*march, 1)
    at = datetime(2025, 3, 20, 9, tzinfo=UTC)
    ranges, old = take_in_off_grid_blocks(
        [(at, at + timedelta(minutes=15))], [month], BERLIN, PT15M
    )
    assert (ranges, old) == ([march], [month.start])
    days = _berlin_days(date(2025, 3, 3), 3)
    ranges, old = take_in_off_grid_blocks([(at, at + timedelta(minutes=15))], days, BERLIN, P1M)
    assert (ranges, old) == ([march], [b.start for b in days])


def test_blocks_on_the_grid_change_nothing() -> None:
    days = _berlin_days(date(2025, 3, 3), 3)
    at = datetime(2025, 3, 4, 9, tzinfo=UTC)
    wanted = [(at, at + timedelta(minutes=15))]
    assert take_in_off_grid_blocks(wanted, days, BERLIN, PT15M) == (wanted, [])
