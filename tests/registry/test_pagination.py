"""Cursor pagination of ListSites and ListResources."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from openvpp.v1 import site_registry_pb2 as pb

from service.app import Service
from service.auth.principal import Role
from service.upstream.status import identifier_lock_key
from tests.conftest import MakeOrg, Org
from tests.helpers import (
    battery_request,
    expect_invalid,
    random_identifier,
    site_request,
    wait_until_blocked,
)
from tests.registry.support import Stub


async def create_sites(registry: Stub, org: Org, count: int) -> list[str]:
    return [
        (await registry.CreateSite(site_request(name=f"s{i}"), metadata=org.auth)).site.id
        for i in range(count)
    ]


async def test_pages_with_inserts_between_them_have_no_duplicates_or_gaps(
    registry: Stub, partner: Org, other_partner: Org
) -> None:
    existing = await create_sites(registry, partner, 7)
    await create_sites(registry, other_partner, 3)  # never listed for partner
    seen: list[str] = []
    totals: list[int] = []
    inserted: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await registry.ListSites(
            pb.ListSitesRequest(page_size=3, page_token=token), metadata=partner.auth
        )
        pages += 1
        seen += [site.id for site in page.sites]
        totals.append(page.total_size)
        assert len(page.sites) <= 3
        if not page.next_page_token:
            break
        token = page.next_page_token
        if pages <= 2:
            # A site created between pages is listed once, at the end (creation order).
            inserted += await create_sites(registry, partner, 1)
    assert seen == existing + inserted
    assert len(set(seen)) == len(seen)
    assert totals[0] == 7
    assert totals[-1] == 9  # total_size counts what matches now
    assert pages == 3


async def test_last_page_exactly_full_has_no_next_token(registry: Stub, partner: Org) -> None:
    ids = await create_sites(registry, partner, 4)
    first = await registry.ListSites(pb.ListSitesRequest(page_size=2), metadata=partner.auth)
    second = await registry.ListSites(
        pb.ListSitesRequest(page_size=2, page_token=first.next_page_token), metadata=partner.auth
    )
    assert [s.id for s in first.sites] + [s.id for s in second.sites] == ids
    assert second.next_page_token == ""
    # The default page size (50) takes all four at once.
    everything = await registry.ListSites(pb.ListSitesRequest(), metadata=partner.auth)
    assert [s.id for s in everything.sites] == ids
    assert everything.next_page_token == ""
    assert everything.total_size == 4


async def test_filters(registry: Stub, partner: Org) -> None:
    auth = partner.auth
    a, b, c = await create_sites(registry, partner, 3)
    await registry.CreateResource(battery_request(b), metadata=auth)
    await registry.PauseSite(pb.PauseSiteRequest(site_id=c), metadata=auth)

    async def ids(**filters: object) -> list[str]:
        listed = await registry.ListSites(pb.ListSitesRequest(**filters), metadata=auth)  # type: ignore[arg-type]
        assert listed.total_size == len(listed.sites)
        return [s.id for s in listed.sites]

    assert await ids(status=pb.SITE_STATUS_NO_RESOURCES) == [a]
    assert await ids(status=pb.SITE_STATUS_ONBOARDED) == [b]
    assert await ids(status=pb.SITE_STATUS_PAUSED) == [c]
    assert await ids(status=pb.SITE_STATUS_DELETED) == []
    assert await ids(upstream_status=pb.UPSTREAM_STATUS_NO_UPSTREAM_REGISTERED) == [a, b, c]
    assert await ids(upstream_status=pb.UPSTREAM_STATUS_CONTRACT_ACTIVE) == []
    site_b = (await registry.GetSite(pb.GetSiteRequest(site_id=b), metadata=auth)).site
    # The filter is normalized like the stored identifier.
    raw = "ean " + site_b.grid_identifier.lower()
    assert await ids(grid_identifier=raw) == [b]
    assert await ids(grid_identifier=raw, status=pb.SITE_STATUS_PAUSED) == []


async def test_injection_identifier_filter(registry: Stub, partner: Org) -> None:
    request = site_request()
    del request.supply_points[:]
    request.supply_points.extend(
        [
            pb.SupplyPoint(grid_identifier="OFF-9", direction=pb.SUPPLY_POINT_DIRECTION_OFFTAKE),
            pb.SupplyPoint(grid_identifier="INJ-9", direction=pb.SUPPLY_POINT_DIRECTION_INJECTION),
        ]
    )
    site = (await registry.CreateSite(request, metadata=partner.auth)).site
    listed = await registry.ListSites(
        pb.ListSitesRequest(grid_identifier="INJ-9"), metadata=partner.auth
    )
    assert [s.id for s in listed.sites] == [site.id]


async def test_filtered_pages(registry: Stub, partner: Org) -> None:
    ids = await create_sites(registry, partner, 5)
    for site_id in ids[1::2]:
        await registry.PauseSite(pb.PauseSiteRequest(site_id=site_id), metadata=partner.auth)
    request = pb.ListSitesRequest(page_size=1, status=pb.SITE_STATUS_NO_RESOURCES)
    seen = []
    while True:
        page = await registry.ListSites(request, metadata=partner.auth)
        assert page.total_size == 3
        seen += [s.id for s in page.sites]
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert seen == ids[0::2]


async def test_page_token_bound_to_its_filters(registry: Stub, partner: Org) -> None:
    await create_sites(registry, partner, 3)
    first = await registry.ListSites(pb.ListSitesRequest(page_size=1), metadata=partner.auth)
    rule = await expect_invalid(
        registry.ListSites(
            pb.ListSitesRequest(
                page_size=1, page_token=first.next_page_token, status=pb.SITE_STATUS_ONBOARDED
            ),
            metadata=partner.auth,
        ),
        "page_token",
    )
    assert "same filters" in rule
    # The page size may change between pages.
    rest = await registry.ListSites(
        pb.ListSitesRequest(page_size=10, page_token=first.next_page_token), metadata=partner.auth
    )
    assert len(rest.sites) == 2


async def test_page_token_bound_to_the_organization(
    registry: Stub, partner: Org, other_partner: Org
) -> None:
    await create_sites(registry, partner, 2)
    await create_sites(registry, other_partner, 2)
    first = await registry.ListSites(pb.ListSitesRequest(page_size=1), metadata=partner.auth)
    assert first.next_page_token
    # Same filters (none), same list, another organization: refused, not an empty page.
    rule = await expect_invalid(
        registry.ListSites(
            pb.ListSitesRequest(page_size=1, page_token=first.next_page_token),
            metadata=other_partner.auth,
        ),
        "page_token",
    )
    assert "same organization" in rule
    site_id = (await registry.CreateSite(site_request(), metadata=partner.auth)).site.id
    for _ in range(2):
        await registry.CreateResource(battery_request(site_id), metadata=partner.auth)
    resources = await registry.ListResources(
        pb.ListResourcesRequest(site_id=site_id, page_size=1), metadata=partner.auth
    )
    await expect_invalid(
        registry.ListResources(
            pb.ListResourcesRequest(
                site_id=site_id, page_size=1, page_token=resources.next_page_token
            ),
            metadata=other_partner.auth,
        ),
        "page_token",
    )


def _tampered(token: str) -> list[str]:
    body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))

    def encode(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return [
        "not a token",
        token[:-3],
        token + "x",
        "%%%%",
        encode([1, 2]),
        encode({**body, "t": "yesterday"}),
        encode({**body, "i": "not-a-uuid"}),
        encode({**body, "t": 12}),
        encode({k: v for k, v in body.items() if k != "f"}),
        # Forged with the right fingerprint (a caller can compute it): still refused.
        encode({**body, "i": 5}),
        encode({**body, "i": None}),
        encode({**body, "t": None}),
        encode({**body, "t": "2026-01-01T00:00:00"}),
        encode({**body, "t": "9999-12-31T23:59:59-14:00"}),
        encode({**body, "t": "0001-01-01T00:00:00+14:00"}),
        # Nested deeper than the JSON parser goes, within the length a string may have.
        base64.urlsafe_b64encode(b"[" * 1500 + b"]" * 1500).decode().rstrip("="),
    ]


async def test_tampered_page_tokens_are_invalid_argument(registry: Stub, partner: Org) -> None:
    await create_sites(registry, partner, 2)
    first = await registry.ListSites(pb.ListSitesRequest(page_size=1), metadata=partner.auth)
    for token in _tampered(first.next_page_token):
        await expect_invalid(
            registry.ListSites(
                pb.ListSitesRequest(page_size=1, page_token=token), metadata=partner.auth
            ),
            "page_token",
        )


async def test_a_token_of_one_list_is_refused_by_another(
    registry: Stub, partner: Org, site: pb.Site
) -> None:
    other = (await registry.CreateSite(site_request(), metadata=partner.auth)).site
    for _ in range(3):
        await registry.CreateResource(battery_request(site.id), metadata=partner.auth)
        await registry.CreateResource(battery_request(other.id), metadata=partner.auth)
    sites_page = await registry.ListSites(pb.ListSitesRequest(page_size=1), metadata=partner.auth)
    first = await registry.ListResources(
        pb.ListResourcesRequest(site_id=site.id, page_size=1), metadata=partner.auth
    )
    for token, site_id in (
        (sites_page.next_page_token, site.id),
        (first.next_page_token, other.id),
    ):
        await expect_invalid(
            registry.ListResources(
                pb.ListResourcesRequest(site_id=site_id, page_token=token), metadata=partner.auth
            ),
            "page_token",
        )
    await expect_invalid(
        registry.ListSites(
            pb.ListSitesRequest(page_token=first.next_page_token), metadata=partner.auth
        ),
        "page_token",
    )


@pytest.mark.parametrize("page_size", [1, 2])
async def test_resource_pages_with_a_concurrent_insert(
    registry: Stub, partner: Org, site: pb.Site, page_size: int
) -> None:
    created = [
        (
            await registry.CreateResource(
                battery_request(site.id, name=f"r{i}"), metadata=partner.auth
            )
        ).resource.id
        for i in range(5)
    ]
    seen: list[str] = []
    request = pb.ListResourcesRequest(site_id=site.id, page_size=page_size)
    inserted = False
    while True:
        page = await registry.ListResources(request, metadata=partner.auth)
        seen += [r.id for r in page.resources]
        if not inserted:
            created.append(
                (
                    await registry.CreateResource(battery_request(site.id), metadata=partner.auth)
                ).resource.id
            )
            inserted = True
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert seen == created
    assert page.total_size == 6


async def test_a_site_created_while_a_supplier_holds_its_identifier_is_not_passed_over(
    service: Service, registry: Stub, make_org: MakeOrg
) -> None:
    partner = await make_org(Role.PARTNER)
    identifier = random_identifier()
    assert service.pool is not None
    async with service.pool.acquire() as holder, holder.transaction():
        # A supplier's write on the identifier (or the upstream scheduler) holds its lock.
        await holder.execute("SELECT pg_advisory_xact_lock($1)", identifier_lock_key(identifier))
        slow = asyncio.ensure_future(
            registry.CreateSite(site_request(identifier), metadata=partner.auth)
        )
        await wait_until_blocked(holder, 1, slow)
        others = await create_sites(registry, partner, 2)
        first = await registry.ListSites(pb.ListSitesRequest(page_size=1), metadata=partner.auth)
    slow_site = (await slow).site
    seen = [site.id for site in first.sites]
    token = first.next_page_token
    while token:
        page = await registry.ListSites(
            pb.ListSitesRequest(page_size=1, page_token=token), metadata=partner.auth
        )
        seen += [site.id for site in page.sites]
        token = page.next_page_token
    assert seen == [*others, slow_site.id]
