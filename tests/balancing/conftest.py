"""Fixtures of the balancing tests: a balanced site with meters, settings and readings over
the real gRPC API, and a way to run the queue consumer to the end of the queue."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.type import date_pb2
from openvpp.v1 import balancing_pb2 as bpb
from openvpp.v1 import (
    balancing_pb2_grpc,
    meter_registry_pb2_grpc,
    site_registry_pb2_grpc,
    telemetry_pb2_grpc,
)
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import site_registry_pb2 as spb
from openvpp.v1 import telemetry_pb2 as tpb

from service.app import Service
from service.balancing.worker import BalancingQueueConsumer
from tests.conftest import Org

BERLIN_NEW_YEAR = datetime(2024, 12, 31, 23, 0, tzinfo=UTC)  # 2025-01-01 00:00 in Berlin


def stamp(value: datetime) -> timestamp_pb2.Timestamp:
    result = timestamp_pb2.Timestamp()
    result.FromDatetime(value)
    return result


def day(value: date) -> date_pb2.Date:
    return date_pb2.Date(year=value.year, month=value.month, day=value.day)


@pytest.fixture(scope="session")
def balancing(channel: grpc.aio.Channel) -> balancing_pb2_grpc.BalancingAsyncStub:
    return balancing_pb2_grpc.BalancingStub(channel)


async def drain(consumer: BalancingQueueConsumer) -> int:
    """Runs queue passes until the queue is empty; how many passes claimed rows."""
    passes = 0
    while await consumer.step():
        passes += 1
    return passes


@pytest.fixture
def consumer(service: Service) -> BalancingQueueConsumer:
    assert service.balancing_consumer is not None
    return service.balancing_consumer


@dataclass
class Community:
    """A partner's balanced site and terse calls on it."""

    org: Org
    site: spb.Site
    registry: site_registry_pb2_grpc.SiteRegistryAsyncStub
    meters: meter_registry_pb2_grpc.MeterRegistryAsyncStub
    telemetry: telemetry_pb2_grpc.TelemetryAsyncStub
    balancing: balancing_pb2_grpc.BalancingAsyncStub
    created: list[str] = field(default_factory=list)

    async def meter(
        self,
        direction: int = mpb.METER_DIRECTION_CONSUMER,
        measuring: int = mpb.MEASURING_LOAD_PROFILE_ACCURATE,
        start: datetime = BERLIN_NEW_YEAR - timedelta(days=30),
        end: datetime | None = None,
        identifier: str | None = None,
    ) -> mpb.Meter:
        request = mpb.CreateMeterRequest(
            site_id=self.site.id,
            identifier=identifier or f"M{len(self.created)}-{self.site.id[:8]}",
            serial="1ISK0001",
            mpo="MPO-1",
            direction=direction,  # type: ignore[arg-type]
            measuring=measuring,  # type: ignore[arg-type]
            start_date=stamp(start),
            end_date=stamp(end) if end is not None else None,
        )
        meter = (await self.meters.CreateMeter(request, metadata=self.org.auth)).meter
        self.created.append(meter.id)
        return meter

    async def participate(
        self,
        meter: mpb.Meter,
        start: date = date(2025, 1, 1),
        end: date | None = None,
        priority: int | None = None,
        share: float | None = None,
        role: int = bpb.BALANCING_ROLE_PARTICIPANT,
    ) -> bpb.MeterBalancingSetting:
        request = bpb.CreateMeterBalancingSettingRequest(
            site_id=self.site.id,
            meter_id=meter.id,
            balancing=role,  # type: ignore[arg-type]
            start_date=day(start),
            end_date=day(end) if end is not None else None,
            priority=priority,
            share=share,
        )
        response = await self.balancing.CreateMeterBalancingSetting(request, metadata=self.org.auth)
        return response.setting

    async def another_site(self, org: Org | None = None, **site_fields: Any) -> Community:
        """A new site on the same channel, of ``org`` (default: this community's)."""
        return await make_community(
            org or self.org,
            self.registry,
            self.meters,
            self.telemetry,
            self.balancing,
            **site_fields,
        )

    async def participants(self, *directions: int) -> list[mpb.Meter]:
        """One load-profile meter per direction, each taking part from the default start."""
        made = [await self.meter(direction=direction) for direction in directions]
        for meter in made:
            await self.participate(meter)
        return made

    async def policy(
        self, method: int, start: date, end: date | None = None
    ) -> bpb.SiteBalancingPolicy:
        request = bpb.CreateSiteBalancingPolicyRequest(
            site_id=self.site.id,
            allocation_method=method,  # type: ignore[arg-type]
            start_date=day(start),
            end_date=day(end) if end is not None else None,
        )
        response = await self.balancing.CreateSiteBalancingPolicy(request, metadata=self.org.auth)
        return response.policy

    async def ingest(self, readings: Sequence[tpb.Reading]) -> tpb.ReadingBatchAck:
        batch = tpb.ReadingBatch(batch_id="b", readings=list(readings))
        response = await self.telemetry.IngestReadings(
            tpb.IngestReadingsRequest(batch=batch), metadata=self.org.auth
        )
        assert response.ack.rejected_count == 0, response.ack
        return response.ack

    async def profile(
        self, meter: mpb.Meter, start: datetime, values: Sequence[float], step_minutes: int = 15
    ) -> tpb.ReadingBatchAck:
        """Interval energies of a load-profile meter from ``start`` on, one per step."""
        return await self.ingest(
            [
                tpb.Reading(
                    meter_id=meter.id,
                    timestamp=stamp(start + timedelta(minutes=step_minutes * i)),
                    interval_wh=value,
                )
                for i, value in enumerate(values)
            ]
        )

    async def balances(self, **fields: Any) -> list[bpb.AggregatedBalance]:
        """Every page of ListAggregatedBalances."""
        rows: list[bpb.AggregatedBalance] = []
        token = ""
        while True:
            request = bpb.ListAggregatedBalancesRequest(page_token=token, **fields)
            response = await self.balancing.ListAggregatedBalances(request, metadata=self.org.auth)
            rows.extend(response.balances)
            token = response.next_page_token
            if not token:
                return rows

    async def summaries(self, **fields: Any) -> list[bpb.BalanceSummary]:
        rows: list[bpb.BalanceSummary] = []
        token = ""
        while True:
            request = bpb.ListBalanceSummariesRequest(
                site_id=self.site.id, page_token=token, **fields
            )
            response = await self.balancing.ListBalanceSummaries(request, metadata=self.org.auth)
            rows.extend(response.summaries)
            token = response.next_page_token
            if not token:
                return rows


