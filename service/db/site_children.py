"""One page of a site's child rows (resources, meters), scoped to the owning organization."""

from __future__ import annotations

from typing import Literal
from uuid import UUID

import asyncpg

from service.common.errors import NotFoundError
from service.db.keyset import keyset_page
from service.db.pagination import Cursor

ChildTable = Literal["resources", "meters"]


async def list_site_children(
    pool: asyncpg.Pool,
    table: ChildTable,
    org_id: UUID,
    site_id: UUID,
    after: Cursor | None,
    limit: int,
) -> tuple[list[asyncpg.Record], int]:
    """Rows after ``after`` in (created_at, id) order and how many the site has in all; an
    unknown or another organization's site is NOT_FOUND. One snapshot for page and count."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        if not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM sites WHERE id = $1 AND org_id = $2)", site_id, org_id
        ):
            raise NotFoundError("site", str(site_id))
        return await keyset_page(
            conn,
            f"SELECT * FROM {table} WHERE site_id = $1 AND org_id = $2",
            [site_id, org_id],
            after,
            limit,
        )
