from __future__ import annotations

import asyncio
import gc
import logging
import math
import uuid
import weakref
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import grpc
import pytest
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import meter_registry_pb2_grpc, site_registry_pb2_grpc, telemetry_pb2_grpc
from openvpp.v1 import site_registry_pb2 as spb
from openvpp.v1 import telemetry_pb2 as tpb

from service.app import Service
from tests.conftest import Org
from tests.helpers import expect_invalid, wait_until_blocked
from tests.telemetry.conftest import (
    METER_START,
    Setup,
    interval,
    make_setup,
    quarter,
    register,
    stamp,
)

R = tpb.RejectReason


async def read_ack(call: object) -> tpb.ReadingBatchAck:
    response = await call.read()  # type: ignore[attr-defined]
    assert isinstance(response, tpb.StreamReadingsResponse), response
    return response.ack


def reasons(ack: tpb.ReadingBatchAck) -> dict[int, int]:
    return {r.index: r.reason for r in ack.rejected}


async def stored_count(service: Service, meter_id: str) -> int:
    assert service.pool is not None
    count: int = await service.pool.fetchval(
        "SELECT count(*) FROM readings WHERE meter_id = $1", uuid.UUID(meter_id)
    )
    return count


async def test_every_reject_reason_and_the_rest_stored(
    setup: Setup, other_partner: Org, service: Service
) -> None:
    consumer = await setup.meter(end_date=stamp(quarter(40)))
    profile = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
    both = await setup.meter(direction=mpb.METER_DIRECTION_BIDIRECTIONAL)
    open_ended = await setup.meter()
    foreign = await (
        await make_setup(other_partner, setup.registry, setup.meters, setup.telemetry)
    ).meter()
    future = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(hours=3)
    future -= timedelta(minutes=future.minute % 15)
    batch = [
        register(consumer, quarter(1), 100.0),  # 0 ok
        tpb.Reading(meter_id=str(uuid.uuid4()), timestamp=stamp(quarter(1)), register_wh=1),
        tpb.Reading(meter_id=foreign.id, timestamp=stamp(quarter(1)), register_wh=1),  # 2
        register(consumer, quarter(2) + timedelta(minutes=7), 101.0),  # 3 off grid
        register(consumer, METER_START - timedelta(minutes=15), 99.0),  # 4 before start
        register(consumer, quarter(41), 300.0),  # 5 after the end date
        register(open_ended, future, 500.0),  # 6 future
        register(consumer, quarter(3), math.nan),  # 7
        register(consumer, quarter(4), math.inf),  # 8
        register(consumer, quarter(5), -1.0),  # 9
        register(consumer, quarter(6), 50.0),  # 10 below the 100 before it
        tpb.Reading(meter_id=consumer.id, timestamp=stamp(quarter(7))),  # 11 no value
        interval(consumer, quarter(8), 5.0),  # 12 wrong kind
        register(profile, quarter(8), 5.0),  # 13 wrong kind
        register(both, quarter(8), 5.0),  # 14 flow required
        register(consumer, quarter(9), 120.0, flow=tpb.FLOW_EXPORT),  # 15 flow not allowed
        interval(profile, quarter(9), 7.5),  # 16 ok
        register(both, quarter(9), 8.0, flow=tpb.FLOW_EXPORT),  # 17 ok
        tpb.Reading(meter_id="not-a-uuid", timestamp=stamp(quarter(1)), register_wh=1),  # 18
    ]
    ack = await setup.ingest(batch, batch_id="mixed")
    assert ack.batch_id == "mixed"
    assert reasons(ack) == {
        1: R.REJECT_REASON_UNKNOWN_METER,
        2: R.REJECT_REASON_UNKNOWN_METER,
        3: R.REJECT_REASON_NOT_ON_GRID,
        4: R.REJECT_REASON_OUTSIDE_METER_DATES,
        5: R.REJECT_REASON_OUTSIDE_METER_DATES,
        6: R.REJECT_REASON_TOO_FAR_IN_FUTURE,
        7: R.REJECT_REASON_NON_FINITE_VALUE,
        8: R.REJECT_REASON_NON_FINITE_VALUE,
        9: R.REJECT_REASON_NEGATIVE_VALUE,
        10: R.REJECT_REASON_REGISTER_DECREASED,
        11: R.REJECT_REASON_MISSING_VALUE,
        12: R.REJECT_REASON_WRONG_VALUE_KIND,
        13: R.REJECT_REASON_WRONG_VALUE_KIND,
        14: R.REJECT_REASON_FLOW_REQUIRED,
        15: R.REJECT_REASON_FLOW_NOT_ALLOWED,
        18: R.REJECT_REASON_UNKNOWN_METER,
    }
    assert all(r.description for r in ack.rejected)
    assert (ack.accepted_count, ack.duplicate_count, ack.corrected_count) == (3, 0, 0)
    assert ack.rejected_count == 16
    assert await stored_count(service, consumer.id) == 1
    assert await stored_count(service, profile.id) == 1
    assert await stored_count(service, foreign.id) == 0


