"""One block of results (a site's local day, or month for P1M sites): how it is computed
from interval energy, and how it is packed into its ``balance_blocks`` row. No I/O.

Per balance interval: an interval where any participant in service lacks its energy (a
missing reading or register) is *incomplete*: not balanced, its cells stay 0, and it is
balanced once the reading arrives. So is an interval whose energy lies outside what the
engine computes exactly (:func:`~service.balancing.engine.within_exact_range`: a meter's
energy or the interval's total production or demand above ``MAX_INTERVAL_WH``): values
stored before ingest bounded them, a register jump or a huge transformer factor. It is
counted as *out of range* and balanced once the readings are corrected; the other
intervals are balanced as usual. A meter out of service (before its start or from its
end) takes part with zero energy, which the engine treats as absence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from uuid import UUID

import numpy as np
from numpy.typing import NDArray

from service.balancing.calendar import to_us
from service.balancing.engine import (
    AllocationMethod,
    BalancingInput,
    allocate,
    round_energy_wh,
    within_exact_range,
)

_INT = np.dtype("<i8")


class Direction(StrEnum):
    CONSUMER = "consumer"
    PRODUCER = "producer"
    BIDIRECTIONAL = "bidirectional"


@dataclass(frozen=True)
class Participant:
    """A meter with a PARTICIPANT setting on the block's day."""

    meter_id: UUID
    direction: Direction
    # The meter's service period, UTC microseconds (end None: open).
    start_us: int
    end_us: int | None
    tier: int
    share: float | None

    @property
    def produces(self) -> bool:
        return self.direction is not Direction.CONSUMER

    @property
    def consumes(self) -> bool:
        return self.direction is not Direction.PRODUCER


@dataclass
class Block:
    start: datetime
    end: datetime
    interval_starts: NDArray[np.int64]  # [T]
    complete: NDArray[np.bool_]  # [T]
    producer_ids: tuple[UUID, ...]
    consumer_ids: tuple[UUID, ...]
    shared_wh: NDArray[np.int64]  # [T, P, C]
    feed_in_wh: NDArray[np.int64]  # [T, P]
    grid_supply_wh: NDArray[np.int64]  # [T, C]
    # Set on a block read as its totals only (T = 1, the block's start): the number of its
    # intervals that were complete. None: ``complete`` counts one interval per row.
    complete_counts: NDArray[np.int64] | None = None

    def same_layout(self, other: Block) -> bool:
        return (
            self.producer_ids == other.producer_ids
            and self.consumer_ids == other.consumer_ids
            and np.array_equal(self.interval_starts, other.interval_starts)
        )


def empty_block(
    start: datetime,
    end: datetime,
    interval_starts: NDArray[np.int64],
    producer_ids: tuple[UUID, ...],
    consumer_ids: tuple[UUID, ...],
) -> Block:
    t, p, c = len(interval_starts), len(producer_ids), len(consumer_ids)
    return Block(
        start,
        end,
        interval_starts,
        np.zeros(t, dtype=np.bool_),
        producer_ids,
        consumer_ids,
        np.zeros((t, p, c), dtype=np.int64),
        np.zeros((t, p), dtype=np.int64),
        np.zeros((t, c), dtype=np.int64),
    )


def layout(participants: Sequence[Participant]) -> tuple[tuple[UUID, ...], tuple[UUID, ...]]:
    """Producer and consumer meter ids, each in meter-id order (the engine's columns)."""
    ordered = sorted(participants, key=lambda p: p.meter_id)
    return (
        tuple(p.meter_id for p in ordered if p.produces),
        tuple(p.meter_id for p in ordered if p.consumes),
    )


@dataclass
class PreparedIntervals:
    """The complete intervals of one block's re-balanced rows, ready for the engine.

    ``key`` is what the engine call depends on besides the energy (method, meters, tiers,
    keys): blocks with equal keys are allocated in one engine call, which amortises the
    engine's per-call cost over a month of days instead of paying it per day."""

    block: Block
    done: NDArray[np.intp]
    production_wh: NDArray[np.int64]  # [len(done), P]
    demand_wh: NDArray[np.int64]  # [len(done), C]
    method: AllocationMethod
    producer_as_consumer: NDArray[np.int64]
    consumer_tier: NDArray[np.int64]
    consumer_share: NDArray[np.float64]
    # Per re-balanced row: whether it is balanced (every participant had its energy, all
    # within the engine's exact range) ...
    complete_rows: NDArray[np.bool_]
    # ... and whether it is not because its energy is out of that range.
    out_of_range_rows: NDArray[np.bool_]

    @property
    def key(self) -> tuple[object, ...]:
        return (
            self.method,
            self.block.producer_ids,
            self.block.consumer_ids,
            tuple(self.producer_as_consumer.tolist()),
            tuple(self.consumer_tier.tolist()),
            tuple(np.nan_to_num(self.consumer_share, nan=-1.0).tolist()),
        )


