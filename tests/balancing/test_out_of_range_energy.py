"""Energy beyond what the engine computes exactly never makes balancing fail.

A review found that one absurd reading (2e16 Wh in a quarter-hour, a unit mix-up) made
RunBalancing answer INTERNAL and the worker fail the site's whole pass again and again.
Ingest now refuses such readings; what was stored before, and energy that accepted input
can still make too large (a register jump, a transformer factor stored before the API bounded
it), leaves just its interval
unbalanced and counted as out of range, and the rest of the site is balanced.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from openvpp.v1 import balancing_pb2 as bpb
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import telemetry_pb2 as tpb

from service.app import Service
from service.balancing.engine import MAX_INTERVAL_WH
from service.balancing.worker import BalancingQueueConsumer
from service.db.balancing_queue import enqueue_balancing
from service.grid import PT1H
from service.telemetry.domain import max_interval_wh
from tests.balancing.conftest import Community, drain, stamp

BERLIN = ZoneInfo("Europe/Berlin")
Q = timedelta(minutes=15)


def local(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=BERLIN).astimezone(UTC)


AT = local(2025, 3, 4, 10)


@pytest.fixture
def pool(service: Service) -> asyncpg.Pool:
    assert service.pool is not None
    return service.pool


async def run_balancing(
    community: Community, start: datetime, end: datetime
) -> bpb.RunBalancingResponse:
    """RunBalancing of [start, end): any error fails the test, INTERNAL above all."""
    request = bpb.RunBalancingRequest(
        site_id=community.site.id, start_time=stamp(start), end_time=stamp(end)
    )
    response: bpb.RunBalancingResponse = await community.balancing.RunBalancing(
        request, metadata=community.org.auth
    )
    return response


async def summary_at(community: Community, at: datetime) -> bpb.BalanceSummary:
    [summary] = await community.summaries(
        interval="PT15M", start_time=stamp(at), end_time=stamp(at + Q)
    )
    return summary


async def three_meters(community: Community) -> tuple[mpb.Meter, mpb.Meter, mpb.Meter]:
    """Two consumers and a producer, taking part, with plain readings in AT and the two
    quarter-hours after it (a 50 Wh, b 30 Wh, pv 40 Wh)."""
    a, b, pv = await community.participants(
        mpb.METER_DIRECTION_CONSUMER, mpb.METER_DIRECTION_CONSUMER, mpb.METER_DIRECTION_PRODUCER
    )
    for meter, value in ((a, 50.0), (b, 30.0), (pv, 40.0)):
        await community.profile(meter, AT, [value] * 3)
    return a, b, pv


async def test_an_absurd_reading_is_refused_and_the_site_still_balances(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    """The review's case: a unit mix-up in every meter's reading of one quarter-hour."""
    a, b, pv = await community.participants(
        mpb.METER_DIRECTION_CONSUMER, mpb.METER_DIRECTION_CONSUMER, mpb.METER_DIRECTION_PRODUCER
    )
    readings = [
        tpb.Reading(meter_id=meter.id, timestamp=stamp(AT), interval_wh=value)
        for meter, value in ((a, 2.01e16), (b, 5.07e16), (pv, 9.71e16))
    ]
    response = await community.telemetry.IngestReadings(
        tpb.IngestReadingsRequest(batch=tpb.ReadingBatch(batch_id="mix-up", readings=readings)),
        metadata=community.org.auth,
    )
    assert [r.reason for r in response.ack.rejected] == [tpb.REJECT_REASON_VALUE_TOO_LARGE] * 3
    assert response.ack.accepted_count == 0
    answer = await run_balancing(community, AT, AT + Q)
    # Nothing was stored: the interval lacks its readings, nothing is out of range.
    assert (answer.balanced_intervals, answer.incomplete_intervals) == (0, 1)
    assert answer.out_of_range_intervals == 0
    await drain(consumer)
    assert consumer.held_back() == []


async def test_stored_energy_beyond_the_exact_range_leaves_only_its_interval_unbalanced(
    community: Community, consumer: BalancingQueueConsumer, pool: asyncpg.Pool
) -> None:
    """Values stored before ingest bounded them: the review's 2e16 Wh in AT, and in the
    quarter-hour after it a value whose whole Wh would wrap around in int64 (balanced as 0
    Wh before). The third quarter-hour is plain and is balanced as usual, by RunBalancing
    and by the worker, which neither fails nor holds the site back."""
    a, b, pv = await three_meters(community)
    await drain(consumer)
    stored_before_the_bound = [(a, AT, 2.01e16), (b, AT, 5.07e16), (pv, AT, 9.71e16)]
    stored_before_the_bound.append((pv, AT + Q, 9.3e18))
    async with pool.acquire() as conn, conn.transaction():
        for meter, at, value in stored_before_the_bound:
            changed = await conn.execute(
                "UPDATE readings SET value_wh = $3 WHERE meter_id = $1 AND ts = $2",
                uuid.UUID(meter.id),
                at,
                value,
            )
            assert changed == "UPDATE 1"
        await enqueue_balancing(
            conn, community.org.id, [(uuid.UUID(community.site.id), AT, AT + 3 * Q)]
        )

    assert await drain(consumer) == 1
    assert consumer.held_back() == []
    assert consumer.last_result is not None
    assert consumer.last_result.out_of_range == 2
    assert consumer.last_result.first_out_of_range == AT

    answer = await run_balancing(community, AT, AT + 3 * Q)
    assert (answer.balanced_intervals, answer.incomplete_intervals) == (1, 2)
    assert answer.out_of_range_intervals == 2
    for at in (AT, AT + Q):
        unbalanced = await summary_at(community, at)
        assert (unbalanced.complete_intervals, unbalanced.production_wh) == (0, 0)
    plain = await summary_at(community, AT + 2 * Q)
    assert plain.complete_intervals == 1
    assert (plain.production_wh, plain.demand_wh, plain.shared_wh) == (40, 80, 40)

    # A correction of the readings balances the interval again.
    await community.profile(pv, AT + Q, [40.0])
    await drain(consumer)
    assert (await summary_at(community, AT + Q)).shared_wh == 40


async def test_a_register_jump_beyond_the_exact_range_leaves_its_interval_unbalanced(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    """A register may jump (a replaced meter, a first reading after years): accepted up to
    1e15 Wh, its interval energy can exceed the engine's range."""
    a = await community.meter()
    pv = await community.meter(
        direction=mpb.METER_DIRECTION_PRODUCER, measuring=mpb.MEASURING_READINGS_ACCURATE
    )
    for meter in (a, pv):
        await community.participate(meter)
    await community.profile(a, AT, [50.0, 50.0])
    registers = [0.0, 40.0, 40.0 + 1e13]
    await community.ingest(
        [
            tpb.Reading(meter_id=pv.id, timestamp=stamp(AT + i * Q), register_wh=value)
            for i, value in enumerate(registers)
        ]
    )
    assert MAX_INTERVAL_WH < 1e13
    await drain(consumer)
    assert consumer.held_back() == []
    answer = await run_balancing(community, AT, AT + 2 * Q)
    assert (answer.balanced_intervals, answer.out_of_range_intervals) == (1, 1)
    assert (await summary_at(community, AT)).shared_wh == 40
    assert (await summary_at(community, AT + Q)).complete_intervals == 0


