"""Readings in PostgreSQL: partitions, the bulk ingest path, reads for lists and watchers.

Ingest of one batch (driven by :mod:`service.telemetry.ingest`) is one transaction: stored
neighbours of register values are read, rows of groups with nothing stored in their range
are COPYed straight into ``readings``, the others are COPYed into a per-connection
temporary staging table and ONE ``INSERT ... SELECT ... ON CONFLICT DO UPDATE ... WHERE
value IS DISTINCT FROM`` moves them into ``readings`` (new rows are accepted, changed rows
corrected, identical rows left alone and counted as duplicates), the affected site
intervals are appended to ``balancing_queue`` and one compact NOTIFY names the batch for
watchers (:func:`write_rows`, one function per step). The ack is built only after COMMIT.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import struct
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg

from service.db.balancing_queue import BalancingRange, enqueue_balancing
from service.events.channels import READINGS_CHANNEL
from service.events.payloads import readings_batch_payload
from service.grid import parse_resolution
from service.identifiers.ids import MeterId, OrgId, SiteId
from service.telemetry.domain import affected_intervals
from service.telemetry.meter_store import MeterRecord
from service.telemetry.validate import MeterInfo, from_us, meter_info

log = logging.getLogger(__name__)

_US = 1_000_000

_STAGING_DDL = """
CREATE TEMP TABLE IF NOT EXISTS reading_staging (
    meter_id uuid NOT NULL, flow smallint NOT NULL, ts_us bigint NOT NULL,
    value_wh double precision NOT NULL
) ON COMMIT DELETE ROWS
"""

# Rows of (meter, flow) groups with something stored in the batch's time range, staged and
# moved with ONE upsert under the batch's ingest id ($1). They are inserted in key order so
# concurrent batches touching the same rows lock them in the same order. A fresh row
# carries the ingest id, a corrected one its negation, which tells inserts from updates
# (xmax is not available on partitioned tables).
_UPSERT = """
WITH up AS (
    INSERT INTO readings AS r (meter_id, flow, ts, value_wh, ingest_id)
    SELECT s.meter_id, s.flow, timestamptz 'epoch' + s.ts_us * interval '1 microsecond',
           s.value_wh, $1::bigint
    FROM reading_staging s
    ORDER BY s.meter_id, s.flow, s.ts_us
    ON CONFLICT (meter_id, flow, ts) DO UPDATE
        SET value_wh = EXCLUDED.value_wh, ingest_id = -EXCLUDED.ingest_id
        WHERE r.value_wh IS DISTINCT FROM EXCLUDED.value_wh
    RETURNING r.ingest_id > 0 AS inserted
)
SELECT count(*) FILTER (WHERE inserted)::int AS inserted,
       count(*) FILTER (WHERE NOT inserted)::int AS updated
FROM up
"""

_NEXT_INGEST = "SELECT nextval('reading_ingest_seq')"

# Only when part of a batch changed: which (meter, timestamp) rows it changed.
_CHANGED = """
SELECT meter_id, (extract(epoch FROM ts) * 1000000)::bigint AS ts_us FROM readings
WHERE meter_id = ANY($1::uuid[]) AND ingest_id IN ($2::bigint, -$2::bigint)
  AND ts BETWEEN timestamptz 'epoch' + $3::bigint * interval '1 microsecond'
             AND timestamptz 'epoch' + $4::bigint * interval '1 microsecond'
"""

# Stored registers around each (meter, flow) group of a batch: the last one before, those
# within, the first one after, each searched within a window so that only the partitions
# near the batch are probed.
_NEIGHBOURS = """
SELECT g.n, (extract(epoch FROM x.ts) * 1000000)::bigint AS ts_us, x.value_wh
FROM unnest($1::uuid[], $2::smallint[], $3::bigint[], $4::bigint[])
     WITH ORDINALITY AS g(meter_id, flow, lo_us, hi_us, n)
