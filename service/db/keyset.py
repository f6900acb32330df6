"""One page of rows in (created_at, id) order, and how many rows match in all."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from service.db.pagination import Cursor


async def keyset_page(
    conn: asyncpg.Connection,
    matching: str,
    args: Sequence[Any],
    after: Cursor | None,
    limit: int,
) -> tuple[list[asyncpg.Record], int]:
    """The first ``limit`` rows of the query ``matching`` (its parameters ``args``) after
    ``after``, and the count of all its rows. Run it in a repeatable-read transaction so
    page and count come from one snapshot. ``matching`` must be scoped to the caller's
    organization: nothing is added here but the page."""
    page_args = [*args, limit]
    page = ""
    if after is not None:
        page_args += [after.created_at, after.id]
        n = len(page_args)
        page = f"WHERE (m.created_at, m.id) > (${n - 1}, ${n})"
    rows = await conn.fetch(
        f"SELECT * FROM ({matching}) m {page} ORDER BY m.created_at, m.id LIMIT ${len(args) + 1}",
        *page_args,
    )
    total: int = await conn.fetchval(f"SELECT count(*) FROM ({matching}) m", *args)
    return list(rows), total
