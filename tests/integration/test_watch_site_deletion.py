"""A watch of one site's data ends NOT_FOUND when that site (and with it its data) is
deleted, as a watch opened on it afterwards would: WatchReadings (by site or by meter) and
WatchBalances. Watches of other sites go on. (WatchSetpoints stays open: setpoints outlive
their site, tests/dispatch.)"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from openvpp.v1 import balancing_pb2 as bpb
from openvpp.v1 import (
    balancing_pb2_grpc,
    meter_registry_pb2_grpc,
    site_registry_pb2_grpc,
    telemetry_pb2_grpc,
)
from openvpp.v1 import site_registry_pb2 as spb
from openvpp.v1 import telemetry_pb2 as tpb

from service.app import Service
from service.auth.principal import Role
from tests.conftest import MakeOrg
from tests.helpers import eventually, meter_request, resource_info, site_request

Watch = Any  # a grpc.aio server-streaming call


async def ended_by_deletion(watch: Watch, site_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(watch.read(), 10)
    assert ended.value.code() == grpc.StatusCode.NOT_FOUND
    assert ended.value.details() == f"site {site_id!r} was deleted"
    assert resource_info(ended.value) == ("site", site_id)


async def still_open(watch: Watch) -> None:
    # Nothing to read, and not ended: the read is still waiting.
    read = asyncio.ensure_future(watch.read())
    done, _ = await asyncio.wait({read}, timeout=0.3)
    assert not done, read.result() if done else None
    read.cancel()


def stamp(value: datetime) -> timestamp_pb2.Timestamp:
    result = timestamp_pb2.Timestamp()
    result.FromDatetime(value)
    return result


def no_watchers_of(service: Service, *site_ids: str) -> bool:
    assert service.hub is not None
    return not any(site_id in service.hub._site_watchers for site_id in site_ids)


async def test_every_watch_of_a_site_ends_not_found_when_it_is_deleted(
    service: Service,
    channel: grpc.aio.Channel,
    registry: site_registry_pb2_grpc.SiteRegistryAsyncStub,
    meters: meter_registry_pb2_grpc.MeterRegistryAsyncStub,
    telemetry: telemetry_pb2_grpc.TelemetryAsyncStub,
    make_org: MakeOrg,
) -> None:
    partner = await make_org(Role.PARTNER)
    balancing = balancing_pb2_grpc.BalancingStub(channel)
    doomed = (await registry.CreateSite(site_request(), metadata=partner.auth)).site
    kept = (await registry.CreateSite(site_request(), metadata=partner.auth)).site
    meter = (await meters.CreateMeter(meter_request(doomed.id), metadata=partner.auth)).meter

    def watches_of(site_id: str) -> list[Watch]:
        return [
            telemetry.WatchReadings(
                tpb.WatchReadingsRequest(site_id=site_id), metadata=partner.auth
            ),
            balancing.WatchBalances(
                bpb.WatchBalancesRequest(site_id=site_id), metadata=partner.auth
            ),
        ]

    on_doomed = watches_of(doomed.id)
    on_doomed.append(
        telemetry.WatchReadings(tpb.WatchReadingsRequest(meter_id=meter.id), metadata=partner.auth)
    )
    on_kept = watches_of(kept.id)
    # Every one subscribed (headers come after the subscription and the site's check).
    for watch in on_doomed + on_kept:
        await asyncio.wait_for(watch.initial_metadata(), 10)

    await registry.DeleteSite(spb.DeleteSiteRequest(site_id=doomed.id), metadata=partner.auth)

    for watch in on_doomed:
        await ended_by_deletion(watch, doomed.id)
    for watch in on_kept:
        await still_open(watch)
    # The same status as a watch opened now.
    with pytest.raises(grpc.aio.AioRpcError) as afterwards:
        await asyncio.wait_for(
            balancing.WatchBalances(
                bpb.WatchBalancesRequest(site_id=doomed.id), metadata=partner.auth
            ).read(),
            10,
        )
    assert afterwards.value.code() == grpc.StatusCode.NOT_FOUND

    for watch in on_kept:
        watch.cancel()
    await eventually(
        lambda: no_watchers_of(service, doomed.id, kept.id), "the ended watches to be forgotten"
    )


async def test_a_watch_opened_on_a_deleted_site_is_not_found_and_leaves_nothing(
    service: Service,
    channel: grpc.aio.Channel,
    registry: site_registry_pb2_grpc.SiteRegistryAsyncStub,
    make_org: MakeOrg,
) -> None:
    partner = await make_org(Role.PARTNER)
    balancing = balancing_pb2_grpc.BalancingStub(channel)
    site = (await registry.CreateSite(site_request(), metadata=partner.auth)).site
    await registry.DeleteSite(spb.DeleteSiteRequest(site_id=site.id), metadata=partner.auth)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(
            balancing.WatchBalances(
                bpb.WatchBalancesRequest(site_id=site.id), metadata=partner.auth
            ).read(),
            10,
        )
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert refused.value.details() == f"site {site.id!r} not found"
    # Refused after subscribing: the subscription is not left behind.
    await eventually(lambda: no_watchers_of(service, site.id), "the refused watch to be forgotten")
