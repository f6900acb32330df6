from __future__ import annotations

import grpc
from openvpp.v1 import site_registry_pb2 as pb
from openvpp.v1 import site_registry_pb2_grpc

from tests.conftest import Org
from tests.helpers import expect_invalid, rpc_error, site_request


async def test_seed_example_creates_site(
    registry: site_registry_pb2_grpc.SiteRegistryAsyncStub, partner: Org
) -> None:
    request = pb.CreateSiteRequest(
        location=pb.Location(address="Dok Noord, Gent, Belgium"),
        supply_points=[
            pb.SupplyPoint(
                grid_identifier="EAN1234567890", direction=pb.SUPPLY_POINT_DIRECTION_BIDIRECTIONAL
            )
        ],
    )
    response = await registry.CreateSite(request, metadata=partner.auth)
    site = response.site
    assert site.grid_identifier == "1234567890"
    assert site.status == pb.SITE_STATUS_NO_RESOURCES
    assert site.upstream_status == pb.UPSTREAM_STATUS_NO_UPSTREAM_REGISTERED
    assert site.timezone == "UTC"
    fetched = await registry.GetSite(pb.GetSiteRequest(site_id=site.id), metadata=partner.auth)
    assert fetched.site == site


async def test_missing_token_is_unauthenticated(
    registry: site_registry_pb2_grpc.SiteRegistryAsyncStub,
) -> None:
    error = await rpc_error(registry.CreateSite(site_request()))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_bad_identifier_names_field(
    registry: site_registry_pb2_grpc.SiteRegistryAsyncStub, partner: Org
) -> None:
    rule = await expect_invalid(
        registry.CreateSite(site_request("123", country="BE"), metadata=partner.auth),
        "supply_points[0].grid_identifier",
    )
    assert "EAN" in rule
