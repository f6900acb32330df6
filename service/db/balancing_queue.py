"""The one writer of ``balancing_queue``: site time ranges whose balances must be recomputed.

A row names the owning organization, the site and ``[interval_start, interval_end)`` on the
site's balance grid. Writers append in their own transaction (readings ingest, meter and
site changes, balancing settings), so a queued range commits with the change that caused
it, or not at all. The same statement notifies :data:`BALANCING_QUEUE_CHANNEL`, which wakes
the consumer at commit; rows are append-only, so concurrent writers never wait on each
other's queue rows and a change committed after a consumer's claim appends a new row.

A change that moves a site's grid or a meter's energy queues the range its data covers:
:func:`readings_spans` finds the first and last reading in one query, :func:`span_range`
turns them into a range of the site's grid. A change of the grid also queues the runs of
stored results (:func:`results_runs`), which must move to the new grid where no reading is.
A change of who takes part (balancing settings, or a participant's deletion) queues local
days, clipped to where the site has data (:func:`days_with_data`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg

from service.events.channels import BALANCING_QUEUE_CHANNEL
from service.grid import Resolution, TimeRange, local_midnight, merge_ranges

_ONE_MICROSECOND = timedelta(microseconds=1)

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

    A site's overlapping or touching ranges are queued as one row: the consumer joins them
    anyway (``rebalance``), and an ingest batch of a meter's 100 registers touches 101
    intervals, which were 101 rows, each with its key checks, to write, claim and delete.

    ``also_notify`` (channel, payload) is sent by the same statement, saving the hot ingest
    path a round trip. Nothing is written, and only ``also_notify`` is sent, without ranges.
    """
    by_site: dict[UUID, list[TimeRange]] = {}
    for site, start, end in ranges:
        by_site.setdefault(site, []).append((start, end))
    ordered = [
        (site, start, end) for site in sorted(by_site) for start, end in merge_ranges(by_site[site])
    ]
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


# The first and last reading instant of a site's meters, and of one of them ($3), each found
# with one index probe per meter and flow (first and last in time order), not a scan.
_READINGS_SPANS = """
SELECT min(x.first_ts) AS site_first, max(x.last_ts) AS site_last,
       min(x.first_ts) FILTER (WHERE x.meter_id = $3) AS meter_first,
       max(x.last_ts) FILTER (WHERE x.meter_id = $3) AS meter_last
FROM meters m
CROSS JOIN (VALUES (1::smallint), (2::smallint)) AS f(flow)
CROSS JOIN LATERAL (
    SELECT m.id AS meter_id,
        (SELECT r.ts FROM readings r WHERE r.meter_id = m.id AND r.flow = f.flow
         ORDER BY r.ts LIMIT 1) AS first_ts,
        (SELECT r.ts FROM readings r WHERE r.meter_id = m.id AND r.flow = f.flow
         ORDER BY r.ts DESC LIMIT 1) AS last_ts
) x
WHERE m.site_id = $1 AND m.org_id = $2
"""

# An instant span [first, last] (both readings' timestamps), or None when there is no data.
Span = tuple[datetime, datetime] | None


async def readings_spans(
    conn: asyncpg.Connection, org_id: UUID, site_id: UUID, meter_id: UUID | None = None
) -> tuple[Span, Span]:
    """(first and last reading instant of the site's meters, the same of ``meter_id``)."""
    row = await conn.fetchrow(_READINGS_SPANS, site_id, org_id, meter_id)
    site: Span = None
    meter: Span = None
    if row is not None and row["site_first"] is not None:
        site = (row["site_first"], row["site_last"])
    if row is not None and row["meter_first"] is not None:
        meter = (row["meter_first"], row["meter_last"])
    return site, meter


