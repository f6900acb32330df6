"""Fixtures of the upstream tests: a service of our own whose clock the tests move.

The shared session service runs on the system clock; these tests need "today" under their
control, so they talk to a second Service on the same database with a FakeClock, for partner
and supplier calls alike (the scheduler is ticked by the tests, never by a timer).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.type import date_pb2
from openvpp.v1 import site_registry_pb2 as site_pb
from openvpp.v1 import site_registry_pb2_grpc, upstream_registry_pb2_grpc
from openvpp.v1 import upstream_registry_pb2 as pb

from service.app import Service
from service.auth.principal import Role
from service.common.clock import ManualClock
from tests.conftest import MakeOrg, Org, test_settings
from tests.helpers import random_identifier, site_request

# Mid-January: far from DST changes, in a year no other test uses.
BASE = datetime(2031, 1, 15, 12, 0, tzinfo=UTC)
TODAY = BASE.date()


class FakeClock(ManualClock):
    """A clock that only moves when told to, starting at :data:`BASE`."""

    def __init__(self, at: datetime = BASE) -> None:
        super().__init__(at)


@pytest.fixture(scope="session")
def session_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
async def upstream_service(
    database_url: str, service: Service, session_clock: FakeClock
) -> AsyncIterator[Service]:
    # Depends on `service` so both share one migrated database.
    running = Service(test_settings(), database_url, clock=session_clock)
    await running.start()
    yield running
    await running.stop(grace=1)


@pytest.fixture
def clock(session_clock: FakeClock) -> FakeClock:
    """The upstream service's clock, back at BASE for every test."""
    session_clock.set(BASE)
    return session_clock


@pytest.fixture(scope="session")
async def upstream_channel(upstream_service: Service) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{upstream_service.port}") as channel:
        yield channel


@pytest.fixture(scope="session")
def upstream(
    upstream_channel: grpc.aio.Channel,
) -> upstream_registry_pb2_grpc.UpstreamRegistryAsyncStub:
    return upstream_registry_pb2_grpc.UpstreamRegistryStub(upstream_channel)


@pytest.fixture(scope="session")
def sites(upstream_channel: grpc.aio.Channel) -> site_registry_pb2_grpc.SiteRegistryAsyncStub:
    """The site registry of the upstream service (same clock as the supplier side)."""
    return site_registry_pb2_grpc.SiteRegistryStub(upstream_channel)


@pytest.fixture
async def supplier(make_org: MakeOrg) -> Org:
    return await make_org(Role.SUPPLIER)


@pytest.fixture
async def other_supplier(make_org: MakeOrg) -> Org:
    return await make_org(Role.SUPPLIER)


@pytest.fixture
async def operator(make_org: MakeOrg) -> Org:
    return await make_org(Role.OPERATOR)


def day(value: date) -> date_pb2.Date:
    return date_pb2.Date(year=value.year, month=value.month, day=value.day)


def days(n: int) -> date:
    """TODAY plus n days."""
    return TODAY + timedelta(days=n)


class Api:
    """Terse calls for the tests: partner and supplier sides of one upstream service."""

    def __init__(
        self,
        sites: site_registry_pb2_grpc.SiteRegistryAsyncStub,
        upstream: upstream_registry_pb2_grpc.UpstreamRegistryAsyncStub,
    ) -> None:
        self.sites = sites
        self.upstream = upstream

    async def partner_site(
        self, org: Org, identifier: str | None = None, timezone: str = "UTC", **fields: Any
    ) -> site_pb.Site:
        request = site_request(identifier or random_identifier(), timezone=timezone, **fields)
        return (await self.sites.CreateSite(request, metadata=org.auth)).site

    async def status(self, org: Org, site_id: str) -> int:
        request = site_pb.GetSiteRequest(site_id=site_id)
        return (await self.sites.GetSite(request, metadata=org.auth)).site.upstream_status

    async def upstream_site(
        self, org: Org, identifier: str, country: str = "", external_id: str = ""
    ) -> pb.UpstreamSite:
        request = pb.CreateUpstreamSiteRequest(
            grid_identifier=identifier, country=country, external_id=external_id
        )
        return (await self.upstream.CreateUpstreamSite(request, metadata=org.auth)).upstream_site

    async def contract(
        self,
        org: Org,
        upstream_site_id: str,
        start: date,
        end: date | None = None,
        requires_agreement: bool = False,
    ) -> pb.Contract:
        request = pb.CreateContractRequest(
            upstream_site_id=upstream_site_id,
            start_date=day(start),
            end_date=day(end) if end else None,
            requires_agreement=requires_agreement,
        )
        return (await self.upstream.CreateContract(request, metadata=org.auth)).contract

    async def agree(self, org: Org, contract_id: str, who: str = "J. Peeters") -> pb.Contract:
        request = pb.AgreeContractRequest(contract_id=contract_id, agreed_by=who)
        return (await self.upstream.AgreeContract(request, metadata=org.auth)).contract

    async def terminate(self, org: Org, contract_id: str, effective: date) -> pb.Contract:
        request = pb.TerminateContractRequest(
            contract_id=contract_id, effective_date=day(effective)
        )
        return (await self.upstream.TerminateContract(request, metadata=org.auth)).contract

    async def get_upstream_site(self, org: Org, upstream_site_id: str) -> pb.UpstreamSite:
        request = pb.GetUpstreamSiteRequest(upstream_site_id=upstream_site_id)
        return (await self.upstream.GetUpstreamSite(request, metadata=org.auth)).upstream_site


