"""Ingest racing other writers: a meter deleted meanwhile, a stream's batches held up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import site_registry_pb2 as spb
from openvpp.v1 import telemetry_pb2 as tpb

from service.app import Service
from service.telemetry.energy import FLOW_IMPORT
from service.telemetry.store import upsert_staged_rows
from tests.helpers import eventually, wait_until_blocked
from tests.telemetry.conftest import METER_START, Setup, interval, quarter, register

R = tpb.RejectReason

ReadingOf = Callable[[mpb.Meter, datetime, float], tpb.Reading]


# A meter of each kind: register meters are locked for their register check, the others
# only against their deletion.
EACH_KIND_OF_METER = pytest.mark.parametrize(
    ("measuring", "reading"),
    [
        (mpb.MEASURING_READINGS_ACCURATE, register),
        (mpb.MEASURING_LOAD_PROFILE_ACCURATE, interval),
    ],
    ids=["register", "load_profile"],
)


async def orphaned_readings(service: Service, meter: mpb.Meter) -> int:
    """Readings left of a meter that is gone (no foreign key would refuse them)."""
    assert service.pool is not None
    count: int = await service.pool.fetchval(
        "SELECT count(*) FROM readings r WHERE r.meter_id = $1"
        " AND NOT EXISTS (SELECT 1 FROM meters m WHERE m.id = r.meter_id)",
        uuid.UUID(meter.id),
    )
    return count


async def stored_value(service: Service, meter: mpb.Meter, at: datetime) -> float | None:
    assert service.pool is not None
    value: float | None = await service.pool.fetchval(
        "SELECT value_wh FROM readings WHERE meter_id = $1 AND ts = $2", uuid.UUID(meter.id), at
    )
    return value


def batch(batch_id: str, readings: list[tpb.Reading]) -> tpb.StreamReadingsRequest:
    return tpb.StreamReadingsRequest(batch=tpb.ReadingBatch(batch_id=batch_id, readings=readings))


async def read_ack(call: Any) -> tpb.ReadingBatchAck:
    response = await call.read()
    assert isinstance(response, tpb.StreamReadingsResponse), response
    return response.ack


@EACH_KIND_OF_METER
async def test_a_reading_of_a_meter_deleted_meanwhile_is_unknown_and_not_stored(
    setup: Setup, service: Service, measuring: int, reading: ReadingOf
) -> None:
    assert service.pool is not None
    meter = await setup.meter(measuring=measuring)
    # Cached now: the batch below passes validation on the cached context.
    first = await setup.ingest([reading(meter, quarter(0), 1.0)])
    assert first.accepted_count == 1
    async with service.pool.acquire() as conn:
        holding = conn.transaction()
        await holding.start()
        # DeleteMeter gets as far as queueing the range of the readings it deleted: the
        # meter row is deleted but not yet committed while the batch arrives.
        await conn.execute("LOCK TABLE balancing_queue IN SHARE ROW EXCLUSIVE MODE")
        deleting = asyncio.ensure_future(
            setup.meters.DeleteMeter(
                mpb.DeleteMeterRequest(meter_id=meter.id), metadata=setup.org.auth
            )
        )
        await wait_until_blocked(conn, 1, deleting)
        ingesting = asyncio.ensure_future(setup.ingest([reading(meter, quarter(1), 2.0)]))
        await wait_until_blocked(conn, 2, deleting, ingesting)
        await holding.rollback()
    await asyncio.wait_for(deleting, 10)
    ack = await asyncio.wait_for(ingesting, 10)
    assert {r.index: r.reason for r in ack.rejected} == {0: R.REJECT_REASON_UNKNOWN_METER}
    assert ack.accepted_count == 0
    assert await orphaned_readings(service, meter) == 0
    # The meter is gone from the cache too: the next batch does not wait to find out.
    again = await setup.ingest([reading(meter, quarter(2), 3.0)])
    assert {r.index: r.reason for r in again.rejected} == {0: R.REJECT_REASON_UNKNOWN_METER}


@dataclass
class HeldUp:
    """A stream whose first batch (a register meter's reading and a load profile's value
    100 at quarter 0) is held up in its transaction by another writer of the register."""

    profile: mpb.Meter
    call: Any
    holding: Any


@contextlib.asynccontextmanager
async def first_batch_held_up(setup: Setup, service: Service) -> AsyncIterator[HeldUp]:
    """Releases the first batch when the block ends."""
    assert service.pool is not None
    held = await setup.meter()
    profile = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
    call = setup.telemetry.StreamReadings(metadata=setup.org.auth)
    async with service.pool.acquire() as conn:
        holding = conn.transaction()
        await holding.start()
        try:
            await conn.execute("SELECT FROM meters WHERE id = $1 FOR UPDATE", uuid.UUID(held.id))
            await call.write(
                batch(
                    "first",
                    [register(held, quarter(0), 1.0), interval(profile, quarter(0), 100.0)],
                )
            )
            await wait_until_blocked(conn, 1)
            yield HeldUp(profile, call, holding)
        finally:
            await holding.rollback()


async def not_stored_meanwhile(service: Service, meter: mpb.Meter) -> None:
    """Time for a batch that did not wait for the held-up one to commit, which the first
    one's older value would then overwrite; nothing of the key is stored yet."""
    await asyncio.sleep(0.5)
    assert await stored_value(service, meter, quarter(0)) is None