def prepare_intervals(
    block: Block,
    rows: NDArray[np.intp],
    interval_ends: NDArray[np.int64],
    method: AllocationMethod,
    participants: Sequence[Participant],
    meter_column: Mapping[UUID, int],
    import_wh: NDArray[np.float64],
    export_wh: NDArray[np.float64],
) -> PreparedIntervals:
    """Marks the intervals ``rows`` of ``block`` complete or not from their energy
    (``import_wh`` / ``export_wh``: [len(rows), M], NaN unknown, columns by
    ``meter_column``), clears their cells, and returns the complete ones' whole-Wh energy
    for :func:`allocate_prepared`."""
    by_id = {p.meter_id: p for p in participants}
    producers = [by_id[m] for m in block.producer_ids]
    consumers = [by_id[m] for m in block.consumer_ids]
    starts = block.interval_starts[rows]
    ends = interval_ends[rows]

    def in_service(group: Sequence[Participant]) -> NDArray[np.bool_]:
        begin = np.array([p.start_us for p in group], dtype=np.int64)
        finish = np.array(
            [p.end_us if p.end_us is not None else np.iinfo(np.int64).max for p in group],
            dtype=np.int64,
        )
        result: NDArray[np.bool_] = (starts[:, None] >= begin[None, :]) & (
            ends[:, None] <= finish[None, :]
        )
        return result

    def energy(source: NDArray[np.float64], group: Sequence[Participant]) -> NDArray[np.float64]:
        if not group:
            return np.zeros((len(rows), 0), dtype=np.float64)
        missing_column = np.full(len(rows), np.nan)
        columns = [
            source[:, meter_column[p.meter_id]] if p.meter_id in meter_column else missing_column
            for p in group
        ]
        return np.stack(columns, axis=1)

    production = np.where(in_service(producers), energy(export_wh, producers), 0.0)
    demand = np.where(in_service(consumers), energy(import_wh, consumers), 0.0)
    missing = np.isnan(production).any(axis=1) | np.isnan(demand).any(axis=1)
    # NaN is outside the range too: complete = known and in range.
    complete: NDArray[np.bool_] = within_exact_range(production) & within_exact_range(demand)
    out_of_range: NDArray[np.bool_] = ~missing & ~complete

    block.complete[rows] = complete
    block.shared_wh[rows] = 0
    block.feed_in_wh[rows] = 0
    block.grid_supply_wh[rows] = 0
    consumer_index = {m: i for i, m in enumerate(block.consumer_ids)}
    return PreparedIntervals(
        block=block,
        done=rows[complete],
        production_wh=round_energy_wh(production[complete]),
        demand_wh=round_energy_wh(demand[complete]),
        method=method,
        producer_as_consumer=np.array(
            [consumer_index.get(p.meter_id, -1) for p in producers], dtype=np.int64
        ),
        consumer_tier=np.array([c.tier for c in consumers], dtype=np.int64),
        consumer_share=np.array(
            [c.share if c.share is not None else np.nan for c in consumers], dtype=np.float64
        ),
        complete_rows=complete,
        out_of_range_rows=out_of_range,
    )


def allocate_prepared(group: Sequence[PreparedIntervals]) -> None:
    """Allocates the complete intervals of blocks with one ``key`` in one engine call and
    writes the cells into their blocks (intervals are independent in the engine)."""
    group = [g for g in group if len(g.done)]
    if not group:
        return
    first = group[0]
    production = np.concatenate([g.production_wh for g in group])
    demand = np.concatenate([g.demand_wh for g in group])
    if production.shape[1] and demand.shape[1]:
        result = allocate(
            BalancingInput(
                method=first.method,
                production_wh=production,
                demand_wh=demand,
                producer_as_consumer=first.producer_as_consumer,
                consumer_tier=first.consumer_tier,
                consumer_share=first.consumer_share,
            )
        )
        shared, feed_in, grid_supply = result.shared_wh, result.feed_in_wh, result.grid_supply_wh
    else:
        shared = np.zeros((len(production), production.shape[1], demand.shape[1]), np.int64)
        feed_in, grid_supply = production, demand
    offset = 0
    for g in group:
        size = len(g.done)
        g.block.shared_wh[g.done] = shared[offset : offset + size]
        g.block.feed_in_wh[g.done] = feed_in[offset : offset + size]
        g.block.grid_supply_wh[g.done] = grid_supply[offset : offset + size]
        offset += size


