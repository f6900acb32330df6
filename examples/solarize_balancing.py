"""The whole Solarize flow of the seed guide "Metered in, Balanced out", over gRPC.

As a partner: 1. the site "Businesspark" in Berlin (balanced accurate, PT15M, no supply
point of its own), 2. its iMSys TAF-7 meter 1ISK0001 (consumer, readings accurate) and a
rooftop PV meter to share from, a day of quarter-hour readings, 3. the meters' balancing
settings (1ISK0001 with priority 1), 4. the aggregated balances of 1ISK0001 as debitor at
PT15M for January, and the day's summary.

The server's worker balances what ingest queued within moments; the flow calls
``RunBalancing`` for the day anyway, so it does not depend on a worker running.

    .venv/bin/python examples/solarize_balancing.py --token "$TOKEN" \
        [--address 127.0.0.1:50051] [--quarters 96] [--keep]

``OPENVPP_ADDRESS`` and ``OPENVPP_TOKEN`` work in place of the flags.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from datetime import UTC, date, datetime, timedelta

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

# Local midnight of 1 January 2025 in Berlin: the meter's start and the first reading.
START = datetime(2024, 12, 31, 23, 0, tzinfo=UTC)
QUARTER = timedelta(minutes=15)


def timestamp(instant: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(instant)
    return stamp


def pv_wh(quarter: int) -> float:
    """A winter day's PV output per quarter-hour: a bell from 08:00 to 16:00 local."""
    hour = quarter / 4
    return max(0.0, 400 * math.sin(math.pi * (hour - 8) / 8)) if 8 <= hour <= 16 else 0.0