def community_site_request(**fields: Any) -> spb.CreateSiteRequest:
    values: dict[str, Any] = {
        "name": "Businesspark",
        "type": spb.SITE_TYPE_BALANCED_ACCURATE,
        "balance_resolution": "PT15M",
        "location": spb.Location(address="10115 Berlin", country="DE"),
        "timezone": "Europe/Berlin",
    }
    values.update(fields)
    return spb.CreateSiteRequest(**values)


async def make_community(
    org: Org,
    registry: site_registry_pb2_grpc.SiteRegistryAsyncStub,
    meters: meter_registry_pb2_grpc.MeterRegistryAsyncStub,
    telemetry: telemetry_pb2_grpc.TelemetryAsyncStub,
    balancing: balancing_pb2_grpc.BalancingAsyncStub,
    **site_fields: Any,
) -> Community:
    site = (
        await registry.CreateSite(community_site_request(**site_fields), metadata=org.auth)
    ).site
    return Community(org, site, registry, meters, telemetry, balancing)


@pytest.fixture
async def community(
    partner: Org,
    registry: site_registry_pb2_grpc.SiteRegistryAsyncStub,
    meters: meter_registry_pb2_grpc.MeterRegistryAsyncStub,
    telemetry: telemetry_pb2_grpc.TelemetryAsyncStub,
    balancing: balancing_pb2_grpc.BalancingAsyncStub,
    consumer: BalancingQueueConsumer,
) -> Community:
    # Earlier tests of the session leave queue rows behind: start from an empty queue.
    await drain(consumer)
    return await make_community(partner, registry, meters, telemetry, balancing)


def by_pair(rows: Sequence[bpb.AggregatedBalance]) -> dict[tuple[datetime, str, str], int]:
    return {
        (
            r.interval_start.ToDatetime(tzinfo=UTC),
            r.creditor_meter_id,
            r.debitor_meter_id,
        ): r.energy_wh
        for r in rows
    }
