"""The inputs the hardening issue found answering INTERNAL: each is now a field violation
(NUL, overlong text, out-of-range times) or, inside a batch, a reject of that reading only."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.type import date_pb2
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import site_registry_pb2 as spb
from openvpp.v1 import telemetry_pb2 as tpb
from openvpp.v1 import upstream_registry_pb2 as upb
from openvpp.v1 import upstream_registry_pb2_grpc

from service.app import Service

if TYPE_CHECKING:
    UpstreamStub = upstream_registry_pb2_grpc.UpstreamRegistryAsyncStub
from service.auth.principal import Role
from tests.conftest import MakeOrg
from tests.helpers import battery_request, expect_invalid, rpc_error, site_request
from tests.telemetry.conftest import Setup, quarter, register, stamp
from tests.telemetry.test_ingest import stored_count

NUL = "a\x00b"
R = tpb.RejectReason


async def _site_count(service: Service, org_id: object) -> int:
    assert service.pool is not None
    count: int = await service.pool.fetchval("SELECT count(*) FROM sites WHERE org_id = $1", org_id)
    return count


def _with_address(address: str) -> spb.CreateSiteRequest:
    request = site_request()
    request.location.address = address
    return request


@pytest.mark.parametrize(
    ("field", "request_of"),
    [
        ("name", lambda: site_request(name=NUL)),
        ("external_id", lambda: site_request(external_id=NUL)),
        ("location.address", lambda: _with_address(NUL)),
        ("supply_points[0].grid_identifier", lambda: site_request(grid_identifier="T1" + NUL)),
    ],
)
async def test_nul_in_site_text_is_a_violation_naming_the_field(
    setup: Setup, service: Service, field: str, request_of: object
) -> None:
    before = await _site_count(service, setup.org.id)
    request = request_of()  # type: ignore[operator]
    rule = await expect_invalid(setup.registry.CreateSite(request, metadata=setup.org.auth), field)
    assert "NUL" in rule
    assert await _site_count(service, setup.org.id) == before


async def test_nul_in_filters_updates_resources_and_meters(setup: Setup) -> None:
    auth = setup.org.auth
    await expect_invalid(
        setup.registry.ListSites(spb.ListSitesRequest(grid_identifier=NUL), metadata=auth),
        "grid_identifier",
    )
    await expect_invalid(
        setup.registry.UpdateSite(
            spb.UpdateSiteRequest(
                site=spb.Site(id=setup.site.id, name=NUL),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            ),
            metadata=auth,
        ),
        "site.name",
    )
    for field in ("name", "external_id", "webhook_url"):
        await expect_invalid(
            setup.registry.CreateResource(
                battery_request(setup.site.id, **{field: NUL}), metadata=auth
            ),
            field,
        )
    for field in ("identifier", "serial", "mpo"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await setup.meter(**{field: NUL})
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, field
    meter = await setup.meter()
    await expect_invalid(
        setup.meters.UpdateMeter(
            mpb.UpdateMeterRequest(
                meter=mpb.Meter(id=meter.id, serial=NUL),
                update_mask=field_mask_pb2.FieldMask(paths=["serial"]),
            ),
            metadata=auth,
        ),
        "meter.serial",
    )


async def test_overlong_text_names_the_field_limit(setup: Setup) -> None:
    # Within the guard's ceiling the domain reports it with every other violation ...
    error = await rpc_error(
        setup.registry.CreateSite(
            site_request(name="n" * 201, timezone="Bad/Zone"), metadata=setup.org.auth
        )
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    rule = await expect_invalid(
        setup.registry.CreateSite(site_request(name="n" * 201), metadata=setup.org.auth), "name"
    )
    assert rule == "must be at most 200 characters"
    # ... far beyond it the guard refuses it with the same rule, before anything else.
    rule = await expect_invalid(
        setup.registry.CreateSite(site_request(name="n" * 100_000), metadata=setup.org.auth),
        "name",
    )
    assert rule == "must be at most 200 characters"
    rule = await expect_invalid(
        setup.registry.GetSite(spb.GetSiteRequest(site_id="x" * 5000), metadata=setup.org.auth),
        "site_id",
    )
    assert rule == "must be at most 4096 characters"


async def test_an_id_that_is_not_a_uuid_is_invalid_argument(setup: Setup) -> None:
    rule = await expect_invalid(
        setup.registry.GetSite(spb.GetSiteRequest(site_id="nope"), metadata=setup.org.auth),
        "site_id",
    )
    assert rule == "must be a UUID"


def _seconds(value: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=value)


async def test_meter_dates_out_of_range(setup: Setup) -> None:
    for field in ("start_date", "end_date"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await setup.meter(**{field: _seconds(2**40)})
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    await expect_invalid(
        setup.meters.CreateMeter(
            mpb.CreateMeterRequest(
                site_id=setup.site.id,
                identifier="X1",
                direction=mpb.METER_DIRECTION_CONSUMER,
                measuring=mpb.MEASURING_READINGS_ACCURATE,
                start_date=timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=-1),
            ),
            metadata=setup.org.auth,
        ),
        "start_date",
    )


async def test_list_readings_range_out_of_range(setup: Setup) -> None:
    meter = await setup.meter()
    rule = await expect_invalid(
        setup.telemetry.ListReadings(
            tpb.ListReadingsRequest(
                meter_id=meter.id, start_time=_seconds(0), end_time=_seconds(2**40)
            ),
            metadata=setup.org.auth,
        ),
        "end_time",
    )
    assert "2200-01-01" in rule


async def test_an_out_of_range_reading_is_rejected_alone_and_the_rest_stored(
    setup: Setup, service: Service
) -> None:
    meter = await setup.meter()
    last_quarter = datetime(9999, 12, 31, 23, 45, tzinfo=UTC)
    batch = [
        register(meter, quarter(1), 10.0),  # 0 ok
        tpb.Reading(meter_id=meter.id, timestamp=stamp(last_quarter), register_wh=11.0),
        tpb.Reading(meter_id=meter.id, timestamp=_seconds(2**40), register_wh=12.0),
        tpb.Reading(meter_id=meter.id, timestamp=_seconds(-(2**40)), register_wh=12.0),
        tpb.Reading(
            meter_id=meter.id,
            timestamp=timestamp_pb2.Timestamp(seconds=1_735_693_200, nanos=-5),
            register_wh=12.0,
        ),
        register(meter, quarter(2), 13.0),  # 5 ok
        tpb.Reading(meter_id=NUL, timestamp=stamp(quarter(3)), register_wh=14.0),
    ]
    ack = await setup.ingest(batch)
    assert ack.accepted_count == 2
    assert {r.index: r.reason for r in ack.rejected} == {
        1: R.REJECT_REASON_TIMESTAMP_OUT_OF_RANGE,
        2: R.REJECT_REASON_TIMESTAMP_OUT_OF_RANGE,
        3: R.REJECT_REASON_TIMESTAMP_OUT_OF_RANGE,
        4: R.REJECT_REASON_TIMESTAMP_OUT_OF_RANGE,
        6: R.REJECT_REASON_UNKNOWN_METER,
    }
    assert await stored_count(service, meter.id) == 2


async def test_nul_in_a_batch_id_is_a_violation(setup: Setup) -> None:
    meter = await setup.meter()
    await expect_invalid(
        setup.telemetry.IngestReadings(
            tpb.IngestReadingsRequest(
                batch=tpb.ReadingBatch(batch_id=NUL, readings=[register(meter, quarter(1), 1.0)])
            ),
            metadata=setup.org.auth,
        ),
        "batch.batch_id",
    )


@pytest.fixture
def upstream_stub(
    channel: grpc.aio.Channel,
) -> upstream_registry_pb2_grpc.UpstreamRegistryAsyncStub:
    return upstream_registry_pb2_grpc.UpstreamRegistryStub(channel)


async def test_contract_dates_out_of_range(upstream_stub: UpstreamStub, make_org: MakeOrg) -> None:
    supplier = await make_org(Role.SUPPLIER)
    for bad in (
        date_pb2.Date(year=9999, month=12, day=31),
        date_pb2.Date(year=2025, month=2, day=30),
        date_pb2.Date(year=1899, month=12, day=31),
    ):
        rule = await expect_invalid(
            upstream_stub.CreateContract(
                upb.CreateContractRequest(upstream_site_id="x", start_date=bad),
                metadata=supplier.auth,
            ),
            "start_date",
        )
        assert "1900-01-01" in rule
