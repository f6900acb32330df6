"""Every upstream_status, reached through the API, and every change reaching WatchSites."""

from __future__ import annotations

from datetime import timedelta

from google.protobuf import field_mask_pb2
from openvpp.v1 import site_registry_pb2 as site_pb
from openvpp.v1 import upstream_registry_pb2 as pb

from service.app import Service
from tests.conftest import Org
from tests.helpers import random_ean18, random_identifier
from tests.upstream.conftest import (
    Api,
    FakeClock,
    WatcherFactory,
    day,
    days,
    upstream_changes,
)


async def test_no_upstream_then_no_contract_then_back(
    api: Api, partner: Org, supplier: Org
) -> None:
    identifier = random_identifier()
    site = await api.partner_site(partner, identifier)
    assert site.upstream_status == site_pb.UPSTREAM_STATUS_NO_UPSTREAM_REGISTERED

    upstream_site = await api.upstream_site(supplier, identifier)
    assert upstream_site.matched_partner_site
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_NO_CONTRACT

    await api.upstream.DeleteUpstreamSite(
        pb.DeleteUpstreamSiteRequest(upstream_site_id=upstream_site.id), metadata=supplier.auth
    )
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_NO_UPSTREAM_REGISTERED


async def test_contract_lifecycle_reaches_every_contract_status(
    api: Api, partner: Org, supplier: Org, clock: FakeClock, upstream_service: Service
) -> None:
    identifier = random_identifier()
    site = await api.partner_site(partner, identifier)
    upstream_site = await api.upstream_site(supplier, identifier)
    contract = await api.contract(
        supplier, upstream_site.id, days(10), days(40), requires_agreement=True
    )
    assert contract.state == pb.CONTRACT_STATE_NEEDS_AGREEMENT
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_NEEDS_AGREEMENT

    agreed = await api.agree(supplier, contract.id)
    assert agreed.state == pb.CONTRACT_STATE_PENDING
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_PENDING

    scheduler = upstream_service.upstream_scheduler
    assert scheduler is not None
    clock.advance(timedelta(days=10))
    await scheduler.run_once()
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE

    clock.advance(timedelta(days=30))
    await scheduler.run_once()
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_INACTIVE


async def test_backdated_ended_contract_is_inactive(api: Api, partner: Org, supplier: Org) -> None:
    identifier = random_identifier()
    site = await api.partner_site(partner, identifier)
    upstream_site = await api.upstream_site(supplier, identifier)
    contract = await api.contract(supplier, upstream_site.id, days(-60), days(-30))
    assert contract.state == pb.CONTRACT_STATE_INACTIVE
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_INACTIVE


async def test_contract_without_agreement_starting_today_is_active(
    api: Api, partner: Org, supplier: Org
) -> None:
    identifier = random_identifier()
    site = await api.partner_site(partner, identifier)
    upstream_site = await api.upstream_site(supplier, identifier)
    contract = await api.contract(supplier, upstream_site.id, days(0))
    assert contract.state == pb.CONTRACT_STATE_ACTIVE
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE


async def test_partner_site_registered_later_gets_status_at_once(
    api: Api, partner: Org, supplier: Org, watch: WatcherFactory
) -> None:
    identifier = random_ean18()
    upstream_site = await api.upstream_site(supplier, identifier, country="BE")
    assert not upstream_site.matched_partner_site
    await api.contract(supplier, upstream_site.id, days(-5))

    async with watch(partner) as watcher:
        # Written the partner's way: spaced, lower-case prefix, still the same identifier.
        spaced = "ean " + " ".join(identifier[i : i + 6] for i in range(0, 18, 6))
        site = await api.partner_site(partner, spaced, country="BE")
        assert site.grid_identifier == identifier
        assert site.upstream_status == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE
        events = await watcher.events_until_sentinel(site.id)
    created = [e for e in events if e.event_type == site_pb.SITE_EVENT_TYPE_CREATED]
    assert [e.site.upstream_status for e in created] == [site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE]
    assert upstream_changes(events, site.id) == []
    assert (await api.get_upstream_site(supplier, upstream_site.id)).matched_partner_site