@pytest.fixture
def api(
    sites: site_registry_pb2_grpc.SiteRegistryAsyncStub,
    upstream: upstream_registry_pb2_grpc.UpstreamRegistryAsyncStub,
    clock: FakeClock,
) -> Api:
    return Api(sites, upstream)


class Watcher:
    """A WatchSites stream of one partner; reads events up to a sentinel change."""

    def __init__(self, sites: site_registry_pb2_grpc.SiteRegistryAsyncStub, org: Org) -> None:
        self._sites = sites
        self._org = org
        self._call = sites.WatchSites(site_pb.WatchSitesRequest(), metadata=org.auth)

    async def __aenter__(self) -> Watcher:
        await self._call.initial_metadata()  # subscribed from here on
        # Events committed just before subscribing may still be on their way through the
        # replica's listener. They come in commit order, so a site created now marks their
        # end: what follows its CREATED event is what the test itself caused.
        marker = await self._sites.CreateSite(
            site_request(random_identifier(), name="watch start"), metadata=self._org.auth
        )
        async for event in self._call:
            if (
                event.event_type == site_pb.SITE_EVENT_TYPE_CREATED
                and event.site.id == marker.site.id
            ):
                return self
        raise AssertionError("watch stream ended before it started")

    async def __aexit__(self, *exc: object) -> None:
        self._call.cancel()

    async def events_until_sentinel(self, site_id: str) -> list[site_pb.WatchSitesResponse]:
        """Every event up to (without) an UPDATED event this causes on ``site_id``: events of
        one listener arrive in commit order, so all earlier commits are in the list."""
        marker = f"sentinel-{id(self)}-{datetime.now(UTC).timestamp()}"
        await self._sites.UpdateSite(
            site_pb.UpdateSiteRequest(
                site=site_pb.Site(id=site_id, name=marker),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            ),
            metadata=self._org.auth,
        )
        seen: list[site_pb.WatchSitesResponse] = []
        async for event in self._call:
            if event.event_type == site_pb.SITE_EVENT_TYPE_UPDATED and event.site.name == marker:
                return seen
            seen.append(event)
        raise AssertionError("watch stream ended before the sentinel")

    async def next_upstream_change(self, site_id: str) -> site_pb.WatchSitesResponse:
        async for event in self._call:
            if (
                event.event_type == site_pb.SITE_EVENT_TYPE_UPSTREAM_STATUS_CHANGED
                and event.site.id == site_id
            ):
                return event
        raise AssertionError("watch stream ended before the change")


WatcherFactory = Callable[[Org], Watcher]


@pytest.fixture
def watch(sites: site_registry_pb2_grpc.SiteRegistryAsyncStub) -> WatcherFactory:
    return lambda org: Watcher(sites, org)


def upstream_changes(events: list[site_pb.WatchSitesResponse], site_id: str) -> list[int]:
    """The upstream_status values announced by UPSTREAM_STATUS_CHANGED for ``site_id``."""
    return [
        e.site.upstream_status
        for e in events
        if e.event_type == site_pb.SITE_EVENT_TYPE_UPSTREAM_STATUS_CHANGED and e.site.id == site_id
    ]
