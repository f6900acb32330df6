"""Balancing settings, policies and results in PostgreSQL, scoped to one organization on
every query (the worker, which serves every organization, passes each queue row's own).

Every write of a setting or policy queues the affected days that have data
(``balancing_queue``) in its own transaction, so the results follow the change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg

from service.balancing.blocks import Block, pack, unpack, unpack_totals
from service.balancing.calendar import StoredBlock
from service.balancing.domain import (
    BalancingRole,
    Period,
    Policy,
    Setting,
    SettingFields,
    overlap_violation,
    share_excess_rule,
    static_share_excess,
    validate_setting,
)
from service.balancing.engine import AllocationMethod
from service.common.errors import NotFoundError, ViolationCollector
from service.db.balancing_queue import days_with_data, enqueue_balancing
from service.db.keyset import keyset_page
from service.db.lock_order import METER_LOCK_ORDER
from service.db.pagination import Cursor
from service.grid import Resolution, SiteType, parse_resolution, site_type_is_balanced

_LOCK_SETTINGS = b"openvpp.balancing.settings:"
_LOCK_RESULTS = b"openvpp.balancing.results:"


def _lock_key(namespace: bytes, site_id: UUID) -> int:
    return int.from_bytes(
        hashlib.sha256(namespace + site_id.bytes).digest()[:8], "big", signed=True
    )


async def lock_site_settings(conn: asyncpg.Connection, site_id: UUID) -> None:
    """Serializes writers of one site's settings and policies (histories, share sums)."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(_LOCK_SETTINGS, site_id))


