"""The consumer of ``balancing_queue``: claims a site's queued ranges, re-balances them and
deletes the rows in the one transaction that also replaces the results.

- A crash, a cancelled pass or a lost connection rolls the transaction back: the rows are
  still queued and the old results still stored, so nothing acknowledged is lost.
- Rows are claimed with ``FOR UPDATE SKIP LOCKED``: replicas never claim the same row, and
  never wait for each other's rows.
- Each site is re-balanced under :func:`lock_site_results` (a transaction-scoped advisory
  lock) taken *before* its energy is read: two replicas that claimed different rows of one
  site take turns, and the later one reads what the earlier one's triggers committed, so an
  older computation never commits over a newer one.
- A pass handles one site; it answers True when it claimed rows (more may wait), so the
  worker drains a backlog site by site without waiting for the next tick.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from uuid import UUID

import asyncpg

from service.balancing.rebalance import RebalanceResult, TimeRange, rebalance
from service.balancing.store import (
    SiteInfo,
    lock_site_results,
    site_info,
    try_lock_site_results,
)
from service.common.errors import NotFoundError
from service.events.channels import BALANCES_CHANNEL

log = logging.getLogger(__name__)

# Queue rows of one site handled by one pass (a site's ingest of a day is ~100 rows).
MAX_CLAIM_ROWS = 5000

_CLAIM_HEAD = """
SELECT org_id, site_id FROM balancing_queue WHERE NOT (site_id = ANY($1::uuid[]))
ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED
"""
_CLAIM_SITE = """
SELECT id, interval_start, interval_end FROM balancing_queue
WHERE site_id = $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED
"""


async def publish(conn: asyncpg.Connection, site: SiteInfo, result: RebalanceResult) -> None:
    """One notification per re-balanced range, delivered when the transaction commits."""
    if not result.ranges:
        return
    now = datetime.now(UTC).isoformat()
    for start, end in result.ranges:
        payload = {
            "key": str(site.org_id),
            "site": str(site.id),
            "from": start.isoformat(),
            "to": end.isoformat(),
            "balanced": result.balanced,
            "incomplete": result.incomplete,
            "at": now,
        }
        await conn.execute(
            "SELECT pg_notify($1, $2)", BALANCES_CHANNEL, json.dumps(payload, separators=(",", ":"))
        )


async def rebalance_now(
    pool: asyncpg.Pool, org_id: UUID, site_id: UUID, ranges: list[TimeRange]
) -> RebalanceResult:
    """``RunBalancing``: re-balances ``ranges`` of the site in one transaction now."""
    async with pool.acquire() as conn, conn.transaction():
        await lock_site_results(conn, site_id)
        site = await site_info(conn, org_id, site_id)
        result = await rebalance(conn, site, ranges)
        await publish(conn, site, result)
    return result


class BalancingQueueConsumer:
    def __init__(self, pool: asyncpg.Pool, max_rows: int = MAX_CLAIM_ROWS) -> None:
        self._pool = pool
        self._max_rows = max_rows
        # What the last committed pass re-balanced (tests and diagnostics).
        self.last_result: RebalanceResult | None = None
        self.last_site: UUID | None = None
        # Tests only: awaited after the results are written, before COMMIT.
        self.before_commit: Callable[[], Awaitable[None]] | None = None

    async def _claim_site(self, conn: asyncpg.Connection) -> tuple[UUID, UUID] | None:
        """The oldest queued site no other pass is balancing, locked for this transaction;
        when every queued site is busy, the first of them after its current pass."""
        busy: list[UUID] = []
        busy_org: dict[UUID, UUID] = {}
        while True:
            head = await conn.fetchrow(_CLAIM_HEAD, busy)
            if head is None:
                if not busy:
                    return None
                await lock_site_results(conn, busy[0])
                return busy_org[busy[0]], busy[0]
            org_id, site_id = head["org_id"], head["site_id"]
            if await try_lock_site_results(conn, site_id):
                return org_id, site_id
            busy.append(site_id)
            busy_org[site_id] = org_id

    async def step(self) -> bool:
        """One pass: one site's queued ranges. True when it claimed rows."""
        async with self._pool.acquire() as conn, conn.transaction():
            claimed = await self._claim_site(conn)
            if claimed is None:
                return False
            org_id, site_id = claimed
            rows = await conn.fetch(_CLAIM_SITE, site_id, self._max_rows)
            ranges = [(row["interval_start"], row["interval_end"]) for row in rows]
            try:
                site = await site_info(conn, org_id, site_id)
            except NotFoundError:
                site = None
            result = RebalanceResult()
            if site is not None:
                result = await rebalance(conn, site, ranges)
                await publish(conn, site, result)
            await conn.execute(
                "DELETE FROM balancing_queue WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
            )
            if self.before_commit is not None:
                await self.before_commit()
        self.last_result = result
        self.last_site = site_id
        return True
