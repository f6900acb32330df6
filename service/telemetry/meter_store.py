"""Meters in PostgreSQL, scoped to one organization on every query.

Every change notifies ``METER_CHANGED_CHANNEL`` (:mod:`service.events.channels`) with the
org id inside its transaction, so each replica drops its cached meter contexts of that
organization once the change commits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from service.common.errors import AlreadyExistsError, NotFoundError, ValidationError
from service.db.balancing_queue import (
    enqueue_balancing,
    participation_ranges,
    readings_spans,
    span_range,
)
from service.db.pagination import Cursor
from service.db.site_children import list_site_children
from service.events.payloads import notify_meter_changed
from service.grid import SiteType, parse_resolution
from service.identifiers.ids import MeterId, OrgId, SiteId
from service.telemetry.domain import (
    Measuring,
    MeterDirection,
    MeterFields,
    validate_meter,
)


@dataclass(frozen=True)
class MeterRecord:
    """A ``meters`` row; :meth:`from_row` is the one mapping of that table."""

    id: MeterId
    org_id: OrgId
    site_id: SiteId
    fields: MeterFields
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> MeterRecord:
        return cls(
            id=row["id"],
            org_id=row["org_id"],
            site_id=row["site_id"],
            fields=MeterFields(
                identifier=row["identifier"],
                serial=row["serial"],
                mpo=row["mpo"],
                direction=MeterDirection(row["direction"]),
                measuring=Measuring(row["measuring"]),
                start_date=row["start_date"],
                end_date=row["end_date"],
                transformer_factor=row["transformer_factor"],
            ),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )


def _duplicate(identifier: str) -> AlreadyExistsError:
    return AlreadyExistsError(
        "identifier", f"the site already has a meter with identifier {identifier!r}"
    )


def _raise_violations(violations: list[tuple[str, str]]) -> None:
    if violations:
        from service.common.errors import FieldViolation

        raise ValidationError([FieldViolation(f, r) for f, r in violations])


class MeterStore:
    def __init__(self, pool: asyncpg.Pool, org_id: OrgId) -> None:
        self._pool = pool
        self._org_id = org_id

    async def _site_type(self, conn: asyncpg.Connection, site_id: SiteId) -> SiteType | None:
        row = await conn.fetchrow(
            "SELECT site_type FROM sites WHERE id = $1 AND org_id = $2 FOR SHARE",
            site_id,
            self._org_id,
        )
        if row is None:
            raise NotFoundError("site", str(site_id))
        return SiteType(row["site_type"]) if row["site_type"] else None

    async def create(self, site_id: SiteId, fields: MeterFields) -> MeterRecord:
        """Validates against the site type under a share lock on the site, then inserts."""
        async with self._pool.acquire() as conn, conn.transaction():
            site_type = await self._site_type(conn, site_id)
            _raise_violations(validate_meter(fields, site_type))
            assert fields.direction is not None
            assert fields.measuring is not None
            try:
                row = await conn.fetchrow(
                    """
                    INSERT INTO meters (org_id, site_id, identifier, serial, mpo, direction,
                        measuring, start_date, end_date, transformer_factor)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                    RETURNING *
                    """,
                    self._org_id,
                    site_id,
                    fields.identifier,
                    fields.serial,
                    fields.mpo,
                    str(fields.direction),
                    str(fields.measuring),
                    fields.start_date,
                    fields.end_date,
                    fields.transformer_factor,
                )
            except asyncpg.UniqueViolationError:
                raise _duplicate(fields.identifier) from None
            await notify_meter_changed(conn, self._org_id)
        return MeterRecord.from_row(row)

    async def get(self, meter_id: MeterId) -> MeterRecord:
        row = await self._pool.fetchrow(
            "SELECT * FROM meters WHERE id = $1 AND org_id = $2", meter_id, self._org_id
        )
        if row is None:
            raise NotFoundError("meter", str(meter_id))
        return MeterRecord.from_row(row)

    async def list(
        self, site_id: SiteId, after: Cursor | None, limit: int
    ) -> tuple[list[MeterRecord], int]:
        rows, total = await list_site_children(
            self._pool, "meters", self._org_id, site_id, after, limit
        )
        return [MeterRecord.from_row(row) for row in rows], total

    async def update(
        self, meter_id: MeterId, change: Callable[[MeterFields], MeterFields]
    ) -> MeterRecord:
        async with self._pool.acquire() as conn, conn.transaction():
            current = await conn.fetchrow(
                "SELECT * FROM meters WHERE id = $1 AND org_id = $2 FOR UPDATE",
                meter_id,
                self._org_id,
            )
            if current is None:
                raise NotFoundError("meter", str(meter_id))
            record = MeterRecord.from_row(current)
            fields = change(record.fields)
            # Measuring is fixed, so the site type rule holds as at creation.
            _raise_violations(validate_meter(fields, None, prefix="meter."))
            try:
                row = await conn.fetchrow(
                    """
                    UPDATE meters SET identifier = $3, serial = $4, mpo = $5, start_date = $6,
                        end_date = $7, transformer_factor = $8, updated_at = clock_timestamp()
                    WHERE id = $1 AND org_id = $2
                    RETURNING *
                    """,
                    meter_id,
                    self._org_id,
                    fields.identifier,
                    fields.serial,
                    fields.mpo,
                    fields.start_date,
                    fields.end_date,
                    fields.transformer_factor,
                )
            except asyncpg.UniqueViolationError:
                raise _duplicate(fields.identifier) from None
            await notify_meter_changed(conn, self._org_id)
            updated = MeterRecord.from_row(row)
            await self._queue_changed_energy(conn, record, updated)
        return updated

    async def delete(self, meter_id: MeterId) -> None:
        """Deletes the meter and its readings and queues the site intervals they touched,
        and the days it took part in (its balancing settings go with it)."""
        async with self._pool.acquire() as conn, conn.transaction():
            meter = await conn.fetchrow(
                """
                SELECT m.site_id, m.measuring, s.timezone, s.balance_resolution
                FROM meters m JOIN sites s ON s.id = m.site_id
                WHERE m.id = $1 AND m.org_id = $2
                FOR UPDATE OF m
                """,
                meter_id,
                self._org_id,
            )
            if meter is None:
                raise NotFoundError("meter", str(meter_id))
            timezone = ZoneInfo(meter["timezone"])
            # While its settings are there: a participant without readings left incomplete
            # intervals that nothing else would re-balance once it is gone.
            ranges = await participation_ranges(
                conn, self._org_id, meter["site_id"], timezone, meter_id
            )
            # Readings first, to know which intervals to rebalance; deleting the meter would
            # remove them too (see migration 0005) but without telling which.
            span = await conn.fetchrow(
                """
                WITH gone AS (DELETE FROM readings WHERE meter_id = $1 RETURNING ts)
                SELECT min(ts) AS first, max(ts) AS last FROM gone
                """,
                meter_id,
            )
            await conn.execute(
                "DELETE FROM meters WHERE id = $1 AND org_id = $2", meter_id, self._org_id
            )
            await notify_meter_changed(conn, self._org_id)
            if span["first"] is not None:
                # One range from the first to the last interval the readings touched: the
                # consumer rebalances the intervals in it that have data.
                start, end = span_range(
                    span["first"],
                    span["last"],
                    [(parse_resolution(meter["balance_resolution"]), timezone)],
                    registers=meter["measuring"] != Measuring.LOAD_PROFILE_ACCURATE,
                )
                ranges.append((meter["site_id"], start, end))
            await enqueue_balancing(conn, self._org_id, ranges)

    async def _queue_changed_energy(
        self, conn: asyncpg.Connection, before: MeterRecord, after: MeterRecord
    ) -> None:
        """Queues the site range whose energy the change of a meter's factor or dates moves.

        A new factor changes every interval of the meter's data; a new start or end date
        turns the intervals between the old and the new date from measured to absent (0) or
        back. Only where the site has data: an interval without any needs no balance.
        """
        old, new = before.fields, after.fields
        factor_changed = old.transformer_factor != new.transformer_factor
        dates_changed = (old.start_date, old.end_date) != (new.start_date, new.end_date)
        if not (factor_changed or dates_changed):
            return
        site_span, meter_span = await readings_spans(conn, self._org_id, after.site_id, after.id)
        if site_span is None:
            return
        parts = [meter_span] if meter_span is not None else []
        if dates_changed:
            for was, now in ((old.start_date, new.start_date), (old.end_date, new.end_date)):
                if was != now:
                    bounds = [d if d is not None else site_span[1] for d in (was, now)]
                    parts.append((min(bounds), max(bounds)))
        if not parts:
            return
        first = max(site_span[0], min(p[0] for p in parts))
        last = min(site_span[1], max(p[1] for p in parts))
        if first > last:
            return
        site = await conn.fetchrow(
            "SELECT timezone, balance_resolution FROM sites WHERE id = $1 AND org_id = $2",
            after.site_id,
            self._org_id,
        )
        grid = (parse_resolution(site["balance_resolution"]), ZoneInfo(site["timezone"]))
        start, end = span_range(first, last, [grid])
        await enqueue_balancing(conn, self._org_id, [(after.site_id, start, end)])
