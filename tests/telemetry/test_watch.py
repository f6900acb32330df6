from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import grpc
import pytest
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import meter_registry_pb2_grpc, site_registry_pb2_grpc, telemetry_pb2_grpc
from openvpp.v1 import site_registry_pb2 as spb
from openvpp.v1 import telemetry_pb2 as tpb

from service.app import Service
from service.events.channels import READINGS_CHANNEL
from service.events.payloads import readings_batch_payload
from tests.conftest import Org, running_service
from tests.helpers import eventually, rpc_error
from tests.telemetry.conftest import Setup, interval, make_setup, quarter, register

# Upper bound for a committed batch to reach a watcher; a hang fails instead of blocking.
DELIVERY_TIMEOUT = 10.0


async def next_readings(call: object) -> list[tpb.Reading]:
    response = await asyncio.wait_for(call.read(), DELIVERY_TIMEOUT)  # type: ignore[attr-defined]
    assert isinstance(response, tpb.WatchReadingsResponse), response
    return list(response.readings)


async def wait_for_subscribers(replica: Service, count: int) -> None:
    assert replica.hub is not None
    for _ in range(200):
        if replica.hub.subscriber_count(READINGS_CHANNEL) == count:
            return
        await asyncio.sleep(0.05)
    pytest.fail(
        f"expected {count} subscribers, have {replica.hub.subscriber_count(READINGS_CHANNEL)}"
    )


async def test_watcher_on_other_replica_gets_committed_changes(
    setup: Setup, replica_channel: grpc.aio.Channel, replica: Service
) -> None:
    meter = await setup.meter()
    other_meter = await setup.meter()
    stub = telemetry_pb2_grpc.TelemetryStub(replica_channel)
    by_site = stub.WatchReadings(
        tpb.WatchReadingsRequest(site_id=setup.site.id), metadata=setup.org.auth
    )
    by_meter = stub.WatchReadings(
        tpb.WatchReadingsRequest(meter_id=meter.id), metadata=setup.org.auth
    )
    await by_site.initial_metadata()
    await by_meter.initial_metadata()

    # Written through the other replica (the session service).
    batch = [register(meter, quarter(1), 5.0), register(other_meter, quarter(1), 7.0)]
    await setup.ingest(batch)
    site_readings = await next_readings(by_site)
    assert sorted((r.meter_id, r.register_wh) for r in site_readings) == sorted(
        [(meter.id, 5.0), (other_meter.id, 7.0)]
    )
    assert all(r.flow == tpb.FLOW_IMPORT for r in site_readings)
    assert [(r.meter_id, r.register_wh) for r in await next_readings(by_meter)] == [(meter.id, 5.0)]

    # Duplicates change nothing and are not sent; the next change is.
    await setup.ingest(batch)
    await setup.ingest([register(meter, quarter(1), 6.0)])
    assert [r.register_wh for r in await next_readings(by_meter)] == [6.0]
    assert [r.register_wh for r in await next_readings(by_site)] == [6.0]
    by_site.cancel()
    by_meter.cancel()


async def test_watch_other_orgs_site_is_not_found(
    setup: Setup, other_partner: Org, replica_channel: grpc.aio.Channel
) -> None:
    stub = telemetry_pb2_grpc.TelemetryStub(replica_channel)
    call = stub.WatchReadings(
        tpb.WatchReadingsRequest(site_id=setup.site.id), metadata=other_partner.auth
    )
    error = await rpc_error(call.read())
    assert error.code() == grpc.StatusCode.NOT_FOUND


@pytest.fixture
async def fixed_window_channel(replica: Service) -> AsyncIterator[grpc.aio.Channel]:
    """A client whose HTTP/2 receive window stays at 64 KiB (no BDP growth), so that a
    watcher that does not read stalls the server's writes after a few dozen KiB."""
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{replica.port}", options=[("grpc.http2.bdp_probe", 0)]
    ) as channel:
        yield channel


async def test_slow_watcher_is_cut_off_with_bounded_buffer(
    setup: Setup, fixed_window_channel: grpc.aio.Channel, replica: Service
) -> None:
    assert replica.telemetry_servicer is not None
    bound = replica.settings.readings_watch_buffer_size
    await wait_for_subscribers(replica, 0)
    meter = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
    stub = telemetry_pb2_grpc.TelemetryStub(fixed_window_channel)
    call = stub.WatchReadings(tpb.WatchReadingsRequest(meter_id=meter.id), metadata=setup.org.auth)
    await call.initial_metadata()
    await wait_for_subscribers(replica, 1)

    # The watcher reads nothing while many batches are committed.
    for n in range(30):
        start = quarter(n * 500)
        await setup.ingest(
            [interval(meter, start + timedelta(minutes=15 * i), 1.0 + n) for i in range(500)]
        )
        if replica.hub is not None and replica.hub.subscriber_count(READINGS_CHANNEL) == 0:
            break
    # The server dropped the subscription: it buffers nothing more for this watcher.
    await wait_for_subscribers(replica, 0)

    # What was already on its way is delivered, then the stream ends RESOURCE_EXHAUSTED.
    code = None
    for _ in range(100):
        try:
            await next_readings(call)
        except grpc.aio.AioRpcError as ended:
            code = ended.code()
            break
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 0 < replica.telemetry_servicer.watch_peak_buffered <= bound


