"""WatchSites: events committed through any replica reach the caller's stream; a reader
that falls behind is cut off instead of growing the server's memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from openvpp.v1 import site_registry_pb2 as pb
from openvpp.v1 import site_registry_pb2_grpc

from service.app import Service
from service.auth.principal import Role
from service.events.channels import SITE_EVENTS_CHANNEL
from service.events.hub import SubscriberTooSlow
from tests.conftest import MakeOrg, Org
from tests.conftest import test_settings as settings_for_tests
from tests.helpers import battery_request, site_request
from tests.registry.support import Stub, mask

EVENT_TIMEOUT = 10


async def open_watch(registry: Stub, org: Org) -> Any:
    call = registry.WatchSites(pb.WatchSitesRequest(), metadata=org.auth)
    # Headers arrive once the server is subscribed: events after this are not missed.
    await asyncio.wait_for(call.initial_metadata(), EVENT_TIMEOUT)
    return call


async def next_event(call: Any) -> pb.WatchSitesResponse:
    event = await asyncio.wait_for(call.read(), EVENT_TIMEOUT)
    assert isinstance(event, pb.WatchSitesResponse), event
    return event


async def test_events_made_through_another_replica(
    registry: Stub, replica_registry: Stub, partner: Org, other_partner: Org
) -> None:
    watch = await open_watch(registry, partner)
    try:
        auth = partner.auth
        # Another tenant's change on the same replica is never seen.
        await replica_registry.CreateSite(site_request(), metadata=other_partner.auth)
        created = (await replica_registry.CreateSite(site_request(name="w"), metadata=auth)).site
        updated = (
            await replica_registry.UpdateSite(
                pb.UpdateSiteRequest(
                    site=pb.Site(id=created.id, name="w2"), update_mask=mask("name")
                ),
                metadata=auth,
            )
        ).site
        resource = await replica_registry.CreateResource(battery_request(created.id), metadata=auth)
        paused = await replica_registry.PauseSite(
            pb.PauseSiteRequest(site_id=created.id), metadata=auth
        )
        await replica_registry.PauseSite(pb.PauseSiteRequest(site_id=created.id), metadata=auth)
        await replica_registry.DeleteResource(
            pb.DeleteResourceRequest(resource_id=resource.resource.id), metadata=auth
        )
        await replica_registry.DeleteSite(pb.DeleteSiteRequest(site_id=created.id), metadata=auth)

        events = [await next_event(watch) for _ in range(5)]
        assert [e.event_type for e in events] == [
            pb.SITE_EVENT_TYPE_CREATED,
            pb.SITE_EVENT_TYPE_UPDATED,
            pb.SITE_EVENT_TYPE_STATUS_CHANGED,  # first controllable resource
            pb.SITE_EVENT_TYPE_STATUS_CHANGED,  # paused; the second pause changes nothing
            pb.SITE_EVENT_TYPE_DELETED,  # removing a resource of a paused site keeps PAUSED
        ]
        assert {e.site.id for e in events} == {created.id}
        assert events[0].site == created
        assert events[1].site == updated
        assert events[2].site.status == pb.SITE_STATUS_ONBOARDED
        assert events[3].site == paused.site
        assert events[4].site.status == pb.SITE_STATUS_PAUSED  # as it was when deleted
        times = [e.event_time.ToDatetime() for e in events]
        assert times == sorted(times)
        assert times[0] >= created.create_time.ToDatetime()
        assert times[1] >= updated.update_time.ToDatetime()
    finally:
        watch.cancel()


async def test_every_watcher_of_the_org_gets_each_event(
    registry: Stub, replica_registry: Stub, partner: Org
) -> None:
    watches = [await open_watch(registry, partner), await open_watch(replica_registry, partner)]
    try:
        site = (await registry.CreateSite(site_request(), metadata=partner.auth)).site
        for watch in watches:
            event = await next_event(watch)
            assert event.event_type == pb.SITE_EVENT_TYPE_CREATED
            assert event.site.id == site.id
    finally:
        for watch in watches:
            watch.cancel()


async def test_cancelled_watch_releases_its_subscription(
    registry: Stub, partner: Org, service: Service
) -> None:
    assert service.hub is not None
    before = service.hub.subscriber_count(SITE_EVENTS_CHANNEL)
    watch = await open_watch(registry, partner)
    assert service.hub.subscriber_count(SITE_EVENTS_CHANNEL) == before + 1
    watch.cancel()
    for _ in range(200):
        if service.hub.subscriber_count(SITE_EVENTS_CHANNEL) == before:
            break
        await asyncio.sleep(0.01)
    assert service.hub.subscriber_count(SITE_EVENTS_CHANNEL) == before


@pytest.fixture(scope="module")
async def small_buffer_service(database_url: str) -> AsyncIterator[Service]:
    running = Service(settings_for_tests(watch_buffer_size=4), database_url)
    await running.start()
    yield running
    await running.stop(grace=1)


async def test_slow_reader_is_cut_off_with_a_bounded_buffer(
    small_buffer_service: Service, registry: Stub, make_org: MakeOrg
) -> None:
    org = await make_org(Role.PARTNER)
    # A client that reads nothing and grants the server a tiny HTTP/2 window: once that
    # window is full, events pile up in the server's per-subscriber buffer.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    address = f"127.0.0.1:{small_buffer_service.port}"
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        slow = site_registry_pb2_grpc.SiteRegistryStub(channel)
        watch = await open_watch(slow, org)
        hub = small_buffer_service.hub
        assert hub is not None
        subscriptions = [
            sub for subs in hub._subscriptions[SITE_EVENTS_CHANNEL].values() for sub in subs
        ]
        assert len(subscriptions) == 1
        created = 40
        for i in range(created):
            await registry.CreateSite(site_request(name=f"e{i}"), metadata=org.auth)
        # The subscriber's buffer never held more than watch_buffer_size events, and the
        # overflow ended it as too slow.
        (subscription,) = subscriptions
        assert subscription.peak_buffered <= 4
        assert isinstance(subscription.ended, SubscriberTooSlow)
        received = 0
        ended: grpc.aio.AioRpcError | None = None
        while ended is None:
            try:
                await next_event(watch)
                received += 1
            except grpc.aio.AioRpcError as error:
                ended = error
        assert ended.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "reconnect" in (ended.details() or "")
        assert received < created
        for _ in range(200):
            if hub.subscriber_count(SITE_EVENTS_CHANNEL) == 0:
                break
            await asyncio.sleep(0.01)
        assert hub.subscriber_count(SITE_EVENTS_CHANNEL) == 0
        # Reconnecting works and sees new events.
        again = await open_watch(slow, org)
        site = (await registry.CreateSite(site_request(), metadata=org.auth)).site
        # Notifications of the earlier burst may still be on their way; the new one follows.
        while (await next_event(again)).site.id != site.id:
            pass
        again.cancel()