async def test_register_decrease_against_stored_neighbours(setup: Setup) -> None:
    meter = await setup.meter()
    first = await setup.ingest(
        [register(meter, quarter(0), 10.0), register(meter, quarter(8), 20.0)]
    )
    assert first.accepted_count == 2
    ack = await setup.ingest(
        [
            register(meter, quarter(4), 9.0),  # below the stored 10 before it
            register(meter, quarter(5), 21.0),  # above the stored 20 after it
            register(meter, quarter(6), 15.0),  # fits
            register(meter, quarter(9), 19.0),  # below the stored 20 before it
            register(meter, quarter(7), 14.0),  # below 15 accepted just before it
        ]
    )
    assert reasons(ack) == {
        0: R.REJECT_REASON_REGISTER_DECREASED,
        1: R.REJECT_REASON_REGISTER_DECREASED,
        3: R.REJECT_REASON_REGISTER_DECREASED,
        4: R.REJECT_REASON_REGISTER_DECREASED,
    }
    assert ack.accepted_count == 1


async def test_a_refused_correction_s_stored_value_still_bounds_the_batch(setup: Setup) -> None:
    meter = await setup.meter()
    await setup.ingest([register(meter, quarter(0), 100.0), register(meter, quarter(1), 200.0)])
    ack = await setup.ingest(
        [
            register(meter, quarter(1), 50.0),  # a correction below the 100 before it
            register(meter, quarter(2), 150.0),  # below the stored 200 that stands
        ]
    )
    assert reasons(ack) == {
        0: R.REJECT_REASON_REGISTER_DECREASED,
        1: R.REJECT_REASON_REGISTER_DECREASED,
    }
    assert ack.accepted_count == 0


async def test_stored_neighbours_beyond_the_check_window_still_bound_the_batch(
    setup: Setup,
) -> None:
    # Stored 100 at day 0 and 200 at day 100: each is more than the 92 days of the check's
    # window away from a batch value next to the other one.
    meter = await setup.meter()
    day = 96  # quarter-hours
    await setup.ingest(
        [register(meter, quarter(0), 100.0), register(meter, quarter(100 * day), 200.0)]
    )
    below = await setup.ingest([register(meter, quarter(99 * day), 50.0)])
    above = await setup.ingest([register(meter, quarter(1 * day), 300.0)])
    assert reasons(below) == {0: R.REJECT_REASON_REGISTER_DECREASED}
    assert reasons(above) == {0: R.REJECT_REASON_REGISTER_DECREASED}
    fits = await setup.ingest([register(meter, quarter(50 * day), 150.0)])
    assert fits.accepted_count == 1


