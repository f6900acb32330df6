"""The reference from setpoints to their dispatch, checked once per statement (migration
0018) with a foreign key's rules: no setpoint refers to a dispatch that does not exist, a
delete cascades (on to the attempts, by their own foreign key), the key never changes, and a
dispatch cannot be deleted under setpoints that are being written for it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from uuid import UUID

import asyncpg
import pytest


@pytest.fixture
async def conn(fresh_database: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(fresh_database)
    try:
        yield connection
    finally:
        await connection.close()


async def _org(conn: asyncpg.Connection, role: str) -> UUID:
    org_id: UUID = await conn.fetchval(
        "INSERT INTO organizations (name, role) VALUES ($1, $2) RETURNING id", role, role
    )
    return org_id


async def _dispatch(conn: asyncpg.Connection, operator: UUID) -> UUID:
    dispatch_id = uuid.uuid4()
    now = datetime.now(UTC)
    await conn.execute(
        """
        INSERT INTO dispatches (id, org_id, request_id, request_digest, power_kw, start_time,
            end_time, dispatch_type, allocated_power_kw, shortfall_power_kw,
            eligible_site_count, ineligible_site_count)
        VALUES ($1, $2, $3, '\\x00', 1, $4, $4, 'exact', 1, 0, 1, 0)
        """,
        dispatch_id,
        operator,
        str(dispatch_id),
        now,
    )
    return dispatch_id


async def _setpoints(
    conn: asyncpg.Connection, dispatch_ids: list[UUID], operator: UUID, partner: UUID
) -> list[UUID]:
    ids = [uuid.uuid4() for _ in dispatch_ids]
    now = datetime.now(UTC)
    await conn.execute(
        """
        INSERT INTO setpoints (id, dispatch_id, operator_org_id, partner_org_id, site_id,
            resource_id, power_kw, start_time, end_time)
        SELECT i, d, $3, $4, gen_random_uuid(), gen_random_uuid(), 1, $5, $5
        FROM unnest($1::uuid[], $2::uuid[]) AS n (i, d)
        """,
        ids,
        dispatch_ids,
        operator,
        partner,
        now,
    )
    return ids


async def _attempts(conn: asyncpg.Connection, setpoint_ids: list[UUID]) -> None:
    await conn.execute(
        """
        INSERT INTO setpoint_attempts (setpoint_id, attempt_time, http_status, latency_ms)
        SELECT s, now(), 204, 1 FROM unnest($1::uuid[]) AS s
        """,
        setpoint_ids,
    )


async def test_rows_refer_only_to_rows_that_exist(conn: asyncpg.Connection) -> None:
    operator, partner = await _org(conn, "operator"), await _org(conn, "partner")
    dispatch_id = await _dispatch(conn, operator)
    # One missing reference among many refuses the whole statement.
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="dispatch that does not exist"):
        await _setpoints(conn, [dispatch_id] * 5 + [uuid.uuid4()], operator, partner)
    assert await conn.fetchval("SELECT count(*) FROM setpoints") == 0
    setpoint_ids = await _setpoints(conn, [dispatch_id] * 3, operator, partner)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await _attempts(conn, [*setpoint_ids, uuid.uuid4()])
    assert await conn.fetchval("SELECT count(*) FROM setpoint_attempts") == 0
    await _attempts(conn, setpoint_ids + setpoint_ids)
    assert await conn.fetchval("SELECT count(*) FROM setpoint_attempts") == 6


async def test_deleting_an_organization_takes_its_dispatches_setpoints_and_attempts(
    conn: asyncpg.Connection,
) -> None:
    operator, other, partner = (
        await _org(conn, "operator"),
        await _org(conn, "operator"),
        await _org(conn, "partner"),
    )
    gone = [await _dispatch(conn, operator) for _ in range(2)]
    kept = await _dispatch(conn, other)
    gone_setpoints = await _setpoints(conn, [gone[0], gone[1], gone[1]], operator, partner)
    kept_setpoints = await _setpoints(conn, [kept, kept], other, partner)
    await _attempts(conn, gone_setpoints + kept_setpoints)
    await conn.execute("DELETE FROM organizations WHERE id = $1", operator)
    assert await conn.fetchval("SELECT count(*) FROM dispatches") == 1
    remaining = await conn.fetch("SELECT id FROM setpoints ORDER BY id")
    assert sorted(row["id"] for row in remaining) == sorted(kept_setpoints)
    attempts = await conn.fetch("SELECT setpoint_id FROM setpoint_attempts")
    assert sorted(row["setpoint_id"] for row in attempts) == sorted(kept_setpoints)


@pytest.mark.parametrize(
    ("table", "column"),
    [
        ("dispatches", "id"),
        ("setpoints", "dispatch_id"),
    ],
)
async def test_a_referenced_key_never_changes(
    conn: asyncpg.Connection, table: str, column: str
) -> None:
    operator, partner = await _org(conn, "operator"), await _org(conn, "partner")
    setpoint_ids = await _setpoints(conn, [await _dispatch(conn, operator)], operator, partner)
    await _attempts(conn, setpoint_ids)
    with pytest.raises(asyncpg.ForeignKeyViolationError, match=f"{table}.{column} cannot change"):
        await conn.execute(f"UPDATE {table} SET {column} = gen_random_uuid()")
    # Setting it to what it is, as an UPDATE listing every column does, is no change.
    await conn.execute(f"UPDATE {table} SET {column} = {column}")


async def test_a_dispatch_is_not_deleted_under_setpoints_being_written(
    conn: asyncpg.Connection, fresh_database: str
) -> None:
    operator, partner = await _org(conn, "operator"), await _org(conn, "partner")
    dispatch_id = await _dispatch(conn, operator)
    deleter = await asyncpg.connect(fresh_database)
    try:
        async with conn.transaction():
            await _setpoints(conn, [dispatch_id] * 4, operator, partner)
            deleting = asyncio.create_task(
                deleter.execute("DELETE FROM dispatches WHERE id = $1", dispatch_id)
            )
            # The new setpoints hold their dispatch: the delete waits for them to commit.
            await asyncio.sleep(0.5)
            assert not deleting.done()
        await asyncio.wait_for(deleting, 10)
    finally:
        await deleter.close()
    # Then it deletes them with it.
    assert await conn.fetchval("SELECT count(*) FROM setpoints") == 0