async def lock_site_results(conn: asyncpg.Connection, site_id: UUID) -> None:
    """Serializes re-balancing of one site: whoever holds it reads the energy after every
    earlier re-balancing committed, so an older computation never overwrites a newer one."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(_LOCK_RESULTS, site_id))


async def try_lock_site_results(conn: asyncpg.Connection, site_id: UUID) -> bool:
    locked: bool = await conn.fetchval(
        "SELECT pg_try_advisory_xact_lock($1)", _lock_key(_LOCK_RESULTS, site_id)
    )
    return locked


@dataclass(frozen=True)
class SiteInfo:
    id: UUID
    org_id: UUID
    timezone: ZoneInfo
    resolution: Resolution
    site_type: SiteType | None

    @property
    def balanced(self) -> bool:
        return self.site_type is not None and site_type_is_balanced(self.site_type)


async def site_info(
    conn: asyncpg.Connection | asyncpg.Pool, org_id: UUID, site_id: UUID, *, lock: bool = False
) -> SiteInfo:
    """The site's balancing facts, NOT_FOUND for a site not of ``org_id``. ``lock``: held
    with ``FOR KEY SHARE`` until the transaction ends, so that a row about to reference the
    site is not left pointing at a site deleted meanwhile (its DeleteSite waits instead)."""
    row = await conn.fetchrow(
        "SELECT timezone, balance_resolution, site_type FROM sites WHERE id = $1 AND org_id = $2"
        + (" FOR KEY SHARE" if lock else ""),
        site_id,
        org_id,
    )
    if row is None:
        raise NotFoundError("site", str(site_id))
    return SiteInfo(
        site_id,
        org_id,
        ZoneInfo(row["timezone"]),
        parse_resolution(row["balance_resolution"]),
        SiteType(row["site_type"]) if row["site_type"] else None,
    )


def setting_from_row(row: Mapping[str, Any]) -> Setting:
    return Setting(
        id=row["id"],
        site_id=row["site_id"],
        meter_id=row["meter_id"],
        balancing=BalancingRole(row["balancing"]),
        period=Period(row["start_date"], row["end_date"]),
        priority=row["priority"],
        share=row["share"],
        created_at=row["created_at"],
    )


def policy_from_row(row: Mapping[str, Any]) -> Policy:
    return Policy(
        id=row["id"],
        site_id=row["site_id"],
        method=AllocationMethod(row["allocation_method"]),
        period=Period(row["start_date"], row["end_date"]),
        created_at=row["created_at"],
    )


async def site_settings(conn: asyncpg.Connection, org_id: UUID, site_id: UUID) -> list[Setting]:
    rows = await conn.fetch(
        "SELECT * FROM meter_balancing_settings WHERE site_id = $1 AND org_id = $2",
        site_id,
        org_id,
    )
    return [setting_from_row(row) for row in rows]


async def site_policies(conn: asyncpg.Connection, org_id: UUID, site_id: UUID) -> list[Policy]:
    rows = await conn.fetch(
        "SELECT * FROM site_balancing_policies WHERE site_id = $1 AND org_id = $2 "
        "ORDER BY start_date",
        site_id,
        org_id,
    )
    return [policy_from_row(row) for row in rows]


async def queue_periods(
    conn: asyncpg.Connection, org_id: UUID, site: SiteInfo, periods: Sequence[Period]
) -> None:
    """Queues the days of ``periods`` on which the site has data (see
    :func:`days_with_data`)."""
    days = [(p.start, p.end) for p in periods]
    await enqueue_balancing(
        conn, org_id, await days_with_data(conn, org_id, site.id, site.timezone, days)
    )


class BalancingStore:
    def __init__(self, pool: asyncpg.Pool, org_id: UUID) -> None:
        self._pool = pool
        self._org_id = org_id

    # -- settings -----------------------------------------------------------------------

    async def _meter_site(
        self, conn: asyncpg.Connection, meter_id: UUID, *, lock: bool = True
    ) -> UUID:
        """The meter's site; ``lock``: the meter held (``FOR KEY SHARE``) until the
        transaction ends. A setting written for it after the settings lock's wait would
        otherwise reference a meter (or site) deleted during that wait, a foreign-key
        violation; DeleteMeter and DeleteSite wait for it instead."""
        site_id: UUID | None = await conn.fetchval(
            "SELECT site_id FROM meters WHERE id = $1 AND org_id = $2"
            + (" FOR KEY SHARE" if lock else ""),
            meter_id,
            self._org_id,
        )
        if site_id is None:
            raise NotFoundError("meter", str(meter_id))
        return site_id

    def _check_site_rules(
        self,
        errors: ViolationCollector,
        settings: list[Setting],
        policies: list[Policy],
        changed: Setting | None,
        prefix: str,
        share_field: str,
    ) -> None:
        if changed is not None:
            overlap_violation(
                errors,
                changed.period,
                [
                    s.period
                    for s in settings
                    if s.meter_id == changed.meter_id and s.id != changed.id
                ],
                "balancing setting of this meter",
                prefix,
            )
            settings = [s for s in settings if s.id != changed.id] + [changed]
        excess = static_share_excess(settings, policies)
        if excess is not None:
            errors.add(share_field, share_excess_rule(excess))

    async def create_setting(
        self, site_id: UUID | None, meter_id: UUID, fields: SettingFields, period: Period
    ) -> Setting:
        async with self._pool.acquire() as conn, conn.transaction():
            meter_site = await self._meter_site(conn, meter_id)
            if site_id is not None and site_id != meter_site:
                await site_info(conn, self._org_id, site_id)  # NOT_FOUND for a foreign site
                errors = ViolationCollector()
                errors.add("site_id", "must be the site of the meter (or empty)")
                errors.raise_if_any()
            site = await site_info(conn, self._org_id, meter_site)
            await lock_site_settings(conn, site.id)
            settings = await site_settings(conn, self._org_id, site.id)
            policies = await site_policies(conn, self._org_id, site.id)
            assert fields.balancing is not None
            candidate = Setting(
                UUID(int=0),
                site.id,
                meter_id,
                fields.balancing,
                period,
                fields.priority,
                fields.share,
                datetime.min,
            )
            errors = ViolationCollector()
            self._check_site_rules(errors, settings, policies, candidate, "", "share")
            errors.raise_if_any()
            row = await conn.fetchrow(
                """
                INSERT INTO meter_balancing_settings (org_id, site_id, meter_id, balancing,
                    start_date, end_date, priority, share)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                RETURNING *
                """,
                self._org_id,
                site.id,
                meter_id,
                str(fields.balancing),
                period.start,
                period.end,
                fields.priority,
                fields.share,
            )
            await queue_periods(conn, self._org_id, site, [period])
        return setting_from_row(row)

    async def list_settings(
        self, site_id: UUID, meter_id: UUID | None, after: Cursor | None, limit: int
    ) -> tuple[list[Setting], int]:
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            await site_info(conn, self._org_id, site_id)
            args: list[Any] = [site_id, self._org_id]
            matching = "SELECT * FROM meter_balancing_settings WHERE site_id = $1 AND org_id = $2"
            if meter_id is not None:
                # Another organization's meter is NOT_FOUND, as in every other call; one of
                # another site of this organization has no settings here.
                await self._meter_site(conn, meter_id, lock=False)
                args.append(meter_id)
                matching += " AND meter_id = $3"
            rows, total = await keyset_page(conn, matching, args, after, limit)
        return [setting_from_row(row) for row in rows], total

    async def _locked_setting(self, conn: asyncpg.Connection, setting_id: UUID) -> Setting:
        site_id = await conn.fetchval(
            "SELECT site_id FROM meter_balancing_settings WHERE id = $1 AND org_id = $2",
            setting_id,
            self._org_id,
        )
        if site_id is None:
            raise NotFoundError("meter_balancing_setting", str(setting_id))
        # The site first (FOR KEY SHARE, as CreateSiteBalancingPolicy holds it): with the
        # setting's row locked before it, a DeleteSite (site locked, its cascade waiting for
        # that row) and the queueing of this change (which needs the site) deadlocked.
        try:
            await site_info(conn, self._org_id, site_id, lock=True)
        except NotFoundError:
            raise NotFoundError("meter_balancing_setting", str(setting_id)) from None
        await lock_site_settings(conn, site_id)
        # Locked: the deletion of its meter (which takes the setting with it, and no
        # settings lock) may have begun; it is then waited for and the setting is gone.
        row = await conn.fetchrow(
            "SELECT * FROM meter_balancing_settings WHERE id = $1 AND org_id = $2 FOR UPDATE",
            setting_id,
            self._org_id,
        )
        if row is None:
            raise NotFoundError("meter_balancing_setting", str(setting_id))
        return setting_from_row(row)

    async def update_setting(
        self,
        setting_id: UUID,
        end_date: date | None,
        priority: int | None,
        share: float | None,
        paths: frozenset[str],
    ) -> Setting:
        async with self._pool.acquire() as conn, conn.transaction():
            current = await self._locked_setting(conn, setting_id)
            new_period = Period(
                current.period.start, end_date if "end_date" in paths else current.period.end
            )
            validate_setting(
                SettingFields(
                    current.balancing,
                    new_period.start,
                    new_period.end,
                    priority if "priority" in paths else current.priority,
                    share if "share" in paths else current.share,
                ),
                "setting.",
            )
            changed = replace(
                current,
                period=new_period,
                priority=priority if "priority" in paths else current.priority,
                share=share if "share" in paths else current.share,
            )
            site = await site_info(conn, self._org_id, current.site_id)
            settings = await site_settings(conn, self._org_id, site.id)
            policies = await site_policies(conn, self._org_id, site.id)
            errors = ViolationCollector()
            self._check_site_rules(errors, settings, policies, changed, "setting.", "setting.share")
            errors.raise_if_any()
            row = await conn.fetchrow(
                """
                UPDATE meter_balancing_settings
                SET end_date = $3, priority = $4, share = $5, updated_at = clock_timestamp()
                WHERE id = $1 AND org_id = $2
                RETURNING *
                """,
                setting_id,
                self._org_id,
                changed.period.end,
                changed.priority,
                changed.share,
            )
            await queue_periods(conn, self._org_id, site, [current.period, changed.period])
        return setting_from_row(row)

    async def delete_setting(self, setting_id: UUID) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            current = await self._locked_setting(conn, setting_id)
            await conn.execute(
                "DELETE FROM meter_balancing_settings WHERE id = $1 AND org_id = $2",
                setting_id,
                self._org_id,
            )
            site = await site_info(conn, self._org_id, current.site_id)
            await queue_periods(conn, self._org_id, site, [current.period])

    # -- policies -------------------------------------------------------------------------

    async def create_policy(
        self, site_id: UUID, method: AllocationMethod, period: Period
    ) -> Policy:
        async with self._pool.acquire() as conn, conn.transaction():
            site = await site_info(conn, self._org_id, site_id, lock=True)
            await lock_site_settings(conn, site.id)
            policies = await site_policies(conn, self._org_id, site.id)
            errors = ViolationCollector()
            overlap_violation(
                errors, period, [p.period for p in policies], "balancing policy of this site"
            )
            candidate = Policy(UUID(int=0), site.id, method, period, datetime.min)
            settings = await site_settings(conn, self._org_id, site.id)
            excess = static_share_excess(settings, [*policies, candidate])
            if excess is not None:
                errors.add("allocation_method", share_excess_rule(excess))
            errors.raise_if_any()
            row = await conn.fetchrow(
                """
                INSERT INTO site_balancing_policies (org_id, site_id, allocation_method,
                    start_date, end_date)
                VALUES ($1, $2, $3, $4, $5)
                RETURNING *
                """,
                self._org_id,
                site.id,
                int(method),
                period.start,
                period.end,
            )
            await queue_periods(conn, self._org_id, site, [period])
        return policy_from_row(row)

    async def list_policies(
        self, site_id: UUID, after: Cursor | None, limit: int
    ) -> tuple[list[Policy], int]:
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            await site_info(conn, self._org_id, site_id)
            rows, total = await keyset_page(
                conn,
                "SELECT * FROM site_balancing_policies WHERE site_id = $1 AND org_id = $2",
                [site_id, self._org_id],
                after,
                limit,
            )
        return [policy_from_row(row) for row in rows], total


# -- results ------------------------------------------------------------------------------

_BLOCK_COLUMNS = (
    "site_id",
    "org_id",
    "block_start",
    "block_end",
    "interval_starts",
    "complete",
    "producer_ids",
    "consumer_ids",
    "shared_wh",
    "feed_in_wh",
    "grid_supply_wh",
    "shared_total_wh",
    "feed_in_total_wh",
    "grid_supply_total_wh",
    "complete_intervals",
)


def _block_from_row(row: Mapping[str, Any]) -> Block:
    return unpack(
        row["block_start"],
        row["block_end"],
        row["interval_starts"],
        row["complete"],
        row["producer_ids"],
        row["consumer_ids"],
        row["shared_wh"],
        row["feed_in_wh"],
        row["grid_supply_wh"],
    )


async def load_blocks(
    conn: asyncpg.Connection | asyncpg.Pool,
    org_id: UUID,
    site_id: UUID,
    start: datetime,
    end: datetime,
) -> list[Block]:
    """The stored blocks overlapping ``[start, end)``, ascending."""
    rows = await conn.fetch(
        """
        SELECT * FROM balance_blocks
        WHERE site_id = $1 AND org_id = $2 AND block_start < $4 AND block_end > $3
        ORDER BY block_start
        """,
        site_id,
        org_id,
        start,
        end,
    )
    return [_block_from_row(row) for row in rows]


# One consumer's slice of each block: its contiguous [P, T] cells and [T] grid supply (NULL
# in a block without it, which still counts for the completeness of the site's intervals).
_CONSUMER_SLICE = """
SELECT block_start, block_end, interval_starts, complete, producer_ids, c,
       substring(shared_wh FROM (c - 1) * n_p * n_t * 8 + 1 FOR n_p * n_t * 8) AS shared_wh,
       substring(grid_supply_wh FROM (c - 1) * n_t * 8 + 1 FOR n_t * 8) AS grid_supply_wh
