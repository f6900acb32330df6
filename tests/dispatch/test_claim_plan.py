"""How the delivery worker's claim reads the outbox when the planner's statistics are stale.

An idle service runs the claim at every poll on an empty table; PostgreSQL then caches a
plan for it made for an empty table. The first large dispatch after that (a fresh
installation's first) must still be claimed by the indexes: the claim looks at its due rows
through the due index and at the site and resource of each claimed row by key, never by
scanning a table whole (which cost 40-50 ms of the database's time for every claim of 32
setpoints out of 10,000 in ``loadtest/dispatch_bench.py``). The plan is read as the worker's
transaction makes it (``_PLAN_FOR_THE_TABLE_AS_IT_IS`` set first).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from service.auth.principal import Role
from service.dispatch.outbox import _CLAIM_SQL, _PLAN_FOR_THE_TABLE_AS_IT_IS

SITES = 200
RESOURCES_PER_SITE = 10


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from plan_nodes(child)


async def outbox_of_one_dispatch(conn: asyncpg.Connection) -> None:
    """SITES sites of a partner with RESOURCES_PER_SITE resources each, and a dispatch with
    a due setpoint for every resource, written directly."""
    operator_id, partner_id = uuid.uuid4(), uuid.uuid4()
    await conn.execute(
        "INSERT INTO organizations (id, name, role) VALUES ($1, 'operator', $3),"
        " ($2, 'partner', $4)",
        operator_id,
        partner_id,
        str(Role.OPERATOR),
        str(Role.PARTNER),
    )
    await conn.execute(
        """
        INSERT INTO sites (org_id, timezone, grid_identifier, primary_direction, status,
            upstream_status, external_id)
        SELECT $1, 'UTC', 'PLAN' || lpad(n::text, 8, '0'), 'bidirectional', 'onboarded',
            'contract_active', 'site-' || n
        FROM generate_series(1, $2) AS n
        """,
        partner_id,
        SITES,
    )
    await conn.execute(
        """
        INSERT INTO resources (org_id, site_id, resource_type, external_id, power_min_kw,
            power_max_kw, capacity_min_kwh, capacity_max_kwh, webhook_url)
        SELECT s.org_id, s.id, 'static_battery', s.external_id || '-' || n, -5, 5, 0, 10,
            'http://127.0.0.1:9/setpoints'
        FROM sites s, generate_series(1, $1) AS n
        """,
        RESOURCES_PER_SITE,
    )
    now = datetime.now(UTC)
    dispatch_id = uuid.uuid4()
    await conn.execute(
        """
        INSERT INTO dispatches (id, org_id, request_id, request_digest, power_kw, start_time,
            end_time, dispatch_type, allocated_power_kw, shortfall_power_kw,
            eligible_site_count, ineligible_site_count)
        VALUES ($1, $2, 'plan', 'digest', 1, $3, $4, 'exact', 1, 0, $5, 0)
        """,
        dispatch_id,
        operator_id,
        now,
        now + timedelta(hours=1),
        SITES,
    )
    await conn.execute(
        """
        INSERT INTO setpoints (id, dispatch_id, operator_org_id, partner_org_id, site_id,
            resource_id, power_kw, start_time, end_time, next_attempt_at)
        SELECT gen_random_uuid(), $1, $2, r.org_id, r.site_id, r.id, 1.0, $3, $4, $3
        FROM resources r
        """,
        dispatch_id,
        operator_id,
        now,
        now + timedelta(hours=1),
    )


@pytest.mark.parametrize("claim_size", [32, 500])
async def test_a_claim_after_idling_on_an_empty_outbox_reads_it_by_its_indexes(
    fresh_database: str, claim_size: int
) -> None:
    conn = await asyncpg.connect(fresh_database)
    try:
        # Statistics of empty tables, and a plan cached while the outbox was empty: the
        # worker's polls run the claim more often than the five times after which
        # PostgreSQL may keep a generic plan.
        await conn.execute("VACUUM (ANALYZE)")
        await conn.execute(f"PREPARE claim AS {_CLAIM_SQL}")
        owner = uuid.uuid4()
        for _ in range(8):
            async with conn.transaction():
                await conn.execute(_PLAN_FOR_THE_TABLE_AS_IT_IS)
                await conn.execute(f"EXECUTE claim (now(), 32, '{owner}', '30 s', '{{}}')")
        await outbox_of_one_dispatch(conn)
        async with conn.transaction():
            await conn.execute(_PLAN_FOR_THE_TABLE_AS_IT_IS)
            explained = await conn.fetchval(
                "EXPLAIN (ANALYZE, FORMAT JSON) "
                f"EXECUTE claim (now() + interval '1 s', {claim_size}, '{owner}', '30 s', '{{}}')"
            )
            claimed = await conn.fetchval(
                "SELECT count(*) FROM setpoints WHERE lease_owner = $1", owner
            )
    finally:
        await conn.close()
    nodes = list(plan_nodes(json.loads(explained)[0]["Plan"]))
    assert claimed == claim_size
    assert not [
        node
        for node in nodes
        if node["Node Type"] == "Seq Scan" and node.get("Relation Name") == "setpoints"
    ]
    # Each claimed row's site and resource are looked up on their own (a table this small
    # may be read for each lookup rather than through its key), never all of them joined.
    for table in ("sites", "resources"):
        reads = [node for node in nodes if node.get("Relation Name") == table]
        assert [(node["Actual Loops"], node["Actual Rows"]) for node in reads] == [
            (claim_size, 1)
        ], table
