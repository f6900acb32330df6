"""Summing stored blocks into output intervals (PT15M, PT1H, P1D, P1M). No I/O.

Every output interval is a union of whole balance intervals (it is never finer than the
site's resolution, and days and months follow the site's time zone like the blocks), so
its sums are exact integer sums of the balance intervals inside it: aggregating the PT15M
results gives exactly the coarser ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

import numpy as np
from numpy.typing import NDArray

from service.balancing.blocks import Block

GRID = "GRID"


@dataclass
class Aggregation:
    bounds: NDArray[np.int64]  # [n + 1] output interval starts, then the last one's end
    balance_intervals: NDArray[np.int64]  # [n] grid intervals of the site inside each
    complete_intervals: NDArray[np.int64]  # [n] of those, stored and balanced
    producer_ids: list[UUID]
    consumer_ids: list[UUID]
    shared_wh: NDArray[np.int64]  # [n, P, C]
    feed_in_wh: NDArray[np.int64]  # [n, P]
    grid_supply_wh: NDArray[np.int64]  # [n, C]
    producer_present: NDArray[np.bool_]  # [n, P] the meter took part in the interval
    consumer_present: NDArray[np.bool_]  # [n, C]
    # [n, P, C] the two took part together (in one block) in the interval: each may have
    # taken part in it without the other (settings that end or start inside a day or month).
    pair_present: NDArray[np.bool_]

    @property
    def complete(self) -> NDArray[np.bool_]:
        result: NDArray[np.bool_] = (self.complete_intervals == self.balance_intervals) & (
            self.balance_intervals > 0
        )
        return result


def output_index(bounds: NDArray[np.int64], starts: NDArray[np.int64]) -> NDArray[np.intp]:
    """Output interval of each balance interval start (-1 or n when outside)."""
    result: NDArray[np.intp] = np.searchsorted(bounds, starts, side="right") - 1
    return result


def aggregate(
    blocks: Sequence[Block],
    bounds: NDArray[np.int64],
    grid: NDArray[np.int64],
    producers: set[UUID] | None = None,
    consumers: set[UUID] | None = None,
) -> Aggregation:
    """Sums ``blocks`` into the output intervals ``bounds``; ``grid`` are all balance
    interval starts of the site in ``[bounds[0], bounds[-1])`` (stored or not), which
    count ``balance_intervals``. ``producers`` / ``consumers`` keep only those columns."""
    n = len(bounds) - 1
    producer_ids = sorted(
        {m for b in blocks for m in b.producer_ids if producers is None or m in producers}
    )
    consumer_ids = sorted(
        {m for b in blocks for m in b.consumer_ids if consumers is None or m in consumers}
    )
    p_index = {m: i for i, m in enumerate(producer_ids)}
    c_index = {m: i for i, m in enumerate(consumer_ids)}
    p_all, c_all = len(producer_ids), len(consumer_ids)
    shared = np.zeros((n, p_all, c_all), dtype=np.int64)
    feed_in = np.zeros((n, p_all), dtype=np.int64)
    grid_supply = np.zeros((n, c_all), dtype=np.int64)
    producer_present = np.zeros((n, p_all), dtype=np.bool_)
    consumer_present = np.zeros((n, c_all), dtype=np.bool_)
    pair_present = np.zeros((n, p_all, c_all), dtype=np.bool_)
    complete = np.zeros(n, dtype=np.int64)
    grid_index = output_index(bounds, grid)
    inside = (grid_index >= 0) & (grid_index < n)
    balance_intervals = np.bincount(grid_index[inside], minlength=n).astype(np.int64)[:n]

    for block in blocks:
        index = output_index(bounds, block.interval_starts)
        keep = (index >= 0) & (index < n)
        if not keep.any():
            continue
        rows = np.flatnonzero(keep)
        index = index[rows]
        # Balance intervals are sorted, so each output interval is one run of rows.
        outputs, first = np.unique(index, return_index=True)
        counts = (
            block.complete[rows] if block.complete_counts is None else block.complete_counts[rows]
        )
        complete += np.bincount(index, weights=counts, minlength=n).astype(np.int64)[:n]
        p_cols = np.array(
            [i for i, m in enumerate(block.producer_ids) if m in p_index], dtype=np.intp
        )
        c_cols = np.array(
            [i for i, m in enumerate(block.consumer_ids) if m in c_index], dtype=np.intp
        )
        p_to = np.array([p_index[block.producer_ids[i]] for i in p_cols], dtype=np.intp)
        c_to = np.array([c_index[block.consumer_ids[i]] for i in c_cols], dtype=np.intp)
        if len(p_cols):
            feed = np.add.reduceat(block.feed_in_wh[np.ix_(rows, p_cols)], first, axis=0)
            feed_in[np.ix_(outputs, p_to)] += feed
            producer_present[np.ix_(outputs, p_to)] = True
        if len(c_cols):
            supply = np.add.reduceat(block.grid_supply_wh[np.ix_(rows, c_cols)], first, axis=0)
            grid_supply[np.ix_(outputs, c_to)] += supply
            consumer_present[np.ix_(outputs, c_to)] = True
        if len(p_cols) and len(c_cols):
            cells = block.shared_wh[np.ix_(rows, p_cols, c_cols)]
            shared[np.ix_(outputs, p_to, c_to)] += np.add.reduceat(cells, first, axis=0)
            pair_present[np.ix_(outputs, p_to, c_to)] = True
    return Aggregation(
        bounds,
        balance_intervals,
        complete,
        producer_ids,
        consumer_ids,
        shared,
        feed_in,
        grid_supply,
        producer_present,
        consumer_present,
        pair_present,
    )


@dataclass(frozen=True)
class PairColumns:
    """The creditor -> debitor rows of an aggregation, in (creditor, debitor) text order:
    ``values`` and ``present`` are [n, K]."""

    creditors: list[str]
    debitors: list[str]
    values: NDArray[np.int64]
    present: NDArray[np.bool_]


def pair_columns(agg: Aggregation, creditor: str | None, debitor: str | None) -> PairColumns:
    """Every creditor -> debitor pair of ``agg`` that matches the filters (None = any):
    producer -> consumer (never a meter to itself), producer -> GRID (feed-in) and
    GRID -> consumer (grid supply)."""
    names: list[tuple[str, str]] = []
    columns: list[NDArray[np.int64]] = []
    presence: list[NDArray[np.bool_]] = []
    producers = [str(m) for m in agg.producer_ids]
    consumers = [str(m) for m in agg.consumer_ids]

    def wanted(cred: str, deb: str) -> bool:
        return (creditor is None or creditor == cred) and (debitor is None or debitor == deb)

    for p, cred in enumerate(producers):
        for c, deb in enumerate(consumers):
            if cred != deb and wanted(cred, deb):
                names.append((cred, deb))
                columns.append(agg.shared_wh[:, p, c])
                presence.append(agg.pair_present[:, p, c])
        if wanted(cred, GRID):
            names.append((cred, GRID))
            columns.append(agg.feed_in_wh[:, p])
            presence.append(agg.producer_present[:, p])
    for c, deb in enumerate(consumers):
        if wanted(GRID, deb):
            names.append((GRID, deb))
            columns.append(agg.grid_supply_wh[:, c])
            presence.append(agg.consumer_present[:, c])
    order = sorted(range(len(names)), key=lambda k: names[k])
    n = len(agg.bounds) - 1
    if not order:
        return PairColumns([], [], np.zeros((n, 0), np.int64), np.zeros((n, 0), np.bool_))
    return PairColumns(
        [names[k][0] for k in order],
        [names[k][1] for k in order],
        np.stack([columns[k] for k in order], axis=1),
        np.stack([presence[k] for k in order], axis=1),
    )


@dataclass(frozen=True)
class Totals:
    production_wh: NDArray[np.int64]
    demand_wh: NDArray[np.int64]
    shared_wh: NDArray[np.int64]
    feed_in_wh: NDArray[np.int64]
    grid_supply_wh: NDArray[np.int64]


def totals(agg: Aggregation) -> Totals:
    shared = agg.shared_wh.sum(axis=(1, 2))
    feed_in = agg.feed_in_wh.sum(axis=1)
    grid_supply = agg.grid_supply_wh.sum(axis=1)
    return Totals(shared + feed_in, shared + grid_supply, shared, feed_in, grid_supply)
