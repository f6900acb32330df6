"""The queue consumer under concurrency and failure: two consumers on one queue, a pass
cancelled or its backend terminated mid-transaction, and the worker of a running server
woken by the ingest's NOTIFY, its commits streamed by WatchBalances."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from openvpp.v1 import balancing_pb2 as bpb
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import telemetry_pb2 as tpb

from service.app import Service
from service.balancing.worker import MAX_ANNOUNCED_RANGES, BalancingQueueConsumer
from service.db.balancing_queue import enqueue_balancing
from tests.balancing.conftest import Community, by_pair, community_site_request, drain, stamp
from tests.conftest import test_settings as server_settings

BERLIN = ZoneInfo("Europe/Berlin")
Q = timedelta(minutes=15)
DAY = datetime(2025, 5, 6, tzinfo=BERLIN).astimezone(UTC)


async def queued(pool: asyncpg.Pool, site_id: str) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM balancing_queue WHERE site_id = $1", UUID(site_id)
    )
    return count


async def stored(pool: asyncpg.Pool, site_id: str) -> list[bytes]:
    rows = await pool.fetch(
        "SELECT shared_wh FROM balance_blocks WHERE site_id = $1 ORDER BY block_start",
        UUID(site_id),
    )
    return [row["shared_wh"] for row in rows]


async def small_site(community: Community, demand: float = 40) -> tuple[mpb.Meter, mpb.Meter]:
    home = await community.meter()
    pv = await community.meter(direction=mpb.METER_DIRECTION_PRODUCER)
    await community.participate(home)
    await community.participate(pv)
    await community.profile(home, DAY, [demand] * 4)
    await community.profile(pv, DAY, [30] * 4)
    return home, pv


async def small_site_balances(community: Community) -> dict[tuple[datetime, str, str], int]:
    """The four quarter-hours of :func:`small_site`, by (interval, creditor, debitor)."""
    return by_pair(
        await community.balances(
            site_id=community.site.id,
            interval="PT15M",
            start_time=stamp(DAY),
            end_time=stamp(DAY + 4 * Q),
        )
    )


class Held:
    """A ``before_commit`` hook that parks the pass inside its transaction until released."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, site_id: UUID) -> None:
        self.reached.set()
        await self.release.wait()


@pytest.fixture
def pool(service: Service) -> asyncpg.Pool:
    assert service.pool is not None
    return service.pool


async def test_two_consumers_on_one_queue_never_balance_one_site_at_once(
    community: Community, consumer: BalancingQueueConsumer, pool: asyncpg.Pool
) -> None:
    home, pv = await small_site(community)
    first = BalancingQueueConsumer(pool)
    second = BalancingQueueConsumer(pool)
    held = Held()
    first.before_commit = held
    running = asyncio.create_task(first.step())
    try:
        await asyncio.wait_for(held.reached.wait(), 10)
        # Every row of the site is claimed by the first: the second finds nothing to do.
        assert await second.step() is False
        # A correction committed meanwhile is queued anew; the second claims it and waits
        # for the site's lock instead of balancing the site at the same time.
        await community.profile(pv, DAY, [10])
        later = asyncio.create_task(second.step())
        await asyncio.sleep(0.3)
        assert not later.done()
        held.release.set()
        assert await running is True
        assert await asyncio.wait_for(later, 10) is True
    finally:
        held.release.set()
        running.cancel()
    assert await queued(pool, community.site.id) == 0
    cells = await small_site_balances(community)
    # The second pass ran after the first committed and saw the corrected reading.
    assert cells[(DAY, pv.id, home.id)] == 10
    assert cells[(DAY + Q, pv.id, home.id)] == 30


