"""A month's partition of readings made on demand (a backfill of an old month) does not
wait for, nor hold up, transactions reading other months, and keeps the table's rules."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from service.db.database import create_pool
from service.telemetry.store import Partitions


async def test_a_new_partition_is_made_beside_a_long_reader_and_keeps_the_rules(
    fresh_database: str,
) -> None:
    pool = await create_pool(fresh_database, 1, 4)
    reader = await asyncpg.connect(fresh_database)
    try:
        # A long transaction that read readings (a balancing pass, an export) holds a lock
        # on the table until it ends.
        await reader.execute("BEGIN")
        await reader.fetchval("SELECT count(*) FROM readings WHERE ts >= now() - interval '1 day'")
        partitions = Partitions(pool)
        await partitions.load()
        # CREATE TABLE ... PARTITION OF waited for that reader, with every other reader and
        # writer of readings queued behind it.
        await asyncio.wait_for(partitions.ensure([(1997, 3)]), 10)
        await asyncio.wait_for(
            pool.fetchval("SELECT count(*) FROM readings WHERE ts >= now() - interval '1 hour'"),
            10,
        )
        await reader.execute("ROLLBACK")

        insert = "INSERT INTO readings (meter_id, flow, ts, value_wh, ingest_id) VALUES"
        meter = "'00000000-0000-0000-0000-000000000001'"
        await pool.execute(f"{insert} ({meter}, 1, '1997-03-10T00:00Z', 5, 1)")
        # The table's key and CHECK hold in the new partition.
        with pytest.raises(asyncpg.UniqueViolationError):
            await pool.execute(f"{insert} ({meter}, 1, '1997-03-10T00:00Z', 6, 2)")
        with pytest.raises(asyncpg.CheckViolationError):
            await pool.execute(f"{insert} ({meter}, 3, '1997-03-11T00:00Z', 6, 2)")
        # Its bounds are the month's.
        with pytest.raises(asyncpg.CheckViolationError):
            await pool.execute(f"{insert} ({meter}, 1, '1997-04-01T00:00Z', 6, 2)")
        assert await pool.fetchval("SELECT count(*) FROM readings_p199703") == 1
        # Another replica's Partitions, not knowing of it, finds it made.
        other = Partitions(pool)
        await other.ensure([(1997, 3)])
    finally:
        await reader.close()
        await pool.close()


async def test_a_months_table_detached_by_hand_is_named_not_skipped(fresh_database: str) -> None:
    """Skipped as made, it left every reading of its month refused without a word."""
    pool = await create_pool(fresh_database, 1, 2)
    try:
        await pool.execute("CREATE TABLE readings_p199801 (LIKE readings INCLUDING ALL)")
        with pytest.raises(RuntimeError, match="readings_p199801 exists but is not a partition"):
            await Partitions(pool).ensure([(1998, 1)])
    finally:
        await pool.close()