async def test_concurrent_batches_of_one_meter_are_checked_against_each_other(
    setup: Setup, service: Service, replica_channel: grpc.aio.Channel
) -> None:
    meter = await setup.meter()
    assert service.pool is not None
    # Through two replicas: one server orders its own batches of a meter before they
    # reach the database, two only meet there.
    elsewhere = telemetry_pb2_grpc.TelemetryStub(replica_channel)
    async with service.pool.acquire() as conn:
        # Hold the meter so both batches are in flight together.
        holding = conn.transaction()
        await holding.start()
        await conn.execute("SELECT FROM meters WHERE id = $1 FOR UPDATE", uuid.UUID(meter.id))
        earlier_higher = asyncio.ensure_future(
            setup.ingest([register(meter, quarter(1), 100.0)], "a")
        )

        async def later_lower_call() -> tpb.ReadingBatchAck:
            response = await elsewhere.IngestReadings(
                tpb.IngestReadingsRequest(
                    batch=tpb.ReadingBatch(
                        batch_id="b", readings=[register(meter, quarter(2), 50.0)]
                    )
                ),
                metadata=setup.org.auth,
            )
            return response.ack

        later_lower = asyncio.ensure_future(later_lower_call())
        # Both wait for the meter's lock inside their transactions.
        await wait_until_blocked(conn, 2, earlier_higher, later_lower)
        await holding.rollback()
    acks = await asyncio.wait_for(asyncio.gather(earlier_higher, later_lower), 10)
    # Whichever committed first, the other saw it: one decrease, rejected.
    assert sorted(ack.accepted_count for ack in acks) == [0, 1]
    assert [reasons(ack) for ack in acks if ack.rejected_count] == [
        {0: R.REJECT_REASON_REGISTER_DECREASED}
    ]
    assert await stored_count(service, meter.id) == 1


async def test_duplicates_and_corrections(setup: Setup, service: Service) -> None:
    meter = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
    batch = [interval(meter, quarter(i), 10.0 + i) for i in range(4)]
    first = await setup.ingest(batch)
    assert (first.accepted_count, first.duplicate_count, first.corrected_count) == (4, 0, 0)
    again = await setup.ingest(batch)
    assert (again.accepted_count, again.duplicate_count, again.corrected_count) == (0, 4, 0)
    changed = [*batch[:2], interval(meter, quarter(2), 99.0), interval(meter, quarter(4), 1.0)]
    third = await setup.ingest(changed)
    assert (third.accepted_count, third.duplicate_count, third.corrected_count) == (1, 2, 1)
    # Repeated within one batch: the last value wins, counted as a correction.
    fourth = await setup.ingest(
        [interval(meter, quarter(5), 1.0), interval(meter, quarter(5), 2.0)]
    )
    assert (fourth.accepted_count, fourth.corrected_count) == (1, 1)
    listed = await setup.list(meter.id, quarter(0), quarter(8))
    assert [r.interval_wh for r in listed.readings] == [10.0, 11.0, 99.0, 13.0, 1.0, 2.0]
    assert await stored_count(service, meter.id) == 6


async def test_register_to_interval_across_dst(
    partner: Org,
    registry: site_registry_pb2_grpc.SiteRegistryAsyncStub,
    meters: meter_registry_pb2_grpc.MeterRegistryAsyncStub,
    telemetry: telemetry_pb2_grpc.TelemetryAsyncStub,
) -> None:
    berlin = ZoneInfo("Europe/Berlin")
    site = await make_setup(partner, registry, meters, telemetry, timezone="Europe/Berlin")
    meter = await site.meter(transformer_factor=2.0)
    for day, expected in ((datetime(2025, 3, 30), 92), (datetime(2025, 10, 26), 100)):
        start = day.replace(tzinfo=berlin).astimezone(UTC)
        end = (day + timedelta(days=1)).replace(tzinfo=berlin).astimezone(UTC)
        stamps = []
        at = start
        while at <= end:
            stamps.append(at)
            at += timedelta(minutes=15)
        # Register grows 1 Wh per minute of real time; one register left out makes a gap.
        missing = stamps[10]
        batch = [
            register(meter, at, (at - METER_START).total_seconds() / 60)
            for at in stamps
            if at != missing
        ]
        ack = await site.ingest(batch)
        assert ack.accepted_count == len(stamps) - 1, ack.rejected
        listed = await site.list(meter.id, start, end)
        starts = [i.interval_start.ToDatetime(tzinfo=UTC) for i in listed.intervals]
        assert len(starts) == expected - 2  # the gap removes the interval before and after
        assert stamps[9] not in starts
        assert missing not in starts
        assert all(i.energy_wh == 30.0 for i in listed.intervals)  # 15 Wh x factor 2
        assert len(listed.readings) == len(stamps) - 2  # end is exclusive