async def test_many_sites_drained_by_two_consumers_all_balanced(
    community: Community, consumer: BalancingQueueConsumer, pool: asyncpg.Pool
) -> None:
    others = []
    for index in range(4):
        extra = Community(
            community.org,
            (
                await community.registry.CreateSite(
                    community_site_request(),
                    metadata=community.org.auth,
                )
            ).site,
            community.registry,
            community.meters,
            community.telemetry,
            community.balancing,
        )
        await small_site(extra, demand=20 + index)
        others.append(extra)
    first, second = BalancingQueueConsumer(pool), BalancingQueueConsumer(pool)
    sites: list[UUID] = []

    async def run(worker: BalancingQueueConsumer) -> None:
        while await worker.step():
            assert worker.last_site is not None
            sites.append(worker.last_site)

    await asyncio.gather(run(first), run(second))
    # Every site balanced (a site whose rows were split between the two claims may be
    # balanced twice, one pass after the other, never both at once).
    assert {o.site.id for o in others} <= {str(s) for s in sites}
    for extra in others:
        assert await queued(pool, extra.site.id) == 0
        assert len(await stored(pool, extra.site.id)) == 1


@pytest.mark.parametrize("how", ["cancel", "terminate"])
async def test_a_pass_killed_mid_transaction_leaves_rows_queued_and_results_unchanged(
    community: Community, consumer: BalancingQueueConsumer, pool: asyncpg.Pool, how: str
) -> None:
    _home, pv = await small_site(community)
    await drain(consumer)
    before = await stored(pool, community.site.id)
    assert len(before) == 1
    await community.profile(pv, DAY, [5, 5, 5, 5])
    waiting = await queued(pool, community.site.id)
    assert waiting > 0

    worker = BalancingQueueConsumer(pool)
    held = Held()
    worker.before_commit = held
    running = asyncio.create_task(worker.step())
    await asyncio.wait_for(held.reached.wait(), 10)
    if how == "cancel":
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    else:
        # The backend holding the claim dies (a crashed replica or a lost connection).
        killed = await pool.fetchval(
            """
            SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l
            WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_backend_pid()
              AND l.pid IN (SELECT pid FROM pg_locks WHERE relation = 'balancing_queue'::regclass)
            """
        )
        assert killed >= 1
        held.release.set()
        with pytest.raises(
            (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)
        ):
            await running
    assert await queued(pool, community.site.id) == waiting
    assert await stored(pool, community.site.id) == before
    # The next pass picks the rows up and commits the new results.
    await drain(consumer)
    assert await queued(pool, community.site.id) == 0
    assert await stored(pool, community.site.id) != before


async def test_a_failing_site_is_held_back_and_the_others_still_balanced(
    community: Community, consumer: BalancingQueueConsumer, pool: asyncpg.Pool
) -> None:
    await small_site(community)
    other = Community(
        community.org,
        (
            await community.registry.CreateSite(
                community_site_request(), metadata=community.org.auth
            )
        ).site,
        community.registry,
        community.meters,
        community.telemetry,
        community.balancing,
    )
    await small_site(other)
    failing = UUID(community.site.id)
    worker = BalancingQueueConsumer(pool)

    async def fail_for_one_site(site_id: UUID) -> None:
        if site_id == failing:
            raise RuntimeError("simulated failure while balancing this site")

    worker.before_commit = fail_for_one_site
    with pytest.raises(RuntimeError):
        await worker.step()
    assert worker.held_back() == [failing]
    waiting = await queued(pool, community.site.id)
    assert waiting > 0
    # The failed site's rows are older, yet the next pass balances the other site.
    assert await worker.step() is True
    assert worker.last_site == UUID(other.site.id)
    assert await queued(pool, other.site.id) == 0
    assert await queued(pool, community.site.id) == waiting
    # Nothing else queued (of this test): the held-back site waits for its turn.
    while await worker.step():
        assert worker.last_site != failing
    worker.before_commit = None
    await drain(consumer)
    assert await queued(pool, community.site.id) == 0


@pytest.fixture
async def balancing_server(database_url: str, service: Service) -> AsyncIterator[Service]:
    """A second server whose balancing worker runs (woken by NOTIFY, polling as fallback)."""
    running = Service(server_settings(balancing_poll_seconds=30), database_url)
    await running.start()
    yield running
    await running.stop(grace=1)


