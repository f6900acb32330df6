"""A BALANCED_* site may have no supply point: no grid identifier, never matched upstream."""

from __future__ import annotations

from google.protobuf import field_mask_pb2
from openvpp.v1 import site_registry_pb2 as site_pb
from openvpp.v1 import upstream_registry_pb2 as pb

from service.app import Service
from tests.conftest import Org
from tests.helpers import expect_invalid, random_identifier
from tests.upstream.conftest import Api, days


def community_request(**fields: object) -> site_pb.CreateSiteRequest:
    values: dict[str, object] = {
        "name": "Businesspark",
        "type": site_pb.SITE_TYPE_BALANCED_ACCURATE,
        "balance_resolution": "PT15M",
        "location": site_pb.Location(address="10115 Berlin", country="DE"),
        "timezone": "Europe/Berlin",
    }
    values.update(fields)
    return site_pb.CreateSiteRequest(**values)  # type: ignore[arg-type]


async def test_balanced_site_without_supply_points_create_get_list(api: Api, partner: Org) -> None:
    created = (await api.sites.CreateSite(community_request(), metadata=partner.auth)).site
    second = (await api.sites.CreateSite(community_request(), metadata=partner.auth)).site
    assert created.grid_identifier == ""
    assert list(created.supply_points) == []
    assert created.type == site_pb.SITE_TYPE_BALANCED_ACCURATE
    assert created.upstream_status == site_pb.UPSTREAM_STATUS_NO_UPSTREAM_REGISTERED

    got = await api.sites.GetSite(site_pb.GetSiteRequest(site_id=created.id), metadata=partner.auth)
    assert got.site == created
    listed = await api.sites.ListSites(site_pb.ListSitesRequest(), metadata=partner.auth)
    assert {created.id, second.id} <= {site.id for site in listed.sites}


async def test_unbalanced_site_still_needs_a_supply_point(api: Api, partner: Org) -> None:
    for site_type in (site_pb.SITE_TYPE_UNSPECIFIED, site_pb.SITE_TYPE_UNBALANCED_ACCURATE):
        await expect_invalid(
            api.sites.CreateSite(community_request(type=site_type), metadata=partner.auth),
            "supply_points",
        )
    site = (await api.sites.CreateSite(community_request(), metadata=partner.auth)).site
    change = site_pb.Site(id=site.id, type=site_pb.SITE_TYPE_UNBALANCED_ACCURATE)
    await expect_invalid(
        api.sites.UpdateSite(
            site_pb.UpdateSiteRequest(
                site=change, update_mask=field_mask_pb2.FieldMask(paths=["type"])
            ),
            metadata=partner.auth,
        ),
        "site.supply_points",
    )


async def test_upstream_matching_ignores_a_site_without_grid_identifier(
    api: Api, partner: Org, supplier: Org, upstream_service: Service
) -> None:
    community = (await api.sites.CreateSite(community_request(), metadata=partner.auth)).site
    identifier = random_identifier()
    matched = await api.partner_site(partner, identifier)
    upstream_site = await api.upstream_site(supplier, identifier)
    await api.contract(supplier, upstream_site.id, days(-1))
    # An upstream site whose identifier is empty after normalization cannot exist either.
    await expect_invalid(
        api.upstream.CreateUpstreamSite(
            pb.CreateUpstreamSiteRequest(grid_identifier=" "), metadata=supplier.auth
        ),
        "grid_identifier",
    )
    assert upstream_service.upstream_scheduler is not None
    await upstream_service.upstream_scheduler.tick()
    assert await api.status(partner, matched.id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE
    assert await api.status(partner, community.id) == site_pb.UPSTREAM_STATUS_NO_UPSTREAM_REGISTERED

    # Dropping its supply points leaves a balanced site matching nothing any more.
    update = site_pb.UpdateSiteRequest(
        site=site_pb.Site(id=matched.id, type=site_pb.SITE_TYPE_BALANCED_ACCURATE),
        update_mask=field_mask_pb2.FieldMask(paths=["supply_points", "type"]),
    )
    updated = (await api.sites.UpdateSite(update, metadata=partner.auth)).site
    assert updated.grid_identifier == ""
    assert updated.upstream_status == site_pb.UPSTREAM_STATUS_NO_UPSTREAM_REGISTERED
    contracts = await api.upstream.ListContracts(
        pb.ListContractsRequest(upstream_site_id=upstream_site.id), metadata=supplier.auth
    )
    assert len(contracts.contracts) == 1
    refreshed = await api.get_upstream_site(supplier, upstream_site.id)
    assert not refreshed.matched_partner_site
