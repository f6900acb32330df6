from __future__ import annotations

import grpc
from google.protobuf import field_mask_pb2
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import meter_registry_pb2_grpc, site_registry_pb2_grpc, telemetry_pb2_grpc
from openvpp.v1 import site_registry_pb2 as spb

from tests.conftest import Org
from tests.helpers import battery_request, expect_invalid, rpc_error
from tests.telemetry.conftest import METER_START, Setup, make_setup, stamp


async def test_seed_meter_round_trip(setup: Setup) -> None:
    meter = await setup.meter(identifier="1ISK0001", serial="1ISK0001")
    assert meter.site_id == setup.site.id
    assert meter.direction == mpb.METER_DIRECTION_CONSUMER
    assert meter.measuring == mpb.MEASURING_READINGS_ACCURATE
    assert meter.start_date.ToDatetime().isoformat() == "2024-12-31T23:00:00"
    assert meter.transformer_factor == 1
    assert not meter.HasField("end_date")
    assert meter.update_time == meter.create_time
    fetched = await setup.meters.GetMeter(
        mpb.GetMeterRequest(meter_id=meter.id), metadata=setup.org.auth
    )
    assert fetched.meter == meter


async def test_identifier_unique_per_site(setup: Setup) -> None:
    await setup.meter(identifier="M-1")
    error = await rpc_error(setup.meter(identifier="M-1"))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_measuring_must_fit_site_type(setup: Setup) -> None:
    rule = await expect_invalid(
        setup.meter(measuring=mpb.MEASURING_READINGS_INACCURATE), "measuring"
    )
    assert "readings_accurate" in rule


async def test_inaccurate_site_accepts_sparse_readings(
    partner: Org,
    registry: site_registry_pb2_grpc.SiteRegistryAsyncStub,
    meters: meter_registry_pb2_grpc.MeterRegistryAsyncStub,
    telemetry: telemetry_pb2_grpc.TelemetryAsyncStub,
) -> None:
    inaccurate = await make_setup(
        partner, registry, meters, telemetry, type=spb.SITE_TYPE_UNBALANCED_INACCURATE
    )
    meter = await inaccurate.meter(measuring=mpb.MEASURING_READINGS_INACCURATE)
    assert meter.measuring == mpb.MEASURING_READINGS_INACCURATE


async def test_field_rules(setup: Setup) -> None:
    await expect_invalid(setup.meter(identifier=" "), "identifier")
    await expect_invalid(setup.meter(direction=mpb.METER_DIRECTION_UNSPECIFIED), "direction")
    await expect_invalid(setup.meter(start_date=None), "start_date")
    await expect_invalid(setup.meter(end_date=stamp(METER_START)), "end_date")
    await expect_invalid(setup.meter(transformer_factor=0), "transformer_factor")
    # 1e308 made a reading's interval energy an infinity in ListReadings.
    await expect_invalid(setup.meter(transformer_factor=1e308), "transformer_factor")
    await expect_invalid(setup.meter(transformer_factor=100_000_001), "transformer_factor")
    assert (await setup.meter(transformer_factor=100_000_000)).transformer_factor == 1e8
    await expect_invalid(setup.meter(site_id="nope"), "site_id")


