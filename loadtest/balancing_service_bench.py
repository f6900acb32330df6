"""Balancing service benchmark: a site-year through the running server.

Usage: flock /tmp/openvpp-bench.lock python -m loadtest.balancing_service_bench \
    [--consumers 100] [--producers 2] [--days 365] [--corrections 100]

1. Uses OPENVPP_DATABASE_URL, or an embedded PostgreSQL in a temporary folder (tuned like
   the telemetry benchmark's), and starts ``openvpp serve`` as a separate process with its
   balancing worker, sampling its RSS all along.
2. Creates one balanced site (Europe/Berlin, PT15M, no supply point), ``--consumers``
   consumer and ``--producers`` PV producer meters (load profiles) and their settings, then
   loads a year of interval energy straight into ``readings`` with COPY (3.57 M rows for
   100 + 2 meters).
3. Times ``RunBalancing`` of the whole year (read the readings, balance, persist);
   ``ListAggregatedBalances`` of the year at PT15M for one debitor and at P1M for the whole
   site (every page); and, over ``--corrections`` corrected readings sent one at a time,
   the latency from the IngestReadings ack to the WatchBalances event of its re-balanced
   interval (p50 / p99).

Prints the figures; asserts nothing (the goals are in the README).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import grpc
import numpy as np
import psutil
from google.protobuf import timestamp_pb2
from google.type import date_pb2
from openvpp.v1 import balancing_pb2 as bpb
from openvpp.v1 import (
    balancing_pb2_grpc,
    meter_registry_pb2_grpc,
    site_registry_pb2_grpc,
    telemetry_pb2_grpc,
)
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import site_registry_pb2 as spb
from openvpp.v1 import telemetry_pb2 as tpb

from loadtest.telemetry_bench import RssSampler, database, free_port, serve, wait_serving
from service.auth.principal import Role
from service.auth.store import IdentityStore
from service.telemetry.store import Partitions

YEAR_START = datetime(2024, 12, 31, 23, 0, tzinfo=UTC)  # 2025-01-01 00:00 in Berlin
STEP = timedelta(minutes=15)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def stamp(value: datetime) -> timestamp_pb2.Timestamp:
    result = timestamp_pb2.Timestamp()
    result.FromDatetime(value)
    return result


async def setup(dsn: str, port: int, consumers: int, producers: int, days: int) -> dict[str, Any]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    assert pool is not None
    store = IdentityStore(pool)
    org = await store.create_org(f"bench-{uuid.uuid4().hex[:6]}", Role.PARTNER)
    token = (await store.create_token(org.id)).token
    auth = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        sites = site_registry_pb2_grpc.SiteRegistryStub(channel)
        meters = meter_registry_pb2_grpc.MeterRegistryStub(channel)
        balancing = balancing_pb2_grpc.BalancingStub(channel)
        site = (
            await sites.CreateSite(
                spb.CreateSiteRequest(
                    name="Businesspark",
                    type=spb.SITE_TYPE_BALANCED_ACCURATE,
                    balance_resolution="PT15M",
                    location=spb.Location(address="10115 Berlin", country="DE"),
                    timezone="Europe/Berlin",
                ),
                metadata=auth,
            )
        ).site

        async def meter(n: int, direction: int) -> str:
            created = await meters.CreateMeter(
                mpb.CreateMeterRequest(
                    site_id=site.id,
                    identifier=f"M{n:04d}",
                    serial=f"M{n:04d}",
                    mpo="MPO",
                    direction=direction,  # type: ignore[arg-type]
                    measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE,
                    start_date=stamp(YEAR_START - timedelta(days=1)),
                ),
                metadata=auth,
            )
            await balancing.CreateMeterBalancingSetting(
                bpb.CreateMeterBalancingSettingRequest(
                    meter_id=created.meter.id,
                    balancing=bpb.BALANCING_ROLE_PARTICIPANT,
                    start_date=date_pb2.Date(year=2025, month=1, day=1),
                ),
                metadata=auth,
            )
            return created.meter.id

        consumer_ids = [await meter(n, mpb.METER_DIRECTION_CONSUMER) for n in range(consumers)]
        producer_ids = [
            await meter(consumers + n, mpb.METER_DIRECTION_PRODUCER) for n in range(producers)
        ]
    # Local days in Berlin: DST takes an hour in spring and gives it back in autumn.
    berlin = ZoneInfo("Europe/Berlin")
    local_end = datetime.combine(date(2025, 1, 1) + timedelta(days=days), dt_time(0), berlin)
    steps = int((local_end.astimezone(UTC) - YEAR_START) / STEP)
    partitions = Partitions(pool)
    await partitions.load()
    months = {(m.year, m.month) for m in (YEAR_START + timedelta(days=d) for d in range(days + 2))}
    await partitions.ensure(sorted(months))
    rng = np.random.default_rng(2025)
    load_started = time.perf_counter()
    stamps = [YEAR_START + step * STEP for step in range(steps)]
    quarter = np.arange(steps)
    hour = (quarter % 96) / 4
    day = quarter // 96
    season = 0.55 + 0.45 * np.cos(2 * np.pi * (day - 172) / 365)
    daylight = 8 + 8 * season
    sun = np.clip((hour - (13.0 - daylight / 2)) / daylight, 0, 1)
    async with pool.acquire() as conn:
        for index, meter_id in enumerate([*consumer_ids, *producer_ids]):
            is_producer = index >= consumers
            if is_producer:
                peak = 3000 + 1000 * (index - consumers)
                values = peak * season * np.sin(np.pi * sun) * rng.uniform(0.6, 1.0, steps)
            else:
                evening = 80 * np.exp(-((hour - 19) ** 2) / 4)
                values = 40 + 20 * (index % 5) + evening + rng.uniform(0, 30, steps)
            meter_uuid = uuid.UUID(meter_id)
            flow = 2 if is_producer else 1
            await conn.copy_records_to_table(
                "readings",
                records=[
                    (meter_uuid, flow, at, value, 1)
                    for at, value in zip(stamps, values.tolist(), strict=True)
                ],
                columns=["meter_id", "flow", "ts", "value_wh", "ingest_id"],
            )
    load_seconds = time.perf_counter() - load_started
    await pool.close()
    return {
        "token": token,
        "site": site.id,
        "consumers": consumer_ids,
        "producers": producer_ids,
        "steps": steps,
        "load_seconds": load_seconds,
    }


async def measure(port: int, plan: dict[str, Any], corrections: int) -> dict[str, Any]:
    auth = (("authorization", f"Bearer {plan['token']}"),)
    end = YEAR_START + plan["steps"] * STEP
    figures: dict[str, Any] = {}
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        balancing = balancing_pb2_grpc.BalancingStub(channel)
        telemetry = telemetry_pb2_grpc.TelemetryStub(channel)

        started = time.perf_counter()
        run = await balancing.RunBalancing(
            bpb.RunBalancingRequest(
                site_id=plan["site"], start_time=stamp(YEAR_START), end_time=stamp(end)
            ),
            metadata=auth,
            timeout=600,
        )
        figures["run_seconds"] = time.perf_counter() - started
        figures["run_balanced"] = run.balanced_intervals
        figures["run_incomplete"] = run.incomplete_intervals

        async def read_all(**fields: Any) -> tuple[float, int]:
            begun = time.perf_counter()
            rows, token = 0, ""
            while True:
                page = await balancing.ListAggregatedBalances(
                    bpb.ListAggregatedBalancesRequest(
                        start_time=stamp(YEAR_START),
                        end_time=stamp(end),
                        page_size=10_000,
                        page_token=token,
                        **fields,
                    ),
                    metadata=auth,
                    timeout=600,
                )
                rows += len(page.balances)
                token = page.next_page_token
                if not token:
                    return time.perf_counter() - begun, rows

        figures["debitor_pt15m"] = await read_all(
            debitor_meter_id=plan["consumers"][0], interval="PT15M"
        )
        figures["site_p1m"] = await read_all(site_id=plan["site"], interval="P1M")

        stream = balancing.WatchBalances(
            bpb.WatchBalancesRequest(site_id=plan["site"]), metadata=auth
        )
        await stream.initial_metadata()
        rng = random.Random(7)
        latencies = []
        for n in range(corrections):
            step = rng.randrange(plan["steps"])
            at = YEAR_START + step * STEP
            reading = tpb.Reading(
                meter_id=plan["consumers"][n % len(plan["consumers"])],
                timestamp=stamp(at),
                interval_wh=1000.0 + n,
            )
            ack = await telemetry.IngestReadings(
                tpb.IngestReadingsRequest(
                    batch=tpb.ReadingBatch(batch_id=f"c{n}", readings=[reading])
                ),
                metadata=auth,
            )
            acked = time.perf_counter()
            assert ack.ack.corrected_count == 1, ack.ack
            while True:
                event = await asyncio.wait_for(stream.read(), 30)
                assert isinstance(event, bpb.WatchBalancesResponse)
                if (
                    event.start_time.ToDatetime(tzinfo=UTC)
                    <= at
                    < event.end_time.ToDatetime(tzinfo=UTC)
                ):
                    break
            latencies.append(time.perf_counter() - acked)
        stream.cancel()
        latencies.sort()
        figures["correction_p50"] = statistics.median(latencies) if latencies else 0.0
        figures["correction_p99"] = (
            latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)]
            if latencies
            else 0.0
        )
        figures["correction_max"] = latencies[-1] if latencies else 0.0
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--consumers", type=int, default=100)
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--corrections", type=int, default=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    return run_sections(parser.parse_args(argv))


def run_sections(args: argparse.Namespace) -> int:
    with database(tune=True) as dsn:
        port = free_port()
        server = serve(dsn, port, {"OPENVPP_BALANCING_POLL_SECONDS": "5"})
        sampler = RssSampler(server.pid)
        sampler.start()
        try:
            wait_serving(port, server, 60)
            plan = asyncio.run(setup(dsn, port, args.consumers, args.producers, args.days))
            idle_rss = psutil.Process(server.pid).memory_info().rss
            meter_intervals = plan["steps"] * (args.consumers + args.producers)
            print(
                f"site of {args.consumers} consumers + {args.producers} producers, "
                f"{plan['steps']:,} intervals ({meter_intervals:,} meter-intervals) COPYed in "
                f"{plan['load_seconds']:.1f} s; server idle RSS {idle_rss / 2**20:.0f} MiB",
                flush=True,
            )
            figures = asyncio.run(measure(port, plan, args.corrections))
            rss_after = psutil.Process(server.pid).memory_info().rss
        finally:
            server.terminate()
            server.wait(30)
            sampler.stop()
    run_rate = meter_intervals / figures["run_seconds"]
    print(
        f"RunBalancing year:         {figures['run_seconds']:.2f} s "
        f"({figures['run_balanced']:,} balanced, {figures['run_incomplete']:,} incomplete; "
        f"{run_rate:,.0f} meter-intervals/s read, balanced and persisted)  goal <= 10 s"
    )
    seconds, rows = figures["debitor_pt15m"]
    print(f"List year PT15M, 1 debitor: {seconds:.2f} s for {rows:,} rows  goal <= 1 s")
    seconds, rows = figures["site_p1m"]
    print(f"List year P1M, whole site:  {seconds:.2f} s for {rows:,} rows  goal <= 1 s")
    print(
        f"correction ack -> balanced: p50 {figures['correction_p50'] * 1000:.0f} ms, "
        f"p99 {figures['correction_p99'] * 1000:.0f} ms, max "
        f"{figures['correction_max'] * 1000:.0f} ms over {args.corrections}  goal p99 <= 1 s"
    )
    print(f"server RSS: peak {sampler.peak / 2**20:.0f} MiB, after {rss_after / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