CROSS JOIN LATERAL (
    SELECT y.ts, y.value_wh FROM (
        (SELECT r.ts, r.value_wh FROM readings r
         WHERE r.meter_id = g.meter_id AND r.flow = g.flow
           AND r.ts < timestamptz 'epoch' + g.lo_us * interval '1 microsecond'
           AND r.ts >= timestamptz 'epoch' + g.lo_us * interval '1 microsecond' - $5::interval
         ORDER BY r.ts DESC LIMIT 1)
        UNION ALL
        (SELECT r.ts, r.value_wh FROM readings r
         WHERE r.meter_id = g.meter_id AND r.flow = g.flow
           AND r.ts >= timestamptz 'epoch' + g.lo_us * interval '1 microsecond'
           AND r.ts <= timestamptz 'epoch' + g.hi_us * interval '1 microsecond')
        UNION ALL
        (SELECT r.ts, r.value_wh FROM readings r
         WHERE r.meter_id = g.meter_id AND r.flow = g.flow
           AND r.ts > timestamptz 'epoch' + g.hi_us * interval '1 microsecond'
           AND r.ts <= timestamptz 'epoch' + g.hi_us * interval '1 microsecond' + $5::interval
         ORDER BY r.ts LIMIT 1)
    ) y
) x
"""

# First pass for every group: the latest stored register from the window before the batch
# on. When it lies before the batch (the usual append), it is the only neighbour there is.
_LATEST = """
SELECT g.n, (extract(epoch FROM x.ts) * 1000000)::bigint AS ts_us, x.value_wh
FROM unnest($1::uuid[], $2::smallint[], $3::bigint[])
     WITH ORDINALITY AS g(meter_id, flow, lo_us, n)
CROSS JOIN LATERAL (
    SELECT r.ts, r.value_wh FROM readings r
    WHERE r.meter_id = g.meter_id AND r.flow = g.flow
      AND r.ts >= timestamptz 'epoch' + g.lo_us * interval '1 microsecond' - $4::interval
    ORDER BY r.ts DESC LIMIT 1
) x
"""

# Which (meter, flow, first, last) groups already have a stored value in their range.
_OCCUPIED = """
SELECT g.meter_id, g.flow
FROM unnest($1::uuid[], $2::smallint[], $3::bigint[], $4::bigint[])
     AS g(meter_id, flow, lo_us, hi_us)
WHERE EXISTS (
    SELECT 1 FROM readings r
    WHERE r.meter_id = g.meter_id AND r.flow = g.flow
      AND r.ts >= timestamptz 'epoch' + g.lo_us * interval '1 microsecond'
      AND r.ts <= timestamptz 'epoch' + g.hi_us * interval '1 microsecond'
)
"""

# For groups with nothing stored in the window: the nearest values anywhere.
_NEIGHBOURS_UNBOUNDED = """
SELECT g.n, (extract(epoch FROM x.ts) * 1000000)::bigint AS ts_us, x.value_wh
FROM unnest($1::uuid[], $2::smallint[], $3::bigint[], $4::bigint[])
     WITH ORDINALITY AS g(meter_id, flow, lo_us, hi_us, n)
