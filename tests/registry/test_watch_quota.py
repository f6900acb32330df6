"""Watch* streams per organization and replica are bounded: one more is RESOURCE_EXHAUSTED
until one closes, other organizations and unary calls are not affected."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from openvpp.v1 import site_registry_pb2 as spb
from openvpp.v1 import site_registry_pb2_grpc, telemetry_pb2_grpc
from openvpp.v1 import telemetry_pb2 as tpb

from service.app import Service
from service.auth.principal import Role
from service.identifiers.ids import OrgId
from tests.conftest import MakeOrg, running_service
from tests.helpers import error_reason, eventually, site_request


@pytest.fixture
async def two_watches_server(database_url: str) -> AsyncIterator[Service]:
    async with running_service(database_url, max_watch_streams_per_org=2) as running:
        yield running


async def test_one_watch_stream_too_many_is_refused_until_one_closes(
    two_watches_server: Service, make_org: MakeOrg
) -> None:
    server = two_watches_server
    assert server.call_guard is not None
    quota = server.call_guard.watch_streams
    org, other = await make_org(Role.PARTNER), await make_org(Role.PARTNER)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        sites = site_registry_pb2_grpc.SiteRegistryStub(channel)
        telemetry = telemetry_pb2_grpc.TelemetryStub(channel)
        site = (await sites.CreateSite(site_request(), metadata=org.auth)).site
        # Refused requests take no place: three undecodable ones, then the two allowed.
        raw_watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            "/openvpp.v1.SiteRegistry/WatchSites"
        )
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as malformed:
                await asyncio.wait_for(raw_watch(b"\xff\xff\xff", metadata=org.auth).read(), 10)
            assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert quota.open_streams(OrgId(org.id)) == 0
        first = sites.WatchSites(spb.WatchSitesRequest(), metadata=org.auth)
        second = telemetry.WatchReadings(
            tpb.WatchReadingsRequest(site_id=site.id), metadata=org.auth
        )
        for call in (first, second):
            await call.initial_metadata()
        assert quota.open_streams(OrgId(org.id)) == 2

        third = sites.WatchSites(spb.WatchSitesRequest(), metadata=org.auth)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(third.read(), 10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(refused.value) == "TOO_MANY_WATCH_STREAMS"
        assert "OPENVPP_MAX_WATCH_STREAMS_PER_ORG" in (refused.value.details() or "")

        # Unary calls, and another organization's streams, go on.
        await sites.ListSites(spb.ListSitesRequest(), metadata=org.auth)
        theirs = sites.WatchSites(spb.WatchSitesRequest(), metadata=other.auth)
        await theirs.initial_metadata()
        # The open streams still get their events.
        created = (await sites.CreateSite(site_request(), metadata=org.auth)).site
        event = await asyncio.wait_for(first.read(), 10)
        assert isinstance(event, spb.WatchSitesResponse)
        assert event.site.id == created.id

        # Closing one gives its place back.
        second.cancel()

        def given_back() -> bool:
            return quota.open_streams(OrgId(org.id)) == 1

        await eventually(given_back, "the closed stream's place to be given back")
        again = sites.WatchSites(spb.WatchSitesRequest(), metadata=org.auth)
        await again.initial_metadata()
        created = (await sites.CreateSite(site_request(), metadata=org.auth)).site
        event = await asyncio.wait_for(again.read(), 10)
        assert isinstance(event, spb.WatchSitesResponse)
        for call in (first, again, theirs):
            call.cancel()
    await eventually(lambda: quota.open_streams(OrgId(org.id)) == 0, "every place given back")
