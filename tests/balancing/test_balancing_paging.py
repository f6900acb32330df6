"""Paging ListAggregatedBalances: every page answers, and the pages of any size together are
the one-shot listing, with no gap and no duplicate, whatever the filter: a prosumer as
creditor (its own consumer column is never a row), a debitor across a day without data, a
meter that joins in the middle of the range."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from openvpp.v1 import balancing_pb2 as bpb
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import site_registry_pb2 as spb
from openvpp.v1 import telemetry_pb2 as tpb

from service.balancing import calendar, reads
from service.balancing.worker import BalancingQueueConsumer
from tests.balancing.conftest import Community, drain, stamp
from tests.conftest import Org

BERLIN = ZoneInfo("Europe/Berlin")
Q = timedelta(minutes=15)
PAGE_SIZES = (1, 2, 3, 4, 7, 8, 10, 11)
Row = tuple[datetime, datetime, str, str, int, bool]


def local(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=BERLIN).astimezone(UTC)


async def prosumer_readings(
    community: Community, meter: mpb.Meter, start: datetime, count: int, wh: int = 30
) -> None:
    """A BIDIRECTIONAL meter's import and export, ``wh`` each, per quarter-hour."""
    for flow in (tpb.FLOW_IMPORT, tpb.FLOW_EXPORT):
        await community.ingest(
            [
                tpb.Reading(
                    meter_id=meter.id, timestamp=stamp(start + i * Q), interval_wh=wh, flow=flow
                )
                for i in range(count)
            ]
        )


def as_rows(balances: Sequence[bpb.AggregatedBalance]) -> list[Row]:
    return [
        (
            b.interval_start.ToDatetime(tzinfo=UTC),
            b.interval_end.ToDatetime(tzinfo=UTC),
            b.creditor_meter_id,
            b.debitor_meter_id,
            b.energy_wh,
            b.complete,
        )
        for b in balances
    ]


async def one_shot(community: Community, **fields: Any) -> list[Row]:
    request = bpb.ListAggregatedBalancesRequest(page_size=10_000, **fields)
    response = await community.balancing.ListAggregatedBalances(
        request, metadata=community.org.auth
    )
    assert response.next_page_token == ""
    return as_rows(response.balances)


async def paged(community: Community, page_size: int, **fields: Any) -> list[Row]:
    rows: list[Row] = []
    token = ""
    while True:
        request = bpb.ListAggregatedBalancesRequest(page_size=page_size, page_token=token, **fields)
        response = await community.balancing.ListAggregatedBalances(
            request, metadata=community.org.auth
        )
        assert len(response.balances) <= page_size
        # A page that says there is more is full.
        assert not response.next_page_token or len(response.balances) == page_size
        rows.extend(as_rows(response.balances))
        token = response.next_page_token
        if not token:
            return rows


