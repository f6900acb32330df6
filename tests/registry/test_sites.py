"""Site and resource lifecycle through the real gRPC API: every RPC, status transitions,
field masks, deletion and atomicity."""

from __future__ import annotations

from typing import Any

import asyncpg
import grpc
import pytest
from openvpp.v1 import site_registry_pb2 as pb

from service.app import Service
from tests.conftest import Org
from tests.helpers import battery_request, expect_invalid, rpc_error, site_request
from tests.registry.support import (
    INJECTION,
    OFFTAKE,
    Stub,
    count_rows,
    mask,
    point,
    resource_request,
)

VALID_EAN_BE = "541448820000000008"
CONTROLLABLE = [
    pb.RESOURCE_TYPE_STATIC_BATTERY,
    pb.RESOURCE_TYPE_HEAT_PUMP,
    pb.RESOURCE_TYPE_ELECTRIC_VEHICLE,
    pb.RESOURCE_TYPE_EV_CHARGING_POINT,
    pb.RESOURCE_TYPE_PHOTOVOLTAIC,
    pb.RESOURCE_TYPE_WIND,
    pb.RESOURCE_TYPE_OTHER,
]


async def get_site(registry: Stub, org: Org, site_id: str) -> pb.Site:
    return (await registry.GetSite(pb.GetSiteRequest(site_id=site_id), metadata=org.auth)).site


async def test_create_site_with_every_field(registry: Stub, partner: Org) -> None:
    request = pb.CreateSiteRequest(
        name="Dok Noord",
        external_id="crm-42",
        location=pb.Location(
            address="Dok Noord 7, Gent", latitude=51.07, longitude=3.73, country="be"
        ),
        supply_points=[
            point("EAN 5414 4882 0000 0000 08", OFFTAKE),
            point("541448820000000015", INJECTION),
        ],
        type=pb.SITE_TYPE_BALANCED_ACCURATE,
        balance_resolution="PT1H",
    )
    site = (await registry.CreateSite(request, metadata=partner.auth)).site
    assert site.id
    assert site.name == "Dok Noord"
    assert site.external_id == "crm-42"
    assert site.location.country == "BE"
    assert (site.location.latitude, site.location.longitude) == (51.07, 3.73)
    assert site.timezone == "Europe/Brussels"  # default from the country
    assert site.grid_identifier == VALID_EAN_BE
    assert [(p.grid_identifier, p.direction, p.primary) for p in site.supply_points] == [
        (VALID_EAN_BE, OFFTAKE, True),
        ("541448820000000015", INJECTION, False),
    ]
    assert site.status == pb.SITE_STATUS_NO_RESOURCES
    assert site.upstream_status == pb.UPSTREAM_STATUS_NO_UPSTREAM_REGISTERED
    assert site.type == pb.SITE_TYPE_BALANCED_ACCURATE
    assert site.balance_resolution == "PT1H"
    assert site.create_time.seconds > 0
    assert site.update_time == site.create_time  # never changed yet
    assert await get_site(registry, partner, site.id) == site


async def test_injection_listed_after_offtake_whatever_the_request_order(
    registry: Stub, partner: Org
) -> None:
    request = site_request()
    del request.supply_points[:]
    request.supply_points.extend([point("INJ-1", INJECTION), point("OFF-1", OFFTAKE)])
    site = (await registry.CreateSite(request, metadata=partner.auth)).site
    assert [p.grid_identifier for p in site.supply_points] == ["OFF-1", "INJ-1"]
    assert site.grid_identifier == "OFF-1"


async def test_defaults(registry: Stub, partner: Org) -> None:
    site = (await registry.CreateSite(site_request(), metadata=partner.auth)).site
    assert site.timezone == "UTC"
    assert site.balance_resolution == "PT15M"
    assert site.type == pb.SITE_TYPE_UNSPECIFIED
    assert not site.location.HasField("latitude")


async def test_same_primary_identifier_twice_is_already_exists(
    registry: Stub, partner: Org, service: Service
) -> None:
    await registry.CreateSite(site_request("EAN 4444"), metadata=partner.auth)
    error = await rpc_error(registry.CreateSite(site_request("4444"), metadata=partner.auth))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "second head meter" in (error.details() or "")
    # The identifier of another site's injection point is no primary one: allowed.
    request = site_request()
    del request.supply_points[:]
    request.supply_points.extend([point("OFF-X", OFFTAKE), point("5555", INJECTION)])
    await registry.CreateSite(request, metadata=partner.auth)
    await registry.CreateSite(site_request("5555"), metadata=partner.auth)
    assert service.pool is not None
    async with service.pool.acquire() as conn:
        assert await count_rows(conn, "sites", partner) == 3