async def test_batch_too_large(setup: Setup) -> None:
    meter = await setup.meter()
    batch = [register(meter, quarter(0), 1.0)] * 10001
    await expect_invalid(setup.ingest(batch), "batch.readings")


async def test_stream_pipelines_and_acks_in_order(setup: Setup) -> None:
    meter = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
    call = setup.telemetry.StreamReadings(metadata=setup.org.auth)
    for n in range(5):
        batch = tpb.ReadingBatch(
            batch_id=f"s{n}",
            readings=[interval(meter, quarter(n * 10 + i), 1.0) for i in range(10)],
        )
        await call.write(tpb.StreamReadingsRequest(batch=batch))
    acks = [await read_ack(call) for _ in range(5)]
    await call.done_writing()
    assert [a.batch_id for a in acks] == [f"s{n}" for n in range(5)]
    assert all(a.accepted_count == 10 for a in acks)


async def wait_stored(service: Service, meter_id: str, count: int) -> None:
    for _ in range(200):
        if await stored_count(service, meter_id) == count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} readings never got stored")


async def test_batch_resent_after_dropped_ack_is_stored_once(
    setup: Setup, service: Service
) -> None:
    meter = await setup.meter()
    readings = [register(meter, quarter(i), 100.0 + i) for i in range(20)]
    batch = tpb.StreamReadingsRequest(batch=tpb.ReadingBatch(batch_id="once", readings=readings))
    call = setup.telemetry.StreamReadings(metadata=setup.org.auth)
    await call.write(batch)
    # The server commits; the ack is lost: the client drops the stream without reading it.
    await wait_stored(service, meter.id, 20)
    call.cancel()
    retry = setup.telemetry.StreamReadings(metadata=setup.org.auth)
    await retry.write(batch)
    ack = await read_ack(retry)
    await retry.done_writing()
    assert (ack.accepted_count, ack.duplicate_count, ack.corrected_count) == (0, 20, 0)
    assert await stored_count(service, meter.id) == 20
    listed = await setup.list(meter.id, quarter(0), quarter(20))
    assert [r.register_wh for r in listed.readings] == [100.0 + i for i in range(20)]


async def test_batch_resent_while_first_may_be_in_flight_is_stored_once(
    setup: Setup, service: Service
) -> None:
    meter = await setup.meter()
    readings = [register(meter, quarter(i), 100.0 + i) for i in range(50)]
    batch = tpb.StreamReadingsRequest(batch=tpb.ReadingBatch(batch_id="race", readings=readings))
    call = setup.telemetry.StreamReadings(metadata=setup.org.auth)
    await call.write(batch)
    call.cancel()  # at once: the first copy may or may not be processed
    retry = setup.telemetry.StreamReadings(metadata=setup.org.auth)
    await retry.write(batch)
    ack = await read_ack(retry)
    await retry.done_writing()
    assert ack.accepted_count + ack.duplicate_count == 50
    assert ack.corrected_count == ack.rejected_count == 0
    # The first copy, if the server took it, ran to its commit (its stream was gone).
    assert service.telemetry_servicer is not None
    await service.telemetry_servicer.wait_in_flight()
    assert await stored_count(service, meter.id) == 50


async def queued_ranges(service: Service, site_id: str) -> list[tuple[datetime, datetime]]:
    """The site's balancing-queue rows as (start, end), in queue order."""
    assert service.pool is not None
    rows = await service.pool.fetch(
        "SELECT interval_start, interval_end FROM balancing_queue WHERE site_id = $1"
        " ORDER BY interval_start, id",
        uuid.UUID(site_id),
    )
    return [(row[0], row[1]) for row in rows]