# The runs of a site's stored balance blocks: consecutive blocks (one's end the next's start)
# form one run, so gaps between the days with results stay gaps.
_RESULTS_RUNS = """
SELECT min(block_start) AS run_start, max(block_end) AS run_end
FROM (
    SELECT block_start, block_end,
           count(*) FILTER (WHERE block_start <> previous_end) OVER (ORDER BY block_start) AS run
    FROM (
        SELECT block_start, block_end, lag(block_end) OVER (ORDER BY block_start) AS previous_end
        FROM balance_blocks
        WHERE site_id = $1 AND org_id = $2
    ) blocks
) runs
GROUP BY run
ORDER BY run_start
"""


async def results_runs(
    conn: asyncpg.Connection, org_id: UUID, site_id: UUID
) -> list[tuple[datetime, datetime]]:
    """The ``[start, end)`` runs of the site's stored balance results, ascending."""
    rows = await conn.fetch(_RESULTS_RUNS, site_id, org_id)
    return [(row["run_start"], row["run_end"]) for row in rows]


def span_range(
    first: datetime,
    last: datetime,
    grids: Sequence[tuple[Resolution, ZoneInfo]],
    registers: bool = True,
) -> tuple[datetime, datetime]:
    """The range on ``grids[0]`` (the site's grid now) that holds every interval of any of
    ``grids`` (e.g. also the grid before a change) touched by values in ``[first, last]``:
    from the interval before ``first`` (a register ends it; with ``registers`` False, only
    interval values are in the span: from ``first``'s own) to the end of ``last``'s."""
    current_resolution, current_tz = grids[0]
    earliest = first - _ONE_MICROSECOND if registers else first
    starts, ends = [], []
    for resolution, tz in grids:
        starts.append(resolution.floor(earliest, tz))
        ends.append(resolution.next_start(resolution.floor(last, tz), tz))
    start = current_resolution.floor(min(starts), current_tz)
    end = current_resolution.ceil(max(ends), current_tz)
    return start, end


async def days_with_data(
    conn: asyncpg.Connection,
    org_id: UUID,
    site_id: UUID,
    tz: ZoneInfo,
    days: Iterable[tuple[date, date | None]],
) -> list[BalancingRange]:
    """The local days ``[start, end)`` (end None: open) of ``days`` on which the site has
    data: readings, or results (which must follow when readings are gone).

    A register's energy also needs the register before it, so a day of margin around the
    data is kept; re-balancing a day without data only writes incomplete intervals.
    """
    days = list(days)
    if not days:
        return []  # no need to look for the data
    readings, _ = await readings_spans(conn, org_id, site_id)
    stored = await conn.fetchrow(
        "SELECT min(block_start) AS first_ts, max(block_end) AS last_ts "
        "FROM balance_blocks WHERE site_id = $1 AND org_id = $2",
        site_id,
        org_id,
    )
    spans: list[tuple[datetime, datetime]] = []
    if readings is not None:
        spans.append(readings)
    if stored is not None and stored["first_ts"] is not None:
        spans.append((stored["first_ts"], stored["last_ts"]))
    if not spans:
        return []
    data_start: datetime = min(first for first, _ in spans) - timedelta(days=1)
    data_end: datetime = max(last for _, last in spans) + timedelta(days=1)
    ranges: list[BalancingRange] = []
    for first_day, end_day in days:
        start = max(local_midnight(first_day, tz), data_start)
        end = data_end if end_day is None else min(local_midnight(end_day, tz), data_end)
        if start < end:
            ranges.append((site_id, start, end))
    return ranges


async def participation_ranges(
    conn: asyncpg.Connection, org_id: UUID, site_id: UUID, tz: ZoneInfo, meter_id: UUID
) -> list[BalancingRange]:
    """The days a meter takes part in (its PARTICIPANT settings) on which the site has data:
    what its deletion, which takes its settings with it, changes. Without its readings it
    still made those intervals incomplete; with them it had a share."""
    rows = await conn.fetch(
        "SELECT start_date, end_date FROM meter_balancing_settings "
        "WHERE meter_id = $1 AND org_id = $2 AND balancing = 'participant'",
        meter_id,
        org_id,
    )
    return await days_with_data(
        conn, org_id, site_id, tz, [(row["start_date"], row["end_date"]) for row in rows]
    )