CROSS JOIN LATERAL (
    SELECT y.ts, y.value_wh FROM (
        (SELECT r.ts, r.value_wh FROM readings r
         WHERE r.meter_id = g.meter_id AND r.flow = g.flow
           AND r.ts < timestamptz 'epoch' + g.lo_us * interval '1 microsecond'
         ORDER BY r.ts DESC LIMIT 1)
        UNION ALL
        (SELECT r.ts, r.value_wh FROM readings r
         WHERE r.meter_id = g.meter_id AND r.flow = g.flow
           AND r.ts > timestamptz 'epoch' + g.hi_us * interval '1 microsecond'
         ORDER BY r.ts LIMIT 1)
    ) y
) x
"""

_RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
# A row to store: (meter id, flow code, epoch µs, value Wh).
Row = tuple[UUID, int, int, float]


@dataclass(frozen=True)
class WriteResult:
    ingest_id: int
    inserted: int
    updated: int


def month_start(year: int, month: int) -> datetime:
    year, month = year + (month - 1) // 12, (month - 1) % 12 + 1
    return datetime(year, month, 1, tzinfo=UTC)


def _month_start_us(year: int, month: int) -> int:
    return int(month_start(year, month).timestamp()) * _US


def partition_name(year: int, month: int) -> str:
    return f"readings_p{year:04d}{month:02d}"


class Partitions:
    """Monthly partitions of ``readings`` (UTC months), created on demand and ahead."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._known: set[tuple[int, int]] = set()
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        rows = await self._pool.fetch(
            """
            SELECT c.relname FROM pg_inherits i
            JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'readings'::regclass
            """
        )
        for row in rows:
            name: str = row["relname"]
            if name.startswith("readings_p") and len(name) == 16:
                self._known.add((int(name[10:14]), int(name[14:16])))

    async def ensure_ahead(self, now: datetime, months_ahead: int) -> None:
        await self.ensure([(now.year, now.month + k) for k in range(-1, months_ahead + 1)])

    async def ensure_range(self, first_us: int, last_us: int) -> None:
        """Every month from the one of ``first_us`` to the one of ``last_us`` (epoch µs)."""
        first, last = from_us(first_us), from_us(last_us)
        months = (last.year - first.year) * 12 + last.month - first.month
        await self.ensure([(first.year, first.month + k) for k in range(months + 1)])

    async def ensure_for(self, stamps_us: Sequence[int]) -> None:
        """The partitions of the months that hold one of ``stamps_us`` (epoch µs), and of no
        month between them: a batch of two readings decades apart makes two partitions."""
        first, last = from_us(min(stamps_us)), from_us(max(stamps_us))
        span = (last.year - first.year) * 12 + last.month - first.month
        months = [(first.year, first.month + k) for k in range(span + 1)]
        if span > 1:
            # Months between the first and the last may hold nothing: found by bisection.
            ordered = sorted(stamps_us)
            months = [
                (year, month)
                for year, month in months
                if bisect.bisect_left(ordered, _month_start_us(year, month))
                < bisect.bisect_left(ordered, _month_start_us(year, month + 1))
            ]
        await self.ensure(months)

    async def ensure(self, months: Iterable[tuple[int, int]]) -> None:
        wanted = set()
        for year, month in months:
            start = month_start(year, month)
            wanted.add((start.year, start.month))
        missing = wanted - self._known
        if not missing:
            return
        async with self._lock, self._pool.acquire() as conn, conn.transaction():
            # Replicas creating the same partition at once would collide.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('openvpp_partitions'))")
            for year, month in sorted(missing):
                name = partition_name(year, month)
                attached = await conn.fetchval(
                    "SELECT c.relispartition FROM pg_class c WHERE c.oid = to_regclass($1)", name
                )
                if attached:
                    continue  # another replica made it (made and attached in one commit)
                if attached is not None:
                    # Detached by hand (an archive?): not ours to attach again, nor to drop.
                    raise RuntimeError(
                        f"table {name} exists but is not a partition of readings: attach it"
                        f" again (ALTER TABLE readings ATTACH PARTITION {name} ...) or rename"
                        " it, so that readings of its month can be stored"
                    )
                start = month_start(year, month)
                end = month_start(year, month + 1)
                # Made apart and then attached: CREATE TABLE ... PARTITION OF locks
                # readings exclusively, so it waited for every transaction reading any
                # month, and all readings traffic queued behind it (a backfill of an old
                # month while balancing read). ATTACH takes SHARE UPDATE EXCLUSIVE, which
                # reads and writes do not conflict with; the table is empty, so its check
                # scans nothing. LIKE ... INCLUDING ALL copies what ATTACH requires to match
                # (defaults, CHECKs, generated columns, storage); the key index it gains.
                await conn.execute(f"CREATE TABLE {name} (LIKE readings INCLUDING ALL)")
                await conn.execute(
                    f"ALTER TABLE readings ATTACH PARTITION {name} FOR VALUES FROM"
                    f" ('{start.isoformat()}') TO ('{end.isoformat()}')"
                )
        self._known |= missing


