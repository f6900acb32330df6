"""How long balancing's read of a site-year takes: ``site_interval_energy``.

Seeds one site (Europe/Berlin, PT15M) with ``--meters`` register meters and a register at
every quarter-hour of ``--year`` (102 meters: 3.57 M readings, straight COPY into
``readings``), then times ``site_interval_energy`` over the year ``--repeat`` times,
alternately as one COPY and as two parallel COPYs. As a baseline measured in the same run,
it also times a plain ``fetch`` of the same rows (asyncpg records, what a per-row read would
start from). Embedded PostgreSQL in a temporary directory unless ``OPENVPP_DATABASE_URL``
is set.

    flock /tmp/openvpp-bench.lock .venv/bin/python -m loadtest.energy_bench
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import numpy as np

from service.db.database import EmbeddedPostgres, create_pool
from service.db.migrate import migrate
from service.grid import PT15M
from service.grid.arrays import grid_bounds_us
from service.telemetry import energy_store
from service.telemetry.energy_store import site_interval_energy
from service.telemetry.store import Partitions, copy_payload


async def seed(pool: asyncpg.Pool, meters: int, year: int) -> tuple[uuid.UUID, uuid.UUID]:
    tz = ZoneInfo("Europe/Berlin")
    start, end = datetime(year, 1, 1, tzinfo=tz), datetime(year + 1, 1, 1, tzinfo=tz)
    bounds = grid_bounds_us(PT15M, tz, start, end)
    async with pool.acquire() as conn:
        org = await conn.fetchval(
            "INSERT INTO organizations (name, role) VALUES ('bench', 'partner') RETURNING id"
        )
        site = await conn.fetchval(
            """
            INSERT INTO sites (org_id, name, external_id, address, latitude, longitude, country,
                timezone, grid_identifier, primary_direction, site_type, balance_resolution)
            VALUES ($1, 'bench', '', '', 0, 0, 'DE', 'Europe/Berlin', 'BENCH-1',
                'bidirectional', 'balanced_accurate', 'PT15M')
            RETURNING id
            """,
            org,
        )
        ids = []
        for n in range(meters):
            ids.append(
                await conn.fetchval(
                    """
                    INSERT INTO meters (org_id, site_id, identifier, direction, measuring,
                        start_date)
                    VALUES ($1, $2, $3, 'consumer', 'readings_accurate', $4) RETURNING id
                    """,
                    org,
                    site,
                    f"M{n}",
                    start,
                )
            )
    partitions = Partitions(pool)
    await partitions.load()
    await partitions.ensure_range(int(bounds[0]), int(bounds[-1]))
    rng = np.random.default_rng(1)
    async with pool.acquire() as conn:
        for meter_id in ids:
            registers = np.cumsum(rng.uniform(0, 300, len(bounds)))
            rows = [
                (meter_id, 1, int(ts), float(value))
                for ts, value in zip(bounds, registers, strict=True)
            ]
            await conn.copy_to_table(
                "readings",
                source=memoryview(copy_payload(rows, 1)),
                columns=("meter_id", "flow", "ts", "value_wh", "ingest_id"),
                format="binary",
            )
        await conn.execute("ANALYZE readings")
    return org, site


async def run(args: argparse.Namespace, dsn: str) -> None:
    pool = await create_pool(dsn, 1, 3)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        began = time.perf_counter()
        org, site = await seed(pool, args.meters, args.year)
        print(f"seeded {args.meters} meters in {time.perf_counter() - began:.1f} s")
        default_parallel = energy_store.PARALLEL_MIN_CELLS
        tz = ZoneInfo("Europe/Berlin")
        start = datetime(args.year, 1, 1, tzinfo=tz)
        end = datetime(args.year + 1, 1, 1, tzinfo=tz)
        for _ in range(args.repeat):
            for label, parallel_from in (("one COPY", 10**18), ("two COPYs", default_parallel)):
                energy_store.PARALLEL_MIN_CELLS = parallel_from
                began = time.perf_counter()
                energy = await site_interval_energy(pool, org, site, start, end)
                took = time.perf_counter() - began
                known = int(np.count_nonzero(~np.isnan(energy.import_wh)))
                print(
                    f"site_interval_energy ({label}): {took:.2f} s for "
                    f"{energy.import_wh.size:,} meter-intervals ({known:,} known)"
                )
            began = time.perf_counter()
            rows = await pool.fetch(
                """
                SELECT r.meter_id, r.flow, r.ts, r.value_wh FROM meters m
                JOIN readings r ON r.meter_id = m.id
                WHERE m.site_id = $1 AND r.ts >= $2 AND r.ts <= $3
                """,
                site,
                start,
                end,
            )
            fetched = time.perf_counter() - began
            print(f"baseline, plain fetch of the {len(rows):,} rows: {fetched:.2f} s")
            del rows
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--meters", type=int, default=102)
    parser.add_argument("--year", type=int, default=2025)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    dsn = os.environ.get("OPENVPP_DATABASE_URL")
    if dsn:
        asyncio.run(run(args, dsn))
        return
    home = Path(tempfile.mkdtemp(prefix="openvpp-energy-bench-"))
    embedded = EmbeddedPostgres(home)
    try:
        asyncio.run(run(args, embedded.start()))
    finally:
        embedded.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
