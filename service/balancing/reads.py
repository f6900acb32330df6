"""Reading results: pages of aggregated balances and summaries over stored blocks.

A page lays out and reads output intervals only from its cursor on, at most ``page_size``
of them for summaries and windows sized to hold ``page_size`` rows for balances, so its
work is bounded by the page whatever the requested range: only the blocks of those
windows are read and summed (numpy over the decoded arrays).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import numpy as np

from service.balancing.aggregate import GRID, Aggregation, aggregate, pair_columns, totals
from service.balancing.calendar import (
    from_us,
    grid_starts,
    output_bounds,
    output_floor,
    output_next,
    output_range,
    to_us,
)
from service.balancing.store import (
    SiteInfo,
    load_block_totals,
    load_blocks,
    load_consumer_blocks,
)
from service.common.errors import ValidationError
from service.db.pagination import (
    decode_token_body,
    encode_token_body,
    filters_fingerprint,
    page_size_or_default,
)

# Output intervals that are unions of whole blocks (local days or months).
WHOLE_BLOCKS = frozenset({"P1D", "P1M"})
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000


def balances_page_size(page_size: int) -> int:
    return page_size_or_default(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)


def _decode(token: str, fingerprint: str) -> dict[str, Any] | None:
    body = decode_token_body(token, fingerprint)
    if body is None:
        return None
    start_us = body.get("s")
    # A forged token (the fingerprint is no secret) must not reach numpy with an integer
    # beyond int64, nor bring other types where the cursor's ids are read.
    if (
        not isinstance(start_us, int)
        or isinstance(start_us, bool)
        or not -(2**63) <= start_us < 2**63
        or not all(isinstance(body.get(key, ""), str) for key in ("c", "d"))
    ):
        raise ValidationError.single("page_token", "must be a next_page_token this API returned")
    return body


@dataclass(frozen=True)
class BalanceRows:
    """Rows of one window, columnar (a page has one or more): row ``r`` is the interval
    ``[bounds_us[intervals[r]], bounds_us[intervals[r] + 1])``, the pair ``pairs[r]`` of
    ``creditors`` / ``debitors``, ``energy_wh[r]`` and ``complete[r]``. Columns are plain
    lists: a page of 10,000 rows is then one pass of the servicer, no object per row."""

    bounds_us: list[int]
    creditors: list[str]
    debitors: list[str]
    intervals: list[int]
    pairs: list[int]
    energy_wh: list[int]
    complete: list[bool]

    def __len__(self) -> int:
        return len(self.intervals)

    def truncated(self, size: int) -> BalanceRows:
        return BalanceRows(
            self.bounds_us,
            self.creditors,
            self.debitors,
            self.intervals[:size],
            self.pairs[:size],
            self.energy_wh[:size],
            self.complete[:size],
        )


@dataclass(frozen=True)
class SummaryRow:
    interval_start: datetime
    interval_end: datetime
    production_wh: int
    demand_wh: int
    shared_wh: int
    feed_in_wh: int
    grid_supply_wh: int
    balance_intervals: int
    complete_intervals: int


async def _window(
    pool: asyncpg.Pool,
    site: SiteInfo,
    bounds: np.ndarray,
    producers: set[UUID] | None,
    consumers: set[UUID] | None,
    whole_blocks: bool,
) -> Aggregation:
    start, end = from_us(int(bounds[0])), from_us(int(bounds[-1]))
    one_consumer = None
    if consumers is not None and len(consumers) == 1 and producers is None:
        (one_consumer,) = consumers
    if whole_blocks:
        # Days and months hold whole blocks: their totals are all that is needed.
        blocks = await load_block_totals(pool, site.org_id, site.id, start, end, one_consumer)
    elif one_consumer is not None:
        blocks = await load_consumer_blocks(pool, site.org_id, site.id, start, end, one_consumer)
    else:
        blocks = await load_blocks(pool, site.org_id, site.id, start, end)
    grid = grid_starts(start, end, site.timezone, site.resolution)
    return aggregate(blocks, bounds, grid, producers, consumers)


async def _next_data(
    pool: asyncpg.Pool, site: SiteInfo, after_us: int, creditor: str | None, debitor: str | None
) -> int | None:
    """Start of the first stored block ending after ``after_us`` that can hold a row under
    the filters: one with the filtered meters on their sides (GRID: any producer or
    consumer on the other side), so the days before a meter joined are jumped over."""
    conditions = ["site_id = $1", "org_id = $2", "block_end > $3"]
    args: list[Any] = [site.id, site.org_id, from_us(after_us)]
    for meter, side, other in (
        (creditor, "producer_ids", "consumer_ids"),
        (debitor, "consumer_ids", "producer_ids"),
    ):
        if meter == GRID:
            conditions.append(f"cardinality({other}) > 0")
        elif meter is not None:
            args.append(UUID(meter))
            conditions.append(f"${len(args)}::uuid = ANY({side})")
    value: datetime | None = await pool.fetchval(
        f"SELECT min(block_start) FROM balance_blocks WHERE {' AND '.join(conditions)}", *args
    )
    return to_us(value) if value is not None else None


def _cursor_start(
    cursor_us: int, first: datetime, last_end: datetime, site: SiteInfo, interval: str
) -> datetime | None:
    """Start of the output interval holding a cursor's instant, inside the request's
    range (None: at or after its end). Clamped first, so that a forged instant never
    leaves datetime's range."""
    if cursor_us >= to_us(last_end):
        return None
    if cursor_us <= to_us(first):
        return first
    return output_floor(from_us(cursor_us), site.timezone, interval)