async def test_changes_mark_site_intervals_for_balancing(setup: Setup, service: Service) -> None:
    assert service.pool is not None
    meter = await setup.meter()
    site_id = uuid.UUID(setup.site.id)
    await setup.ingest([register(meter, quarter(4), 10.0)])
    query = """
        SELECT org_id, interval_start, interval_end FROM balancing_queue WHERE site_id = $1
        ORDER BY interval_start, id
    """

    async def queued() -> list[tuple[datetime, datetime]]:
        rows = await service.pool.fetch(query, site_id)  # type: ignore[union-attr]
        # Each row names its organization, which its consumer claims and scopes it by.
        assert {row["org_id"] for row in rows} <= {setup.org.id}
        return [(row["interval_start"], row["interval_end"]) for row in rows]

    # A register ends the interval before it and starts the one after it: one range of
    # the site's PT15M grid holds both.
    assert await queued() == [(quarter(3), quarter(5))]
    duplicate = await setup.ingest([register(meter, quarter(4), 10.0)])
    assert duplicate.duplicate_count == 1
    assert await queued() == [(quarter(3), quarter(5))]  # nothing changed
    correction = await setup.ingest([register(meter, quarter(4), 11.0)])
    assert correction.corrected_count == 1
    assert await queued() == [(quarter(3), quarter(5))] * 2

    # Partly changed batches queue only what changed, ranges apart as they lie apart.
    await setup.ingest([register(meter, quarter(4), 11.0), register(meter, quarter(8), 20.0)])
    assert await queued() == [(quarter(3), quarter(5))] * 2 + [(quarter(7), quarter(9))]


async def test_a_batch_of_consecutive_registers_queues_one_range(
    setup: Setup, service: Service
) -> None:
    # 96 registers touch 97 intervals: one queue row to write, claim and delete, not 97.
    meter = await setup.meter()
    other = await setup.meter()
    ack = await setup.ingest(
        [register(meter, quarter(n), float(n)) for n in range(1, 97)]
        + [register(other, quarter(n), float(n)) for n in (40, 60)]
    )
    assert ack.accepted_count == 98
    # The other meter's intervals lie within the first one's: the site's range is one.
    assert await queued_ranges(service, setup.site.id) == [(quarter(0), quarter(97))]


async def test_an_interval_reading_and_a_register_at_one_instant_queue_both_intervals(
    setup: Setup, service: Service
) -> None:
    # The load profile's reading at 01:00 is the interval from 01:00; the register at 01:00
    # also ends the interval before it. Both are queued, whichever comes first.
    profile = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
    meter = await setup.meter()
    ack = await setup.ingest(
        [interval(profile, quarter(4), 5.0), register(meter, quarter(4), 10.0)]
    )
    assert ack.accepted_count == 2
    assert await queued_ranges(service, setup.site.id) == [(quarter(3), quarter(5))]


async def test_a_site_deleted_behind_the_meter_cache_makes_its_readings_unknown(
    setup: Setup, service: Service
) -> None:
    # The site goes without its NOTIFY having reached this replica (deleted straight in
    # the database): its meters are still cached here, and the balancing queue's key to the
    # site breaks the batch's transaction. The batch is judged again on fresh meters.
    assert service.pool is not None
    meter = await setup.meter()
    await setup.ingest([register(meter, quarter(0), 1.0)])
    await service.pool.execute("DELETE FROM sites WHERE id = $1", uuid.UUID(setup.site.id))
    ack = await setup.ingest([register(meter, quarter(1), 2.0)])
    assert reasons(ack) == {0: R.REJECT_REASON_UNKNOWN_METER}
    assert ack.accepted_count == 0


async def test_one_meter_in_two_spellings_in_one_batch(setup: Setup) -> None:
    meter = await setup.meter()
    upper = tpb.Reading(meter_id=meter.id.upper(), timestamp=stamp(quarter(1)), register_wh=2.0)
    ack = await setup.ingest([register(meter, quarter(0), 1.0), upper])
    assert reasons(ack) == {}
    assert ack.accepted_count == 2


