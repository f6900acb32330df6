from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import telemetry_pb2 as tpb
from openvpp.v1 import telemetry_pb2_grpc

from service.app import Service
from service.events.channels import READINGS_CHANNEL
from tests.conftest import Org
from tests.helpers import rpc_error
from tests.telemetry.conftest import Setup, interval, quarter, register

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
