"""The Solarize flow (seed guide "Metered in, Balanced out"), as far as the API has it.

As a partner: 1. the site "Businesspark" in Berlin (balanced accurate, PT15M), 2. its
iMSys TAF-7 meter 1ISK0001 (consumer, readings accurate), then a day's quarter-hour
register readings and ``ListReadings`` with the interval energy computed from them,
3. the meter's balancing setting (participant from 2025-01-01, priority 1) and 4. the
aggregated balances of the meter as debitor at PT15M for January. The server's worker
balances what ingest queued within moments; the flow calls ``RunBalancing`` for its
readings first, so it does not depend on a worker running.

    .venv/bin/python examples/solarize_metering.py --token "$TOKEN" \
        [--address 127.0.0.1:50051] [--keep]

Each step is a function taking the ``Flow`` (stubs and what earlier steps made) and
``STEPS`` runs them in order, so a step joins by adding a function and a line there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import timestamp_pb2
from google.type import date_pb2
from openvpp.v1 import balancing_pb2 as balancing_pb
from openvpp.v1 import balancing_pb2_grpc as balancing_grpc
from openvpp.v1 import meter_registry_pb2 as meters_pb
from openvpp.v1 import meter_registry_pb2_grpc as meters_grpc
from openvpp.v1 import site_registry_pb2 as sites_pb
from openvpp.v1 import site_registry_pb2_grpc as sites_grpc
from openvpp.v1 import telemetry_pb2 as telemetry_pb
from openvpp.v1 import telemetry_pb2_grpc as telemetry_grpc

import openvpp_client

# A valid MaLo-ID (BDEW check digit), as the README's sample identifier table lists.
SAMPLE_MALO_ID = "51234567895"
# Local midnight of 1 January 2025 in Berlin: the meter's start and the first reading.
START = datetime(2024, 12, 31, 23, 0, tzinfo=UTC)
QUARTER = timedelta(minutes=15)


def timestamp(instant: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(instant)
    return stamp


@dataclass
class Flow:
    sites: sites_grpc.SiteRegistryStub
    meters: meters_grpc.MeterRegistryStub
    telemetry: telemetry_grpc.TelemetryStub
    balancing: balancing_grpc.BalancingStub
    grid_identifier: str
    quarters: int
    site: sites_pb.Site | None = None
    meter: meters_pb.Meter | None = None

    @classmethod
    def on(cls, channel: grpc.Channel, grid_identifier: str, quarters: int) -> Flow:
        return cls(
            sites_grpc.SiteRegistryStub(channel),
            meters_grpc.MeterRegistryStub(channel),
            telemetry_grpc.TelemetryStub(channel),
            balancing_grpc.BalancingStub(channel),
            grid_identifier,
            quarters,
        )


def create_site(flow: Flow) -> None:
    flow.site = flow.sites.CreateSite(
        sites_pb.CreateSiteRequest(
            name="Businesspark",
            type=sites_pb.SITE_TYPE_BALANCED_ACCURATE,
            balance_resolution="PT15M",
            location=sites_pb.Location(address="10115 Berlin, Germany", country="DE"),
            timezone="Europe/Berlin",
            supply_points=[
                sites_pb.SupplyPoint(
                    grid_identifier=flow.grid_identifier,
                    direction=sites_pb.SUPPLY_POINT_DIRECTION_OFFTAKE,
                )
            ],
        )
    ).site
    print(f"1. site {flow.site.id} {flow.site.name}, {sites_pb.SiteType.Name(flow.site.type)}")


def create_meter(flow: Flow) -> None:
    assert flow.site is not None
    flow.meter = flow.meters.CreateMeter(
        meters_pb.CreateMeterRequest(
            site_id=flow.site.id,
            identifier="1ISK0001",
            serial="1ISK0001",
            mpo="example-mpo",
            direction=meters_pb.METER_DIRECTION_CONSUMER,
            measuring=meters_pb.MEASURING_READINGS_ACCURATE,
            start_date=timestamp(START),
        )
    ).meter
    print(f"2. meter {flow.meter.id} {flow.meter.identifier}, starts {START.isoformat()}")


def ingest_readings(flow: Flow) -> None:
    """Cumulative registers (OBIS 1.8.0) at every quarter-hour, 250 Wh apart."""
    assert flow.meter is not None
    readings = [
        telemetry_pb.Reading(
            meter_id=flow.meter.id,
            timestamp=timestamp(START + index * QUARTER),
            register_wh=1_000_000 + 250 * index,
        )
        for index in range(flow.quarters + 1)
    ]
    batch = telemetry_pb.ReadingBatch(batch_id="businesspark-2025-01-01", readings=readings)
    ack = flow.telemetry.IngestReadings(telemetry_pb.IngestReadingsRequest(batch=batch)).ack
    print(
        f"   readings: {ack.accepted_count} accepted, {ack.duplicate_count} duplicate, "
        f"{ack.rejected_count} rejected"
    )
    if ack.rejected_count:
        raise SystemExit(f"rejected: {ack.rejected}")


def list_readings(flow: Flow) -> None:
    assert flow.meter is not None
    answer = flow.telemetry.ListReadings(
        telemetry_pb.ListReadingsRequest(
            meter_id=flow.meter.id,
            start_time=timestamp(START),
            end_time=timestamp(START + flow.quarters * QUARTER),
        )
    )
    total = sum(interval.energy_wh for interval in answer.intervals)
    print(
        f"   ListReadings: {len(answer.readings)} readings, {len(answer.intervals)} "
        f"quarter-hours, {total:.0f} Wh"
    )


def configure_balancing(flow: Flow) -> None:
    """The meter takes part from the contract start; priority 1 is served first (unset would
    share equally with every other consumer)."""
    assert flow.site is not None
    assert flow.meter is not None
    setting = flow.balancing.CreateMeterBalancingSetting(
        balancing_pb.CreateMeterBalancingSettingRequest(
            site_id=flow.site.id,
            meter_id=flow.meter.id,
            balancing=balancing_pb.BALANCING_ROLE_PARTICIPANT,
            start_date=date_pb2.Date(year=2025, month=1, day=1),
            priority=1,
        )
    ).setting
    print(
        f"3. balancing setting {setting.id}: "
        f"{balancing_pb.BalancingRole.Name(setting.balancing)} from 2025-01-01, "
        f"priority {setting.priority}"
    )


def aggregated_balances(flow: Flow) -> None:
    assert flow.site is not None
    assert flow.meter is not None
    run = flow.balancing.RunBalancing(
        balancing_pb.RunBalancingRequest(
            site_id=flow.site.id,
            start_time=timestamp(START),
            end_time=timestamp(START + flow.quarters * QUARTER),
        )
    )
    print(
        f"   RunBalancing: {run.balanced_intervals} balanced, {run.incomplete_intervals} incomplete"
    )
    rows = complete = from_grid = shared = 0
    page_token = ""
    while True:
        page = flow.balancing.ListAggregatedBalances(
            balancing_pb.ListAggregatedBalancesRequest(
                debitor_meter_id=flow.meter.id,
                start_time=timestamp(START),
                end_time=timestamp(datetime(2025, 1, 31, 23, 0, tzinfo=UTC)),
                interval="PT15M",
                page_token=page_token,
            )
        )
        for balance in page.balances:
            rows += 1
            complete += balance.complete
            if balance.creditor_meter_id == "GRID":
                from_grid += balance.energy_wh
            else:
                shared += balance.energy_wh
        page_token = page.next_page_token
        if not page_token:
            break
    # With no producer on the site, everything the meter used came from the grid.
    print(
        f"4. aggregated balances of {flow.meter.identifier} as debitor: {rows} rows "
        f"({complete} complete), {from_grid} Wh from GRID, {shared} Wh shared"
    )


STEPS: list[Callable[[Flow], None]] = [
    create_site,
    create_meter,
    ingest_readings,
    list_readings,
    configure_balancing,
    aggregated_balances,
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    openvpp_client.add_connection_arguments(parser)
    parser.add_argument("--grid-identifier", default=SAMPLE_MALO_ID, help="a German MaLo-ID")
    parser.add_argument("--quarters", type=int, default=96, help="quarter-hours of readings")
    parser.add_argument("--keep", action="store_true", help="keep the site, meter and readings")
    args = parser.parse_args(argv)
    with openvpp_client.channel_from_args(parser, args) as channel:
        flow = Flow.on(channel, args.grid_identifier, args.quarters)
        for step in STEPS:
            step(flow)
        if not args.keep and flow.site is not None:
            # Deleting the site deletes its meters and their readings: the flow runs again.
            flow.sites.DeleteSite(sites_pb.DeleteSiteRequest(site_id=flow.site.id))
            print(f"deleted site {flow.site.id} with its meter and readings")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except grpc.RpcError as error:
        sys.exit(openvpp_client.failure_line(error))
