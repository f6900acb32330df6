"""Applies date-driven upstream_status changes (a contract starting or ending) on its own.

Every partner site carries ``upstream_next_check_at``, the instant its status will next change
by the calendar alone (kept by :func:`service.upstream.status.refresh_upstream_status`). Each
tick recomputes the identifiers of all sites that are due at the clock's "now".

Several replicas may tick at once. An identifier is claimed with a *non-blocking* try of the
same advisory lock every writer takes first (the SKIP LOCKED of identifiers): a replica skips
what another replica (or a concurrent API write, which recomputes it anyway) holds. Should
two replicas still recompute one identifier one after the other, the second finds the status
already right and writes nothing, so each transition is applied, and published, once. Claiming
by row lock (``FOR UPDATE SKIP LOCKED`` on sites) would take a site row before the advisory
lock, the reverse of the writers' order, and could deadlock with them. Nothing is missed after
downtime: a due row stays due (``<= now``) until a recomputation moves it on.
"""

from __future__ import annotations

import logging

import asyncpg

from service.common.clock import Clock
from service.common.loglimit import LogLimiter, held_back
from service.upstream.status import refresh_upstream_status, try_lock_identifier

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 100


class UpstreamScheduler:
    def __init__(
        self, pool: asyncpg.Pool, clock: Clock, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._batch_size = batch_size
        self._failure_log = LogLimiter(60.0)
        # Identifiers whose recomputation failed, over this scheduler's life (tests, metrics).
        self.failed_identifiers = 0

    async def run_once(self) -> int:
        """One tick: recomputes every identifier due now that no one else holds; returns the
        number of site statuses this replica changed."""
        now = self._clock.now()
        after = ""  # keyset over identifiers: each is looked at once per tick
        changed = 0
        while True:
            due = await self._pool.fetch(
                """
                SELECT DISTINCT grid_identifier FROM sites
                WHERE upstream_next_check_at <= $1 AND grid_identifier > $2
                ORDER BY grid_identifier
                LIMIT $3
                """,
                now,
                after,
                self._batch_size,
            )
            if not due:
                return changed
            for row in due:
                after = row["grid_identifier"]
                try:
                    async with self._pool.acquire() as conn, conn.transaction():
                        if await try_lock_identifier(conn, after):
                            changed += await refresh_upstream_status(conn, [after], now)
                except Exception as error:
                    # One identifier's failure (its data, a bug, a time zone this replica's
                    # tz data lacks) must not hold back the others', of every organization:
                    # it stays due and is tried again next tick. Without the database the
                    # next fetch fails and ends the tick.
                    self.failed_identifiers += 1
                    dropped = self._failure_log.admit("identifier")
                    if dropped is not None:
                        log.warning(
                            "upstream scheduler: recomputing %s failed (%s: %s); it stays due%s",
                            after,
                            type(error).__name__,
                            error,
                            held_back(dropped),
                        )

    async def tick(self) -> bool:
        """A worker pass: one tick. Due rows stay due after a failed tick, so the worker's
        retry catches up; nothing is left waiting for the next pass."""
        changed = await self.run_once()
        if changed:
            log.info("upstream scheduler changed %d site status(es)", changed)
        return False