async def test_a_later_batch_on_a_stream_is_not_overwritten_by_an_earlier_one_held_up(
    setup: Setup, service: Service
) -> None:
    unrelated = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
    async with first_batch_held_up(setup, service) as scene:
        profile, call = scene.profile, scene.call
        # The client's later value of the same key.
        await call.write(batch("second", [interval(profile, quarter(0), 90.0)]))
        # A batch sharing no meter with the held-up one is not held up; larger than the
        # second, so that (without an order of writes) the second has committed by the time
        # this one is stored.
        await call.write(batch("third", [interval(unrelated, quarter(n), 5.0) for n in range(96)]))

        async def third_stored() -> bool:
            return await stored_value(service, unrelated, quarter(95)) == 5.0

        await eventually(third_stored, "the batch sharing no meter stored")
    acks = [await asyncio.wait_for(read_ack(call), 10) for _ in range(3)]
    await call.done_writing()
    assert await stored_value(service, profile, quarter(0)) == 90.0
    assert [a.batch_id for a in acks] == ["first", "second", "third"]
    assert [(a.accepted_count, a.corrected_count) for a in acks] == [(2, 0), (0, 1), (96, 0)]


async def test_a_batch_whose_readings_are_all_rejected_keeps_the_write_order(
    setup: Setup, service: Service
) -> None:
    # The second batch names the meter but has nothing to write: the third, which waits
    # for it, must still write after the first.
    async with first_batch_held_up(setup, service) as scene:
        profile, call = scene.profile, scene.call
        await call.write(batch("refused", [interval(profile, quarter(1), -1.0)]))
        await call.write(batch("later", [interval(profile, quarter(0), 90.0)]))
        await not_stored_meanwhile(service, profile)
    acks = [await asyncio.wait_for(read_ack(call), 10) for _ in range(3)]
    await call.done_writing()
    assert [a.batch_id for a in acks] == ["first", "refused", "later"]
    assert {r.index: r.reason for r in acks[1].rejected} == {0: R.REJECT_REASON_NEGATIVE_VALUE}
    assert [(a.accepted_count, a.corrected_count) for a in acks] == [(2, 0), (0, 0), (0, 1)]
    assert await stored_value(service, profile, quarter(0)) == 90.0