class MeterCache:
    """Meter contexts per organization; cleared per org on any meter or site change."""

    def __init__(self, pool: asyncpg.Pool, ttl_seconds: float) -> None:
        self._pool = pool
        self._ttl = ttl_seconds
        self._orgs: dict[str, tuple[float, dict[str, MeterInfo | None]]] = {}

    def forget_org(self, org_id: str) -> None:
        self._orgs.pop(org_id, None)

    def forget_meters(self, org_id: str, meter_ids: Collection[UUID]) -> None:
        """Drops these meters (every spelling of their ids), known to be gone, before their
        deletion's NOTIFY gets here; the rest of the organization stays cached."""
        entry = self._orgs.get(org_id)
        if entry is None:
            return
        known = entry[1]
        for text in [t for t, info in known.items() if info is not None and info.id in meter_ids]:
            del known[text]

    def forget_all(self) -> None:
        self._orgs.clear()

    async def lookup(self, org_id: OrgId, meter_ids: Iterable[str]) -> dict[str, MeterInfo | None]:
        """Meter id text -> context (None: unknown or another org's), loading what is new."""
        org_key = str(org_id)
        now = time.monotonic()
        entry = self._orgs.get(org_key)
        if entry is None or entry[0] < now:
            entry = (now + self._ttl, {})
            self._orgs[org_key] = entry
        known = entry[1]
        if len(known) > 200_000:
            known.clear()
        wanted = set(meter_ids)
        missing = {m for m in wanted if m not in known}
        if missing:
            # Every spelling of an id (upper or lower case, braces) is its own key.
            parsed: dict[UUID, list[str]] = {}
            for text in missing:
                # Not a UUID: unknown, and not remembered (a client sending distinct garbage
                # ids must not fill the cache; parsing again is cheap).
                with contextlib.suppress(ValueError):
                    parsed.setdefault(UUID(text), []).append(text)
            if parsed:
                rows = await self._pool.fetch(
                    """
                    SELECT m.*, s.timezone, s.balance_resolution FROM meters m
                    JOIN sites s ON s.id = m.site_id
                    WHERE m.id = ANY($1::uuid[]) AND m.org_id = $2
                    """,
                    list(parsed),
                    org_id,
                )
                for row in rows:
                    info = info_from_row(row)
                    for text in parsed.pop(info.id):
                        known[text] = info
        # Ids not found are not remembered: a meter created a moment ago on another replica
        # must not stay unknown here until the cache expires.
        return {m: known.get(m) for m in wanted}


def info_from_row(row: Any) -> MeterInfo:
    """From a ``meters`` row joined with its site's ``timezone`` and ``balance_resolution``."""
    meter = MeterRecord.from_row(row)
    fields = meter.fields
    assert fields.direction is not None
    assert fields.measuring is not None
    assert fields.start_date is not None
    assert fields.transformer_factor is not None
    return meter_info(
        id=meter.id,
        org_id=meter.org_id,
        site_id=meter.site_id,
        direction=fields.direction,
        measuring=fields.measuring,
        start_date=fields.start_date,
        end_date=fields.end_date,
        transformer_factor=fields.transformer_factor,
        timezone=ZoneInfo(row["timezone"]),
        resolution=parse_resolution(row["balance_resolution"]),
    )


@lru_cache(maxsize=65536)
def _queue_ranges(
    tz_key: str, resolution: str, ts_us: int, is_register: bool
) -> tuple[tuple[datetime, datetime], ...]:
    """The balance intervals (start, end) whose energy a reading at ``ts_us`` changes."""
    grid = parse_resolution(resolution)
    tz = ZoneInfo(tz_key)
    starts = affected_intervals(from_us(ts_us), is_register, grid, tz)
    return tuple((start, grid.next_start(start, tz)) for start in starts)