async def test_list_readings_rules(setup: Setup, other_partner: Org) -> None:
    meter = await setup.meter()
    await expect_invalid(setup.list(meter.id, quarter(4), quarter(0)), "end_time")
    await expect_invalid(
        setup.list(meter.id, quarter(0), quarter(0) + timedelta(days=40)), "end_time"
    )
    error = await setup.telemetry.ListReadings(
        tpb.ListReadingsRequest(
            meter_id=meter.id, start_time=stamp(quarter(0)), end_time=stamp(quarter(4))
        ),
        metadata=other_partner.auth,
    ).code()
    assert error == grpc.StatusCode.NOT_FOUND


async def test_a_negative_zero_reading_is_stored_as_zero(setup: Setup) -> None:
    meter = await setup.meter()
    ack = await setup.ingest([register(meter, quarter(0), -0.0), register(meter, quarter(1), 1.0)])
    assert ack.accepted_count == 2
    listed = await setup.list(meter.id, quarter(0), quarter(2))
    assert [r.register_wh for r in listed.readings] == [0.0, 1.0]
    # Read back as 0, not "-0".
    assert math.copysign(1.0, listed.readings[0].register_wh) == 1.0
    # A resend of 0 is the same reading.
    again = await setup.ingest([register(meter, quarter(0), 0.0)])
    assert again.duplicate_count == 1


async def test_list_readings_range_is_judged_to_the_nanosecond(setup: Setup) -> None:
    """Nanoseconds below a microsecond are cut off the instants read, not off the range's
    length: 31 days and 1 ns is longer than 31 days."""
    meter = await setup.meter()
    start = stamp(quarter(0))
    end = stamp(quarter(0) + timedelta(days=31))
    end.nanos += 1
    await expect_invalid(
        setup.telemetry.ListReadings(
            tpb.ListReadingsRequest(meter_id=meter.id, start_time=start, end_time=end),
            metadata=setup.org.auth,
        ),
        "end_time",
    )
    exactly = stamp(quarter(0) + timedelta(days=31))
    listed = await setup.telemetry.ListReadings(
        tpb.ListReadingsRequest(meter_id=meter.id, start_time=start, end_time=exactly),
        metadata=setup.org.auth,
    )
    assert list(listed.readings) == []
    # Within one microsecond: both instants read the same, yet end is after start.
    later = tpb.ListReadingsRequest(meter_id=meter.id, start_time=start, end_time=start)
    later.end_time.nanos += 1
    await setup.telemetry.ListReadings(later, metadata=setup.org.auth)


async def test_same_new_batch_sent_concurrently_is_stored_once(
    setup: Setup, service: Service
) -> None:
    meter = await setup.meter()
    batch = [register(meter, quarter(i), float(i)) for i in range(300)]
    # Both copies may find nothing stored and take the plain-insert path; the loser of the
    # race retries with the upsert and reports duplicates.
    acks = await asyncio.gather(*(setup.ingest(batch, batch_id=f"c{n}") for n in range(3)))
    assert sum(a.accepted_count for a in acks) == 300
    assert sum(a.duplicate_count for a in acks) == 600
    assert await stored_count(service, meter.id) == 300


async def test_same_new_load_profile_sent_concurrently_is_stored_once(
    setup: Setup, service: Service
) -> None:
    meter = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
    batch = [interval(meter, quarter(i), 2.0) for i in range(300)]
    acks = await asyncio.gather(*(setup.ingest(batch, batch_id=f"p{n}") for n in range(3)))
    assert sum(a.accepted_count for a in acks) == 300
    assert sum(a.duplicate_count for a in acks) == 600
    assert await stored_count(service, meter.id) == 300
    # A later batch overlapping stored values corrects them through the upsert.
    changed = await setup.ingest([interval(meter, quarter(i), 3.0) for i in range(290, 310)])
    assert (changed.accepted_count, changed.corrected_count) == (10, 10)


