"""The service's metrics, recorded through a real server: calls by method and status code,
readings by outcome, workers' passes, health and open watch streams."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from openvpp.v1 import meter_registry_pb2_grpc, site_registry_pb2_grpc, telemetry_pb2_grpc
from openvpp.v1 import site_registry_pb2 as spb
from openvpp.v1 import telemetry_pb2 as tpb

from service.app import Service
from service.auth.principal import Role
from service.auth.store import IdentityStore
from tests.conftest import running_service
from tests.helpers import eventually, meter_request, rpc_error, site_request
from tests.metrics_reader import RecordedMetrics
from tests.telemetry.conftest import METER_START, stamp

DURATION = "rpc.server.duration"


@pytest.fixture
async def measured(database_url: str) -> AsyncIterator[tuple[Service, RecordedMetrics]]:
    recorded = RecordedMetrics()
    async with running_service(
        database_url, meter_provider=recorded.provider, balancing_poll_seconds=0.2
    ) as server:
        yield server, recorded


def rpc(method: str, code: grpc.StatusCode, service: str = "openvpp.v1.SiteRegistry") -> dict:  # type: ignore[type-arg]
    return {
        "rpc.system": "grpc",
        "rpc.service": service,
        "rpc.method": method,
        "rpc.grpc.status_code": code.value[0],
    }


async def test_calls_readings_workers_and_streams_are_measured(
    measured: tuple[Service, RecordedMetrics],
) -> None:
    server, recorded = measured
    assert server.pool is not None
    identity = IdentityStore(server.pool)
    org = await identity.create_org("measured", Role.PARTNER)
    auth = (("authorization", f"Bearer {(await identity.create_token(org.id)).token}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        sites = site_registry_pb2_grpc.SiteRegistryStub(channel)
        meters = meter_registry_pb2_grpc.MeterRegistryStub(channel)
        telemetry = telemetry_pb2_grpc.TelemetryStub(channel)
        site = (await sites.CreateSite(site_request(), metadata=auth)).site
        for _ in range(3):
            await sites.GetSite(spb.GetSiteRequest(site_id=site.id), metadata=auth)
        missing = "00000000-0000-0000-0000-000000000000"
        await rpc_error(sites.GetSite(spb.GetSiteRequest(site_id=missing), metadata=auth))
        await rpc_error(sites.GetSite(spb.GetSiteRequest(site_id=site.id)))  # no token
        assert recorded.value(DURATION, **rpc("GetSite", grpc.StatusCode.OK)) == 3
        assert recorded.value(DURATION, **rpc("GetSite", grpc.StatusCode.NOT_FOUND)) == 1
        assert recorded.value(DURATION, **rpc("GetSite", grpc.StatusCode.UNAUTHENTICATED)) == 1
        assert recorded.value(DURATION, **rpc("CreateSite", grpc.StatusCode.OK)) == 1

        meter = (await meters.CreateMeter(meter_request(site.id), metadata=auth)).meter
        day = 24 * 3600

        def reading(meter_id: str, offset: int, value: float) -> tpb.Reading:
            at = stamp(METER_START)
            at.seconds += offset
            return tpb.Reading(meter_id=meter_id, timestamp=at, register_wh=value)

        batch = [reading(meter.id, day, 10), reading(meter.id, 2 * day, 20), reading(missing, 0, 1)]
        await telemetry.IngestReadings(
            tpb.IngestReadingsRequest(batch=tpb.ReadingBatch(batch_id="a", readings=batch)),
            metadata=auth,
        )
        await telemetry.IngestReadings(
            tpb.IngestReadingsRequest(batch=tpb.ReadingBatch(batch_id="b", readings=batch[:1])),
            metadata=auth,
        )
        readings = "openvpp.telemetry.readings"
        assert recorded.value(readings, outcome="accepted") == 2
        assert recorded.value(readings, outcome="duplicate") == 1
        assert recorded.value(readings, outcome="rejected") == 1

        assert recorded.value("openvpp.health.serving") == 1
        assert recorded.value("openvpp.watch.streams") == 0
        watch = sites.WatchSites(spb.WatchSitesRequest(), metadata=auth)
        await watch.initial_metadata()
        assert recorded.value("openvpp.watch.streams") == 1
        watch.cancel()

    # The balancing worker ran passes on its timer (the ingest queued work for it).
    await eventually(
        lambda: recorded.value("openvpp.worker.passes", worker="balancing") > 0,
        "a balancing pass",
    )
    assert recorded.value("openvpp.worker.failures", worker="balancing") == 0
