"""A site's grid moving under its stored results (UpdateSite of ``timezone`` or
``balance_resolution``): afterwards the results are those of the new grid only, every
balance counted once, with no moment at which a reader sees both grids or neither."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from google.protobuf import field_mask_pb2
from openvpp.v1 import balancing_pb2 as bpb
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import site_registry_pb2 as spb

from service.app import Service
from service.balancing.calendar import block_of
from service.balancing.worker import BalancingQueueConsumer
from service.grid import parse_resolution
from tests.balancing.conftest import Community, drain, stamp

BERLIN = ZoneInfo("Europe/Berlin")
LONDON = ZoneInfo("Europe/London")
Q = timedelta(minutes=15)


def local(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=BERLIN).astimezone(UTC)


@pytest.fixture
def pool(service: Service) -> asyncpg.Pool:
    assert service.pool is not None
    return service.pool


async def _update_site(community: Community, **fields: object) -> None:
    site = spb.Site(id=community.site.id, **fields)  # type: ignore[arg-type]
    await community.registry.UpdateSite(
        spb.UpdateSiteRequest(site=site, update_mask=field_mask_pb2.FieldMask(paths=list(fields))),
        metadata=community.org.auth,
    )


async def _one_shared_interval(community: Community, consumer: BalancingQueueConsumer) -> datetime:
    """A consumer (50 Wh) and a producer (40 Wh) in one quarter-hour, balanced."""
    a, pv = await community.participants(mpb.METER_DIRECTION_CONSUMER, mpb.METER_DIRECTION_PRODUCER)
    at = local(2025, 3, 4, 10)
    await community.profile(a, at, [50])
    await community.profile(pv, at, [40])
    await drain(consumer)
    return at


async def _assert_blocks_on_grid(
    pool: asyncpg.Pool, community: Community, timezone: ZoneInfo, resolution: str
) -> list[tuple[datetime, datetime]]:
    """Every stored block of the site is a block of the given grid, and none overlap."""
    rows = await pool.fetch(
        "SELECT block_start, block_end FROM balance_blocks WHERE site_id = $1 ORDER BY block_start",
        UUID(community.site.id),
    )
    bounds = [(row["block_start"], row["block_end"]) for row in rows]
    grid = parse_resolution(resolution)
    assert [block_of(start, timezone, grid) for start, _ in bounds] == bounds
    assert all(end <= later for (_, end), (later, _) in pairwise(bounds))
    return bounds


def _totals(summaries: list[bpb.BalanceSummary]) -> tuple[int, int, int]:
    return (
        sum(s.production_wh for s in summaries),
        sum(s.demand_wh for s in summaries),
        sum(s.shared_wh for s in summaries),
    )


async def test_a_timezone_change_does_not_double_count_the_stored_balances(
    community: Community, consumer: BalancingQueueConsumer, pool: asyncpg.Pool
) -> None:
    at = await _one_shared_interval(community, consumer)
    await _update_site(community, timezone="Europe/London")
    await drain(consumer)
    summaries = await community.summaries(
        interval="PT15M", start_time=stamp(at), end_time=stamp(at + Q)
    )
    assert [(s.production_wh, s.demand_wh, s.shared_wh) for s in summaries] == [(40, 50, 40)]
    await _assert_blocks_on_grid(pool, community, LONDON, "PT15M")


async def test_a_resolution_change_to_p1m_does_not_double_count_the_stored_balances(
    community: Community, consumer: BalancingQueueConsumer, pool: asyncpg.Pool
) -> None:
    await _one_shared_interval(community, consumer)
    await _update_site(community, balance_resolution="P1M")
    await drain(consumer)
    summaries = await community.summaries(
        interval="P1M", start_time=stamp(local(2025, 3, 1)), end_time=stamp(local(2025, 4, 1))
    )
    # The month's readings: one load-profile value each, 40 Wh shared of 50 Wh demand.
    assert [(s.production_wh, s.demand_wh, s.shared_wh) for s in summaries] == [(40, 50, 40)]
    assert await _assert_blocks_on_grid(pool, community, BERLIN, "P1M") == [
        (local(2025, 3, 1), local(2025, 4, 1))
    ]


async def test_a_resolution_change_back_from_p1m_leaves_only_day_blocks(
    community: Community, consumer: BalancingQueueConsumer, pool: asyncpg.Pool
) -> None:
    at = await _one_shared_interval(community, consumer)
    await _update_site(community, balance_resolution="P1M")
    await drain(consumer)
    await _update_site(community, balance_resolution="PT15M")
    # One quarter-hour in the middle of the month, before the queued range: the month block
    # it overlaps goes, and every day of the month comes back as a day block.
    await community.balancing.RunBalancing(
        bpb.RunBalancingRequest(
            site_id=community.site.id, start_time=stamp(at), end_time=stamp(at + Q)
        ),
        metadata=community.org.auth,
    )
    month = {"start_time": stamp(local(2025, 3, 1)), "end_time": stamp(local(2025, 4, 1))}
    for _ in range(2):
        days = await _assert_blocks_on_grid(pool, community, BERLIN, "PT15M")
        assert (days[0][0], days[-1][1], len(days)) == (local(2025, 3, 1), local(2025, 4, 1), 31)
        quarter = await community.summaries(
            interval="PT15M", start_time=stamp(at), end_time=stamp(at + Q)
        )
        assert [(s.production_wh, s.demand_wh, s.shared_wh) for s in quarter] == [(40, 50, 40)]
        summaries = await community.summaries(interval="P1M", **month)
        assert [
            (s.production_wh, s.demand_wh, s.shared_wh, s.complete_intervals) for s in summaries
        ] == [(40, 50, 40, 1)]
        await drain(consumer)  # the range the change queued: the same results


async def test_rebalancing_part_of_the_old_grid_replaces_every_old_block_it_overlaps(
    community: Community, consumer: BalancingQueueConsumer, pool: asyncpg.Pool
) -> None:
    a, pv = await community.participants(mpb.METER_DIRECTION_CONSUMER, mpb.METER_DIRECTION_PRODUCER)
    # Two Berlin days with data; in London each Berlin day straddles two London days.
    first, second = local(2025, 3, 4, 10), local(2025, 3, 5, 10)
    for at in (first, second):
        await community.profile(a, at, [50])
        await community.profile(pv, at, [40])
    await drain(consumer)
    await _update_site(community, timezone="Europe/London")
    # Before the queued range is balanced, one quarter-hour of the first day is re-balanced:
    # the London days it touches overlap both Berlin blocks, so both are replaced at once.
    ran = await community.balancing.RunBalancing(
        bpb.RunBalancingRequest(
            site_id=community.site.id, start_time=stamp(first), end_time=stamp(first + Q)
        ),
        metadata=community.org.auth,
    )
    assert ran.balanced_intervals == 2
    span = {"start_time": stamp(local(2025, 3, 3)), "end_time": stamp(local(2025, 3, 7))}
    for _ in range(2):
        await _assert_blocks_on_grid(pool, community, LONDON, "PT15M")
        assert _totals(await community.summaries(interval="P1D", **span)) == (80, 100, 80)
        assert _totals(await community.summaries(interval="PT15M", **span)) == (80, 100, 80)
        await drain(consumer)  # the range the change queued: the same results


async def test_a_reader_sees_the_old_grid_until_the_new_one_commits(
    community: Community, consumer: BalancingQueueConsumer, pool: asyncpg.Pool
) -> None:
    await _one_shared_interval(community, consumer)
    await _update_site(community, balance_resolution="P1M")
    month = {"start_time": stamp(local(2025, 3, 1)), "end_time": stamp(local(2025, 4, 1))}
    seen: list[tuple[int, int, int]] = []

    async def read_before_commit(site_id: UUID) -> None:
        # Another connection, while the pass holds its writes uncommitted.
        seen.append(_totals(await community.summaries(interval="P1M", **month)))

    consumer.before_commit = read_before_commit
    try:
        await asyncio.wait_for(drain(consumer), 30)
    finally:
        consumer.before_commit = None
    assert seen == [(40, 50, 40)]
    assert _totals(await community.summaries(interval="P1M", **month)) == (40, 50, 40)


async def test_results_away_from_the_readings_move_to_the_new_grid_too(
    community: Community, consumer: BalancingQueueConsumer, pool: asyncpg.Pool
) -> None:
    await _one_shared_interval(community, consumer)
    # A day re-balanced without any reading: incomplete results, months from the readings.
    june = local(2025, 6, 2)
    await community.balancing.RunBalancing(
        bpb.RunBalancingRequest(
            site_id=community.site.id, start_time=stamp(june), end_time=stamp(june + Q)
        ),
        metadata=community.org.auth,
    )
    await _update_site(community, timezone="Europe/London")
    await drain(consumer)
    bounds = await _assert_blocks_on_grid(pool, community, LONDON, "PT15M")
    # The two runs of results stay two: the months between get no blocks.
    assert [start.astimezone(LONDON).date() for start, _ in bounds] == [
        date(2025, 3, 3),
        date(2025, 3, 4),
        date(2025, 6, 1),
        date(2025, 6, 2),
    ]