async def _lock_waiters(conn: asyncpg.Connection) -> int:
    """Statements waiting for a lock of ``readings``: the watcher's reads and the test's own
    second lock (not the balancing worker's reads, which wait too)."""
    waiting: int = await conn.fetchval(
        """
        SELECT count(*) FROM pg_stat_activity
        WHERE wait_event_type = 'Lock'
          AND (query LIKE '%r.ingest_id IN (%' OR query LIKE 'LOCK TABLE readings%')
        """
    )
    return waiting


@pytest.fixture
async def one_connection_server(database_url: str) -> AsyncIterator[Service]:
    """A server with one database connection and a watch buffer of 3: its reads are one
    round trip each once their statement is prepared, so table locks order them exactly."""
    async with running_service(
        database_url, db_pool_min_size=1, db_pool_max_size=1, readings_watch_buffer_size=3
    ) as running:
        yield running


async def test_a_reader_that_keeps_up_is_not_cut_off_while_the_server_catches_up(
    partner: Org,
    registry: site_registry_pb2_grpc.SiteRegistryAsyncStub,
    meters: meter_registry_pb2_grpc.MeterRegistryAsyncStub,
    telemetry: telemetry_pb2_grpc.TelemetryAsyncStub,
    one_connection_server: Service,
    database_url: str,
) -> None:
    """Commits that pile up while the server reads one batch back are read back together.

    The server's reads are held up by table locks so that the order is certain. With one
    read per event, the commits below overflowed the buffer of 3 while the client read
    everything it was sent."""
    server = one_connection_server
    assert server.hub is not None
    # Not balanced: no balancing pass reads the readings the test locks.
    setup = await make_setup(
        partner, registry, meters, telemetry, type=spb.SITE_TYPE_UNBALANCED_ACCURATE
    )
    meter = await setup.meter()
    for n in range(6):
        await setup.ingest([register(meter, quarter(n), float(n))])
    observer = await asyncpg.connect(database_url)
    first_lock = await asyncpg.connect(database_url)
    second_lock = await asyncpg.connect(database_url)
    try:
        ingests = [
            abs(row["ingest_id"])
            for row in await observer.fetch(
                "SELECT ingest_id FROM readings WHERE meter_id = $1 ORDER BY ts",
                uuid.UUID(meter.id),
            )
        ]
        assert len(set(ingests)) == 6

        async def commit_event(n: int) -> None:
            # As the batch's own commit announced it.
            payload = readings_batch_payload(
                setup.org.id, ingests[n], [uuid.UUID(setup.site.id)], quarter(n), quarter(n)
            )
            await observer.execute("SELECT pg_notify($1, $2)", READINGS_CHANNEL, payload)

        def buffered() -> int:
            assert server.hub is not None
            subscriptions = server.hub._subscriptions[READINGS_CHANNEL][str(setup.org.id)]
            assert subscriptions, "the watcher was cut off as too slow"
            return next(iter(subscriptions)).buffered

        async def buffered_is(count: int) -> bool:
            return buffered() == count

        async def waiters(count: int) -> bool:
            return await _lock_waiters(observer) == count

        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = telemetry_pb2_grpc.TelemetryStub(channel).WatchReadings(
                tpb.WatchReadingsRequest(meter_id=meter.id), metadata=setup.org.auth
            )
            await call.initial_metadata()
            await wait_for_subscribers(server, 1)
            # Prepares the read on the server's one connection.
            await commit_event(0)
            assert [r.register_wh for r in await next_readings(call)] == [0.0]

            held = first_lock.transaction()
            await held.start()
            await first_lock.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
            await commit_event(0)
            await eventually(lambda: waiters(1), "the server's read of the first batch to wait")
            queued = second_lock.transaction()
            await queued.start()
            second = asyncio.create_task(
                second_lock.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
            )
            await eventually(
                lambda: waiters(2), "the second lock to queue behind the server's read"
            )
            await commit_event(1)
            await commit_event(2)
            await eventually(lambda: buffered_is(2), "two events buffered")
            # The held read runs; the second lock is granted before the server reads again.
            await held.commit()
            await second
            assert [r.register_wh for r in await next_readings(call)] == [0.0]
            await eventually(lambda: waiters(1), "the server's next read to wait")
            for n in (3, 4, 5):
                await commit_event(n)
            await eventually(lambda: buffered_is(3), "the last three events buffered")
            await queued.commit()
            values = [[r.register_wh for r in await next_readings(call)] for _ in range(5)]
            assert values == [[1.0], [2.0], [3.0], [4.0], [5.0]]
            call.cancel()
    finally:
        for conn in (first_lock, second_lock, observer):
            await conn.close()