async def test_deleting_meter_or_site_removes_their_readings(
    setup: Setup, service: Service
) -> None:
    kept = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
    deleted = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
    ack = await setup.ingest(
        [interval(m, quarter(i), 5.0) for m in (kept, deleted) for i in range(3)]
    )
    assert ack.accepted_count == 6
    await setup.meters.DeleteMeter(
        mpb.DeleteMeterRequest(meter_id=deleted.id), metadata=setup.org.auth
    )
    assert await stored_count(service, deleted.id) == 0
    assert await stored_count(service, kept.id) == 3
    # A deleted site takes its meters along (foreign key) and they their readings.
    await setup.registry.DeleteSite(
        spb.DeleteSiteRequest(site_id=setup.site.id), metadata=setup.org.auth
    )
    assert await stored_count(service, kept.id) == 0


async def test_batch_mixing_fresh_and_stored_groups(setup: Setup, service: Service) -> None:
    # One meter only appends (COPYed straight into readings), the other has a stored value
    # inside the batch's range (staged and upserted): both under the batch's ingest id.
    assert service.pool is not None
    appending = await setup.meter()
    correcting = await setup.meter()
    await setup.ingest([register(correcting, quarter(4), 10.0)])
    ack = await setup.ingest(
        [
            register(appending, quarter(4), 5.0),
            register(correcting, quarter(4), 11.0),
            register(appending, quarter(5), 6.0),
            register(correcting, quarter(5), 12.0),
        ]
    )
    assert (ack.accepted_count, ack.corrected_count, ack.duplicate_count) == (3, 1, 0)
    rows = await service.pool.fetch(
        "SELECT meter_id, ts, value_wh, ingest_id FROM readings WHERE meter_id = ANY($1)",
        [uuid.UUID(appending.id), uuid.UUID(correcting.id)],
    )
    by_key = {(str(r["meter_id"]), r["ts"]): (r["value_wh"], r["ingest_id"]) for r in rows}
    assert len(by_key) == 4
    batch_id = by_key[(appending.id, quarter(4))][1]
    assert batch_id > 0
    assert by_key == {
        (appending.id, quarter(4)): (5.0, batch_id),
        (appending.id, quarter(5)): (6.0, batch_id),
        (correcting.id, quarter(4)): (11.0, -batch_id),
        (correcting.id, quarter(5)): (12.0, batch_id),
    }
    again = await setup.ingest([register(appending, quarter(5), 6.0)])
    assert (again.accepted_count, again.duplicate_count) == (0, 1)


