"""Partner and supplier writes on one identifier at the same time: no stale status, no
deadlock (both sides take the identifier's lock before any partner site row)."""

from __future__ import annotations

import asyncio

from google.protobuf import field_mask_pb2
from openvpp.v1 import site_registry_pb2 as site_pb
from openvpp.v1 import upstream_registry_pb2 as upstream_pb

from service.app import Service
from service.upstream.status import identifier_lock_key
from tests.conftest import Org
from tests.helpers import random_identifier, wait_until_blocked
from tests.upstream.conftest import Api, days
from tests.upstream.test_sites_without_supply_points import community_request


async def test_partner_create_racing_supplier_writes_never_leaves_a_stale_status(
    api: Api, partner: Org, supplier: Org
) -> None:
    for _ in range(15):
        identifier = random_identifier()
        upstream_site = await api.upstream_site(supplier, identifier)
        site, _contract = await asyncio.gather(
            api.partner_site(partner, identifier),
            api.contract(supplier, upstream_site.id, days(-1)),
        )
        assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE

    for _ in range(15):
        identifier = random_identifier()
        site, _upstream_site = await asyncio.gather(
            api.partner_site(partner, identifier),
            api.upstream_site(supplier, identifier),
        )
        assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_NO_CONTRACT


async def test_partner_updates_racing_supplier_writes_do_not_deadlock(
    api: Api, partner: Org, supplier: Org
) -> None:
    identifier = random_identifier()
    site = await api.partner_site(partner, identifier)
    upstream_site = await api.upstream_site(supplier, identifier)

    async def partner_updates() -> None:
        for zone in ["Europe/Brussels", "UTC", "Asia/Tokyo", "Europe/Paris"] * 3:
            await api.sites.UpdateSite(
                site_pb.UpdateSiteRequest(
                    site=site_pb.Site(id=site.id, timezone=zone),
                    update_mask=field_mask_pb2.FieldMask(paths=["timezone"]),
                ),
                metadata=partner.auth,
            )

    async def supplier_writes() -> None:
        for i in range(6):
            contract = await api.contract(
                supplier, upstream_site.id, days(10 * i), days(10 * i + 5)
            )
            await api.terminate(supplier, contract.id, days(10 * i + 1))

    # Errors (a deadlock surfaces as ABORTED) fail the gather.
    await asyncio.gather(partner_updates(), supplier_writes(), partner_updates())
    # Today (days(0)) lies in the first contract, terminated from days(1): active.
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE


async def test_a_site_losing_the_identifier_another_update_just_gave_it_is_reset(
    api: Api, partner: Org, supplier: Org, service: Service
) -> None:
    # One update gives a community site its first supply point (with an active contract
    # upstream); a second, sent meanwhile, removes every supply point. The second read the
    # site's identifier (none) before the first committed, and must judge by the row it
    # locks: the site ends without identifier and with no upstream status.
    assert service.pool is not None
    identifier = random_identifier()
    upstream_site = await api.upstream_site(supplier, identifier)
    await api.contract(supplier, upstream_site.id, days(-1))
    community = (
        await api.sites.CreateSite(
            community_request(location=site_pb.Location()), metadata=partner.auth
        )
    ).site
    supply_points = field_mask_pb2.FieldMask(paths=["supply_points"])
    add = site_pb.UpdateSiteRequest(
        site=site_pb.Site(
            id=community.id,
            supply_points=[
                site_pb.SupplyPoint(
                    grid_identifier=identifier,
                    direction=site_pb.SUPPLY_POINT_DIRECTION_BIDIRECTIONAL,
                )
            ],
        ),
        update_mask=supply_points,
    )
    remove = site_pb.UpdateSiteRequest(
        site=site_pb.Site(id=community.id), update_mask=supply_points
    )
    async with service.pool.acquire() as holder:
        holding = holder.transaction()
        await holding.start()
        # Any concurrent writer of the identifier (a supplier's contract call) holds it.
        await holder.execute("SELECT pg_advisory_xact_lock($1)", identifier_lock_key(identifier))
        adding = asyncio.ensure_future(api.sites.UpdateSite(add, metadata=partner.auth))
        await wait_until_blocked(holder, 1, adding)
        removing = asyncio.ensure_future(api.sites.UpdateSite(remove, metadata=partner.auth))
        # The second waits for the site's row, which the first holds.
        await wait_until_blocked(holder, 2, adding, removing)
        await holding.rollback()
    added = (await asyncio.wait_for(adding, 10)).site
    assert added.upstream_status == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE
    removed = (await asyncio.wait_for(removing, 10)).site
    assert removed.grid_identifier == ""
    assert removed.upstream_status == site_pb.UPSTREAM_STATUS_NO_UPSTREAM_REGISTERED
    got = (
        await api.sites.GetSite(site_pb.GetSiteRequest(site_id=community.id), metadata=partner.auth)
    ).site
    assert got == removed


async def test_an_upstream_site_created_while_its_identifier_is_busy_is_not_paged_past(
    api: Api, supplier: Org, service: Service
) -> None:
    assert service.pool is not None
    before = await api.upstream_site(supplier, random_identifier())
    busy = random_identifier()
    async with service.pool.acquire() as holder:
        holding = holder.transaction()
        await holding.start()
        await holder.execute("SELECT pg_advisory_xact_lock($1)", identifier_lock_key(busy))
        creating = asyncio.ensure_future(api.upstream_site(supplier, busy))
        await wait_until_blocked(holder, 1, creating)
        later = [await api.upstream_site(supplier, random_identifier()) for _ in range(2)]
        first = await api.upstream.ListUpstreamSites(
            upstream_pb.ListUpstreamSitesRequest(page_size=2), metadata=supplier.auth
        )
        await holding.rollback()
    created = await asyncio.wait_for(creating, 10)
    seen = [site.id for site in first.upstream_sites]
    token = first.next_page_token
    while token:
        page = await api.upstream.ListUpstreamSites(
            upstream_pb.ListUpstreamSitesRequest(page_size=2, page_token=token),
            metadata=supplier.auth,
        )
        seen.extend(site.id for site in page.upstream_sites)
        token = page.next_page_token
    mine = {before.id, created.id, *(site.id for site in later)}
    assert mine <= set(seen)
    assert len(seen) == len(set(seen))