FROM (
    SELECT *, array_position(consumer_ids, $5::uuid) AS c,
           cardinality(producer_ids) AS n_p, octet_length(interval_starts) / 8 AS n_t
    FROM balance_blocks
    WHERE site_id = $1 AND org_id = $2 AND block_start < $4 AND block_end > $3
) b
ORDER BY block_start
"""


async def load_consumer_blocks(
    conn: asyncpg.Connection | asyncpg.Pool,
    org_id: UUID,
    site_id: UUID,
    start: datetime,
    end: datetime,
    consumer_id: UUID,
) -> list[Block]:
    """The stored blocks overlapping ``[start, end)``, reduced to ``consumer_id`` (feed-in
    not read): the few KB of a debitor instead of whole blocks. A block without that
    consumer comes without meters: its intervals still count towards ``complete``, which
    describes the site's grid whichever filter reads it."""
    rows = await conn.fetch(_CONSUMER_SLICE, site_id, org_id, start, end, consumer_id)
    return [
        unpack(
            row["block_start"],
            row["block_end"],
            row["interval_starts"],
            row["complete"],
            row["producer_ids"] if row["c"] is not None else [],
            [consumer_id] if row["c"] is not None else [],
            row["shared_wh"] or b"",
            None,
            row["grid_supply_wh"] or b"",
        )
        for row in rows
    ]