async def test_a_batch_of_a_gone_stream_that_fails_is_logged_in_one_line(
    setup: Setup, service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody awaits the ingest of a batch whose stream went away: when it failed (here its
    database connection is cut while it waits for the meter's lock), asyncio logged "Task
    exception was never retrieved" with a traceback once the task was collected."""
    meter = await setup.meter()
    batch = tpb.ReadingBatch(batch_id="orphan", readings=[register(meter, quarter(0), 1.0)])
    assert service.pool is not None
    assert service.telemetry_servicer is not None
    caplog.set_level(logging.WARNING)
    async with service.pool.acquire() as holder:
        async with holder.transaction():
            await holder.execute("SELECT FROM meters WHERE id = $1 FOR UPDATE", uuid.UUID(meter.id))
            call = setup.telemetry.StreamReadings(metadata=setup.org.auth)
            await call.write(tpb.StreamReadingsRequest(batch=batch))
            await wait_until_blocked(holder, 1)
            [task] = [weakref.ref(task) for task in service.telemetry_servicer._orphans]
            call.cancel()
            await asyncio.sleep(0.1)
            terminated = await holder.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
            )
            assert terminated == 1
        await service.telemetry_servicer.wait_in_flight()
    # Until the task is collected: asyncio's complaint comes then.
    for _ in range(50):
        gc.collect()
        await asyncio.sleep(0.02)
        if task() is None:
            break
    assert task() is None
    assert not [r for r in caplog.records if r.exc_info or "never retrieved" in r.getMessage()]
    [line] = [r.getMessage() for r in caplog.records if "orphan" in r.getMessage()]
    assert line.startswith("batch 'orphan' of a stream that ended before its ack was not stored: ")
    assert await stored_count(service, meter.id) == 0


def counts(ack: tpb.ReadingBatchAck) -> tuple[int, int, int, int]:
    return (ack.accepted_count, ack.duplicate_count, ack.corrected_count, ack.rejected_count)


async def test_readings_superseded_by_a_refused_one_are_refused_with_it(
    setup: Setup, service: Service
) -> None:
    """The batch's earlier readings of a key were counted a duplicate or a correction at
    once, so when the last one was refused (here its register falls below the one stored
    after it) the ack reported a correction or duplicate that was never stored."""
    meter = await setup.meter()
    assert counts(await setup.ingest([register(meter, quarter(2), 300.0)])) == (1, 0, 0, 0)
    decreased = tpb.REJECT_REASON_REGISTER_DECREASED
    for values in ((100.0, 500.0), (500.0, 500.0), (100.0, 200.0, 500.0)):
        ack = await setup.ingest([register(meter, quarter(1), value) for value in values])
        assert counts(ack) == (0, 0, 0, len(values)), (values, ack)
        assert [(r.index, r.reason) for r in ack.rejected] == [
            (i, decreased) for i in range(len(values))
        ]
    assert await stored_count(service, meter.id) == 1
    # Kept as before when the last one is stored: the earlier ones are repeated or corrected.
    ack = await setup.ingest([register(meter, quarter(1), v) for v in (100.0, 250.0, 250.0)])
    assert counts(ack) == (1, 1, 1, 0)
    assert await stored_count(service, meter.id) == 2


async def test_a_register_meters_last_interval_is_known_from_its_reading_at_the_end(
    setup: Setup, service: Service
) -> None:
    """A register at the end date was refused, so the meter's last interval could never be
    known (its energy is the difference of the registers at both its bounds). An interval
    value at the end date still is: it is labelled by its start."""
    meter = await setup.meter(end_date=stamp(quarter(4)))
    ack = await setup.ingest([register(meter, quarter(n), 100.0 + n) for n in range(6)])
    assert [(r.index, r.reason) for r in ack.rejected] == [(5, R.REJECT_REASON_OUTSIDE_METER_DATES)]
    listed = await setup.list(meter.id, quarter(0), quarter(5))
    assert [(i.interval_start.ToDatetime(tzinfo=UTC), i.energy_wh) for i in listed.intervals] == [
        (quarter(n), 1.0) for n in range(4)
    ]
    profile = await setup.meter(
        measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE, end_date=stamp(quarter(4))
    )
    ack = await setup.ingest([interval(profile, quarter(n), 5.0) for n in (3, 4)])
    assert [(r.index, r.reason) for r in ack.rejected] == [(1, R.REJECT_REASON_OUTSIDE_METER_DATES)]


async def _reading_partitions(service: Service) -> set[str]:
    assert service.pool is not None
    rows = await service.pool.fetch(
        """
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'readings'::regclass
        """
    )
    return {row["relname"] for row in rows}


async def test_a_batch_years_apart_makes_the_partitions_of_its_months_only(
    setup: Setup, service: Service
) -> None:
    meter = await setup.meter(start_date=stamp(datetime(1993, 1, 1, tzinfo=UTC)))
    before = await _reading_partitions(service)
    ack = await setup.ingest(
        [
            register(meter, datetime(1993, 3, 10, 12, 0, tzinfo=UTC), 100.0),
            register(meter, datetime(1993, 4, 10, 12, 0, tzinfo=UTC), 150.0),
            register(meter, datetime(1997, 8, 20, 6, 15, tzinfo=UTC), 200.0),
        ]
    )
    assert (ack.accepted_count, ack.rejected_count) == (3, 0)
    after = await _reading_partitions(service)
    months = {"readings_p199303", "readings_p199304", "readings_p199708"}
    assert months <= after
    # None of the 50 months between (another test may have made some of them before).
    assert after - before <= months
    listed = await setup.list(
        meter.id, datetime(1997, 8, 1, tzinfo=UTC), datetime(1997, 8, 31, tzinfo=UTC)
    )
    assert [r.register_wh for r in listed.readings] == [200.0]