async def resend_on_a_new_stream(setup: Setup, later: tpb.Reading) -> tpb.ReadingBatchAck:
    again = setup.telemetry.StreamReadings(metadata=setup.org.auth)
    await again.write(batch("later", [later]))
    ack = await read_ack(again)
    await again.done_writing()
    return ack


async def resend_by_ingest_readings(setup: Setup, later: tpb.Reading) -> tpb.ReadingBatchAck:
    return await setup.ingest([later], "later")


@pytest.mark.parametrize(
    "resend", [resend_on_a_new_stream, resend_by_ingest_readings], ids=["stream", "unary"]
)
async def test_a_batch_left_running_by_a_dropped_stream_writes_before_the_resent_ones(
    setup: Setup,
    service: Service,
    resend: Callable[[Setup, tpb.Reading], Awaitable[tpb.ReadingBatchAck]],
) -> None:
    # The client's stream broke before the ack; it reconnects and sends its later value.
    # The batch of the gone stream still runs to its commit, and must not commit last.
    async with first_batch_held_up(setup, service) as scene:
        profile = scene.profile
        scene.call.cancel()
        resent = asyncio.ensure_future(resend(setup, interval(profile, quarter(0), 90.0)))
        await not_stored_meanwhile(service, profile)
    ack = await asyncio.wait_for(resent, 10)
    assert ack.batch_id == "later"
    assert ack.corrected_count == 1
    assert await stored_value(service, profile, quarter(0)) == 90.0


@EACH_KIND_OF_METER
async def test_a_site_deleted_while_a_batch_of_its_meter_is_in_flight_is_deleted(
    setup: Setup, service: Service, measuring: int, reading: ReadingOf
) -> None:
    assert service.pool is not None
    meter = await setup.meter(measuring=measuring)
    async with service.pool.acquire() as conn:
        holding = conn.transaction()
        await holding.start()
        # The batch holds its meter and waits to queue its range (the queue's foreign key
        # then needs the site) while the site's deletion comes in.
        await conn.execute("LOCK TABLE balancing_queue IN SHARE ROW EXCLUSIVE MODE")
        ingesting = asyncio.ensure_future(setup.ingest([reading(meter, quarter(0), 1.0)]))
        await wait_until_blocked(conn, 1, ingesting)
        deleting = asyncio.ensure_future(
            setup.registry.DeleteSite(
                spb.DeleteSiteRequest(site_id=setup.site.id), metadata=setup.org.auth
            )
        )
        await wait_until_blocked(conn, 2, ingesting, deleting)
        await holding.rollback()
    # Neither is aborted: the deletion waits for the batch, then deletes it with the site.
    ack = await asyncio.wait_for(ingesting, 10)
    await asyncio.wait_for(deleting, 10)
    assert ack.accepted_count == 1
    assert await stored_value(service, meter, quarter(0)) is None
    assert await orphaned_readings(service, meter) == 0


async def test_a_correction_after_a_rolled_back_one_on_the_same_connection_is_stored(
    setup: Setup, service: Service
) -> None:
    # Corrections go through the connection's staging table; a transaction that made it
    # and then rolled back must not leave the next one without it.
    assert service.pool is not None
    meter = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
    assert (await setup.ingest([interval(meter, quarter(0), 1.0)])).accepted_count == 1
    at_us = int(quarter(0).timestamp() * 1_000_000)
    correction = [(uuid.UUID(meter.id), FLOW_IMPORT, at_us, 2.0)]
    async with service.pool.acquire() as conn:
        # Whatever earlier batches left on this connection goes: the first transaction
        # below makes the staging table.
        await conn.execute("DISCARD TEMP")
        rolled_back = conn.transaction()
        await rolled_back.start()
        assert await upsert_staged_rows(conn, correction, ingest_id=1) == (0, 1)
        await rolled_back.rollback()
        async with conn.transaction():
            assert await upsert_staged_rows(conn, correction, ingest_id=2) == (0, 1)
    assert await stored_value(service, meter, quarter(0)) == 2.0


