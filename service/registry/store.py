"""Sites and resources in PostgreSQL, scoped to one organization on every query.

A ``RegistryStore`` is built for one tenant and cannot be asked about another's rows: an
id of another organization behaves exactly like an id that does not exist. Every change
publishes a site event (:mod:`service.events.payloads`) in its own transaction, so watchers
on every replica see exactly what was committed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg

from service.common.clock import SYSTEM_CLOCK, Clock
from service.common.errors import AlreadyExistsError, NotFoundError, ValidationError
from service.db.balancing_queue import (
    enqueue_balancing,
    readings_spans,
    results_runs,
    span_range,
)
from service.db.keyset import keyset_page
from service.db.lock_order import METER_LOCK_ORDER
from service.db.pagination import Cursor
from service.db.reads import Reads
from service.db.site_children import list_site_children
from service.events.payloads import SiteEventType, notify_site_event
from service.grid import Resolution, SiteType, parse_resolution
from service.identifiers.ids import OrgId, ResourceId, SiteId
from service.registry.domain import (
    Bounds,
    Location,
    ResourceFields,
    ResourceType,
    SiteFields,
    SiteStatus,
    SupplyPoint,
    SupplyPointDirection,
    derive_site_status,
)
from service.telemetry.domain import Measuring, measuring_allowed, measuring_rule
from service.upstream import status as upstream_sync
from service.upstream.domain import UpstreamStatus

_ONE_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class SiteRecord:
    id: SiteId
    org_id: OrgId
    fields: SiteFields
    status: SiteStatus
    upstream_status: UpstreamStatus
    paused: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SiteRecord:
        """From a database row, or from the JSON snapshot carried by a site event."""
        points = []
        if row["grid_identifier"] is not None:
            points.append(
                SupplyPoint(row["grid_identifier"], SupplyPointDirection(row["primary_direction"]))
            )
        if row["injection_grid_identifier"]:
            points.append(
                SupplyPoint(row["injection_grid_identifier"], SupplyPointDirection.INJECTION)
            )
        return cls(
            id=SiteId(_uuid(row["id"])),
            org_id=OrgId(_uuid(row["org_id"])),
            fields=SiteFields(
                name=row["name"],
                external_id=row["external_id"],
                location=Location(
                    row["address"], row["latitude"], row["longitude"], row["country"]
                ),
                timezone=row["timezone"],
                supply_points=tuple(points),
                site_type=SiteType(row["site_type"]) if row["site_type"] else None,
                balance_resolution=row["balance_resolution"],
            ),
            status=SiteStatus(row["status"]),
            upstream_status=UpstreamStatus(row["upstream_status"]),
            paused=row["paused"],
            created_at=_datetime(row["created_at"]),
            updated_at=_datetime(row["updated_at"]),
        )


@dataclass(frozen=True)
class ResourceRecord:
    id: ResourceId
    site_id: SiteId
    fields: ResourceFields
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ResourceRecord:
        power = (
            Bounds(row["power_min_kw"], row["power_max_kw"])
            if row["power_min_kw"] is not None
            else None
        )
        capacity = (
            Bounds(row["capacity_min_kwh"], row["capacity_max_kwh"])
            if row["capacity_min_kwh"] is not None
            else None
        )
        return cls(
            id=row["id"],
            site_id=row["site_id"],
            fields=ResourceFields(
                resource_type=ResourceType(row["resource_type"]),
                name=row["name"],
                external_id=row["external_id"],
                power_kw=power,
                capacity_kwh=capacity,
                webhook_url=row["webhook_url"],
            ),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )


@dataclass(frozen=True)
class SiteFilter:
    status: SiteStatus | None = None
    upstream_status: UpstreamStatus | None = None
    grid_identifier: str | None = None


def _uuid(value: Any) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))


def _datetime(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def _site_columns(fields: SiteFields) -> list[Any]:
    injection = fields.injection
    primary = fields.primary
    return [
        fields.name,
        fields.external_id,
        fields.location.address,
        fields.location.latitude,
        fields.location.longitude,
        fields.location.country,
        fields.timezone,
        primary.grid_identifier if primary else None,
        str(primary.direction) if primary else None,
        injection.grid_identifier if injection else None,
        str(fields.site_type) if fields.site_type else None,
        fields.balance_resolution,
    ]


def _resource_columns(fields: ResourceFields) -> list[Any]:
    power, capacity = fields.power_kw, fields.capacity_kwh
    return [
        fields.name,
        fields.external_id,
        power.min if power else None,
        power.max if power else None,
        capacity.min if capacity else None,
        capacity.max if capacity else None,
        fields.webhook_url,
    ]


def _grid(fields: SiteFields) -> tuple[Resolution, ZoneInfo]:
    return parse_resolution(fields.balance_resolution), ZoneInfo(fields.timezone)


async def _queue_moved_grid(
    conn: asyncpg.Connection, org_id: OrgId, site_id: SiteId, before: SiteFields, after: SiteFields
) -> None:
    """A new timezone or resolution moves the site's grid, a new type what is balanced: the
    range of the site's readings is queued for rebalancing (on the new grid, covering the
    intervals of the old one too), and so is each run of its stored results, which may
    reach beyond the readings (days re-balanced without any) and must leave the old grid."""
    if (before.timezone, before.balance_resolution, before.site_type) == (
        after.timezone,
        after.balance_resolution,
        after.site_type,
    ):
        return
    grids = [_grid(after), _grid(before)]
    ranges = []
    span, _ = await readings_spans(conn, org_id, site_id)
    if span is not None:
        ranges.append(span_range(span[0], span[1], grids))
    for run_start, run_end in await results_runs(conn, org_id, site_id):
        start, end = span_range(run_start, run_end - _ONE_MICROSECOND, grids, registers=False)
        ranges.append((start, end))
    await enqueue_balancing(conn, org_id, [(site_id, start, end) for start, end in ranges])


def _duplicate_identifier(identifier: str | None, prefix: str = "") -> AlreadyExistsError:
    return AlreadyExistsError(
        prefix + "supply_points[0].grid_identifier",
        f"a site with primary grid identifier {identifier} already exists; "
        "a second head meter is a second site with its own identifier",
    )


class RegistryStore:
    """``reads`` serves the single-statement reads (a ``ReadLane``); the pool by default."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        org_id: OrgId,
        clock: Clock = SYSTEM_CLOCK,
        reads: Reads | None = None,
    ) -> None:
        self._pool = pool
        self._org_id = org_id
        self._clock = clock
        self._reads: Reads = reads or pool

    # Sites

    async def create_site(self, fields: SiteFields) -> SiteRecord:
        async with self._pool.acquire() as conn, conn.transaction():
            if fields.grid_identifier is not None:
                # Waited for before the row is written, not after: the row's created_at
                # (its place in ListSites' keyset) is then close to its commit, and a page
                # read meanwhile cannot pass over it while a supplier holds the identifier.
                await upstream_sync.lock_identifiers(conn, [fields.grid_identifier])
            try:
                row = await conn.fetchrow(
                    """
                    INSERT INTO sites (org_id, name, external_id, address, latitude, longitude,
                        country, timezone, grid_identifier, primary_direction,
                        injection_grid_identifier, site_type, balance_resolution)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                    RETURNING *
                    """,
                    self._org_id,
                    *_site_columns(fields),
                )
            except asyncpg.UniqueViolationError:
                raise _duplicate_identifier(fields.grid_identifier) from None
            # A supplier may have registered this identifier already; CREATED carries the
            # matching upstream_status, so no separate UPSTREAM_STATUS_CHANGED for a new site.
            # A site without a grid identifier matches nothing.
            if row["grid_identifier"] is not None:
                await upstream_sync.refresh_upstream_status(
                    conn, [row["grid_identifier"]], self._clock.now(), silent={row["id"]}
                )
            await notify_site_event(conn, row["id"], SiteEventType.CREATED)
            row = await conn.fetchrow("SELECT * FROM sites WHERE id = $1", row["id"])
        return SiteRecord.from_row(row)

    async def get_site(self, site_id: SiteId) -> SiteRecord:
        row = await self._reads.fetchrow(
            "SELECT * FROM sites WHERE id = $1 AND org_id = $2", site_id, self._org_id
        )
        if row is None:
            raise NotFoundError("site", str(site_id))
        return SiteRecord.from_row(row)

    async def list_sites(
        self, site_filter: SiteFilter, after: Cursor | None, limit: int
    ) -> tuple[list[SiteRecord], int]:
        """One page in creation order, and the number of sites matching the filter."""
        conditions = ["org_id = $1"]
        args: list[Any] = [self._org_id]
        if site_filter.status is not None:
            args.append(str(site_filter.status))
            conditions.append(f"status = ${len(args)}")
        if site_filter.upstream_status is not None:
            args.append(str(site_filter.upstream_status))
            conditions.append(f"upstream_status = ${len(args)}")
        if site_filter.grid_identifier:
            args.append(site_filter.grid_identifier)
            conditions.append(
                f"(grid_identifier = ${len(args)} OR injection_grid_identifier = ${len(args)})"
            )
        where = " AND ".join(conditions)
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            rows, total = await keyset_page(
                conn, f"SELECT * FROM sites WHERE {where}", args, after, limit
            )
        return [SiteRecord.from_row(row) for row in rows], total

    async def update_site(
        self, site_id: SiteId, change: Callable[[SiteFields], SiteFields]
    ) -> SiteRecord:
        """Applies ``change`` (which validates) to the locked current fields, atomically."""
        async with self._pool.acquire() as conn, conn.transaction():
            # The identifier's upstream lock before the row lock: the order every writer of
            # upstream_status keeps (see service.upstream.status). A change to a new
            # identifier takes that one's lock after the row's; that reverse order only
            # matters when identifiers change concurrently (two sites swapping them, or two
            # updates of one site), and PostgreSQL then aborts one transaction (deadlock
            # detected) rather than hang.
            identifier = await conn.fetchval(
                "SELECT grid_identifier FROM sites WHERE id = $1 AND org_id = $2",
                site_id,
                self._org_id,
            )
            if identifier is not None:
                await upstream_sync.lock_identifiers(conn, [identifier])
            current = await self._lock_site(conn, site_id)
            if current.fields.grid_identifier != identifier:
                # A concurrent update committed a change of identifier between the read and
                # the row lock: what follows is decided on the locked row, and its
                # identifier's lock is taken too (the reverse order again, see above).
                identifier = current.fields.grid_identifier
                if identifier is not None:
                    await upstream_sync.lock_identifiers(conn, [identifier])
            fields = change(current.fields)
            if fields.site_type is not None and fields.site_type != current.fields.site_type:
                await self._check_meters_allow(conn, site_id, fields.site_type)
            if fields.grid_identifier is not None and fields.grid_identifier != identifier:
                # Before the row takes the identifier: a CreateSite of it waits for this lock
                # before its INSERT, so it then meets the committed row (ALREADY_EXISTS)
                # rather than an uncommitted one while holding the lock (a deadlock).
                await upstream_sync.lock_identifiers(conn, [fields.grid_identifier])
            try:
                row = await conn.fetchrow(
                    """
                    UPDATE sites SET name = $3, external_id = $4, address = $5, latitude = $6,
                        longitude = $7, country = $8, timezone = $9, grid_identifier = $10,
                        primary_direction = $11, injection_grid_identifier = $12,
                        site_type = $13, balance_resolution = $14, updated_at = clock_timestamp()
                    WHERE id = $1 AND org_id = $2
                    RETURNING *
                    """,
                    site_id,
                    self._org_id,
                    *_site_columns(fields),
                )
            except asyncpg.UniqueViolationError:
                raise _duplicate_identifier(fields.grid_identifier, "site.") from None
            await notify_site_event(conn, site_id, SiteEventType.UPDATED)
            await _queue_moved_grid(conn, self._org_id, site_id, current.fields, fields)
            # A new identifier or time zone can change upstream_status (published after UPDATED).
            if fields.grid_identifier is None and identifier is not None:
                # The site left its supply points behind: nothing matches it any more.
                cleared = await conn.fetchrow(
                    """
                    UPDATE sites SET upstream_status = 'no_upstream_registered',
                        upstream_next_check_at = NULL
                    WHERE id = $1 AND upstream_status <> 'no_upstream_registered'
                    RETURNING *
                    """,
                    site_id,
                )
                if cleared is not None:
                    row = cleared
                    await notify_site_event(conn, site_id, SiteEventType.UPSTREAM_STATUS_CHANGED)
            elif fields.grid_identifier is not None and await upstream_sync.refresh_upstream_status(
                conn, [fields.grid_identifier], self._clock.now()
            ):
                row = await conn.fetchrow("SELECT * FROM sites WHERE id = $1", site_id)
        return SiteRecord.from_row(row)

    async def delete_site(self, site_id: SiteId) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            # The site's meters before the site (whose deletion cascades to them): the order
            # of a telemetry batch, which holds its meters and then needs the site (the
            # balancing queue's foreign key). Site first, a batch in flight and the deletion
            # would deadlock, and PostgreSQL would abort one of them; in the one order of
            # service.db.lock_order, for the same reason.
            await conn.execute(
                "SELECT FROM meters WHERE site_id = $1 AND org_id = $2"
                f" ORDER BY {METER_LOCK_ORDER} FOR UPDATE",
                site_id,
                self._org_id,
            )
            await self._lock_site(conn, site_id)
            await notify_site_event(conn, site_id, SiteEventType.DELETED)
            await conn.execute(
                "DELETE FROM sites WHERE id = $1 AND org_id = $2", site_id, self._org_id
            )

    async def set_paused(self, site_id: SiteId, paused: bool) -> SiteRecord:
        async with self._pool.acquire() as conn, conn.transaction():
            await self._lock_site(conn, site_id)
            await conn.execute(
                "UPDATE sites SET paused = $3 WHERE id = $1 AND org_id = $2 AND paused <> $3",
                site_id,
                self._org_id,
                paused,
            )
            return await self._refresh_status(conn, site_id)

    async def _check_meters_allow(
        self, conn: asyncpg.Connection, site_id: SiteId, site_type: SiteType
    ) -> None:
        """A field violation on ``site.type`` when a meter of the site measures in a way the
        type refuses: CreateMeter refuses such a meter, and a change of type must not make
        one. Meters are created under a share lock on the site, which the caller's lock
        excludes, so none comes in meanwhile."""
        refused = await conn.fetchrow(
            f"""
            SELECT id, measuring FROM meters
            WHERE site_id = $1 AND org_id = $2 AND NOT (measuring = ANY($3::text[]))
            ORDER BY {METER_LOCK_ORDER} LIMIT 1
            """,
            site_id,
            self._org_id,
            [str(measuring) for measuring in Measuring if measuring_allowed(site_type, measuring)],
        )
        if refused is not None:
            raise ValidationError.single(
                "site.type",
                f"{measuring_rule(site_type)}, and meter {refused['id']} of the site measures"
                f" {refused['measuring']}: change or delete that meter first",
            )

    async def _lock_site(self, conn: asyncpg.Connection, site_id: SiteId) -> SiteRecord:
        row = await conn.fetchrow(
            "SELECT * FROM sites WHERE id = $1 AND org_id = $2 FOR UPDATE", site_id, self._org_id
        )
        if row is None:
            raise NotFoundError("site", str(site_id))
        return SiteRecord.from_row(row)

    async def _refresh_status(self, conn: asyncpg.Connection, site_id: SiteId) -> SiteRecord:
        """Re-derives the status of a locked site; publishes STATUS_CHANGED when it moved."""
        row = await conn.fetchrow(
            """
            SELECT s.paused, s.status, (SELECT count(*) FROM resources r
                WHERE r.site_id = s.id AND r.resource_type <> $3) AS controllable
            FROM sites s WHERE s.id = $1 AND s.org_id = $2
            """,
            site_id,
            self._org_id,
            str(ResourceType.METER),
        )
        status = derive_site_status(row["paused"], row["controllable"])
        if status != row["status"]:
            await conn.execute(
                "UPDATE sites SET status = $2, updated_at = clock_timestamp() WHERE id = $1",
                site_id,
                str(status),
            )
            await notify_site_event(conn, site_id, SiteEventType.STATUS_CHANGED)
        return SiteRecord.from_row(
            await conn.fetchrow("SELECT * FROM sites WHERE id = $1", site_id)
        )

    # Resources

    async def create_resource(self, site_id: SiteId, fields: ResourceFields) -> ResourceRecord:
        assert fields.resource_type is not None
        async with self._pool.acquire() as conn, conn.transaction():
            await self._lock_site(conn, site_id)
            row = await conn.fetchrow(
                """
                INSERT INTO resources (org_id, site_id, resource_type, name, external_id,
                    power_min_kw, power_max_kw, capacity_min_kwh, capacity_max_kwh, webhook_url)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                RETURNING *
                """,
                self._org_id,
                site_id,
                str(fields.resource_type),
                *_resource_columns(fields),
            )
            await self._refresh_status(conn, site_id)
        return ResourceRecord.from_row(row)

    async def get_resource(self, resource_id: ResourceId) -> ResourceRecord:
        row = await self._reads.fetchrow(
            "SELECT * FROM resources WHERE id = $1 AND org_id = $2", resource_id, self._org_id
        )
        if row is None:
            raise NotFoundError("resource", str(resource_id))
        return ResourceRecord.from_row(row)

    async def list_resources(
        self, site_id: SiteId, after: Cursor | None, limit: int
    ) -> tuple[list[ResourceRecord], int]:
        rows, total = await list_site_children(
            self._pool, "resources", self._org_id, site_id, after, limit
        )
        return [ResourceRecord.from_row(row) for row in rows], total

    async def update_resource(
        self, resource_id: ResourceId, change: Callable[[ResourceFields], ResourceFields]
    ) -> ResourceRecord:
        async with self._pool.acquire() as conn, conn.transaction():
            current = await conn.fetchrow(
                "SELECT * FROM resources WHERE id = $1 AND org_id = $2 FOR UPDATE",
                resource_id,
                self._org_id,
            )
            if current is None:
                raise NotFoundError("resource", str(resource_id))
            fields = change(ResourceRecord.from_row(current).fields)
            row = await conn.fetchrow(
                """
                UPDATE resources SET name = $3, external_id = $4, power_min_kw = $5,
                    power_max_kw = $6, capacity_min_kwh = $7, capacity_max_kwh = $8,
                    webhook_url = $9, updated_at = clock_timestamp()
                WHERE id = $1 AND org_id = $2
                RETURNING *
                """,
                resource_id,
                self._org_id,
                *_resource_columns(fields),
            )
        return ResourceRecord.from_row(row)

    async def delete_resource(self, resource_id: ResourceId) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            site_id = await conn.fetchval(
                "SELECT site_id FROM resources WHERE id = $1 AND org_id = $2",
                resource_id,
                self._org_id,
            )
            if site_id is None:
                raise NotFoundError("resource", str(resource_id))
            await self._lock_site(conn, site_id)
            deleted = await conn.execute(
                "DELETE FROM resources WHERE id = $1 AND org_id = $2", resource_id, self._org_id
            )
            if deleted == "DELETE 0":
                # Deleted by a concurrent call between the lookup and the site lock.
                raise NotFoundError("resource", str(resource_id))
            await self._refresh_status(conn, site_id)