_TOTALS = """
SELECT block_start, block_end, producer_ids, consumer_ids, shared_total_wh, feed_in_total_wh,
       grid_supply_total_wh, complete_intervals
FROM balance_blocks
WHERE site_id = $1 AND org_id = $2 AND block_start < $4 AND block_end > $3
ORDER BY block_start
"""

_CONSUMER_TOTALS = """
SELECT block_start, block_end, producer_ids, complete_intervals, c,
       substring(shared_total_wh FROM (c - 1) * n_p * 8 + 1 FOR n_p * 8) AS shared_total_wh,
       substring(grid_supply_total_wh FROM (c - 1) * 8 + 1 FOR 8) AS grid_supply_total_wh
FROM (
    SELECT *, array_position(consumer_ids, $5::uuid) AS c, cardinality(producer_ids) AS n_p
    FROM balance_blocks
    WHERE site_id = $1 AND org_id = $2 AND block_start < $4 AND block_end > $3
) b
ORDER BY block_start
"""


async def load_block_totals(
    conn: asyncpg.Connection | asyncpg.Pool,
    org_id: UUID,
    site_id: UUID,
    start: datetime,
    end: datetime,
    consumer_id: UUID | None = None,
) -> list[Block]:
    """The stored blocks overlapping ``[start, end)`` as their totals (one row each), all
    consumers or only ``consumer_id``: what day and month outputs need, ~1% of the bytes.
    With ``consumer_id``, a block without it comes without meters but with its complete
    intervals, so a month's ``complete`` is the site's whichever filter reads it."""
    if consumer_id is None:
        rows = await conn.fetch(_TOTALS, site_id, org_id, start, end)
        return [
            unpack_totals(
                row["block_start"],
                row["block_end"],
                row["producer_ids"],
                row["consumer_ids"],
                row["shared_total_wh"],
                row["feed_in_total_wh"],
                row["grid_supply_total_wh"],
                row["complete_intervals"],
            )
            for row in rows
        ]
    rows = await conn.fetch(_CONSUMER_TOTALS, site_id, org_id, start, end, consumer_id)
    return [
        unpack_totals(
            row["block_start"],
            row["block_end"],
            row["producer_ids"] if row["c"] is not None else [],
            [consumer_id] if row["c"] is not None else [],
            row["shared_total_wh"] or b"",
            None,
            row["grid_supply_total_wh"] or b"",
            row["complete_intervals"],
        )
        for row in rows
    ]