# Each change is made in SQL, with no NOTIFY: the cache has not heard of it yet, as on a
# replica whose NOTIFY is still on its way when the batch comes in.
@EACH_KIND_OF_METER
async def test_a_batch_is_judged_on_the_meter_dates_an_update_committed_meanwhile(
    setup: Setup, service: Service, measuring: int, reading: ReadingOf
) -> None:
    assert service.pool is not None
    meter = await setup.meter(measuring=measuring)
    assert (await setup.ingest([reading(meter, quarter(0), 1.0)])).accepted_count == 1
    await service.pool.execute(
        "UPDATE meters SET end_date = $2, updated_at = clock_timestamp() WHERE id = $1",
        uuid.UUID(meter.id),
        quarter(4),
    )
    ack = await setup.ingest([reading(meter, quarter(2), 2.0), reading(meter, quarter(6), 3.0)])
    assert {r.index: r.reason for r in ack.rejected} == {1: R.REJECT_REASON_OUTSIDE_METER_DATES}
    assert ack.accepted_count == 1
    assert await stored_value(service, meter, quarter(2)) == 2.0
    assert await stored_value(service, meter, quarter(6)) is None


async def test_a_batch_is_judged_on_the_site_grid_an_update_committed_meanwhile(
    setup: Setup, service: Service
) -> None:
    assert service.pool is not None
    meter = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
    assert (await setup.ingest([interval(meter, quarter(0), 1.0)])).accepted_count == 1
    await service.pool.execute(
        "UPDATE sites SET balance_resolution = 'PT1H', updated_at = clock_timestamp()"
        " WHERE id = $1",
        uuid.UUID(setup.site.id),
    )
    ack = await setup.ingest([interval(meter, quarter(4), 2.0), interval(meter, quarter(5), 3.0)])
    assert {r.index: r.reason for r in ack.rejected} == {1: R.REJECT_REASON_NOT_ON_GRID}
    assert await stored_value(service, meter, quarter(4)) == 2.0
    assert await stored_value(service, meter, quarter(5)) is None


async def test_a_meter_dated_to_the_microsecond_is_not_taken_for_changed(
    setup: Setup, service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    assert service.pool is not None
    meter = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
    await service.pool.execute(
        "UPDATE meters SET start_date = $2, end_date = $3 WHERE id = $1",
        uuid.UUID(meter.id),
        METER_START + timedelta(microseconds=123_457),
        quarter(40) + timedelta(microseconds=999_999),
    )
    # Loaded into the cache fresh, then compared with what the lock reads.
    assert service.telemetry_servicer is not None
    service.telemetry_servicer.ingest.meters.forget_all()
    caplog.set_level(logging.INFO, "service.telemetry.ingest")
    ack = await setup.ingest([interval(meter, quarter(n), 1.0) for n in range(3)])
    assert ack.accepted_count == 3
    assert "updated meanwhile" not in caplog.text


async def test_each_spelling_of_a_meter_id_is_judged_on_the_meter_as_stored_now(
    setup: Setup, service: Service
) -> None:
    # The cache holds a context per spelling: one cached before the change, one after.
    assert service.pool is not None
    meter = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
    upper = mpb.Meter(id=meter.id.upper())
    assert (await setup.ingest([interval(upper, quarter(0), 1.0)])).accepted_count == 1
    await service.pool.execute(
        "UPDATE meters SET end_date = $2 WHERE id = $1", uuid.UUID(meter.id), quarter(4)
    )
    ack = await setup.ingest([interval(upper, quarter(6), 2.0), interval(meter, quarter(2), 2.0)])
    assert {r.index: r.reason for r in ack.rejected} == {0: R.REJECT_REASON_OUTSIDE_METER_DATES}
    assert await stored_value(service, meter, quarter(6)) is None
    assert await stored_value(service, meter, quarter(2)) == 2.0
