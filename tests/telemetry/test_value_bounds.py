"""A value more than one grid connection can measure is rejected as its reading alone, on
the unary call and on the stream alike, and changes nothing stored."""

from __future__ import annotations

import math
import uuid

from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import telemetry_pb2 as tpb

from service.app import Service
from tests.telemetry.conftest import Setup, interval, quarter, register
from tests.telemetry.test_ingest import read_ack, reasons, stored_count

R = tpb.RejectReason
TOO_LARGE = R.REJECT_REASON_VALUE_TOO_LARGE


async def test_a_value_beyond_one_grid_connection_is_rejected_alone(
    setup: Setup, service: Service
) -> None:
    registers = await setup.meter()
    profile = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
    batch = [
        register(registers, quarter(1), 10.0),  # 0 ok
        register(registers, quarter(2), 1e15),  # 1 ok: the largest register
        register(registers, quarter(3), math.nextafter(1e15, math.inf)),  # 2
        register(registers, quarter(4), 9.3e18),  # 3 would overflow int64 as Wh
        interval(profile, quarter(1), 1.25e9),  # 4 ok: 5 GW for a quarter-hour
        interval(profile, quarter(2), math.nextafter(1.25e9, math.inf)),  # 5
        interval(profile, quarter(3), 2.01e16),  # 6 the review's unit mix-up
        interval(profile, quarter(4), 1e308),  # 7
    ]
    ack = await setup.ingest(batch)
    assert reasons(ack) == {2: TOO_LARGE, 3: TOO_LARGE, 5: TOO_LARGE, 6: TOO_LARGE, 7: TOO_LARGE}
    assert (ack.accepted_count, ack.rejected_count) == (3, 5)
    rule = ack.rejected[0].description
    assert "interval_wh" in rule
    assert "1.25e9 Wh a quarter-hour" in rule
    assert "register_wh" in rule
    assert await stored_count(service, registers.id) == 2
    assert await stored_count(service, profile.id) == 1

    call = setup.telemetry.StreamReadings(metadata=setup.org.auth)
    await call.write(
        tpb.StreamReadingsRequest(batch=tpb.ReadingBatch(batch_id="s", readings=batch))
    )
    streamed = await read_ack(call)
    await call.done_writing()
    assert reasons(streamed) == reasons(ack)
    assert (streamed.duplicate_count, streamed.rejected_count) == (3, 5)


async def test_a_rejected_value_leaves_the_stored_one_and_queues_nothing(
    setup: Setup, service: Service
) -> None:
    profile = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
    assert (await setup.ingest([interval(profile, quarter(1), 40.0)])).accepted_count == 1
    assert service.pool is not None
    site_queue = "SELECT count(*) FROM balancing_queue WHERE site_id = $1"
    queued = await service.pool.fetchval(site_queue, uuid.UUID(setup.site.id))
    assert queued > 0
    ack = await setup.ingest([interval(profile, quarter(1), 2.01e16)])
    assert reasons(ack) == {0: TOO_LARGE}
    assert (ack.accepted_count, ack.corrected_count) == (0, 0)
    listed = await setup.list(profile.id, quarter(0), quarter(4))
    assert [r.interval_wh for r in listed.readings] == [40.0]
    assert await service.pool.fetchval(site_queue, uuid.UUID(setup.site.id)) == queued
