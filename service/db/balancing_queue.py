"""The one writer of ``balancing_queue``: site time ranges whose balances must be recomputed.

A row names the owning organization, the site and ``[interval_start, interval_end)`` on the
site's balance grid. Writers append in their own transaction (readings ingest, meter and
site changes, balancing settings), so a queued range commits with the change that caused
it, or not at all. The same statement notifies :data:`BALANCING_QUEUE_CHANNEL`, which wakes
the consumer at commit; rows are append-only, so concurrent writers never wait on each
other's queue rows and a change committed after a consumer's claim appends a new row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from uuid import UUID

import asyncpg

from service.events.channels import BALANCING_QUEUE_CHANNEL

# A balance range of one site: (site id, interval_start, interval_end).
BalancingRange = tuple[UUID, datetime, datetime]

_ENQUEUE = """
WITH queued AS (
    INSERT INTO balancing_queue (org_id, site_id, interval_start, interval_end)
    SELECT $1::uuid, site, range_start, range_end
    FROM unnest($2::uuid[], $3::timestamptz[], $4::timestamptz[]) AS r(site, range_start, range_end)
)
SELECT pg_notify($5, $6)
"""

# The same, with a second notification in the one round trip (readings ingest).
_ENQUEUE_AND_NOTIFY = _ENQUEUE + ", pg_notify($7, $8)"


async def enqueue_balancing(
    conn: asyncpg.Connection,
    org_id: UUID,
    ranges: Iterable[BalancingRange],
    *,
    also_notify: tuple[str, str] | None = None,
) -> None:
    """Queues ``ranges`` of ``org_id``'s sites for rebalancing in the caller's transaction.

    ``also_notify`` (channel, payload) is sent by the same statement, saving the hot ingest
    path a round trip. Nothing is written, and only ``also_notify`` is sent, without ranges.
    """
    ordered = sorted(set(ranges))
    if not ordered:
        if also_notify is not None:
            await conn.execute("SELECT pg_notify($1, $2)", *also_notify)
        return
    args: list[object] = [
        org_id,
        [site for site, _, _ in ordered],
        [start for _, start, _ in ordered],
        [end for _, _, end in ordered],
        BALANCING_QUEUE_CHANNEL,
        json.dumps({"key": str(org_id)}, separators=(",", ":")),
    ]
    if also_notify is None:
        await conn.execute(_ENQUEUE, *args)
    else:
        await conn.execute(_ENQUEUE_AND_NOTIFY, *args, *also_notify)