async def test_the_worker_wakes_on_ingest_and_watch_balances_streams_the_commit(
    community: Community, balancing_server: Service
) -> None:
    stream = community.balancing.WatchBalances(
        bpb.WatchBalancesRequest(site_id=community.site.id), metadata=community.org.auth
    )
    await stream.initial_metadata()
    home, pv = await small_site(community)
    seen = 0
    async with asyncio.timeout(20):
        while seen < 4:
            event = await stream.read()
            assert isinstance(event, bpb.WatchBalancesResponse)
            assert event.site_id == community.site.id
            seen += event.balanced_intervals
    stream.cancel()
    cells = by_pair(
        await community.balances(
            debitor_meter_id=home.id, start_time=stamp(DAY), end_time=stamp(DAY + Q)
        )
    )
    assert cells[(DAY, pv.id, home.id)] == 30
    assert cells[(DAY, "GRID", home.id)] == 10

    response = await community.balancing.RunBalancing(
        bpb.RunBalancingRequest(
            site_id=community.site.id, start_time=stamp(DAY), end_time=stamp(DAY + 8 * Q)
        ),
        metadata=community.org.auth,
    )
    assert (response.balanced_intervals, response.incomplete_intervals) == (4, 4)


async def test_a_queued_range_holding_no_interval_start_rebalances_the_intervals_it_overlaps(
    community: Community, consumer: BalancingQueueConsumer, pool: asyncpg.Pool
) -> None:
    # Queued by a replica whose cached grid was stale, or clipped to a settings range that
    # starts inside an interval: the interval it lies in is still to be re-balanced.
    home, pv = await small_site(community)
    await drain(consumer)
    await community.profile(pv, DAY, [10])
    site_id = UUID(community.site.id)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM balancing_queue WHERE site_id = $1", site_id)
        await enqueue_balancing(
            conn,
            community.org.id,
            [(site_id, DAY + timedelta(minutes=5), DAY + timedelta(minutes=10))],
        )
    assert await drain(consumer) == 1
    cells = await small_site_balances(community)
    assert cells[(DAY, pv.id, home.id)] == 10
    assert cells[(DAY + Q, pv.id, home.id)] == 30


async def test_one_pass_over_many_scattered_ranges_announces_a_bounded_cover(
    community: Community, consumer: BalancingQueueConsumer, service: Service
) -> None:
    """A daily register over three years queues 1,100 disjoint ranges; their pass commits
    once. Announced one message each, they overflowed every watcher's buffer at once."""
    assert len(range(1100)) > service.settings.watch_buffer_size
    start = datetime(2022, 1, 1, tzinfo=UTC)
    meter = await community.meter(measuring=mpb.MEASURING_READINGS_ACCURATE, start=start)
    await community.ingest(
        [
            tpb.Reading(
                meter_id=meter.id, timestamp=stamp(start + timedelta(days=d)), register_wh=float(d)
            )
            for d in range(1, 1101)
        ]
    )
    assert service.pool is not None
    assert await queued(service.pool, community.site.id) > MAX_ANNOUNCED_RANGES
    stream = community.balancing.WatchBalances(
        bpb.WatchBalancesRequest(site_id=community.site.id), metadata=community.org.auth
    )
    await stream.initial_metadata()
    await drain(consumer)
    announced: list[tuple[datetime, datetime]] = []
    with contextlib.suppress(TimeoutError):
        while True:
            event = await asyncio.wait_for(stream.read(), 2.0)
            assert isinstance(event, bpb.WatchBalancesResponse)
            announced.append((event.start_time.ToDatetime(UTC), event.end_time.ToDatetime(UTC)))
    # Still open (the last read timed out), and what was re-balanced is covered.
    assert 1 <= len(announced) <= MAX_ANNOUNCED_RANGES
    assert announced == sorted(announced)
    assert announced[0][0] <= start + timedelta(days=1)
    assert announced[-1][1] >= start + timedelta(days=1099)
    stream.cancel()