# Both sets in one statement (one round trip on the hot path); each set in id order. The
# register locks are the only ones two batches can conflict on, so their order alone keeps
# batches from deadlocking on each other.
# In the order of service.db.lock_order: registers, then load profiles, by id in each.
# With what validation read of each meter: the batch was validated on cached contexts.
# The meters are locked, so their dates cannot change before COMMIT. The site is only read:
# an UpdateSite that commits while the batch waits or writes is one the batch came before
# (it was sent before that update answered), and readings stored before a grid change
# stay stored, off the new grid, as they would had the batch committed first. A batch
# sent after the update answered reads the new grid here.
_LOCK_METERS = """
WITH registers AS (
    SELECT id, site_id, start_date, end_date FROM meters
    WHERE id = ANY($1::uuid[]) AND org_id = $3 ORDER BY id FOR NO KEY UPDATE
), profiles AS (
    SELECT id, site_id, start_date, end_date FROM meters
    WHERE id = ANY($2::uuid[]) AND org_id = $3 ORDER BY id FOR KEY SHARE
), locked AS (
    SELECT * FROM registers UNION ALL SELECT * FROM profiles
)
SELECT l.id, (extract(epoch FROM l.start_date) * 1000000)::bigint,
       (extract(epoch FROM l.end_date) * 1000000)::bigint, s.timezone, s.balance_resolution
FROM locked l JOIN sites s ON s.id = l.site_id
"""


async def lock_meters(
    conn: asyncpg.Connection, org_id: OrgId, register_ids: list[UUID], profile_ids: list[UUID]
) -> dict[UUID, asyncpg.Record]:
    """Locks the batch's meters until this transaction ends; those that exist, each with
    its dates (epoch µs) and its site's ``timezone`` and ``balance_resolution`` as they are
    now (see :func:`context_changed`).

    ``readings`` has no foreign key to ``meters`` (migration 0005), so nothing else stops a
    batch validated on a cached meter from storing readings of a meter deleted meanwhile:
    they would outlive the meter's deletion, which has already removed its readings. Every
    meter is held FOR KEY SHARE (what a foreign key would take), which waits for a deletion
    in progress and then finds the meter gone; and a meter held so cannot be deleted or
    updated before this batch commits.

    Register meters are held FOR NO KEY UPDATE instead, which serializes register checks per
    meter: each batch checks its register values against what is stored, and two batches of
    one meter in flight at once (two streams, two replicas) would each miss the other's
    values. The second now waits for the first to commit, and its check then sees those
    values. Row locks on the meters rather than advisory locks: a batch may name thousands
    of meters, and advisory locks live in a shared table of bounded size.
    """
    rows = await conn.fetch(_LOCK_METERS, register_ids, profile_ids, org_id)
    return {row[0]: row for row in rows}


def context_changed(info: MeterInfo, locked: asyncpg.Record) -> bool:
    """Whether what validation read of a meter (``info``, cached) differs from the meter
    as :func:`lock_meters` found it: its dates, or its site's grid."""
    return bool(
        locked[1] != info.start_us
        or locked[2] != info.end_us
        or locked[3] != info.timezone.key
        or locked[4] != info.resolution.iso
    )


Group = tuple[UUID, int, int, int]


async def _fetch_for_groups(
    conn: asyncpg.Connection, sql: str, groups: Sequence[Group], *extra: object
) -> list[asyncpg.Record]:
    """``sql`` over (meter, flow, lo µs, hi µs) groups passed as four arrays, then ``extra``."""
    rows: list[asyncpg.Record] = await conn.fetch(
        sql,
        [g[0] for g in groups],
        [g[1] for g in groups],
        [g[2] for g in groups],
        [g[3] for g in groups],
        *extra,
    )
    return rows