def run(channel: grpc.Channel, token: str, quarters: int, keep: bool) -> None:
    auth = (("authorization", f"Bearer {token}"),)
    sites = sites_grpc.SiteRegistryStub(channel)
    meters = meters_grpc.MeterRegistryStub(channel)
    telemetry = telemetry_grpc.TelemetryStub(channel)
    balancing = balancing_grpc.BalancingStub(channel)

    site = sites.CreateSite(
        sites_pb.CreateSiteRequest(
            name="Businesspark",
            type=sites_pb.SITE_TYPE_BALANCED_ACCURATE,
            balance_resolution="PT15M",
            location=sites_pb.Location(address="10115 Berlin, Germany", country="DE"),
            timezone="Europe/Berlin",
        ),
        metadata=auth,
    ).site
    print(f"1. site {site.id} {site.name}, {sites_pb.SiteType.Name(site.type)}")
    try:
        meter = meters.CreateMeter(
            meters_pb.CreateMeterRequest(
                site_id=site.id,
                identifier="1ISK0001",
                serial="1ISK0001",
                mpo="example-mpo",
                direction=meters_pb.METER_DIRECTION_CONSUMER,
                measuring=meters_pb.MEASURING_READINGS_ACCURATE,
                start_date=timestamp(START),
            ),
            metadata=auth,
        ).meter
        pv = meters.CreateMeter(
            meters_pb.CreateMeterRequest(
                site_id=site.id,
                identifier="PV0001",
                serial="PV0001",
                mpo="example-mpo",
                direction=meters_pb.METER_DIRECTION_PRODUCER,
                measuring=meters_pb.MEASURING_LOAD_PROFILE_ACCURATE,
                start_date=timestamp(START),
            ),
            metadata=auth,
        ).meter
        print(f"2. meters {meter.identifier} (consumer) and {pv.identifier} (producer)")

        # Cumulative registers of 1ISK0001 (OBIS 1.8.0) and PV interval energy (2.29.0).
        readings = [
            telemetry_pb.Reading(
                meter_id=meter.id,
                timestamp=timestamp(START + index * QUARTER),
                register_wh=1_000_000 + 250 * index,
            )
            for index in range(quarters + 1)
        ] + [
            telemetry_pb.Reading(
                meter_id=pv.id,
                timestamp=timestamp(START + index * QUARTER),
                interval_wh=pv_wh(index),
            )
            for index in range(quarters)
        ]
        batch = telemetry_pb.ReadingBatch(batch_id="businesspark-2025-01-01", readings=readings)
        ack = telemetry.IngestReadings(
            telemetry_pb.IngestReadingsRequest(batch=batch), metadata=auth
        ).ack
        print(f"   readings: {ack.accepted_count} accepted, {ack.rejected_count} rejected")
        if ack.rejected_count:
            raise SystemExit(f"rejected: {ack.rejected}")

        first_day = date_pb2.Date(year=2025, month=1, day=1)
        setting = balancing.CreateMeterBalancingSetting(
            balancing_pb.CreateMeterBalancingSettingRequest(
                site_id=site.id,
                meter_id=meter.id,
                balancing=balancing_pb.BALANCING_ROLE_PARTICIPANT,
                start_date=first_day,
                priority=1,
            ),
            metadata=auth,
        ).setting
        balancing.CreateMeterBalancingSetting(
            balancing_pb.CreateMeterBalancingSettingRequest(
                site_id=site.id,
                meter_id=pv.id,
                balancing=balancing_pb.BALANCING_ROLE_PARTICIPANT,
                start_date=first_day,
            ),
            metadata=auth,
        )
        print(
            f"3. {meter.identifier} participates from {date(2025, 1, 1).isoformat()}, "
            f"priority {setting.priority}; {pv.identifier} shares its production"
        )

        run_answer = balancing.RunBalancing(
            balancing_pb.RunBalancingRequest(
                site_id=site.id,
                start_time=timestamp(START),
                end_time=timestamp(START + timedelta(days=1)),
            ),
            metadata=auth,
        )
        print(
            f"   RunBalancing: {run_answer.balanced_intervals} balanced, "
            f"{run_answer.incomplete_intervals} incomplete"
        )

        shared = grid = complete = rows = 0
        token_page = ""
        while True:
            page = balancing.ListAggregatedBalances(
                balancing_pb.ListAggregatedBalancesRequest(
                    debitor_meter_id=meter.id,
                    start_time=timestamp(START),
                    end_time=timestamp(datetime(2025, 1, 31, 23, 0, tzinfo=UTC)),
                    interval="PT15M",
                    page_token=token_page,
                ),
                metadata=auth,
            )
            for row in page.balances:
                rows += 1
                complete += row.complete
                if row.creditor_meter_id == "GRID":
                    grid += row.energy_wh
                else:
                    shared += row.energy_wh
            token_page = page.next_page_token
            if not token_page:
                break
        print(
            f"4. aggregated balances of {meter.identifier}: {rows} rows ({complete} complete), "
            f"{shared} Wh from {pv.identifier}, {grid} Wh from GRID"
        )
        summary = balancing.ListBalanceSummaries(
            balancing_pb.ListBalanceSummariesRequest(
                site_id=site.id,
                start_time=timestamp(START),
                end_time=timestamp(START + timedelta(days=1)),
                interval="P1D",
            ),
            metadata=auth,
        ).summaries[0]
        print(
            f"   day: production {summary.production_wh} Wh, demand {summary.demand_wh} Wh, "
            f"shared {summary.shared_wh} Wh, feed-in {summary.feed_in_wh} Wh, grid supply "
            f"{summary.grid_supply_wh} Wh, {summary.complete_intervals}/"
            f"{summary.balance_intervals} intervals complete"
        )
    finally:
        if not keep:
            # Deleting the site deletes its meters, readings, settings and balances.
            sites.DeleteSite(sites_pb.DeleteSiteRequest(site_id=site.id), metadata=auth)
            print(f"deleted site {site.id}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--address", default=os.environ.get("OPENVPP_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--token", default=os.environ.get("OPENVPP_TOKEN", ""))
    parser.add_argument("--quarters", type=int, default=96, help="quarter-hours of readings")
    parser.add_argument("--keep", action="store_true", help="keep the site and its data")
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("--token (or OPENVPP_TOKEN) is required")
    with grpc.insecure_channel(args.address) as channel:
        run(channel, args.token, args.quarters, args.keep)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except grpc.RpcError as error:
        sys.exit(f"{error.code().name}: {error.details()}")