async def test_delete_site_removes_it_and_its_resources(
    registry: Stub, partner: Org, site: pb.Site, service: Service
) -> None:
    first = await registry.CreateResource(battery_request(site.id), metadata=partner.auth)
    await registry.CreateResource(
        resource_request(site.id, pb.RESOURCE_TYPE_METER), metadata=partner.auth
    )
    await registry.DeleteSite(pb.DeleteSiteRequest(site_id=site.id), metadata=partner.auth)
    error = await rpc_error(
        registry.GetSite(pb.GetSiteRequest(site_id=site.id), metadata=partner.auth)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await rpc_error(
        registry.GetResource(
            pb.GetResourceRequest(resource_id=first.resource.id), metadata=partner.auth
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert service.pool is not None
    async with service.pool.acquire() as conn:
        assert await count_rows(conn, "resources", partner) == 0
        assert await count_rows(conn, "sites", partner) == 0
    # Deleting twice: the site is gone.
    error = await rpc_error(
        registry.DeleteSite(pb.DeleteSiteRequest(site_id=site.id), metadata=partner.auth)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    # Its identifier is free again.
    await registry.CreateSite(site_request(site.grid_identifier), metadata=partner.auth)


# --- status transitions -----------------------------------------------------------------


@pytest.mark.parametrize("kind", CONTROLLABLE)
async def test_first_controllable_resource_onboards_last_removed_reverts(
    registry: Stub, partner: Org, site: pb.Site, kind: int
) -> None:
    created = await registry.CreateResource(resource_request(site.id, kind), metadata=partner.auth)
    assert created.resource.update_time == created.resource.create_time
    onboarded = await get_site(registry, partner, site.id)
    assert onboarded.status == pb.SITE_STATUS_ONBOARDED
    assert onboarded.update_time.ToDatetime() > onboarded.create_time.ToDatetime()
    await registry.DeleteResource(
        pb.DeleteResourceRequest(resource_id=created.resource.id), metadata=partner.auth
    )
    assert (await get_site(registry, partner, site.id)).status == pb.SITE_STATUS_NO_RESOURCES


async def test_meter_alone_does_not_onboard(registry: Stub, partner: Org, site: pb.Site) -> None:
    meter = await registry.CreateResource(
        resource_request(site.id, pb.RESOURCE_TYPE_METER), metadata=partner.auth
    )
    assert (await get_site(registry, partner, site.id)).status == pb.SITE_STATUS_NO_RESOURCES
    battery = await registry.CreateResource(battery_request(site.id), metadata=partner.auth)
    second = await registry.CreateResource(
        resource_request(site.id, pb.RESOURCE_TYPE_HEAT_PUMP), metadata=partner.auth
    )
    assert (await get_site(registry, partner, site.id)).status == pb.SITE_STATUS_ONBOARDED
    # Removing one of two controllable resources keeps it onboarded.
    await registry.DeleteResource(
        pb.DeleteResourceRequest(resource_id=battery.resource.id), metadata=partner.auth
    )
    assert (await get_site(registry, partner, site.id)).status == pb.SITE_STATUS_ONBOARDED
    # Only the meter left: back to NO_RESOURCES.
    await registry.DeleteResource(
        pb.DeleteResourceRequest(resource_id=second.resource.id), metadata=partner.auth
    )
    assert (await get_site(registry, partner, site.id)).status == pb.SITE_STATUS_NO_RESOURCES
    await registry.GetResource(
        pb.GetResourceRequest(resource_id=meter.resource.id), metadata=partner.auth
    )


async def test_pause_and_resume_are_idempotent_and_status_is_derived_again(
    registry: Stub, partner: Org, site: pb.Site
) -> None:
    auth = partner.auth
    pause = pb.PauseSiteRequest(site_id=site.id)
    resume = pb.ResumeSiteRequest(site_id=site.id)
    # A site without resources can be paused and resumes to NO_RESOURCES.
    assert (await registry.PauseSite(pause, metadata=auth)).site.status == pb.SITE_STATUS_PAUSED
    again = (await registry.PauseSite(pause, metadata=auth)).site
    assert again.status == pb.SITE_STATUS_PAUSED
    resumed = (await registry.ResumeSite(resume, metadata=auth)).site
    assert resumed.status == pb.SITE_STATUS_NO_RESOURCES
    unchanged = (await registry.ResumeSite(resume, metadata=auth)).site
    assert unchanged == resumed  # resuming a running site changes nothing, not even update_time

    await registry.PauseSite(pause, metadata=auth)
    # Resources can be added and removed while paused; the site stays PAUSED.
    created = await registry.CreateResource(battery_request(site.id), metadata=auth)
    assert (await get_site(registry, partner, site.id)).status == pb.SITE_STATUS_PAUSED
    listed = await registry.ListSites(
        pb.ListSitesRequest(status=pb.SITE_STATUS_PAUSED), metadata=auth
    )
    assert [s.id for s in listed.sites] == [site.id]
    # Resuming derives the status from the resources it kept.
    assert (
        await registry.ResumeSite(resume, metadata=auth)
    ).site.status == pb.SITE_STATUS_ONBOARDED
    await registry.PauseSite(pause, metadata=auth)
    await registry.DeleteResource(
        pb.DeleteResourceRequest(resource_id=created.resource.id), metadata=auth
    )
    assert (await get_site(registry, partner, site.id)).status == pb.SITE_STATUS_PAUSED
    assert (
        await registry.ResumeSite(resume, metadata=auth)
    ).site.status == pb.SITE_STATUS_NO_RESOURCES


# --- UpdateSite -------------------------------------------------------------------------


async def test_update_site_changes_only_masked_fields(
    registry: Stub, partner: Org, site: pb.Site
) -> None:
    change = pb.Site(
        id=site.id,
        name="renamed",
        external_id="not-in-mask",
        timezone="Europe/Paris",
        balance_resolution="P1M",
        type=pb.SITE_TYPE_UNBALANCED_INACCURATE,
    )
    updated = (
        await registry.UpdateSite(
            pb.UpdateSiteRequest(
                site=change, update_mask=mask("name", "timezone", "balance_resolution", "type")
            ),
            metadata=partner.auth,
        )
    ).site
    assert updated.name == "renamed"
    assert updated.external_id == site.external_id
    assert updated.timezone == "Europe/Paris"
    assert updated.balance_resolution == "P1M"
    assert updated.type == pb.SITE_TYPE_UNBALANCED_INACCURATE
    assert updated.supply_points == site.supply_points
    assert updated.location == site.location
    assert updated.create_time == site.create_time
    assert updated.update_time.ToDatetime() > site.update_time.ToDatetime()
    assert await get_site(registry, partner, site.id) == updated


async def test_update_site_location_and_supply_points(
    registry: Stub, partner: Org, site: pb.Site
) -> None:
    change = pb.Site(
        id=site.id,
        location=pb.Location(address="Rue Neuve 1, Bruxelles", country="BE"),
        supply_points=[point("ean 5414 4882 0000 0000 08")],
    )
    updated = (
        await registry.UpdateSite(
            pb.UpdateSiteRequest(site=change, update_mask=mask("location", "supply_points")),
            metadata=partner.auth,
        )
    ).site
    assert updated.location.country == "BE"
    assert updated.grid_identifier == VALID_EAN_BE
    # The new country's scheme applies to identifiers even when they are not in the mask.
    await expect_invalid(
        registry.UpdateSite(
            pb.UpdateSiteRequest(
                site=pb.Site(id=site.id, location=pb.Location(country="GB")),
                update_mask=mask("location"),
            ),
            metadata=partner.auth,
        ),
        "site.supply_points[0].grid_identifier",
    )


async def test_update_site_mask_errors(registry: Stub, partner: Org, site: pb.Site) -> None:
    rule = await expect_invalid(
        registry.UpdateSite(
            pb.UpdateSiteRequest(site=pb.Site(id=site.id, name="x")), metadata=partner.auth
        ),
        "update_mask",
    )
    assert "name" in rule
    for path in ("status", "id", "upstream_status", "location.address", "nonsense"):
        rule = await expect_invalid(
            registry.UpdateSite(
                pb.UpdateSiteRequest(site=pb.Site(id=site.id), update_mask=mask(path)),
                metadata=partner.auth,
            ),
            "update_mask.paths",
        )
        assert path in rule
    await expect_invalid(
        registry.UpdateSite(
            pb.UpdateSiteRequest(site=pb.Site(id="nope"), update_mask=mask("name")),
            metadata=partner.auth,
        ),
        "site.id",
    )
    assert await get_site(registry, partner, site.id) == site


async def test_update_supply_points_to_a_duplicate_is_already_exists(
    registry: Stub, partner: Org, site: pb.Site
) -> None:
    other = (await registry.CreateSite(site_request(), metadata=partner.auth)).site
    error = await rpc_error(
        registry.UpdateSite(
            pb.UpdateSiteRequest(
                site=pb.Site(id=other.id, supply_points=[point(site.grid_identifier)]),
                update_mask=mask("supply_points"),
            ),
            metadata=partner.auth,
        )
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await get_site(registry, partner, other.id) == other
    # Keeping its own identifier is no collision.
    await registry.UpdateSite(
        pb.UpdateSiteRequest(
            site=pb.Site(id=site.id, supply_points=[point(site.grid_identifier)]),
            update_mask=mask("supply_points"),
        ),
        metadata=partner.auth,
    )


async def test_update_site_validation_reports_the_request_field(
    registry: Stub, partner: Org, site: pb.Site
) -> None:
    await expect_invalid(
        registry.UpdateSite(
            pb.UpdateSiteRequest(
                site=pb.Site(id=site.id, timezone="Nowhere/Town"), update_mask=mask("timezone")
            ),
            metadata=partner.auth,
        ),
        "site.timezone",
    )
    await expect_invalid(
        registry.UpdateSite(
            pb.UpdateSiteRequest(site=pb.Site(id=site.id), update_mask=mask("supply_points")),
            metadata=partner.auth,
        ),
        "site.supply_points",
    )
    assert await get_site(registry, partner, site.id) == site


# --- resources --------------------------------------------------------------------------


async def test_resource_crud(registry: Stub, partner: Org, site: pb.Site) -> None:
    auth = partner.auth
    created = (
        await registry.CreateResource(battery_request(site.id, external_id="bat-1"), metadata=auth)
    ).resource
    assert created.site_id == site.id
    assert created.type == pb.RESOURCE_TYPE_STATIC_BATTERY
    assert (created.power_kw.min, created.power_kw.max) == (-5, 5)
    assert (created.capacity_kwh.min, created.capacity_kwh.max) == (0, 10)
    assert created.webhook_url == "https://partner.example/setpoints"
    fetched = await registry.GetResource(
        pb.GetResourceRequest(resource_id=created.id), metadata=auth
    )
    assert fetched.resource == created

    updated = (
        await registry.UpdateResource(
            pb.UpdateResourceRequest(
                resource=pb.Resource(
                    id=created.id,
                    name="bigger battery",
                    power_kw=pb.Bounds(min=-10, max=10),
                    capacity_kwh=pb.Bounds(min=1, max=20),
                    webhook_url="http://10.0.0.2:8080/hook",
                    external_id="ignored: not in mask",
                    type=pb.RESOURCE_TYPE_WIND,
                ),
                update_mask=mask("name", "power_kw", "capacity_kwh", "webhook_url"),
            ),
            metadata=auth,
        )
    ).resource
    assert updated.name == "bigger battery"
    assert updated.external_id == "bat-1"
    assert updated.type == pb.RESOURCE_TYPE_STATIC_BATTERY
    assert (updated.power_kw.min, updated.power_kw.max) == (-10, 10)
    assert (updated.capacity_kwh.min, updated.capacity_kwh.max) == (1, 20)
    assert updated.webhook_url == "http://10.0.0.2:8080/hook"
    assert updated.update_time.ToDatetime() > created.update_time.ToDatetime()

    listed = await registry.ListResources(pb.ListResourcesRequest(site_id=site.id), metadata=auth)
    assert list(listed.resources) == [updated]
    assert listed.total_size == 1
    assert listed.next_page_token == ""

    await registry.DeleteResource(pb.DeleteResourceRequest(resource_id=created.id), metadata=auth)
    error = await rpc_error(
        registry.DeleteResource(pb.DeleteResourceRequest(resource_id=created.id), metadata=auth)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    listed = await registry.ListResources(pb.ListResourcesRequest(site_id=site.id), metadata=auth)
    assert listed.total_size == 0


async def test_update_resource_mask_errors_and_rules(
    registry: Stub, partner: Org, site: pb.Site
) -> None:
    created = (
        await registry.CreateResource(battery_request(site.id), metadata=partner.auth)
    ).resource
    await expect_invalid(
        registry.UpdateResource(
            pb.UpdateResourceRequest(resource=pb.Resource(id=created.id)), metadata=partner.auth
        ),
        "update_mask",
    )
    for path in ("type", "site_id", "id"):
        await expect_invalid(
            registry.UpdateResource(
                pb.UpdateResourceRequest(
                    resource=pb.Resource(id=created.id), update_mask=mask(path)
                ),
                metadata=partner.auth,
            ),
            "update_mask.paths",
        )
    # Clearing the capacity of a battery breaks its rule.
    await expect_invalid(
        registry.UpdateResource(
            pb.UpdateResourceRequest(
                resource=pb.Resource(id=created.id), update_mask=mask("capacity_kwh")
            ),
            metadata=partner.auth,
        ),
        "resource.capacity_kwh",
    )
    await expect_invalid(
        registry.UpdateResource(
            pb.UpdateResourceRequest(
                resource=pb.Resource(id=created.id, power_kw=pb.Bounds(min=3, max=1)),
                update_mask=mask("power_kw"),
            ),
            metadata=partner.auth,
        ),
        "resource.power_kw",
    )
    fetched = await registry.GetResource(
        pb.GetResourceRequest(resource_id=created.id), metadata=partner.auth
    )
    assert fetched.resource == created


async def test_create_resource_on_missing_site_is_not_found(registry: Stub, partner: Org) -> None:
    error = await rpc_error(
        registry.CreateResource(
            battery_request("00000000-0000-4000-8000-000000000000"), metadata=partner.auth
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


# --- no partial writes ------------------------------------------------------------------


async def test_failing_requests_write_nothing(
    registry: Stub, partner: Org, service: Service
) -> None:
    auth = partner.auth
    site = (await registry.CreateSite(site_request("KEEP-1"), metadata=auth)).site
    await expect_invalid(
        registry.CreateSite(site_request("", name="x" * 201), metadata=auth), "name"
    )
    await rpc_error(registry.CreateSite(site_request("KEEP-1"), metadata=auth))
    await expect_invalid(
        registry.CreateResource(battery_request(site.id, capacity_kwh=None), metadata=auth),
        "capacity_kwh",
    )
    assert service.pool is not None
    async with service.pool.acquire() as conn:
        assert await count_rows(conn, "sites", partner) == 1
        assert await count_rows(conn, "resources", partner) == 0
    assert await get_site(registry, partner, site.id) == site


async def test_failure_after_the_insert_rolls_back_the_whole_call(
    registry: Stub, partner: Org, site: pb.Site, service: Service
) -> None:
    """The resource row is written before the site status; if the status update fails,
    neither may remain (the call is one transaction)."""
    assert service.pool is not None
    async with service.pool.acquire() as conn:
        await conn.execute(
            f"""
            CREATE FUNCTION test_fail_status() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'injected failure'; END $$;
            CREATE TRIGGER test_fail_status BEFORE UPDATE OF status ON sites
            FOR EACH ROW WHEN (NEW.id = '{site.id}') EXECUTE FUNCTION test_fail_status();
            """
        )
    try:
        error = await rpc_error(
            registry.CreateResource(battery_request(site.id), metadata=partner.auth)
        )
        assert error.code() == grpc.StatusCode.INTERNAL
        assert "injected" not in (error.details() or "")  # internals are not leaked
    finally:
        async with service.pool.acquire() as conn:
            await conn.execute(
                "DROP TRIGGER test_fail_status ON sites; DROP FUNCTION test_fail_status()"
            )
    async with service.pool.acquire() as conn:
        assert await count_rows(conn, "resources", partner) == 0
    assert await get_site(registry, partner, site.id) == site


async def test_concurrent_resource_creation_keeps_status_consistent(
    registry: Stub, partner: Org, site: pb.Site, service: Service
) -> None:
    import asyncio

    created = await asyncio.gather(
        *(
            registry.CreateResource(battery_request(site.id), metadata=partner.auth)
            for _ in range(8)
        )
    )
    await asyncio.gather(
        *(
            registry.DeleteResource(
                pb.DeleteResourceRequest(resource_id=r.resource.id), metadata=partner.auth
            )
            for r in created
        )
    )
    assert (await get_site(registry, partner, site.id)).status == pb.SITE_STATUS_NO_RESOURCES
    assert service.pool is not None
    conn: asyncpg.Connection
    async with service.pool.acquire() as conn:
        assert await count_rows(conn, "resources", partner) == 0


async def test_update_site_ignores_fields_outside_the_mask(
    registry: Stub, partner: Org, site: pb.Site
) -> None:
    """Even unparseable values (an unknown enum number) outside the mask do not matter."""
    unknown: Any = 99
    change = pb.Site(id=site.id, name="only this", type=unknown)
    change.supply_points.add(grid_identifier="X", direction=unknown)
    updated = await registry.UpdateSite(
        pb.UpdateSiteRequest(site=change, update_mask=mask("name")), metadata=partner.auth
    )
    assert updated.site.name == "only this"
    assert updated.site.supply_points == site.supply_points
    await expect_invalid(
        registry.UpdateSite(
            pb.UpdateSiteRequest(site=change, update_mask=mask("type")), metadata=partner.auth
        ),
        "site.type",
    )