async def stored_neighbours(
    conn: asyncpg.Connection,
    groups: Sequence[Group],
    window_days: int,
) -> tuple[list[list[tuple[int, float]]], list[bool]]:
    """For each (meter, flow, lo µs, hi µs): stored (µs, value) registers around it, and
    whether nothing is stored from lo on (the batch only appends)."""
    found: list[list[tuple[int, float]]] = [[] for _ in groups]
    if not groups:
        return found, []
    window = timedelta(days=window_days)
    latest = await conn.fetch(
        _LATEST, [g[0] for g in groups], [g[1] for g in groups], [g[2] for g in groups], window
    )
    has_latest = [False] * len(groups)
    latest_us = [0] * len(groups)
    full: list[int] = []
    for n, ts_us, value in latest:
        index = n - 1
        has_latest[index] = True
        latest_us[index] = ts_us
        if ts_us < groups[index][2]:
            found[index].append((ts_us, value))
        else:
            full.append(index)
    if full:
        sub = [groups[i] for i in full]
        rows = await _fetch_for_groups(conn, _NEIGHBOURS, sub, window)
        for row in rows:
            found[full[row[0] - 1]].append((row[1], row[2]))
    # The nearest stored values anywhere, on each side the window may have left out: both
    # sides of a group with nothing stored within the window; for the others, before the
    # batch when nothing within the window came before it, and after it when nothing within
    # the window came after it though a later value is stored (gaps longer than the window).
    want_before = {i for i, present in enumerate(has_latest) if not present}
    want_after = set(want_before)
    for index in full:
        _, _, lo_us, hi_us = groups[index]
        stamps = [ts for ts, _ in found[index]]
        if not any(ts < lo_us for ts in stamps):
            want_before.add(index)
        if latest_us[index] > hi_us and not any(ts > hi_us for ts in stamps):
            want_after.add(index)
    wanted = sorted(want_before | want_after)
    if wanted:
        rows = await _fetch_for_groups(conn, _NEIGHBOURS_UNBOUNDED, [groups[i] for i in wanted])
        for n, ts_us, value in rows:
            index = wanted[n - 1]
            lo_us, hi_us = groups[index][2], groups[index][3]
            if (ts_us < lo_us and index in want_before) or (ts_us > hi_us and index in want_after):
                found[index].append((ts_us, value))
    in_full = set(full)
    return found, [i not in in_full for i in range(len(groups))]


async def unoccupied(conn: asyncpg.Connection, groups: Sequence[Group]) -> list[tuple[UUID, int]]:
    """The (meter, flow) of ``groups`` with nothing stored between their first and last µs."""
    if not groups:
        return []
    rows = await _fetch_for_groups(conn, _OCCUPIED, groups)
    occupied = {(row[0], row[1]) for row in rows}
    return [(g[0], g[1]) for g in groups if (g[0], g[1]) not in occupied]


# Binary COPY of (meter_id uuid, flow smallint, ts timestamptz, value_wh float8,
# ingest_id int8) rows: each field is preceded by its length; timestamptz is microseconds
# since 2000-01-01 UTC.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" * 2
_COPY_TRAILER = b"\xff\xff"
_COPY_ROW = struct.Struct(">hi16sihiqidiq")
_PG_EPOCH_US = 946_684_800 * _US
_READING_COLUMNS = ("meter_id", "flow", "ts", "value_wh", "ingest_id")


def copy_payload(rows: Sequence[Row], ingest_id: int) -> bytes:
    """The binary COPY stream of ``rows`` into ``readings`` under ``ingest_id``.

    Built here rather than by asyncpg's record encoder, which needs a datetime per row.
    """
    pack = _COPY_ROW.pack
    offset = _PG_EPOCH_US
    uuid_bytes: dict[UUID, bytes] = {}
    parts = [_COPY_HEADER]
    append = parts.append
    for meter_id, flow, ts_us, value in rows:
        raw = uuid_bytes.get(meter_id)
        if raw is None:
            raw = uuid_bytes[meter_id] = meter_id.bytes
        append(pack(5, 16, raw, 2, flow, 8, ts_us - offset, 8, value, 8, ingest_id))
    append(_COPY_TRAILER)
    return b"".join(parts)