async def balances_page(
    pool: asyncpg.Pool,
    site: SiteInfo,
    start: datetime,
    end: datetime,
    interval: str,
    creditor: str | None,
    debitor: str | None,
    limit: int,
    page_token: str,
) -> tuple[list[BalanceRows], str]:
    """One page of rows from the cursor on: windows of output intervals sized to hold the
    page, read one after the other until ``limit + 1`` rows (the last only says that there
    is more), each window's output intervals laid out from its own start."""
    fingerprint = filters_fingerprint("balances", site.id, start, end, interval, creditor, debitor)
    cursor = _decode(page_token, fingerprint)
    first, last_end = output_range(start, end, site.timezone, interval)
    last_end_us = to_us(last_end)
    position: datetime | None = first
    after: tuple[str, str] | None = None
    if cursor is not None:
        position = _cursor_start(int(cursor["s"]), first, last_end, site, interval)
        after = (str(cursor.get("c", "")), str(cursor.get("d", "")))
    if position is None or (creditor is not None and creditor == debitor):
        return [], ""  # no meter (nor GRID) is its own creditor
    producers = {UUID(creditor)} if creditor not in (None, GRID) else None
    consumers = {UUID(debitor)} if debitor not in (None, GRID) else None
    if creditor == GRID:
        producers = set()
    if debitor == GRID:
        consumers = set()
    per_interval = await _pairs_per_interval(pool, site, to_us(position), creditor, debitor)
    # Enough output intervals for a page, with one to spare; more windows if they fall short.
    span = max(1, -(-(limit + 1) // per_interval) + 1)
    windows: list[BalanceRows] = []
    count = 0
    while to_us(position) < last_end_us and count <= limit:
        bounds = output_bounds(position, last_end, site.timezone, interval, span)
        agg = await _window(pool, site, bounds, producers, consumers, interval in WHOLE_BLOCKS)
        window_end = int(bounds[-1])
        pairs = pair_columns(agg, creditor, debitor)
        intervals, columns = np.nonzero(pairs.present)
        if after is not None and len(intervals):
            # The cursor's own interval: only the pairs after the cursor's pair.
            later = np.array(
                [(c, d) > after for c, d in zip(pairs.creditors, pairs.debitors, strict=True)],
                dtype=np.bool_,
            )
            keep = (intervals > 0) | later[columns]
            intervals, columns = intervals[keep], columns[keep]
        take = limit + 1 - count
        intervals, columns = intervals[:take], columns[:take]
        if len(intervals):
            windows.append(
                BalanceRows(
                    agg.bounds.tolist(),
                    pairs.creditors,
                    pairs.debitors,
                    intervals.tolist(),
                    columns.tolist(),
                    pairs.values[intervals, columns].tolist(),
                    agg.complete[intervals].tolist(),
                )
            )
            count += len(intervals)
        elif window_end < last_end_us:
            # No row in this window: jump to the next stored block that can hold one.
            upcoming = await _next_data(pool, site, window_end, creditor, debitor)
            if upcoming is None:
                break
            ahead = output_floor(from_us(upcoming), site.timezone, interval)
            window_end = max(window_end, to_us(ahead))
        after = None
        position = from_us(window_end)
    if count <= limit:
        return windows, ""
    # The row after the page's last one says only that there is more: dropped, and with it
    # its window when that row was all it held.
    last = windows.pop()
    if len(last) > 1:
        windows.append(last.truncated(len(last) - 1))
    last = windows[-1]
    row = len(last) - 1
    token = encode_token_body(
        {
            "s": last.bounds_us[last.intervals[row]],
            "c": last.creditors[last.pairs[row]],
            "d": last.debitors[last.pairs[row]],
        },
        fingerprint,
    )
    return windows, token


def rows_per_interval(
    producer_ids: Sequence[UUID],
    consumer_ids: Sequence[UUID],
    creditor: str | None,
    debitor: str | None,
) -> int:
    """Rows an output interval with these meters holds under the filters, as
    :func:`pair_columns` lists them (never a meter to itself), at least 1. A filtered meter
    missing from them is counted as if it took part (it may join later)."""
    producers, consumers = {str(m) for m in producer_ids}, {str(m) for m in consumer_ids}
    p, c = len(producers), len(consumers)
    if creditor is not None and debitor is not None:
        return 1
    if creditor == GRID:
        return max(1, c)
    if debitor == GRID:
        return max(1, p)
    if creditor is not None:
        return c - (creditor in consumers) + 1
    if debitor is not None:
        return p - (debitor in producers) + 1
    return max(1, p * c - len(producers & consumers) + p + c)


async def _pairs_per_interval(
    pool: asyncpg.Pool,
    site: SiteInfo,
    from_us_value: int,
    creditor: str | None,
    debitor: str | None,
) -> int:
    """Rows one output interval is likely to hold under the filters, from the meters of the
    first stored block at or after ``from_us_value`` (sizes a page's window)."""
    row = await pool.fetchrow(
        "SELECT producer_ids, consumer_ids "
        "FROM balance_blocks WHERE site_id = $1 AND org_id = $2 AND block_end > $3 "
        "ORDER BY block_start LIMIT 1",
        site.id,
        site.org_id,
        from_us(int(from_us_value)),
    )
    if row is None:
        return 1
    return rows_per_interval(
        row["producer_ids"] or [], row["consumer_ids"] or [], creditor, debitor
    )


async def summaries_page(
    pool: asyncpg.Pool,
    site: SiteInfo,
    start: datetime,
    end: datetime,
    interval: str,
    limit: int,
    page_token: str,
) -> tuple[list[SummaryRow], str]:
    fingerprint = filters_fingerprint("summaries", site.id, start, end, interval)
    cursor = _decode(page_token, fingerprint)
    first, last_end = output_range(start, end, site.timezone, interval)
    position: datetime | None = first
    if cursor is not None:
        # The cursor is the page's last summary: this page starts after it.
        position = _cursor_start(int(cursor["s"]), first, last_end, site, interval)
        if position is not None and to_us(position) >= int(cursor["s"]):
            position = output_next(position, site.timezone, interval)
    if position is None or position >= last_end:
        return [], ""
    bounds = output_bounds(position, last_end, site.timezone, interval, limit)
    agg = await _window(pool, site, bounds, None, None, interval in WHOLE_BLOCKS)
    sums = totals(agg)
    rows = [
        SummaryRow(
            from_us(int(agg.bounds[i])),
            from_us(int(agg.bounds[i + 1])),
            int(sums.production_wh[i]),
            int(sums.demand_wh[i]),
            int(sums.shared_wh[i]),
            int(sums.feed_in_wh[i]),
            int(sums.grid_supply_wh[i]),
            int(agg.balance_intervals[i]),
            int(agg.complete_intervals[i]),
        )
        for i in range(len(agg.bounds) - 1)
    ]
    if int(bounds[-1]) >= to_us(last_end):
        return rows, ""
    return rows, encode_token_body({"s": to_us(rows[-1].interval_start)}, fingerprint)