# -- packing into a balance_blocks row -------------------------------------------------------


def pack(block: Block) -> tuple[object, ...]:
    """The stored columns after the block's times: interval_starts, complete, producer_ids,
    consumer_ids, shared_wh, feed_in_wh, grid_supply_wh, then the totals (shared, feed-in,
    grid supply, complete intervals). Little-endian int64 (uint8 for complete), time
    innermost: shared_wh [C, P, T], feed_in_wh [P, T], grid_supply_wh [C, T], so one
    consumer's cells are one contiguous byte range, which a debitor's read takes with
    ``substring`` without fetching the rest of the (uncompressed) value."""
    return (
        block.interval_starts.astype(_INT).tobytes(),
        block.complete.astype(np.uint8).tobytes(),
        list(block.producer_ids),
        list(block.consumer_ids),
        np.ascontiguousarray(block.shared_wh.transpose(2, 1, 0), dtype=_INT).tobytes(),
        np.ascontiguousarray(block.feed_in_wh.T, dtype=_INT).tobytes(),
        np.ascontiguousarray(block.grid_supply_wh.T, dtype=_INT).tobytes(),
        np.ascontiguousarray(block.shared_wh.sum(axis=0).T, dtype=_INT).tobytes(),
        block.feed_in_wh.sum(axis=0).astype(_INT).tobytes(),
        block.grid_supply_wh.sum(axis=0).astype(_INT).tobytes(),
        int(block.complete.sum()),
    )


def unpack_totals(
    start: datetime,
    end: datetime,
    producer_ids: Sequence[UUID],
    consumer_ids: Sequence[UUID],
    shared_total: bytes,
    feed_in_total: bytes | None,
    grid_supply_total: bytes,
    complete_intervals: int,
) -> Block:
    """A block read as its totals: one row at the block's start (for day and month
    outputs, which hold whole blocks)."""
    p, c = len(producer_ids), len(consumer_ids)
    shared = np.frombuffer(shared_total, dtype=_INT).reshape(c, p).T[None, :, :]
    feed_in = (
        np.zeros((1, p), dtype=np.int64)
        if feed_in_total is None
        else np.frombuffer(feed_in_total, dtype=_INT).reshape(1, p)
    )
    return Block(
        start,
        end,
        np.array([to_us(start)], dtype=np.int64),
        np.ones(1, dtype=np.bool_),
        tuple(producer_ids),
        tuple(consumer_ids),
        np.array(shared, dtype=np.int64, order="C"),
        np.array(feed_in, dtype=np.int64, order="C"),
        np.frombuffer(grid_supply_total, dtype=_INT).astype(np.int64).reshape(1, c),
        complete_counts=np.array([complete_intervals], dtype=np.int64),
    )


def unpack(
    start: datetime,
    end: datetime,
    interval_starts: bytes,
    complete: bytes,
    producer_ids: Sequence[UUID],
    consumer_ids: Sequence[UUID],
    shared_wh: bytes,
    feed_in_wh: bytes | None,
    grid_supply_wh: bytes,
) -> Block:
    """The block of a stored row (``feed_in_wh`` None: not read, zeros). ``consumer_ids``
    may name a slice of the stored consumers when ``shared_wh`` and ``grid_supply_wh`` are
    that slice's bytes."""
    starts = np.frombuffer(interval_starts, dtype=_INT).astype(np.int64)
    t, p, c = len(starts), len(producer_ids), len(consumer_ids)
    shared = np.frombuffer(shared_wh, dtype=_INT).reshape(c, p, t).transpose(2, 1, 0)
    feed_in = (
        np.zeros((t, p), dtype=np.int64)
        if feed_in_wh is None
        else np.frombuffer(feed_in_wh, dtype=_INT).reshape(p, t).T
    )
    grid_supply = np.frombuffer(grid_supply_wh, dtype=_INT).reshape(c, t).T
    return Block(
        start,
        end,
        starts,
        np.frombuffer(complete, dtype=np.uint8).astype(np.bool_),
        tuple(producer_ids),
        tuple(consumer_ids),
        # Copies (C order): buffers from the database are read-only, and re-balancing
        # writes into a stored block's arrays.
        np.array(shared, dtype=np.int64, order="C"),
        np.array(feed_in, dtype=np.int64, order="C"),
        np.array(grid_supply, dtype=np.int64, order="C"),
    )
