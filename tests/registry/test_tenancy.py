"""Tenant isolation on every RPC: another partner's ids answer exactly like ids that do not
exist, lists hold only the caller's rows, and nothing of the other tenant changes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from openvpp.v1 import site_registry_pb2 as pb

from tests.conftest import Org
from tests.helpers import battery_request, site_request
from tests.registry.support import Stub, mask, not_found, random_id

# RPC name -> request naming (site id, resource id).
CALLS: dict[str, Callable[[str, str], Any]] = {
    "GetSite": lambda site_id, _: pb.GetSiteRequest(site_id=site_id),
    "UpdateSite": lambda site_id, _: pb.UpdateSiteRequest(
        site=pb.Site(id=site_id, name="hijacked"), update_mask=mask("name")
    ),
    "DeleteSite": lambda site_id, _: pb.DeleteSiteRequest(site_id=site_id),
    "PauseSite": lambda site_id, _: pb.PauseSiteRequest(site_id=site_id),
    "ResumeSite": lambda site_id, _: pb.ResumeSiteRequest(site_id=site_id),
    "CreateResource": lambda site_id, _: battery_request(site_id),
    "ListResources": lambda site_id, _: pb.ListResourcesRequest(site_id=site_id),
    "GetResource": lambda _, resource_id: pb.GetResourceRequest(resource_id=resource_id),
    "UpdateResource": lambda _, resource_id: pb.UpdateResourceRequest(
        resource=pb.Resource(id=resource_id, name="hijacked"), update_mask=mask("name")
    ),
    "DeleteResource": lambda _, resource_id: pb.DeleteResourceRequest(resource_id=resource_id),
}


@pytest.mark.parametrize("method", sorted(CALLS))
async def test_other_tenants_ids_are_not_found_like_missing_ones(
    registry: Stub, partner: Org, other_partner: Org, method: str
) -> None:
    theirs = (
        await registry.CreateSite(site_request(name="theirs"), metadata=other_partner.auth)
    ).site
    their_resource = (
        await registry.CreateResource(battery_request(theirs.id), metadata=other_partner.auth)
    ).resource
    call = getattr(registry, method)
    build = CALLS[method]
    foreign = await not_found(call(build(theirs.id, their_resource.id), metadata=partner.auth))
    missing = await not_found(call(build(random_id(), random_id()), metadata=partner.auth))
    assert foreign == missing
    # Untouched for its owner.
    after = await registry.GetSite(
        pb.GetSiteRequest(site_id=theirs.id), metadata=other_partner.auth
    )
    assert after.site.name == "theirs"
    assert after.site.status == pb.SITE_STATUS_ONBOARDED
    resource = await registry.GetResource(
        pb.GetResourceRequest(resource_id=their_resource.id), metadata=other_partner.auth
    )
    assert resource.resource == their_resource


async def test_lists_hold_only_the_callers_rows(
    registry: Stub, partner: Org, other_partner: Org
) -> None:
    mine = (await registry.CreateSite(site_request(), metadata=partner.auth)).site
    theirs = (await registry.CreateSite(site_request(), metadata=other_partner.auth)).site
    listed = await registry.ListSites(pb.ListSitesRequest(), metadata=partner.auth)
    assert [s.id for s in listed.sites] == [mine.id]
    assert listed.total_size == 1
    by_identifier = await registry.ListSites(
        pb.ListSitesRequest(grid_identifier=theirs.grid_identifier), metadata=partner.auth
    )
    assert list(by_identifier.sites) == []
    assert by_identifier.total_size == 0


async def test_the_same_identifier_is_free_for_another_partner(
    registry: Stub, partner: Org, other_partner: Org
) -> None:
    """Uniqueness is per partner: a collision must not reveal another tenant's site."""
    first = await registry.CreateSite(site_request("SHARED-1"), metadata=partner.auth)
    second = await registry.CreateSite(site_request("SHARED-1"), metadata=other_partner.auth)
    assert first.site.id != second.site.id
    mine = (await registry.CreateSite(site_request(), metadata=partner.auth)).site
    moved = await registry.UpdateSite(
        pb.UpdateSiteRequest(
            site=pb.Site(
                id=mine.id,
                supply_points=[
                    pb.SupplyPoint(
                        grid_identifier="OTHER-2",
                        direction=pb.SUPPLY_POINT_DIRECTION_BIDIRECTIONAL,
                    )
                ],
            ),
            update_mask=mask("supply_points"),
        ),
        metadata=partner.auth,
    )
    assert moved.site.grid_identifier == "OTHER-2"