async def test_partner_changing_identifier_follows_the_new_match(
    api: Api, partner: Org, supplier: Org, watch: WatcherFactory
) -> None:
    matched = random_identifier()
    upstream_site = await api.upstream_site(supplier, matched)
    await api.contract(supplier, upstream_site.id, days(-1))
    site = await api.partner_site(partner)
    assert site.upstream_status == site_pb.UPSTREAM_STATUS_NO_UPSTREAM_REGISTERED

    async with watch(partner) as watcher:
        updated = await api.sites.UpdateSite(
            site_pb.UpdateSiteRequest(
                site=site_pb.Site(
                    id=site.id,
                    supply_points=[
                        site_pb.SupplyPoint(
                            grid_identifier=matched,
                            direction=site_pb.SUPPLY_POINT_DIRECTION_BIDIRECTIONAL,
                        )
                    ],
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["supply_points"]),
            ),
            metadata=partner.auth,
        )
        assert updated.site.upstream_status == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE
        events = await watcher.events_until_sentinel(site.id)
    assert upstream_changes(events, site.id) == [site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE]


async def test_matches_partner_sites_of_every_organization(
    api: Api, partner: Org, other_partner: Org, supplier: Org
) -> None:
    identifier = random_identifier()
    first = await api.partner_site(partner, identifier)
    second = await api.partner_site(other_partner, identifier)
    upstream_site = await api.upstream_site(supplier, identifier)
    await api.contract(supplier, upstream_site.id, days(3))
    assert await api.status(partner, first.id) == site_pb.UPSTREAM_STATUS_CONTRACT_PENDING
    assert await api.status(other_partner, second.id) == site_pb.UPSTREAM_STATUS_CONTRACT_PENDING


async def test_terminating_updates_matched_sites_and_watchers(
    api: Api, partner: Org, supplier: Org, watch: WatcherFactory
) -> None:
    identifier = random_identifier()
    site = await api.partner_site(partner, identifier)
    upstream_site = await api.upstream_site(supplier, identifier)
    contract = await api.contract(supplier, upstream_site.id, days(-10))
    async with watch(partner) as watcher:
        terminated = await api.terminate(supplier, contract.id, days(0))
        events = await watcher.events_until_sentinel(site.id)
    assert terminated.state == pb.CONTRACT_STATE_INACTIVE
    assert terminated.termination_date == day(days(0))
    assert terminated.HasField("terminate_time")
    assert upstream_changes(events, site.id) == [site_pb.UPSTREAM_STATUS_CONTRACT_INACTIVE]
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_INACTIVE


async def test_deleting_upstream_site_updates_matched_sites_and_watchers(
    api: Api, partner: Org, supplier: Org, watch: WatcherFactory
) -> None:
    identifier = random_identifier()
    site = await api.partner_site(partner, identifier)
    upstream_site = await api.upstream_site(supplier, identifier)
    await api.contract(supplier, upstream_site.id, days(-10))
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE
    async with watch(partner) as watcher:
        await api.upstream.DeleteUpstreamSite(
            pb.DeleteUpstreamSiteRequest(upstream_site_id=upstream_site.id),
            metadata=supplier.auth,
        )
        events = await watcher.events_until_sentinel(site.id)
    assert upstream_changes(events, site.id) == [site_pb.UPSTREAM_STATUS_NO_UPSTREAM_REGISTERED]


async def test_unchanged_status_publishes_nothing(
    api: Api, partner: Org, supplier: Org, watch: WatcherFactory
) -> None:
    identifier = random_identifier()
    site = await api.partner_site(partner, identifier)
    first = await api.upstream_site(supplier, identifier)
    await api.contract(supplier, first.id, days(-10), days(50))
    async with watch(partner) as watcher:
        # A future contract beside an active one: the site stays CONTRACT_ACTIVE.
        await api.contract(supplier, first.id, days(100), requires_agreement=True)
        events = await watcher.events_until_sentinel(site.id)
    assert upstream_changes(events, site.id) == []
