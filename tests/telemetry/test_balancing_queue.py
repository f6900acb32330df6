"""Changes that move a site's grid or a meter's energy queue the range their data covers."""

from __future__ import annotations

import uuid
from datetime import datetime

from google.protobuf import field_mask_pb2
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import meter_registry_pb2_grpc, site_registry_pb2_grpc, telemetry_pb2_grpc
from openvpp.v1 import site_registry_pb2 as spb

from service.app import Service
from tests.conftest import Org
from tests.telemetry.conftest import Setup, interval, make_setup, quarter, register, stamp


async def queued(service: Service, setup: Setup) -> list[tuple[datetime, datetime]]:
    """The site's queued ranges since the last call (which clears them)."""
    assert service.pool is not None
    rows = await service.pool.fetch(
        """
        DELETE FROM balancing_queue WHERE site_id = $1
        RETURNING org_id, interval_start, interval_end
        """,
        uuid.UUID(setup.site.id),
    )
    # Each row names the organization its consumer claims and scopes it by.
    assert {row["org_id"] for row in rows} <= {setup.org.id}
    return sorted((row["interval_start"], row["interval_end"]) for row in rows)


async def update_site(setup: Setup, path: str, **fields: object) -> None:
    await setup.registry.UpdateSite(
        spb.UpdateSiteRequest(
            site=spb.Site(id=setup.site.id, **fields),  # type: ignore[arg-type]
            update_mask=field_mask_pb2.FieldMask(paths=[path]),
        ),
        metadata=setup.org.auth,
    )


async def update_meter(setup: Setup, meter: mpb.Meter, path: str, **fields: object) -> None:
    await setup.meters.UpdateMeter(
        mpb.UpdateMeterRequest(
            meter=mpb.Meter(id=meter.id, **fields),  # type: ignore[arg-type]
            update_mask=field_mask_pb2.FieldMask(paths=[path]),
        ),
        metadata=setup.org.auth,
    )


async def test_site_changes_that_move_the_grid_queue_the_range_with_data(
    partner: Org,
    registry: site_registry_pb2_grpc.SiteRegistryAsyncStub,
    meters: meter_registry_pb2_grpc.MeterRegistryAsyncStub,
    telemetry: telemetry_pb2_grpc.TelemetryAsyncStub,
    service: Service,
) -> None:
    setup = await make_setup(partner, registry, meters, telemetry)
    meter = await setup.meter()
    # Registers at 01:00 ... 02:30 UTC on 2025-01-01 (PT15M, UTC).
    ack = await setup.ingest([register(meter, quarter(n), float(n)) for n in range(4, 11)])
    assert ack.accepted_count == 7
    await queued(service, setup)

    await update_site(setup, "name", name="renamed")
    await update_site(setup, "timezone", timezone="UTC")  # unchanged value
    assert await queued(service, setup) == []

    # Same grid, other type: from the interval the first register ends to the last's end.
    await update_site(setup, "type", type=spb.SITE_TYPE_BALANCED_INACCURATE)
    assert await queued(service, setup) == [(quarter(3), quarter(11))]

    # PT1H: the range of the new grid that holds the old intervals too.
    await update_site(setup, "balance_resolution", balance_resolution="PT1H")
    assert await queued(service, setup) == [(quarter(0), quarter(12))]

    # UTC -> Kolkata (+05:30) on PT1H: hours move by 30 minutes; both grids are covered.
    await update_site(setup, "timezone", timezone="Asia/Kolkata")
    assert await queued(service, setup) == [(quarter(-2), quarter(14))]

    # A site without readings has nothing to rebalance.
    empty = await make_setup(partner, registry, meters, telemetry)
    await empty.meter()
    await update_site(empty, "timezone", timezone="Europe/Berlin")
    await update_site(empty, "balance_resolution", balance_resolution="PT1H")
    assert await queued(service, empty) == []


async def test_meter_changes_queue_the_range_whose_energy_they_change(
    setup: Setup, service: Service
) -> None:
    changed = await setup.meter()
    other = await setup.meter(direction=mpb.METER_DIRECTION_PRODUCER)
    await setup.ingest([register(changed, quarter(n), float(n)) for n in range(4, 11)])
    await setup.ingest([register(other, quarter(n), float(n)) for n in range(0, 21)])
    await queued(service, setup)

    await update_meter(setup, changed, "serial", serial="SERIAL-2")
    await update_meter(setup, changed, "transformer_factor", transformer_factor=1.0)  # same
    assert await queued(service, setup) == []

    # Every interval of the meter's data changes with its factor.
    await update_meter(setup, changed, "transformer_factor", transformer_factor=3.0)
    assert await queued(service, setup) == [(quarter(3), quarter(11))]

    # An end date: from then on the meter counts as absent, up to the site's last data.
    await update_meter(setup, changed, "end_date", end_date=stamp(quarter(6)))
    assert await queued(service, setup) == [(quarter(3), quarter(21))]

    # A later start date: the intervals before it, from the site's first data.
    await update_meter(setup, other, "start_date", start_date=stamp(quarter(2)))
    assert await queued(service, setup) == [(quarter(-1), quarter(21))]


async def test_delete_meter_queues_the_range_of_its_readings(
    setup: Setup, service: Service
) -> None:
    registers = await setup.meter()
    profile = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
    unread = await setup.meter()
    await setup.ingest([register(registers, quarter(n), float(n)) for n in range(4, 11)])
    await setup.ingest([interval(profile, quarter(n), 1.0) for n in range(20, 23)])
    await queued(service, setup)

    for meter, expected in (
        (unread, []),
        # A register ends the interval before it.
        (registers, [(quarter(3), quarter(11))]),
        # An interval value only its own interval.
        (profile, [(quarter(20), quarter(23))]),
    ):
        await setup.meters.DeleteMeter(
            mpb.DeleteMeterRequest(meter_id=meter.id), metadata=setup.org.auth
        )
        assert await queued(service, setup) == expected
