"""Telemetry ingest benchmark: end-to-end acked readings/s against raw COPY.

Usage: python -m loadtest.telemetry_bench [--readings 1000000] [--meters 1000] ...

1. Uses OPENVPP_DATABASE_URL, or starts an embedded PostgreSQL in a temporary folder.
2. Starts ``openvpp serve`` as a separate process and samples its RSS (psutil) all along.
3. Creates an organization, a token, a site and the meters.
4. A separate client process (generated stubs) streams the readings in batches over a few
   concurrent StreamReadings calls, each with several batches in flight, and counts acks.
5. In the same run: TRUNCATE readings, then raw asyncpg COPY of the same rows into the same
   table, with the same number of connections and the same chunk size.

Prints the figures; it asserts nothing (the goals are in the README). Bounded: the client
stops at --time-limit seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
from google.protobuf import timestamp_pb2
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import meter_registry_pb2_grpc, site_registry_pb2_grpc, telemetry_pb2_grpc
from openvpp.v1 import site_registry_pb2 as spb
from openvpp.v1 import telemetry_pb2 as tpb

import openvpp_client
from service.auth.principal import Role
from service.auth.store import IdentityStore

FIRST = datetime(2025, 1, 1, tzinfo=UTC)
STEP = timedelta(minutes=15)
_US = 1_000_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# The embedded server's defaults are sized for tests (128 MB shared buffers, 1 GB WAL
# between checkpoints); a million rows of random-meter index inserts then mostly measure
# checkpoints and full-page writes. Both the service and the raw COPY run on these.
TUNING = {"shared_buffers": "512MB", "max_wal_size": "8GB", "checkpoint_timeout": "30min"}


async def _tune(dsn: str, settings: dict[str, str]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for name, value in settings.items():
            await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
    finally:
        await conn.close()


@contextlib.contextmanager
def database(tune: bool, extra_settings: dict[str, str] | None = None) -> Iterator[str]:
    """A fresh embedded PostgreSQL (or ``OPENVPP_DATABASE_URL``, as it is), with ``TUNING``
    when ``tune`` and ``extra_settings`` on top."""
    configured = os.environ.get("OPENVPP_DATABASE_URL")
    if configured:
        yield configured
        return
    from service.db.database import EmbeddedPostgres

    settings = {**(TUNING if tune else {}), **(extra_settings or {})}
    with tempfile.TemporaryDirectory(prefix="openvpp-bench-") as tmp:
        embedded = EmbeddedPostgres(Path(tmp))
        try:
            dsn = embedded.start()
            if settings:
                asyncio.run(_tune(dsn, settings))
                embedded.stop()  # shared_buffers needs a restart
                dsn = embedded.start()
                print(
                    "embedded database settings: "
                    + ", ".join(f"{k}={v}" for k, v in settings.items()),
                    flush=True,
                )
            yield dsn
        finally:
            embedded.stop()


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self._process = psutil.Process(pid)
        self._interval = interval
        self._halt = threading.Event()
        self.peak = 0

    def run(self) -> None:
        while not self._halt.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def plan(
    meters: list[str], readings: int, batch: int, streams: int, layout: str
) -> list[list[list[tuple[int, int]]]]:
    """Per stream, its batches as lists of (meter index, step index). Each stream owns a
    slice of the meters. Layout "time": a batch is the stream's meters at a few instants
    (a head-end pushing every quarter-hour). Layout "meter": a batch is a few meters with
    a run of consecutive intervals each (a day's load profile per meter, 100 values)."""
    per_meter = readings // len(meters)
    slices = [list(range(s, len(meters), streams)) for s in range(streams)]
    result: list[list[list[tuple[int, int]]]] = []
    for owned in slices:
        if layout == "time":
            flat = [(m, step) for step in range(per_meter) for m in owned]
        else:
            run = 100
            flat = [
                (m, step)
                for first in range(0, per_meter, run)
                for m in owned
                for step in range(first, min(first + run, per_meter))
            ]
        result.append([flat[i : i + batch] for i in range(0, len(flat), batch)])
    return result


def reading_value(meter: int, step: int, kind: str) -> float:
    return float(step * 250 + meter) if kind == "register" else 250.0


def client_main(
    port: int,
    token: str,
    meters: list[str],
    args: dict[str, Any],
    results: multiprocessing.Queue,  # type: ignore[type-arg]
) -> None:
    """The separate client process: builds the batches, then streams and counts acks."""
    stream_plans = plan(meters, args["readings"], args["batch"], args["streams"], args["layout"])
    kind = args["kind"]
    requests: list[list[tpb.StreamReadingsRequest]] = []
    for s, batches in enumerate(stream_plans):
        built = []
        for b, items in enumerate(batches):
            batch = tpb.ReadingBatch(batch_id=f"{s}-{b}")
            for meter, step in items:
                reading = batch.readings.add(meter_id=meters[meter])
                seconds = int((FIRST + step * STEP).timestamp())
                reading.timestamp.seconds = seconds
                if kind == "register":
                    reading.register_wh = reading_value(meter, step, kind)
                else:
                    reading.interval_wh = reading_value(meter, step, kind)
            built.append(tpb.StreamReadingsRequest(batch=batch))
        requests.append(built)
    results.put(asyncio.run(_stream_all(port, token, requests, args)))


async def _stream_all(
    port: int, token: str, requests: list[list[tpb.StreamReadingsRequest]], args: dict[str, Any]
) -> dict[str, Any]:
    metadata = (("authorization", f"Bearer {token}"),)
    totals = {"acked": 0, "accepted": 0, "duplicate": 0, "corrected": 0, "rejected": 0}
    deadline = time.monotonic() + args["time_limit"]

    async def one(channel: grpc.aio.Channel, batches: list[tpb.StreamReadingsRequest]) -> None:
        stub = telemetry_pb2_grpc.TelemetryStub(channel)
        call = stub.StreamReadings(metadata=metadata)
        window = asyncio.Semaphore(args["in_flight"])
        sent = 0

        async def write() -> None:
            nonlocal sent
            for request in batches:
                if time.monotonic() > deadline:
                    break
                await window.acquire()
                await call.write(request)
                sent += 1
            await call.done_writing()

        writer = asyncio.create_task(write())
        received = 0
        while True:
            response = await call.read()
            if not isinstance(response, tpb.StreamReadingsResponse):
                break  # grpc.aio.EOF
            ack = response.ack
            window.release()
            received += 1
            totals["acked"] += (
                ack.accepted_count + ack.duplicate_count + ack.corrected_count + ack.rejected_count
            )
            totals["accepted"] += ack.accepted_count
            totals["duplicate"] += ack.duplicate_count
            totals["corrected"] += ack.corrected_count
            totals["rejected"] += ack.rejected_count
        await writer

    # The measured streams: the token as per-call metadata and no retry policy (retries
    # would buffer each stream's messages in gRPC core), as a plain insecure channel.
    channels = [
        openvpp_client.aio_channel(f"127.0.0.1:{port}", retry=None) for _ in range(args["channels"])
    ]
    started = time.monotonic()
    await asyncio.gather(
        *(one(channels[i % len(channels)], batches) for i, batches in enumerate(requests))
    )
    elapsed = time.monotonic() - started
    for channel in channels:
        await channel.close()
    return {**totals, "seconds": elapsed}


async def setup_tenant(dsn: str, port: int, meter_count: int, kind: str) -> tuple[str, list[str]]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    store = IdentityStore(pool)
    org = await store.create_org("bench", Role.PARTNER)
    token = (await store.create_token(org.id)).token
    await pool.close()
    # Set-up is not measured: the client helper adds the token and retries what may be.
    async with openvpp_client.aio_channel(f"127.0.0.1:{port}", token) as channel:
        sites = site_registry_pb2_grpc.SiteRegistryStub(channel)
        meters_stub = meter_registry_pb2_grpc.MeterRegistryStub(channel)
        site = await sites.CreateSite(
            spb.CreateSiteRequest(
                name="Businesspark",
                location=spb.Location(address="10115 Berlin"),
                timezone="Europe/Berlin",
                type=spb.SITE_TYPE_BALANCED_ACCURATE,
                balance_resolution="PT15M",
                supply_points=[
                    spb.SupplyPoint(
                        grid_identifier="BENCH" + uuid.uuid4().hex[:12].upper(),
                        direction=spb.SUPPLY_POINT_DIRECTION_BIDIRECTIONAL,
                    )
                ],
            ),
        )
        start = timestamp_pb2.Timestamp()
        start.FromDatetime(FIRST - timedelta(days=1))
        measuring = (
            mpb.MEASURING_READINGS_ACCURATE
            if kind == "register"
            else mpb.MEASURING_LOAD_PROFILE_ACCURATE
        )
        limit = asyncio.Semaphore(16)

        async def create(n: int) -> str:
            async with limit:
                response = await meters_stub.CreateMeter(
                    mpb.CreateMeterRequest(
                        site_id=site.site.id,
                        identifier=f"1ISK{n:05d}",
                        serial=f"1ISK{n:05d}",
                        mpo="MPO",
                        direction=mpb.METER_DIRECTION_CONSUMER,
                        measuring=measuring,
                        start_date=start,
                    ),
                )
                return response.meter.id

        ids = await asyncio.gather(*(create(n) for n in range(meter_count)))
    return token, list(ids)


async def raw_copy(dsn: str, meters: list[str], args: dict[str, Any]) -> tuple[float, float, int]:
    """Seconds for the same rows COPYed concurrently in batch-sized chunks, and for one COPY."""
    stream_plans = plan(meters, args["readings"], args["batch"], args["streams"], args["layout"])
    meter_ids = [uuid.UUID(m) for m in meters]
    chunks: list[list[list[tuple[Any, ...]]]] = []
    for batches in stream_plans:
        built = []
        for items in batches:
            built.append(
                [
                    (
                        meter_ids[m],
                        1,
                        FIRST + step * STEP,
                        reading_value(m, step, args["kind"]),
                        1,
                    )
                    for m, step in items
                ]
            )
        chunks.append(built)
    columns = ("meter_id", "flow", "ts", "value_wh", "ingest_id")
    conns = [await asyncpg.connect(dsn) for _ in chunks]
    await conns[0].execute("TRUNCATE readings")
    started = time.monotonic()

    async def copy_stream(conn: asyncpg.Connection, built: list[list[tuple[Any, ...]]]) -> None:
        for rows in built:
            await conn.copy_records_to_table("readings", records=rows, columns=columns)

    await asyncio.gather(*(copy_stream(c, b) for c, b in zip(conns, chunks, strict=True)))
    concurrent = time.monotonic() - started
    rows_total = sum(len(rows) for built in chunks for rows in built)
    await conns[0].execute("TRUNCATE readings")
    everything = [row for built in chunks for rows in built for row in rows]
    started = time.monotonic()
    await conns[0].copy_records_to_table("readings", records=everything, columns=columns)
    single = time.monotonic() - started
    for conn in conns:
        await conn.close()
    return concurrent, single, rows_total


async def backend_pids(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
        return [row[0] for row in rows]
    finally:
        await conn.close()


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def serve(dsn: str, port: int, settings: dict[str, str]) -> subprocess.Popen[bytes]:
    """``openvpp serve`` in its own process on ``dsn`` and 127.0.0.1:``port``, without the
    bootstrap organization, logging warnings and above, with ``settings`` (``OPENVPP_*``)
    on top; under cProfile when ``BENCH_PROFILE=file`` is set (the profile is written when
    it exits)."""
    env = {
        **os.environ,
        "OPENVPP_DATABASE_URL": dsn,
        "OPENVPP_BOOTSTRAP": "false",
        "OPENVPP_GRPC_ADDRESS": f"127.0.0.1:{port}",
        "OPENVPP_LOG_LEVEL": "WARNING",
        **settings,
    }
    profile = (
        ["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"]]
        if os.environ.get("BENCH_PROFILE")
        else []
    )
    return subprocess.Popen([sys.executable, *profile, "-m", "service.cli", "serve"], env=env)


def wait_serving(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("server exited during start")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.2)
    raise SystemExit("server did not start in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readings", type=int, default=1_000_000)
    parser.add_argument("--meters", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=4, help="concurrent StreamReadings")
    parser.add_argument("--channels", type=int, default=2, help="client connections")
    parser.add_argument("--in-flight", type=int, default=4, help="unacked batches per stream")
    parser.add_argument("--kind", choices=["register", "interval"], default="register")
    parser.add_argument(
        "--layout",
        choices=["meter", "time"],
        default="meter",
        help="meter: 10 meters x 100 intervals per batch; time: all stream meters x 4 instants",
    )
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds of streaming")
    parser.add_argument(
        "--no-tune", action="store_true", help="keep the embedded database's test defaults"
    )
    args = vars(parser.parse_args())

    with database(not args["no_tune"]) as dsn:
        port = free_port()
        server = serve(dsn, port, {"OPENVPP_STREAM_PIPELINE_DEPTH": str(args["in_flight"])})
        sampler = RssSampler(server.pid)
        sampler.start()
        try:
            wait_serving(port, server, 60)
            token, meters = asyncio.run(setup_tenant(dsn, port, args["meters"], args["kind"]))
            idle_rss = psutil.Process(server.pid).memory_info().rss
            print(
                f"server up (pid {server.pid}), {len(meters)} meters, idle RSS "
                f"{idle_rss / 2**20:.0f} MiB; streaming {args['readings']:,} {args['kind']} "
                f"readings in batches of {args['batch']} ({args['layout']} layout) over "
                f"{args['streams']} streams",
                flush=True,
            )
            context = multiprocessing.get_context("spawn")
            results = context.Queue()
            client = context.Process(target=client_main, args=(port, token, meters, args, results))
            server_cpu_before = cpu_seconds([server.pid])
            db_pids = asyncio.run(backend_pids(dsn))
            db_cpu_before = cpu_seconds(db_pids)
            client.start()
            outcome = results.get(timeout=args["time_limit"] + 600)
            client.join()
            peak_rss = sampler.peak
            server_cpu = cpu_seconds([server.pid]) - server_cpu_before
            db_pids_after = asyncio.run(backend_pids(dsn))
            db_cpu = (
                cpu_seconds(db_pids_after)
                - cpu_seconds([p for p in db_pids if p not in db_pids_after])
                - db_cpu_before
            )
        finally:
            server.terminate()
            server.wait(30)
            sampler.stop()
        concurrent, single, copied = asyncio.run(raw_copy(dsn, meters, args))

    acked_rate = outcome["acked"] / outcome["seconds"]
    copy_rate = copied / concurrent
    single_rate = copied / single
    print(
        f"acked readings:     {outcome['acked']:,} in {outcome['seconds']:.1f} s "
        f"(accepted {outcome['accepted']:,}, duplicate {outcome['duplicate']:,}, "
        f"corrected {outcome['corrected']:,}, rejected {outcome['rejected']:,})"
    )
    print(f"end-to-end rate:    {acked_rate:,.0f} readings/s acked")
    print(f"server peak RSS:    {peak_rss / 2**20:.0f} MiB")
    print(
        f"CPU while streaming: server {server_cpu:.1f} s, database backends {db_cpu:.1f} s "
        f"(approximate: backends opened during the run are not counted)"
    )
    print(
        f"raw COPY rate:      {copy_rate:,.0f} rows/s ({args['streams']} connections, "
        f"chunks of {args['batch']}); one single COPY: {single_rate:,.0f} rows/s"
    )
    print(
        f"ratio acked/COPY:   {acked_rate / copy_rate:.2f} "
        f"(vs single COPY: {acked_rate / single_rate:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
