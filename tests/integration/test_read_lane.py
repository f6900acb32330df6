"""The read lane against a real PostgreSQL: bounded, shared, and recovering from trouble."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from service.db.database import create_pool
from service.db.reads import ReadLane, _usable
from tests.helpers import eventually

PID = "SELECT pg_backend_pid() AS pid"
CONNECTION_LOST = (
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    OSError,
)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    own = await create_pool(database_url, 0, 6)
    yield own
    await own.close()


async def test_concurrent_reads_share_at_most_size_connections(pool: asyncpg.Pool) -> None:
    lane = ReadLane(pool, 2)
    rows = await asyncio.gather(*(lane.fetchrow("SELECT $1::int AS n", n) for n in range(200)))
    assert [row["n"] for row in rows if row] == list(range(200))
    pids = await asyncio.gather(*(lane.fetchrow(PID) for _ in range(50)))
    assert 1 <= len({row["pid"] for row in pids if row}) <= 2
    assert pool.get_size() - pool.get_idle_size() == 2
    await lane.close()
    assert pool.get_idle_size() == pool.get_size()


async def test_fetch_returns_every_row(pool: asyncpg.Pool) -> None:
    lane = ReadLane(pool, 1)
    rows = await lane.fetch("SELECT generate_series(1, $1::int) AS n", 5)
    assert [row["n"] for row in rows] == [1, 2, 3, 4, 5]
    await lane.close()


async def test_a_failing_statement_keeps_the_connection(pool: asyncpg.Pool) -> None:
    lane = ReadLane(pool, 1)
    before = await lane.fetchrow(PID)
    with pytest.raises(asyncpg.DivisionByZeroError):
        await lane.fetchrow("SELECT 1 / $1::int", 0)
    after = await lane.fetchrow(PID)
    assert before
    assert after
    assert before["pid"] == after["pid"]
    await lane.close()


Read = asyncio.Future[asyncpg.Record | None]


async def _busy_lane(pool: asyncpg.Pool, holding: str, waiting: str) -> tuple[ReadLane, Read, Read]:
    """A lane of one connection, busy with ``holding``, and ``waiting`` queued behind it."""
    lane = ReadLane(pool, 1)
    holder = asyncio.ensure_future(lane.fetchrow(holding))

    async def holding_runs() -> bool:
        running = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = $1",
            holding,
        )
        return bool(running)

    await eventually(holding_runs, f"{holding!r} runs on the lane's connection")
    waiter = asyncio.ensure_future(lane.fetchrow(waiting))
    await eventually(lambda: lane.waiting == 1, "the second read waits for the lane")
    return lane, holder, waiter


async def test_a_cancelled_read_gives_its_connection_back_and_the_lane_goes_on(
    pool: asyncpg.Pool,
) -> None:
    lane, slow, waiting = await _busy_lane(pool, "SELECT pg_sleep(5)", "SELECT 2 AS n")
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    # The waiter borrows a fresh connection instead of the one still being cancelled.
    row = await asyncio.wait_for(waiting, 5)
    assert row
    assert row["n"] == 2
    await lane.close()
    assert pool.get_idle_size() == pool.get_size()


async def test_a_cancelled_waiter_does_not_take_a_slot(pool: asyncpg.Pool) -> None:
    lane, slow, impatient = await _busy_lane(pool, "SELECT pg_sleep(0.3), 1 AS n", "SELECT 2 AS n")
    impatient.cancel()
    patient = asyncio.ensure_future(lane.fetchrow("SELECT 3 AS n"))
    first, last = await asyncio.wait_for(asyncio.gather(slow, patient), 5)
    assert first
    assert first["n"] == 1
    assert last
    assert last["n"] == 3
    assert impatient.cancelled()
    await lane.close()


async def test_a_freed_slot_goes_to_the_waiter_not_to_a_newcomer(pool: asyncpg.Pool) -> None:
    timed = "SELECT clock_timestamp() AS began, pg_sleep(0.2), clock_timestamp() AS ended"
    lane, holder, waiter = await _busy_lane(pool, "SELECT pg_sleep(5)", timed)
    holder.cancel()  # its connection goes back to the pool; its slot to the waiter
    newcomer = asyncio.ensure_future(lane.fetchrow(timed))  # asks right after
    with pytest.raises(asyncio.CancelledError):
        await holder
    rows = await asyncio.wait_for(asyncio.gather(waiter, newcomer), 5)
    spans = sorted((row["began"], row["ended"]) for row in rows if row)
    assert len(spans) == 2
    assert spans[0][1] <= spans[1][0]  # one after the other: never two connections at once
    await lane.close()


async def _lane_whose_connection_was_ended(
    pool: asyncpg.Pool, database_url: str
) -> tuple[ReadLane, int]:
    """A lane of one connection, and the backend pid the server just ended under it."""
    lane = ReadLane(pool, 1)
    row = await lane.fetchrow(PID)
    assert row
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", row["pid"])
    finally:
        await admin.close()
    return lane, row["pid"]


async def test_a_connection_ended_while_idle_is_replaced_without_a_failed_read(
    pool: asyncpg.Pool, database_url: str
) -> None:
    lane, ended = await _lane_whose_connection_was_ended(pool, database_url)
    # The client sees the connection close while it sits idle in the lane.
    await eventually(
        lambda: not any(_usable(conn) for conn in lane._idle), "the client notices the end"
    )
    replaced = await asyncio.wait_for(lane.fetchrow(PID), 5)
    assert replaced
    assert replaced["pid"] != ended
    await lane.close()


async def test_a_connection_ended_just_before_a_read_costs_at_most_that_read(
    pool: asyncpg.Pool, database_url: str
) -> None:
    lane, ended = await _lane_whose_connection_was_ended(pool, database_url)
    # Whether the client noticed the end before the next read decides if that read fails.
    try:
        first = await asyncio.wait_for(lane.fetchrow(PID), 5)
    except CONNECTION_LOST:
        first = None
    if first is not None:
        assert first["pid"] != ended
    replaced = await asyncio.wait_for(lane.fetchrow(PID), 5)
    assert replaced
    assert replaced["pid"] != ended
    await lane.close()


async def test_reads_after_close_use_the_pool(pool: asyncpg.Pool) -> None:
    lane = ReadLane(pool, 1)
    await lane.fetchrow("SELECT 1")
    await lane.close()
    row = await lane.fetchrow("SELECT 4 AS n")
    assert row
    assert row["n"] == 4
    await eventually(
        lambda: pool.get_idle_size() == pool.get_size(), "every connection back in the pool"
    )
