"""Keeps every partner site's ``upstream_status`` equal to what its upstream contracts say.

:func:`refresh_upstream_status` is the one place that writes ``sites.upstream_status``. Every
write that can change it calls it in its own transaction (upstream site create/delete,
contract create/agree/terminate, partner site create/update), and the scheduler calls it
when a date is crossed. It also records in ``sites.upstream_next_check_at`` when the status
will next change by the calendar alone.

Locking: whoever recomputes an identifier first takes a transaction-scoped advisory lock on
it (:func:`lock_identifiers`), and only then row locks on partner sites. Two writers touching
the same identifier (a supplier adding a contract while a partner registers the site) are
thereby serialized, and the second, reading committed data in READ COMMITTED, sees the
first's change: neither can leave a stale status behind. Taking the advisory lock before any
site row lock everywhere keeps the lock order acyclic.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Collection, Iterable
from datetime import datetime
from uuid import UUID

import asyncpg

from service.events.payloads import SiteEventType, notify_site_event
from service.upstream.domain import (
    ContractTerms,
    UpstreamStatus,
    derive_upstream_status,
    next_transition_date,
)
from service.upstream.sites import local_date, next_check_at

# Distinguishes our advisory locks from other users of the 64-bit key space.
_LOCK_NAMESPACE = b"openvpp.upstream:"


def identifier_lock_key(grid_identifier: str) -> int:
    """A stable signed 64-bit advisory-lock key (the same on every replica, unlike hash())."""
    digest = hashlib.sha256(_LOCK_NAMESPACE + grid_identifier.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def lock_identifiers(conn: asyncpg.Connection, grid_identifiers: Iterable[str]) -> None:
    """Waits for the transaction-scoped locks on these identifiers, in key order (so two
    transactions locking overlapping sets cannot deadlock). Re-entrant within a transaction."""
    for key in sorted({identifier_lock_key(g) for g in grid_identifiers}):
        await conn.execute("SELECT pg_advisory_xact_lock($1)", key)


async def try_lock_identifier(conn: asyncpg.Connection, grid_identifier: str) -> bool:
    """Takes the identifier's transaction-scoped lock only if nobody holds it; never waits."""
    locked: bool = await conn.fetchval(
        "SELECT pg_try_advisory_xact_lock($1)", identifier_lock_key(grid_identifier)
    )
    return locked


def terms_from_row(row: asyncpg.Record) -> ContractTerms:
    return ContractTerms(
        start_date=row["start_date"],
        end_date=row["end_date"],
        requires_agreement=row["requires_agreement"],
        agreed_at=row["agreed_at"],
        termination_date=row["termination_date"],
    )


async def refresh_upstream_status(
    conn: asyncpg.Connection,
    grid_identifiers: Iterable[str],
    now: datetime,
    silent: Collection[UUID] = (),
) -> int:
    """Recomputes ``upstream_status`` and ``upstream_next_check_at`` of every partner site
    whose primary identifier is one of ``grid_identifiers``, each with "today" in the site's
    own time zone at ``now``. Writes only rows that change; a changed status is published as
    UPSTREAM_STATUS_CHANGED in this transaction, except for the sites in ``silent`` (a site
    being created, whose CREATED event carries the status). Returns the number of statuses
    changed.

    Must run inside a transaction, which holds the identifiers' locks from here to its end.
    """
    identifiers = sorted(set(grid_identifiers))
    if not identifiers:
        return 0
    await lock_identifiers(conn, identifiers)
    sites = await conn.fetch(
        """
        SELECT id, grid_identifier, timezone, upstream_status, upstream_next_check_at
        FROM sites WHERE grid_identifier = ANY($1::text[])
        ORDER BY id
        FOR UPDATE
        """,
        identifiers,
    )
    if not sites:
        return 0
    rows = await conn.fetch(
        """
        SELECT u.grid_identifier, u.id AS upstream_site_id, c.start_date, c.end_date,
            c.requires_agreement, c.agreed_at, c.termination_date
        FROM upstream_sites u LEFT JOIN contracts c ON c.upstream_site_id = u.id
        WHERE u.grid_identifier = ANY($1::text[])
        """,
        identifiers,
    )
    # identifier -> upstream site -> its contracts (an upstream site without any stays, empty).
    upstream: dict[str, dict[object, list[ContractTerms]]] = defaultdict(dict)
    for row in rows:
        contracts = upstream[row["grid_identifier"]].setdefault(row["upstream_site_id"], [])
        if row["start_date"] is not None:
            contracts.append(terms_from_row(row))

    changed = 0
    for site in sites:
        per_upstream_site = list(upstream.get(site["grid_identifier"], {}).values())
        today = local_date(now, site["timezone"])
        status = derive_upstream_status(per_upstream_site, today)
        all_terms = [terms for contracts in per_upstream_site for terms in contracts]
        check_at = next_check_at(next_transition_date(all_terms, today), site["timezone"], now)
        if status != UpstreamStatus(site["upstream_status"]):
            # A site created in this transaction (silent) gets its first status as part of
            # its creation: it stays "never updated".
            await conn.execute(
                """
                UPDATE sites SET upstream_status = $2, upstream_next_check_at = $3,
                    updated_at = CASE WHEN $4 THEN updated_at ELSE clock_timestamp() END
                WHERE id = $1
                """,
                site["id"],
                str(status),
                check_at,
                site["id"] in silent,
            )
            if site["id"] not in silent:
                await notify_site_event(conn, site["id"], SiteEventType.UPSTREAM_STATUS_CHANGED)
            changed += 1
        elif check_at != site["upstream_next_check_at"]:
            await conn.execute(
                "UPDATE sites SET upstream_next_check_at = $2 WHERE id = $1",
                site["id"],
                check_at,
            )
    return changed
