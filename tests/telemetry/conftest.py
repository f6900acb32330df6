"""Fixtures for meters and telemetry: stubs, sites with meters, a second replica."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import meter_registry_pb2_grpc, site_registry_pb2_grpc, telemetry_pb2_grpc
from openvpp.v1 import site_registry_pb2 as spb
from openvpp.v1 import telemetry_pb2 as tpb

from service.app import Service
from tests.conftest import Org, test_settings
from tests.helpers import site_request

# Readings of these tests lie in January 2025 (past, so never "too far in the future").
METER_START = datetime(2024, 12, 31, 23, 0, tzinfo=UTC)


def stamp(value: datetime) -> timestamp_pb2.Timestamp:
    result = timestamp_pb2.Timestamp()
    result.FromDatetime(value)
    return result


@dataclass
class Setup:
    """A partner with one site and helpers to add meters and send readings."""

    org: Org
    site: spb.Site
    registry: site_registry_pb2_grpc.SiteRegistryAsyncStub
    meters: meter_registry_pb2_grpc.MeterRegistryAsyncStub
    telemetry: telemetry_pb2_grpc.TelemetryAsyncStub

    async def meter(self, **fields: Any) -> mpb.Meter:
        values: dict[str, Any] = {
            "site_id": self.site.id,
            "identifier": f"1ISK{len(fields)}{datetime.now().timestamp()}",
            "serial": "1ISK0001",
            "mpo": "MPO-1",
            "direction": mpb.METER_DIRECTION_CONSUMER,
            "measuring": mpb.MEASURING_READINGS_ACCURATE,
            "start_date": stamp(METER_START),
        }
        values.update(fields)
        response = await self.meters.CreateMeter(
            mpb.CreateMeterRequest(**values), metadata=self.org.auth
        )
        return response.meter

    async def ingest(self, readings: list[tpb.Reading], batch_id: str = "b") -> tpb.ReadingBatchAck:
        response = await self.telemetry.IngestReadings(
            tpb.IngestReadingsRequest(batch=tpb.ReadingBatch(batch_id=batch_id, readings=readings)),
            metadata=self.org.auth,
        )
        return response.ack

    async def list(self, meter_id: str, start: datetime, end: datetime) -> tpb.ListReadingsResponse:
        return await self.telemetry.ListReadings(
            tpb.ListReadingsRequest(
                meter_id=meter_id, start_time=stamp(start), end_time=stamp(end)
            ),
            metadata=self.org.auth,
        )


def register(meter: mpb.Meter, at: datetime, value: float, **extra: Any) -> tpb.Reading:
    return tpb.Reading(meter_id=meter.id, timestamp=stamp(at), register_wh=value, **extra)


def interval(meter: mpb.Meter, at: datetime, value: float, **extra: Any) -> tpb.Reading:
    return tpb.Reading(meter_id=meter.id, timestamp=stamp(at), interval_wh=value, **extra)


def quarter(n: int, start: datetime = METER_START + timedelta(hours=1)) -> datetime:
    """The n-th quarter-hour after 2025-01-01 00:00 UTC by default."""
    return start + timedelta(minutes=15 * n)


async def make_setup(
    org: Org,
    registry: site_registry_pb2_grpc.SiteRegistryAsyncStub,
    meters: meter_registry_pb2_grpc.MeterRegistryAsyncStub,
    telemetry: telemetry_pb2_grpc.TelemetryAsyncStub,
    **site_fields: Any,
) -> Setup:
    fields: dict[str, Any] = {"timezone": "UTC", "type": spb.SITE_TYPE_BALANCED_ACCURATE}
    fields.update(site_fields)
    site = (await registry.CreateSite(site_request(**fields), metadata=org.auth)).site
    return Setup(org, site, registry, meters, telemetry)


@pytest.fixture
async def setup(
    partner: Org,
    registry: site_registry_pb2_grpc.SiteRegistryAsyncStub,
    meters: meter_registry_pb2_grpc.MeterRegistryAsyncStub,
    telemetry: telemetry_pb2_grpc.TelemetryAsyncStub,
) -> Setup:
    return await make_setup(partner, registry, meters, telemetry)


@pytest.fixture(scope="session")
async def replica(database_url: str) -> AsyncIterator[Service]:
    """A second server on the same database, with a small watch buffer."""
    running = Service(test_settings(readings_watch_buffer_size=3), database_url)
    await running.start()
    yield running
    await running.stop(grace=1)


@pytest.fixture(scope="session")
async def replica_channel(replica: Service) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as open_channel:
        yield open_channel