async def test_list_paginates_and_update_delete(setup: Setup) -> None:
    created = [await setup.meter(identifier=f"L-{i}") for i in range(3)]
    auth = setup.org.auth
    first = await setup.meters.ListMeters(
        mpb.ListMetersRequest(site_id=setup.site.id, page_size=2), metadata=auth
    )
    assert [m.id for m in first.meters] == [m.id for m in created[:2]]
    assert first.total_size == 3
    second = await setup.meters.ListMeters(
        mpb.ListMetersRequest(site_id=setup.site.id, page_size=2, page_token=first.next_page_token),
        metadata=auth,
    )
    assert [m.id for m in second.meters] == [created[2].id]
    assert not second.next_page_token

    changed = mpb.Meter(id=created[0].id, serial="NEW", transformer_factor=40)
    updated = await setup.meters.UpdateMeter(
        mpb.UpdateMeterRequest(
            meter=changed,
            update_mask=field_mask_pb2.FieldMask(paths=["serial", "transformer_factor"]),
        ),
        metadata=auth,
    )
    assert updated.meter.serial == "NEW"
    assert updated.meter.transformer_factor == 40
    assert updated.meter.identifier == created[0].identifier
    await expect_invalid(
        setup.meters.UpdateMeter(
            mpb.UpdateMeterRequest(
                meter=changed, update_mask=field_mask_pb2.FieldMask(paths=["measuring"])
            ),
            metadata=auth,
        ),
        "update_mask.paths",
    )

    await setup.meters.DeleteMeter(mpb.DeleteMeterRequest(meter_id=created[0].id), metadata=auth)
    error = await rpc_error(
        setup.meters.GetMeter(mpb.GetMeterRequest(meter_id=created[0].id), metadata=auth)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_other_org_sees_not_found(setup: Setup, other_partner: Org) -> None:
    meter = await setup.meter()
    other = other_partner.auth
    for call in (
        setup.meters.GetMeter(mpb.GetMeterRequest(meter_id=meter.id), metadata=other),
        setup.meters.DeleteMeter(mpb.DeleteMeterRequest(meter_id=meter.id), metadata=other),
        setup.meters.ListMeters(mpb.ListMetersRequest(site_id=setup.site.id), metadata=other),
        setup.meters.CreateMeter(
            mpb.CreateMeterRequest(
                site_id=setup.site.id,
                identifier="X",
                direction=mpb.METER_DIRECTION_CONSUMER,
                measuring=mpb.MEASURING_READINGS_ACCURATE,
                start_date=stamp(METER_START),
            ),
            metadata=other,
        ),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_a_resource_list_token_is_refused_by_the_meter_list_of_its_site(
    setup: Setup,
) -> None:
    # Both lists are filtered by the site alone: the token must still name its list.
    for _ in range(2):
        await setup.registry.CreateResource(battery_request(setup.site.id), metadata=setup.org.auth)
        await setup.meter()
    resources = await setup.registry.ListResources(
        spb.ListResourcesRequest(site_id=setup.site.id, page_size=1), metadata=setup.org.auth
    )
    assert resources.next_page_token
    await expect_invalid(
        setup.meters.ListMeters(
            mpb.ListMetersRequest(site_id=setup.site.id, page_token=resources.next_page_token),
            metadata=setup.org.auth,
        ),
        "page_token",
    )


async def test_a_site_type_its_meters_cannot_have_is_refused(
    partner: Org,
    registry: site_registry_pb2_grpc.SiteRegistryAsyncStub,
    meters: meter_registry_pb2_grpc.MeterRegistryAsyncStub,
    telemetry: telemetry_pb2_grpc.TelemetryAsyncStub,
) -> None:
    """CreateMeter refuses an inaccurate meter on an accurate site; UpdateSite made such a
    site out of an inaccurate one with that meter."""
    setup = await make_setup(
        partner, registry, meters, telemetry, type=spb.SITE_TYPE_UNBALANCED_INACCURATE
    )
    meter = await setup.meter(measuring=mpb.MEASURING_READINGS_INACCURATE)

    def retype(site_type: int) -> spb.UpdateSiteRequest:
        return spb.UpdateSiteRequest(
            site=spb.Site(id=setup.site.id, type=site_type),  # type: ignore[arg-type]
            update_mask=field_mask_pb2.FieldMask(paths=["type"]),
        )

    for accurate in (spb.SITE_TYPE_BALANCED_ACCURATE, spb.SITE_TYPE_UNBALANCED_ACCURATE):
        rule = await expect_invalid(
            registry.UpdateSite(retype(accurate), metadata=partner.auth), "site.type"
        )
        assert meter.id in rule
        assert "readings_inaccurate" in rule
    got = await registry.GetSite(spb.GetSiteRequest(site_id=setup.site.id), metadata=partner.auth)
    assert got.site.type == spb.SITE_TYPE_UNBALANCED_INACCURATE
    # Another inaccurate type is fine, and an accurate one once the meter is gone.
    await registry.UpdateSite(retype(spb.SITE_TYPE_BALANCED_INACCURATE), metadata=partner.auth)
    await meters.DeleteMeter(mpb.DeleteMeterRequest(meter_id=meter.id), metadata=partner.auth)
    updated = await registry.UpdateSite(
        retype(spb.SITE_TYPE_BALANCED_ACCURATE), metadata=partner.auth
    )
    assert updated.site.type == spb.SITE_TYPE_BALANCED_ACCURATE