async def write_rows(
    conn: asyncpg.Connection,
    org_id: UUID,
    rows: list[Row],
    meters: dict[UUID, MeterInfo],
    fresh: Sequence[tuple[UUID, int]] = (),
) -> WriteResult:
    """Stores a validated batch's rows inside the caller's transaction, in four steps:
    COPY the fresh groups straight in, upsert the others through the staging table, find
    what changed, queue its balance intervals and announce the batch to watchers.

    ``fresh`` are the (meter, flow) groups with nothing stored in the batch's time range
    (seen by the register check in this transaction); a concurrent writer of the same keys
    makes their COPY fail with a unique violation (or a deadlock) and the caller retries the
    batch with no fresh groups.
    """
    plain, staged = split_fresh(rows, fresh)
    ingest_id: int = await conn.fetchval(_NEXT_INGEST)
    inserted = await copy_fresh_rows(conn, plain, ingest_id)
    staged_inserted, updated = await upsert_staged_rows(conn, staged, ingest_id)
    inserted += staged_inserted
    changed_count = inserted + updated
    if changed_count:
        first_us = min(row[2] for row in rows)
        last_us = max(row[2] for row in rows)
        if changed_count == len(rows):
            changed: Iterable[tuple[UUID, int]] = ((row[0], row[2]) for row in rows)
        else:
            changed = await changed_readings(conn, list(meters), ingest_id, first_us, last_us)
        await queue_and_announce(conn, org_id, ingest_id, changed, meters, first_us, last_us)
    return WriteResult(ingest_id, inserted, updated)


def split_fresh(rows: list[Row], fresh: Sequence[tuple[UUID, int]]) -> tuple[list[Row], list[Row]]:
    """(rows of the ``fresh`` groups, the others)."""
    if len(fresh) == 0:
        return [], rows
    fresh_keys = set(fresh)
    if all((row[0], row[1]) in fresh_keys for row in rows):
        return rows, []
    plain = [row for row in rows if (row[0], row[1]) in fresh_keys]
    staged = [row for row in rows if (row[0], row[1]) not in fresh_keys]
    return plain, staged


async def copy_fresh_rows(conn: asyncpg.Connection, rows: list[Row], ingest_id: int) -> int:
    """Binary COPY of rows no stored row can conflict with into ``readings``; their count."""
    if not rows:
        return 0
    await conn.copy_to_table(
        "readings",
        # A memoryview: asyncpg would take bytes for a file path.
        source=memoryview(copy_payload(rows, ingest_id)),
        columns=_READING_COLUMNS,
        format="binary",
    )
    return len(rows)


async def upsert_staged_rows(
    conn: asyncpg.Connection, rows: list[Row], ingest_id: int
) -> tuple[int, int]:
    """COPY into the staging table, then ONE upsert into ``readings``: (inserted, updated).

    Identical values are left alone (neither counted nor re-stamped).
    """
    if not rows:
        return 0, 0
    # Every time, in the batch's transaction: remembered per connection instead, a table
    # made by a transaction that then rolled back would be gone while still counted on, and
    # the next batch would spend an attempt finding out. Only batches with rows stored
    # already come here (resends, corrections), and the table exists after the first.
    await conn.execute(_STAGING_DDL)
    await conn.copy_records_to_table(
        "reading_staging",
        records=rows,
        columns=("meter_id", "flow", "ts_us", "value_wh"),
    )
    result = await conn.fetchrow(_UPSERT, ingest_id)
    return result["inserted"], result["updated"]


async def changed_readings(
    conn: asyncpg.Connection, meter_ids: list[UUID], ingest_id: int, first_us: int, last_us: int
) -> list[tuple[UUID, int]]:
    """(meter, epoch µs) of the rows this batch inserted or corrected (when not all were)."""
    rows = await conn.fetch(_CHANGED, meter_ids, ingest_id, first_us, last_us)
    return [(row[0], row[1]) for row in rows]


