"""The consumer of ``balancing_queue``: claims a site's queued ranges, re-balances them and
deletes the rows in the one transaction that also replaces the results.

- A crash, a cancelled pass or a lost connection rolls the transaction back: the rows are
  still queued and the old results still stored, so nothing acknowledged is lost.
- Rows are claimed with ``FOR UPDATE SKIP LOCKED``: replicas never claim the same row, and
  never wait for each other's rows. A pass locks the site's meters and the site before its
  rows, in DeleteSite's order, so the two never deadlock.
- Each site is re-balanced under :func:`lock_site_results` (a transaction-scoped advisory
  lock) taken *before* its energy is read: two replicas that claimed different rows of one
  site take turns, and the later one reads what the earlier one's triggers committed, so an
  older computation never commits over a newer one.
- A pass handles one site; it answers True when it claimed rows (more may wait), so the
  worker drains a backlog site by site without waiting for the next tick.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from uuid import UUID

import asyncpg

from service.balancing.calendar import TimeRange
from service.balancing.rebalance import RebalanceResult, rebalance
from service.balancing.store import (
    SiteInfo,
    lock_site_results,
    site_info,
    site_meters,
    try_lock_site_results,
)
from service.common.backoff import doubling_delay
from service.common.errors import NotFoundError
from service.events.channels import BALANCES_CHANNEL
from service.grid.ranges import cover_with_at_most

log = logging.getLogger(__name__)

# A failing site is held back this long, doubling per failure up to the maximum.
FIRST_HOLD_BACK_SECONDS = 1.0
MAX_HOLD_BACK_SECONDS = 300.0
# Queue rows of one site handled by one pass (an ingest batch queues a row per run of
# touching intervals of a site: usually one).
MAX_CLAIM_ROWS = 5000

# Ranges one commit announces at most: PostgreSQL hands a transaction's notifications over
# together, so more than a watcher's buffer (OPENVPP_WATCH_BUFFER_SIZE) from one pass ended
# every watcher of the site at once, however fast it read (a daily register ingested over
# three years queues over a thousand disjoint ranges). Beyond it, neighbouring ranges are
# announced joined across the smallest gaps.
MAX_ANNOUNCED_RANGES = 32

# The oldest row no other pass has claimed (SKIP LOCKED); looked up in a savepoint that is
# rolled back, so that the pass holds no queue row while it locks the site's meters and the
# site (see _balance_site). Which pass takes a site is decided by its advisory lock.
_CLAIM_HEAD = """
SELECT org_id, site_id FROM balancing_queue WHERE NOT (site_id = ANY($1::uuid[]))
ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED
"""
_CLAIM_SITE = """
SELECT id, interval_start, interval_end FROM balancing_queue
WHERE site_id = $1 AND org_id = $3 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED
"""


async def publish(conn: asyncpg.Connection, site: SiteInfo, result: RebalanceResult) -> None:
    """One notification per re-balanced range, delivered when the transaction commits; at
    most MAX_ANNOUNCED_RANGES of them (see there)."""
    if not result.ranges:
        return
    now = datetime.now(UTC).isoformat()
    for start, end in cover_with_at_most(result.ranges, MAX_ANNOUNCED_RANGES):
        payload = {
            "key": str(site.org_id),
            "site": str(site.id),
            "from": start.isoformat(),
            "to": end.isoformat(),
            "balanced": result.balanced,
            "incomplete": result.incomplete,
            "out_of_range": result.out_of_range,
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
        # The meters, then the site, before any result row: DeleteSite's order, as a pass.
        await site_meters(conn, org_id, site_id)
        site = await site_info(conn, org_id, site_id, lock=True)
        result = await rebalance(conn, site, ranges)
        await publish(conn, site, result)
    return result


class BalancingQueueConsumer:
    """Passes over ``balancing_queue`` (see the module docstring).

    A site whose pass fails (a bug, a lost connection; energy the engine cannot balance
    exactly only leaves its intervals unbalanced, see ``blocks``) keeps its rows queued and is
    held back for a while, doubling up to ``MAX_HOLD_BACK_SECONDS`` while it keeps failing,
    so one failing site never stops the balancing of the others.
    """

    def __init__(self, pool: asyncpg.Pool, max_rows: int = MAX_CLAIM_ROWS) -> None:
        self._pool = pool
        self._max_rows = max_rows
        # Site -> (consecutive failures, loop time before which it is not claimed).
        self._held_back: dict[UUID, tuple[int, float]] = {}
        # What the last committed pass re-balanced (tests and diagnostics).
        self.last_result: RebalanceResult | None = None
        self.last_site: UUID | None = None
        # Tests only: awaited with the site after its results are written, before COMMIT.
        self.before_commit: Callable[[UUID], Awaitable[None]] | None = None

    def held_back(self) -> list[UUID]:
        now = asyncio.get_running_loop().time()
        return [site for site, (_, until) in self._held_back.items() if until > now]

    async def _claim_site(self, conn: asyncpg.Connection) -> tuple[UUID, UUID] | None:
        """The oldest queued site no other pass is balancing and not held back, locked for
        this transaction; when every such site is busy, the first of them after its pass."""
        skipped = self.held_back()
        busy: list[UUID] = []
        busy_org: dict[UUID, UUID] = {}
        while True:
            head = await self._head(conn, [*skipped, *busy])
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

    async def _head(self, conn: asyncpg.Connection, excluded: list[UUID]) -> asyncpg.Record | None:
        """The (org, site) of the oldest queue row no other pass holds, without holding it:
        the row lock taken in the savepoint goes with its rollback."""
        savepoint = conn.transaction()
        await savepoint.start()
        try:
            head: asyncpg.Record | None = await conn.fetchrow(_CLAIM_HEAD, excluded)
        finally:
            await savepoint.rollback()
        return head

    async def step(self) -> bool:
        """One pass: one site's queued ranges. True when it claimed rows."""
        site_id: UUID | None = None
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                claimed = await self._claim_site(conn)
                if claimed is None:
                    return False
                org_id, site_id = claimed
                result = await self._balance_site(conn, org_id, site_id)
        except Exception:
            if site_id is not None:
                self._hold_back(site_id)
            raise
        self._held_back.pop(site_id, None)
        self.last_result = result
        self.last_site = site_id
        return True

    async def _balance_site(
        self, conn: asyncpg.Connection, org_id: UUID, site_id: UUID
    ) -> RebalanceResult:
        # The site's meters, then the site, then its queue rows: DeleteSite's order (meters,
        # site, and the rows its cascade deletes). With the rows claimed first, a DeleteSite
        # holding the meters waited for them while this pass waited for the meters, and
        # PostgreSQL aborted one.
        await site_meters(conn, org_id, site_id)
        try:
            site = await site_info(conn, org_id, site_id, lock=True)
        except NotFoundError:
            site = None
        rows = await conn.fetch(_CLAIM_SITE, site_id, self._max_rows, org_id)
        ranges = [(row["interval_start"], row["interval_end"]) for row in rows]
        result = RebalanceResult()
        if site is not None:
            result = await rebalance(conn, site, ranges, overlapping=True)
            await publish(conn, site, result)
        await conn.execute(
            "DELETE FROM balancing_queue WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
        )
        if self.before_commit is not None:
            await self.before_commit(site_id)
        return result

    def _hold_back(self, site_id: UUID) -> None:
        failures = self._held_back.get(site_id, (0, 0.0))[0] + 1
        delay = doubling_delay(failures, FIRST_HOLD_BACK_SECONDS, MAX_HOLD_BACK_SECONDS)
        self._held_back[site_id] = (failures, asyncio.get_running_loop().time() + delay)
        log.warning(
            "balancing site %s failed (%d time(s) in a row); its queue rows stay, it is "
            "retried in %.0f s",
            site_id,
            failures,
            delay,
        )