async def test_paging_a_prosumers_balances_as_creditor_never_fails(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    a, prosumer = await community.participants(
        mpb.METER_DIRECTION_CONSUMER, mpb.METER_DIRECTION_BIDIRECTIONAL
    )
    at = local(2025, 3, 4, 10)
    await community.profile(a, at, [50] * 6)
    await prosumer_readings(community, prosumer, at, 6)
    await drain(consumer)
    # Each interval has two rows with the prosumer as creditor: -> a, and -> GRID (feed-in);
    # pages of 8 end on whole windows, the overflow row alone in the next one.
    rows = await community.balances(
        creditor_meter_id=prosumer.id,
        interval="PT15M",
        page_size=8,
        start_time=stamp(at),
        end_time=stamp(at + 6 * Q),
    )
    assert sorted((r.debitor_meter_id, r.energy_wh) for r in rows) == sorted(
        [(a.id, 30), ("GRID", 0)] * 6
    )


async def test_paging_a_debitors_balances_across_a_day_without_data_never_fails(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    a, pv = await community.participants(mpb.METER_DIRECTION_CONSUMER, mpb.METER_DIRECTION_PRODUCER)
    # Readings on the 4th and the 6th; none on the 5th (an outage), so no block that day.
    for start in (local(2025, 3, 4, 23), local(2025, 3, 6, 0)):
        await community.profile(a, start, [50] * 4)
        await community.profile(pv, start, [40] * 4)
    await drain(consumer)
    rows = await community.balances(
        debitor_meter_id=a.id,
        interval="PT15M",
        page_size=8,  # the 4th's last hour is exactly 8 rows (pv -> a, GRID -> a)
        start_time=stamp(local(2025, 3, 4, 23)),
        end_time=stamp(local(2025, 3, 6, 1)),
    )
    assert sorted((r.creditor_meter_id, r.energy_wh) for r in rows) == sorted(
        [(pv.id, 40), ("GRID", 10)] * 8
    )


def output_start(instant: datetime, interval: str) -> datetime:
    here = instant.astimezone(BERLIN)
    if interval == "PT1H":
        here = here.replace(minute=0)
    elif interval == "P1D":
        here = here.replace(hour=0, minute=0)
    return here.astimezone(UTC)


@pytest.mark.parametrize("interval", ["PT15M", "PT1H", "P1D"])
async def test_pages_of_every_size_together_are_the_one_shot_listing(
    community: Community, consumer: BalancingQueueConsumer, interval: str
) -> None:
    a = await community.meter()
    late = await community.meter()  # takes part from the 6th on
    prosumer = await community.meter(direction=mpb.METER_DIRECTION_BIDIRECTIONAL)
    pv = await community.meter(direction=mpb.METER_DIRECTION_PRODUCER)
    for meter in (a, prosumer, pv):
        await community.participate(meter)
    await community.participate(late, start=date(2025, 3, 6))
    # The 4th's last hour, no data on the 5th, the 6th's first hour.
    fourth, sixth = local(2025, 3, 4, 23), local(2025, 3, 6, 0)
    for start in (fourth, sixth):
        await community.profile(a, start, [50, 60, 70, 80])
        await community.profile(pv, start, [40, 45, 50, 55])
        await prosumer_readings(community, prosumer, start, 4)
    await community.profile(late, sixth, [25, 35, 45, 55])
    await drain(consumer)

    # Who is listed with whom, from who takes part on which day.
    def pairs(producers: Sequence[str], consumers: Sequence[str]) -> set[tuple[str, str]]:
        return (
            {(p, c) for p in producers for c in consumers if p != c}
            | {(p, "GRID") for p in producers}
            | {("GRID", c) for c in consumers}
        )

    producers = [prosumer.id, pv.id]
    expected_keys = {
        (output_start(start + i * Q, interval), creditor, debitor)
        for start, consumers in (
            (fourth, [a.id, prosumer.id]),
            (sixth, [a.id, late.id, prosumer.id]),
        )
        for i in range(4)
        for creditor, debitor in pairs(producers, consumers)
    }
    window = {
        "interval": interval,
        "start_time": stamp(fourth),
        "end_time": stamp(sixth + 4 * Q),
    }
    filters: list[dict[str, str]] = [
        {"site_id": community.site.id},
        {"creditor_meter_id": prosumer.id},
        {"creditor_meter_id": pv.id},
        {"site_id": community.site.id, "creditor_meter_id": "GRID"},
        {"debitor_meter_id": a.id},
        {"debitor_meter_id": prosumer.id},
        {"debitor_meter_id": late.id},
        {"site_id": community.site.id, "debitor_meter_id": "GRID"},
        {"creditor_meter_id": pv.id, "debitor_meter_id": late.id},
        {"creditor_meter_id": prosumer.id, "debitor_meter_id": prosumer.id},
    ]
    for given in filters:
        whole = await one_shot(community, **given, **window)
        wanted = {
            key
            for key in expected_keys
            if given.get("creditor_meter_id", key[1]) == key[1]
            and given.get("debitor_meter_id", key[2]) == key[2]
        }
        keys = [(start, creditor, debitor) for start, _, creditor, debitor, _, _ in whole]
        assert keys == sorted(wanted), given
        for page_size in PAGE_SIZES:
            assert await paged(community, page_size, **given, **window) == whole, (
                given,
                page_size,
            )


async def test_a_page_lays_out_only_its_own_output_intervals(
    partner: Org,
    community: Community,
    consumer: BalancingQueueConsumer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """README: a page covers at most page_size output intervals from its cursor, so its
    work is bounded by the page, not by the requested range. Counted, not timed: every
    output interval and balance grid point a page lays out is recorded."""
    laid_out: list[tuple[int, int]] = []  # (output intervals asked for, bounds returned)
    grid_points: list[int] = []

    def spy_bounds(*args: Any) -> Any:
        bounds = real_bounds(*args)
        laid_out.append((args[-1], len(bounds)))
        return bounds

    def spy_grid(*args: Any) -> Any:
        grid = real_grid(*args)
        grid_points.append(len(grid))
        return grid

    real_bounds, real_grid = calendar.output_bounds, calendar.grid_starts
    monkeypatch.setattr(reads, "output_bounds", spy_bounds)
    monkeypatch.setattr(reads, "grid_starts", spy_grid)
    # Amsterdam kept its local mean time (+00:19:32) until 1937: no quarter-hour offset.
    site = await community.another_site(
        timezone="Europe/Amsterdam",
        location=spb.Location(address="Amsterdam", country="NL"),
    )
    longest = timedelta(days=3660)
    start = datetime(1900, 1, 1, tzinfo=UTC)
    token = ""
    for _ in range(2):
        request = bpb.ListBalanceSummariesRequest(
            site_id=site.site.id,
            interval="PT15M",
            page_size=1,
            start_time=stamp(start),
            end_time=stamp(start + longest),
            page_token=token,
        )
        response = await site.balancing.ListBalanceSummaries(request, metadata=partner.auth)
        assert [s.balance_intervals for s in response.summaries] == [1]
        token = response.next_page_token
        assert token
    assert laid_out == [(1, 2), (1, 2)]
    assert grid_points == [1, 1]

    # Ten years of balances with one stored day at their end: the empty windows of the
    # range are jumped over, not laid out.
    home = await site.meter()
    pv = await site.meter(direction=mpb.METER_DIRECTION_PRODUCER)
    for meter in (home, pv):
        await site.participate(meter)
    at = datetime(2025, 3, 4, 10, tzinfo=ZoneInfo("Europe/Amsterdam")).astimezone(UTC)
    await site.profile(home, at, [50])
    await site.profile(pv, at, [40])
    await drain(consumer)
    laid_out.clear()
    grid_points.clear()
    end = datetime(2025, 6, 1, tzinfo=UTC)
    for page_size in (1, 5):
        request_b = bpb.ListAggregatedBalancesRequest(
            site_id=site.site.id,
            interval="PT15M",
            page_size=page_size,
            start_time=stamp(end - longest),
            end_time=stamp(end),
        )
        answer = await site.balancing.ListAggregatedBalances(request_b, metadata=partner.auth)
        assert len(answer.balances) == page_size
        assert answer.next_page_token
        # An empty window, then the stored day's. Each sized by rows: at most page_size + 2
        # output intervals.
        assert len(laid_out) == 2
        assert all(asked <= page_size + 2 and got <= asked + 1 for asked, got in laid_out)
        assert all(points <= page_size + 2 for points in grid_points)
        laid_out.clear()
        grid_points.clear()


async def test_a_late_joiners_first_page_jumps_over_the_days_before_it_joined(
    community: Community, consumer: BalancingQueueConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    windows: list[int] = []

    def spy_bounds(*args: Any) -> Any:
        bounds = real_bounds(*args)
        windows.append(len(bounds) - 1)
        return bounds

    real_bounds = calendar.output_bounds
    monkeypatch.setattr(reads, "output_bounds", spy_bounds)
    a = await community.meter()
    pv = await community.meter(direction=mpb.METER_DIRECTION_PRODUCER)
    joiner = await community.meter()
    for meter in (a, pv):
        await community.participate(meter)
    await community.participate(joiner, start=date(2025, 3, 21))
    first = local(2025, 3, 1, 12)
    # A stored day every day of March without the joiner; it joins on the 21st.
    for n in range(20):
        await community.profile(a, first + timedelta(days=n), [50])
        await community.profile(pv, first + timedelta(days=n), [40])
    joined = local(2025, 3, 21, 12)
    for meter in (a, joiner):
        await community.profile(meter, joined, [30])
    await community.profile(pv, joined, [40])
    await drain(consumer)
    site = community.site.id
    for fields in (
        {"debitor_meter_id": joiner.id},
        {"site_id": site, "creditor_meter_id": "GRID"},
        {"creditor_meter_id": pv.id, "debitor_meter_id": joiner.id},
    ):
        windows.clear()
        request = bpb.ListAggregatedBalancesRequest(
            page_size=1,
            interval="PT15M",
            start_time=stamp(local(2025, 3, 1)),
            end_time=stamp(local(2025, 4, 1)),
            **fields,
        )
        response = await community.balancing.ListAggregatedBalances(
            request, metadata=community.org.auth
        )
        assert len(response.balances) == 1
        assert len(windows) <= 2, (fields, len(windows))
        first_row = response.balances[0].interval_start.ToDatetime(tzinfo=UTC)
        assert first_row == (local(2025, 3, 1) if "site_id" in fields else local(2025, 3, 21))
    # No meter is its own creditor: nothing to look for.
    windows.clear()
    alone = await one_shot(
        community,
        creditor_meter_id=a.id,
        debitor_meter_id=a.id,
        start_time=stamp(local(2025, 3, 1)),
        end_time=stamp(local(2025, 4, 1)),
    )
    assert alone == []
    assert windows == []
    joiners = await one_shot(
        community,
        debitor_meter_id=joiner.id,
        interval="P1D",
        start_time=stamp(local(2025, 3, 1)),
        end_time=stamp(local(2025, 4, 1)),
    )
    assert {start for start, *_ in joiners} == {local(2025, 3, 21)}