async def store_factor(pool: asyncpg.Pool, meter: mpb.Meter, factor: float) -> None:
    """A factor stored before the API bounded it (at most 1e8): balancing still meets it."""
    changed = await pool.execute(
        "UPDATE meters SET transformer_factor = $2 WHERE id = $1", uuid.UUID(meter.id), factor
    )
    assert changed == "UPDATE 1"


@pytest.mark.parametrize("factor", [1e300, 1e308])
async def test_a_transformer_factor_beyond_the_exact_range_leaves_the_meter_unbalanced(
    community: Community, consumer: BalancingQueueConsumer, pool: asyncpg.Pool, factor: float
) -> None:
    """The factor multiplies every reading: 1e300 makes 4e301 Wh, 1e308 an infinity."""
    *_, pv = await three_meters(community)
    await drain(consumer)
    await store_factor(pool, pv, factor)
    await drain(consumer)
    assert consumer.held_back() == []
    answer = await run_balancing(community, AT, AT + 3 * Q)
    assert (answer.balanced_intervals, answer.out_of_range_intervals) == (0, 3)
    assert answer.incomplete_intervals == 3


async def test_watch_balances_counts_the_intervals_out_of_range(
    community: Community, consumer: BalancingQueueConsumer, pool: asyncpg.Pool
) -> None:
    *_, pv = await three_meters(community)
    await drain(consumer)
    stream = community.balancing.WatchBalances(
        bpb.WatchBalancesRequest(site_id=community.site.id), metadata=community.org.auth
    )
    await stream.initial_metadata()
    # 1e300 times every reading of the producer: its three intervals out of range.
    await store_factor(pool, pv, 1e300)
    async with pool.acquire() as conn:
        await enqueue_balancing(
            conn, community.org.id, [(uuid.UUID(community.site.id), AT, AT + 3 * Q)]
        )
    await drain(consumer)
    async with asyncio.timeout(10):
        event = await stream.read()
    stream.cancel()
    assert isinstance(event, bpb.WatchBalancesResponse)
    # Every interval of the queued range is incomplete, the three with readings because
    # they are out of range, any other for want of readings.
    start = event.start_time.ToDatetime(UTC)
    end = event.end_time.ToDatetime(UTC)
    assert start <= AT
    assert end >= AT + 3 * Q
    assert event.balanced_intervals == 0
    assert event.incomplete_intervals == (end - start) // Q
    assert event.out_of_range_intervals == 3


async def test_the_largest_reading_a_pt1h_site_accepts_is_balanced(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    # Ingest's bound for an hour must lie inside the engine's exact range: a reading it
    # accepts is never left unbalanced as out of range (it once accepted up to 1e10 Wh).
    hourly = await community.another_site(balance_resolution="PT1H")
    load, plant = await hourly.participants(
        mpb.METER_DIRECTION_CONSUMER, mpb.METER_DIRECTION_PRODUCER
    )
    at = datetime(2025, 3, 4, 10, tzinfo=UTC)
    largest = max_interval_wh(PT1H)
    assert largest <= MAX_INTERVAL_WH
    ack = await hourly.ingest(
        [
            tpb.Reading(meter_id=load.id, timestamp=stamp(at), interval_wh=100.0),
            tpb.Reading(meter_id=plant.id, timestamp=stamp(at), interval_wh=largest),
        ]
    )
    assert ack.accepted_count == 2
    await drain(consumer)
    answer = await run_balancing(hourly, at, at + timedelta(hours=1))
    assert (answer.balanced_intervals, answer.out_of_range_intervals) == (1, 0)
