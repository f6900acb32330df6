"""Re-balancing a site's time ranges inside the caller's transaction.

Used by the queue worker and by ``RunBalancing``; both hold :func:`lock_site_results` for
the site first, so the energy read here is never older than what a previous holder wrote.
Only the intervals inside the ranges are recomputed: a stored block with the same meters
and grid keeps its other intervals, so a late correction re-balances just what it touched.
After a change of the site's time zone or resolution, the stored blocks of the old grid
that the written ones overlap are replaced in the same transaction: a reader sees either
grid's results, never both, never neither.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import UUID

import asyncpg
import numpy as np
from numpy.typing import NDArray

from service.balancing.blocks import (
    Block,
    Direction,
    Participant,
    PreparedIntervals,
    allocate_prepared,
    empty_block,
    layout,
    prepare_intervals,
)
from service.balancing.calendar import (
    TimeRange,
    block_day,
    blocks_cover,
    from_us,
    grid_starts,
    iter_blocks,
    merge_ranges,
    take_in_off_grid_blocks,
    to_us,
)
from service.balancing.domain import Policy, Setting, method_on, participants_on
from service.balancing.engine import MAX_INTERVAL_WH, AllocationMethod
from service.balancing.store import (
    MeterRow,
    SiteInfo,
    delete_blocks,
    delete_blocks_in,
    load_blocks,
    replace_blocks,
    site_meters,
    site_policies,
    site_settings,
    stored_blocks,
)
from service.common.loglimit import LogLimiter, held_back
from service.telemetry.energy import SiteIntervalEnergy
from service.telemetry.energy_store import site_interval_energy

log = logging.getLogger(__name__)

# Blocks whose energy is read with one query: bounds memory (a month of 100 meters is
# ~3,000 intervals x 100 columns) while a site-year still takes a dozen reads.
CHUNK_SPAN = timedelta(days=31)


@dataclass
class RebalanceResult:
    balanced: int = 0
    # Not balanced: a participant's energy missing, or out of the engine's exact range ...
    incomplete: int = 0
    # ... of which out of range (see service.balancing.blocks), the first starting at:
    out_of_range: int = 0
    first_out_of_range: datetime | None = None
    ranges: list[TimeRange] = field(default_factory=list)

    def add(self, other: RebalanceResult) -> None:
        """Adds the counts of ``other`` (not its ranges)."""
        self.balanced += other.balanced
        self.incomplete += other.incomplete
        self.out_of_range += other.out_of_range
        if other.first_out_of_range is not None and (
            self.first_out_of_range is None or other.first_out_of_range < self.first_out_of_range
        ):
            self.first_out_of_range = other.first_out_of_range


@dataclass
class _Plan:
    block: Block
    rows: NDArray[np.intp]
    ends: NDArray[np.int64]
    method: AllocationMethod
    participants: list[Participant]
    # The block's intervals inside the requested ranges: what the counts report (a block
    # whose layout changed is recomputed whole, but only these were asked for).
    wanted: NDArray[np.bool_]


async def rebalance(
    conn: asyncpg.Connection,
    site: SiteInfo,
    ranges: Iterable[TimeRange],
    *,
    overlapping: bool = False,
) -> RebalanceResult:
    """Re-balances the site's intervals that start in ``ranges`` (``RunBalancing``'s
    rule), or with ``overlapping`` every interval a range overlaps.

    The queue's ranges are re-balanced by overlap: a range queued on a grid other than the
    site's current one (a replica's cached grid stale after UpdateSite) or clipped to a
    settings range that starts inside an interval may hold no interval start, and by the
    start rule would re-balance nothing while its queue row is deleted.
    """
    merged = merge_ranges(ranges)
    if not merged:
        return RebalanceResult()
    # The participants first, held until the commit (FOR KEY SHARE, in the meters' lock
    # order): before any result row is deleted here, which a DeleteSite (holding the
    # meters, then the site) would otherwise wait for while this waited for the meters.
    meters = await site_meters(conn, site.org_id, site.id)
    if not site.balanced:
        # Not (or no longer) balanced: no results at all.
        for start, end in merged:
            await delete_blocks_in(conn, site.org_id, site.id, start, end)
        return RebalanceResult(ranges=merged)
    merged = await _replace_off_grid_blocks(conn, site, merged)
    result = RebalanceResult(ranges=merged)
    settings = await site_settings(conn, site.org_id, site.id)
    policies = await site_policies(conn, site.org_id, site.id)

    # Block start -> (block end, the ranges touching it), ascending.
    touched: dict[datetime, tuple[datetime, list[TimeRange]]] = {}
    for start, end in merged:
        for block_start, block_end in iter_blocks(start, end, site.timezone, site.resolution):
            touched.setdefault(block_start, (block_end, []))[1].append((start, end))
    chunks: list[list[datetime]] = []
    for block_start in sorted(touched):
        if not chunks or block_start - chunks[-1][0] >= CHUNK_SPAN:
            chunks.append([])
        chunks[-1].append(block_start)
    # A pipeline: while the engine allocates one chunk in a worker thread (numpy releases
    # the GIL), the next chunk's stored blocks and energy are read from PostgreSQL, and the
    # finished chunk's blocks are written once its allocation is done.
    computing: tuple[asyncio.Future[RebalanceResult], _Chunk] | None = None
    for chunk in chunks:
        planned = await _plan_chunk(
            conn, site, chunk, touched, settings, policies, meters, overlapping
        )
        if computing is not None:
            await _finish(conn, site, computing, result)
        computing = (asyncio.ensure_future(asyncio.to_thread(_compute, planned)), planned)
    if computing is not None:
        await _finish(conn, site, computing, result)
    if result.out_of_range:
        _log_out_of_range(site, result)
    return result


# One line per site a minute: RunBalancing may be called again and again on the same data.
_out_of_range_log = LogLimiter(60.0)


def _log_out_of_range(site: SiteInfo, result: RebalanceResult) -> None:
    dropped = _out_of_range_log.admit(site.id)
    if dropped is None:
        return
    first = result.first_out_of_range.isoformat() if result.first_out_of_range else "?"
    log.warning(
        "site %s: %d interval(s) not balanced, the first at %s: a participant's energy or "
        "the interval's total exceeds %d Wh, the range balancing computes exactly (readings "
        "stored before ingest bounded them, a register jump or a transformer factor); they "
        "stay incomplete until the readings are corrected%s",
        site.id,
        result.out_of_range,
        first,
        MAX_INTERVAL_WH,
        held_back(dropped),
    )


async def _replace_off_grid_blocks(
    conn: asyncpg.Connection, site: SiteInfo, merged: list[TimeRange]
) -> list[TimeRange]:
    """After a change of the site's time zone or resolution, stored blocks of the old grid
    overlap the blocks about to be written: they are deleted here, in the transaction that
    writes their replacement, and ``merged`` grows to every current block covering them
    (:func:`take_in_off_grid_blocks`). Usually no old block near ``merged`` overlaps what
    is written and this costs one small read; only when one does are all the site's read
    (the run of old blocks it starts may reach beyond)."""
    near = await stored_blocks(
        conn,
        site.org_id,
        site.id,
        *blocks_cover(merged[0][0], merged[-1][1], site.timezone, site.resolution),
    )
    # An old block in a gap between the ranges overlaps nothing written: left for its own
    # re-balancing, it need not cost the full read on every pass.
    if not take_in_off_grid_blocks(merged, near, site.timezone, site.resolution)[1]:
        return merged
    everywhere = await stored_blocks(conn, site.org_id, site.id)
    extended, off_grid = take_in_off_grid_blocks(merged, everywhere, site.timezone, site.resolution)
    await delete_blocks(conn, site.org_id, site.id, off_grid)
    return extended


@dataclass
class _Chunk:
    plans: list[_Plan]
    removed: list[datetime]
    energy: SiteIntervalEnergy | None


async def _finish(
    conn: asyncpg.Connection,
    site: SiteInfo,
    computing: tuple[asyncio.Future[RebalanceResult], _Chunk],
    result: RebalanceResult,
) -> None:
    future, chunk = computing
    result.add(await future)
    await replace_blocks(conn, site.org_id, site.id, [p.block for p in chunk.plans], chunk.removed)


async def _plan_chunk(
    conn: asyncpg.Connection,
    site: SiteInfo,
    chunk: Sequence[datetime],
    touched: dict[datetime, tuple[datetime, list[TimeRange]]],
    settings: Sequence[Setting],
    policies: Sequence[Policy],
    meters: dict[UUID, MeterRow],
    overlapping: bool,
) -> _Chunk:
    """The blocks of ``chunk`` to re-balance (stored ones reused when their layout holds),
    the stored blocks to remove, and the energy of their intervals: the database part."""
    chunk_end = touched[chunk[-1]][0]
    stored = {
        b.start: b for b in await load_blocks(conn, site.org_id, site.id, chunk[0], chunk_end)
    }
    plans: list[_Plan] = []
    removed: list[datetime] = []
    for block_start in chunk:
        block_end, block_ranges = touched[block_start]
        day = block_day(block_start, site.timezone)
        participants = []
        for setting in participants_on(settings, day):
            meter = meters.get(setting.meter_id)
            if meter is None:
                continue
            participants.append(
                Participant(
                    meter.id,
                    Direction(meter.direction),
                    to_us(meter.start_date),
                    to_us(meter.end_date) if meter.end_date is not None else None,
                    setting.tier,
                    setting.share,
                )
            )
        if not participants:
            if block_start in stored:
                removed.append(block_start)
            continue
        grid = grid_starts(block_start, block_end, site.timezone, site.resolution)
        if len(grid) == 0:
            continue
        ends = np.append(grid[1:], np.int64(to_us(block_end)))
        wanted = np.zeros(len(grid), dtype=np.bool_)
        for start, end in block_ranges:
            if overlapping:
                wanted |= (grid < to_us(end)) & (ends > to_us(start))
            else:
                wanted |= (grid >= to_us(start)) & (grid < to_us(end))
        rows = np.flatnonzero(wanted)
        if len(rows) == 0:
            continue
        producer_ids, consumer_ids = layout(participants)
        fresh = empty_block(block_start, block_end, grid, producer_ids, consumer_ids)
        block = stored.get(block_start)
        if block is None or not block.same_layout(fresh):
            # New meters, settings or grid: the whole block, not only the touched intervals.
            block = fresh
            rows = np.arange(len(grid))
        method = method_on(policies, day)
        plans.append(_Plan(block, rows, ends, method, participants, wanted))
    if not plans:
        return _Chunk(plans, removed, None)
    span_start = min(int(p.block.interval_starts[p.rows[0]]) for p in plans)
    span_end = max(int(p.ends[p.rows[-1]]) for p in plans)
    meter_ids = sorted({m.meter_id for p in plans for m in p.participants})
    energy = await site_interval_energy(
        conn, site.org_id, site.id, from_us(span_start), from_us(span_end), meter_ids
    )
    return _Chunk(plans, removed, energy)


def _compute(chunk: _Chunk) -> RebalanceResult:
    """Balances the planned intervals of a chunk in place (CPU only, no I/O, so it may run
    in a worker thread); the counts of the intervals asked for."""
    counts = RebalanceResult()
    energy = chunk.energy
    if energy is None:
        return counts
    column: dict[UUID, int] = {meter_id: i for i, meter_id in enumerate(energy.meter_ids)}
    known = energy.interval_starts
    groups: dict[tuple[object, ...], list[PreparedIntervals]] = {}
    for plan in chunk.plans:
        starts = plan.block.interval_starts[plan.rows]
        index = np.searchsorted(known, starts)
        found = index < len(known)
        found[found] = known[index[found]] == starts[found]
        width = len(energy.meter_ids)
        imports = np.full((len(starts), width), np.nan)
        exports = np.full((len(starts), width), np.nan)
        imports[found] = energy.import_wh[index[found]]
        exports[found] = energy.export_wh[index[found]]
        ready = prepare_intervals(
            plan.block,
            plan.rows,
            plan.ends,
            plan.method,
            plan.participants,
            column,
            imports,
            exports,
        )
        groups.setdefault(ready.key, []).append(ready)
        asked = plan.wanted[plan.rows]
        counts.balanced += int(ready.complete_rows[asked].sum())
        counts.incomplete += int((~ready.complete_rows[asked]).sum())
        out_of_range = np.flatnonzero(ready.out_of_range_rows & asked)
        if out_of_range.size:
            first = from_us(int(starts[out_of_range[0]]))
            counts.add(
                RebalanceResult(out_of_range=int(out_of_range.size), first_out_of_range=first)
            )
    for group in groups.values():
        allocate_prepared(group)
    return counts
