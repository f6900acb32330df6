"""The balance grid in a site's time zone, without I/O: the arithmetic layout equals the
walk of :mod:`service.grid` in every zone, whole-step offsets or not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, available_timezones

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.balancing.calendar import (
    from_us,
    grid_starts,
    output_bounds,
    output_floor,
    output_next,
    output_range,
    to_us,
)
from service.grid import PT1H, PT15M, Resolution

LORD_HOWE = ZoneInfo("Australia/Lord_Howe")  # +11 in summer, +10:30 in winter
ZONES = sorted(available_timezones())


def walked(start: datetime, end: datetime, tz: ZoneInfo, resolution: Resolution) -> list[int]:
    return [to_us(t) for t in resolution.iter_starts(start, end, tz)]


def test_hourly_grid_in_lord_howe_stays_on_local_hours_from_summer_to_summer() -> None:
    # Both ends at +11, a whole number of hours; the winter between them at +10:30.
    start, end = datetime(2025, 1, 10, tzinfo=UTC), datetime(2026, 1, 10, tzinfo=UTC)
    grid = grid_starts(start, end, LORD_HOWE, PT1H)
    assert grid.tolist() == walked(start, end, LORD_HOWE, PT1H)
    assert {from_us(int(t)).astimezone(LORD_HOWE).minute for t in grid} == {0}
    winter_noon = datetime(2025, 6, 2, 12, tzinfo=LORD_HOWE).astimezone(UTC)
    assert to_us(winter_noon) in set(grid.tolist())
    assert winter_noon.minute == 30


@pytest.mark.parametrize(
    ("zone", "start", "end", "resolution"),
    [
        ("Australia/Lord_Howe", datetime(2025, 3, 30), datetime(2025, 4, 10), PT15M),
        # Local mean time +00:19:32 until July 1937, then +00:20, then CET in May 1940.
        ("Europe/Amsterdam", datetime(1937, 6, 20), datetime(1937, 7, 10), PT15M),
        ("Europe/Amsterdam", datetime(1939, 12, 1), datetime(1940, 6, 1), PT1H),
        ("Asia/Kathmandu", datetime(1985, 12, 1), datetime(1986, 2, 1), PT15M),
        ("Pacific/Chatham", datetime(2025, 3, 1), datetime(2025, 5, 1), PT1H),
        ("Antarctica/Troll", datetime(2025, 3, 1), datetime(2025, 4, 15), PT1H),
        ("Pacific/Apia", datetime(2011, 12, 25), datetime(2012, 1, 5), PT15M),
        ("Europe/Berlin", datetime(2024, 1, 1), datetime(2026, 1, 1), PT1H),
    ],
)
def test_the_grid_equals_the_walk_across_odd_offset_changes(
    zone: str, start: datetime, end: datetime, resolution: Resolution
) -> None:
    tz = ZoneInfo(zone)
    a, b = start.replace(tzinfo=UTC), end.replace(tzinfo=UTC)
    assert grid_starts(a, b, tz, resolution).tolist() == walked(a, b, tz, resolution)


@given(
    zone=st.sampled_from(ZONES),
    start_s=st.integers(to_us(datetime(1900, 1, 1, tzinfo=UTC)) // 10**6, 5_000_000_000),
    length_s=st.integers(0, 4 * 86_400),
    resolution=st.sampled_from([PT15M, PT1H]),
)
def test_the_grid_equals_the_walk_in_every_zone(
    zone: str, start_s: int, length_s: int, resolution: Resolution
) -> None:
    tz = ZoneInfo(zone)
    start = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=start_s, microseconds=7)
    end = start + timedelta(seconds=length_s)
    assert grid_starts(start, end, tz, resolution).tolist() == walked(start, end, tz, resolution)


def every_output(start: datetime, end: datetime, tz: ZoneInfo, interval: str) -> list[int]:
    """The request's output intervals one by one (starts, then the last one's end)."""
    first, last_end = output_range(start, end, tz, interval)
    points = [first]
    while points[-1] < last_end:
        points.append(output_next(points[-1], tz, interval))
    return [to_us(p) for p in points]


# At most six weeks: every_output steps through each quarter-hour one by one, and a CI
# machine took a quarter of a second for one example of 200 days.
@given(
    zone=st.sampled_from(ZONES),
    interval=st.sampled_from(["PT15M", "PT1H", "P1D", "P1M"]),
    start_s=st.integers(to_us(datetime(1900, 1, 2, tzinfo=UTC)) // 10**6, 7_000_000_000),
    length_s=st.integers(1, 42 * 86_400),
    counts=st.lists(st.integers(1, 40), min_size=1, max_size=8),
)
def test_windows_from_a_cursor_together_are_the_requests_output_intervals(
    zone: str, interval: str, start_s: int, length_s: int, counts: list[int]
) -> None:
    tz = ZoneInfo(zone)
    start = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=start_s)
    end = start + timedelta(seconds=length_s)
    expected = every_output(start, end, tz, interval)
    assert expected[0] <= to_us(start) < expected[1]
    assert expected[-2] < to_us(end) <= expected[-1]
    first, last_end = output_range(start, end, tz, interval)
    laid_out: list[int] = []
    position, turn = first, 0
    while position < last_end:
        count = counts[turn % len(counts)]
        window = output_bounds(position, last_end, tz, interval, count).tolist()
        assert 2 <= len(window) <= count + 1
        assert window[0] == to_us(position)
        laid_out.extend(window[:-1])
        position, turn = from_us(window[-1]), turn + 1
    assert [*laid_out, to_us(last_end)] == expected


@pytest.mark.parametrize("interval", ["PT15M", "PT1H", "P1D", "P1M"])
def test_a_pages_output_intervals_are_laid_out_for_the_page_not_the_range(
    interval: str,
) -> None:
    # The longest request (3,660 days) in Amsterdam's local mean time (+00:19:32), which
    # once took a datetime walk over all ~351,000 quarter-hours for every page.
    amsterdam = ZoneInfo("Europe/Amsterdam")
    start = datetime(1900, 1, 1, tzinfo=UTC)
    first, last_end = output_range(start, start + timedelta(days=3660), amsterdam, interval)
    for count in (1, 2, 10):
        window = output_bounds(first, last_end, amsterdam, interval, count)
        assert len(window) == count + 1
        assert window.tolist() == every_output(first, from_us(int(window[-1])), amsterdam, interval)
    last_start = output_floor(last_end - timedelta(microseconds=1), amsterdam, interval)
    assert output_bounds(last_start, last_end, amsterdam, interval, 5).tolist() == [
        to_us(last_start),
        to_us(last_end),
    ]
    assert len(output_bounds(last_end, last_end, amsterdam, interval, 5)) == 0
