"""PostgreSQL ends a session of ours that is left idle in a transaction (a process stuck or
gone mid-transaction) and with it its locks, instead of holding them for hours."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from service.db import database
from tests.conftest import running_service


async def test_a_transaction_left_idle_is_ended_and_its_locks_let_go(
    fresh_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 5 minutes in production; a second here.
    monkeypatch.setitem(database.SESSION_SETTINGS, "idle_in_transaction_session_timeout", "1000")
    async with running_service(fresh_database, db_read_connections=0) as server:
        assert server.pool is not None
        assert await server.pool.fetchval("SHOW idle_in_transaction_session_timeout") == "1s"
        stuck = await server.pool.acquire()
        other = await asyncpg.connect(fresh_database)
        try:
            await stuck.execute("BEGIN")
            await stuck.execute("SELECT pg_advisory_xact_lock(4242)")
            # What the stuck process holds, nobody else can take...
            assert not await other.fetchval("SELECT pg_try_advisory_lock(4242)")
            await asyncio.sleep(1.5)
            # ...until PostgreSQL ends its session.
            assert await other.fetchval("SELECT pg_try_advisory_lock(4242)")
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
                await stuck.execute("SELECT 1")
        finally:
            await other.close()
            await server.pool.release(stuck)