async def queue_and_announce(
    conn: asyncpg.Connection,
    org_id: UUID,
    ingest_id: int,
    changed: Iterable[tuple[UUID, int]],
    meters: dict[UUID, MeterInfo],
    first_us: int,
    last_us: int,
) -> None:
    """Queues the balance intervals the changed readings touch and notifies watchers of
    the batch, in one statement."""
    ranges: set[BalancingRange] = set()
    sites: set[UUID] = set()
    seen: set[tuple[UUID, int, bool]] = set()
    for meter_id, ts_us in changed:
        info = meters[meter_id]
        register = not info.load_profile
        # By kind too: a register also ends the interval before it, an interval reading at
        # the same site and instant does not.
        key = (info.site_id, ts_us, register)
        if key in seen:
            continue
        seen.add(key)
        sites.add(info.site_id)
        for start, end in _queue_ranges(info.timezone.key, info.resolution.iso, ts_us, register):
            ranges.add((info.site_id, start, end))
    payload = readings_batch_payload(org_id, ingest_id, sites, from_us(first_us), from_us(last_us))
    await enqueue_balancing(conn, org_id, ranges, also_notify=(READINGS_CHANNEL, payload))


RETRYABLE = _RETRYABLE


class IngestedBatch(NamedTuple):
    """A committed batch as its event names it: its ingest id and the span of its readings."""

    ingest_id: int
    first: datetime
    last: datetime


async def fetch_ingested(
    pool: asyncpg.Pool,
    org_id: OrgId,
    batches: Sequence[IngestedBatch],
    site_id: SiteId | None,
    meter_id: MeterId | None,
) -> list[list[asyncpg.Record]]:
    """Rows each of ``batches`` changed, of one site or one meter of ``org_id``: one list per
    batch, in their order, from one statement (a watcher catching up on a burst of commits
    makes one round trip, not one per commit)."""
    arg: UUID | None = site_id
    where = "m.site_id = $5"
    if meter_id is not None:
        where, arg = "m.id = $5", meter_id
    rows = await pool.fetch(
        f"""
        SELECT b.n, r.meter_id, r.flow, r.ts, r.value_wh, m.measuring
        FROM unnest($2::bigint[], $3::timestamptz[], $4::timestamptz[])
             WITH ORDINALITY AS b(ingest_id, first, last, n)
        JOIN meters m ON m.org_id = $1 AND {where}
        JOIN readings r ON r.meter_id = m.id AND r.ingest_id IN (b.ingest_id, -b.ingest_id)
          AND r.ts BETWEEN b.first AND b.last
        ORDER BY b.n, r.meter_id, r.flow, r.ts
        """,
        org_id,
        [batch.ingest_id for batch in batches],
        [batch.first for batch in batches],
        [batch.last for batch in batches],
        arg,
    )
    per_batch: list[list[asyncpg.Record]] = [[] for _ in batches]
    for row in rows:
        per_batch[row["n"] - 1].append(row)
    return per_batch


async def fetch_range(
    pool: asyncpg.Pool,
    org_id: OrgId,
    meter_id: MeterId,
    first: datetime,
    last_inclusive: datetime,
) -> list[asyncpg.Record]:
    """The stored readings of one of ``org_id``'s meters in [first, last_inclusive]."""
    rows: list[asyncpg.Record] = await pool.fetch(
        """
        SELECT flow, ts, value_wh FROM readings
        WHERE meter_id = $1 AND ts >= $2 AND ts <= $3
          AND EXISTS (SELECT 1 FROM meters WHERE id = $1 AND org_id = $4)
        ORDER BY flow, ts
        """,
        meter_id,
        first,
        last_inclusive,
        org_id,
    )
    return rows


async def site_exists(pool: asyncpg.Pool, org_id: OrgId, site_id: SiteId) -> bool:
    found: bool = await pool.fetchval(
        "SELECT EXISTS (SELECT 1 FROM sites WHERE id = $1 AND org_id = $2)", site_id, org_id
    )
    return found