async def replace_blocks(
    conn: asyncpg.Connection,
    org_id: UUID,
    site_id: UUID,
    written: Sequence[Block],
    removed: Sequence[datetime],
) -> None:
    """Replaces the stored blocks starting at ``written``'s and ``removed``'s starts."""
    await delete_blocks(conn, org_id, site_id, [b.start for b in written] + list(removed))
    if written:
        await conn.copy_records_to_table(
            "balance_blocks",
            records=[(site_id, org_id, b.start, b.end, *pack(b)) for b in written],
            columns=_BLOCK_COLUMNS,
        )


async def stored_blocks(
    conn: asyncpg.Connection,
    org_id: UUID,
    site_id: UUID,
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[StoredBlock]:
    """Where the site's stored blocks lie (overlapping ``[start, end)``, or all), ascending:
    their bounds and interval counts, not their values (the length of an uncompressed
    value is read from its TOAST pointer)."""
    columns = "SELECT block_start, block_end, octet_length(interval_starts) / 8 AS intervals "
    if start is None or end is None:
        rows = await conn.fetch(
            columns + "FROM balance_blocks WHERE site_id = $1 AND org_id = $2 ORDER BY block_start",
            site_id,
            org_id,
        )
    else:
        rows = await conn.fetch(
            columns + "FROM balance_blocks WHERE site_id = $1 AND org_id = $2 "
            "AND block_start < $4 AND block_end > $3 ORDER BY block_start",
            site_id,
            org_id,
            start,
            end,
        )
    return [StoredBlock(row["block_start"], row["block_end"], row["intervals"]) for row in rows]


async def delete_blocks(
    conn: asyncpg.Connection, org_id: UUID, site_id: UUID, starts: Sequence[datetime]
) -> None:
    if starts:
        await conn.execute(
            "DELETE FROM balance_blocks WHERE site_id = $1 AND org_id = $2 "
            "AND block_start = ANY($3::timestamptz[])",
            site_id,
            org_id,
            list(starts),
        )


async def delete_blocks_in(
    conn: asyncpg.Connection, org_id: UUID, site_id: UUID, start: datetime, end: datetime
) -> None:
    await conn.execute(
        "DELETE FROM balance_blocks WHERE site_id = $1 AND org_id = $2 "
        "AND block_start < $4 AND block_end > $3",
        site_id,
        org_id,
        start,
        end,
    )


@dataclass(frozen=True)
class MeterRow:
    id: UUID
    direction: str
    start_date: datetime
    end_date: datetime | None


async def site_meters(
    conn: asyncpg.Connection, org_id: UUID, site_id: UUID
) -> dict[UUID, MeterRow]:
    # Held (FOR KEY SHARE, in the order of service.db.lock_order, as DeleteSite and ingest
    # lock them) until the re-balancing commits: a meter deleted between this read and the
    # read of its energy made the pass fail with NOT_FOUND. A deletion waits now, and
    # queues the days it changes.
    rows = await conn.fetch(
        f"""
        SELECT id, direction, start_date, end_date FROM meters
        WHERE site_id = $1 AND org_id = $2 ORDER BY {METER_LOCK_ORDER} FOR KEY SHARE
        """,
        site_id,
        org_id,
    )
    return {
        row["id"]: MeterRow(row["id"], row["direction"], row["start_date"], row["end_date"])
        for row in rows
    }
