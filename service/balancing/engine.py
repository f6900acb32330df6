"""The energy-sharing allocation engine: pure, vectorised over intervals, exact in whole Wh.

No I/O and nothing but numpy: :func:`allocate` takes one block of ``T`` balance intervals of
one site with a fixed set of meters and settings (:class:`BalancingInput`) and returns who
got what from whom (:class:`BalancingResult`), in whole Wh that add up exactly. The service
(settings, storage, worker, RPCs) is built around it and calls it once per block of
intervals whose participants and settings do not change. A meter that does not take part in
an interval (not in service, no valid setting) is passed with zero energy there: zero energy
behaves exactly like absence, bit for bit, for every method (see *Zero is absence* below).

Notation for one interval: producers ``j`` with production ``x_j`` (Wh), consumers ``i``
with demand ``d_i``; ``own(j)`` is the consumer column of producer ``j`` when it is the same
BIDIRECTIONAL meter (a prosumer), else none. A prosumer's production is what it exported,
so its self-consumption behind the connection point is already netted by its meter; it never
receives its own production (no sharing within one connection point).

Rules (the principles of the Flemish energy-sharing protocol, shared by the Belgian,
French, Austrian and German schemes: settled per interval; a consumer never receives more
than its demand; what is not taken goes back to its producer as feed-in)

Priority tiers
    Consumers with ``consumer_tier`` 1 are served first, then tier 2, ... and the
    unprioritised (tier 0) last. A tier is served from the production that the tiers before
    it left: ``r_j`` (remaining production of producer ``j``) enters tier 1 as ``x_j`` and
    each tier passes on what it did not take. The site's method applies inside each tier,
    with its keys computed over that tier's consumers only. What the last tier leaves is
    feed-in, ``feed_j = r_j``; what a consumer did not receive is grid supply,
    ``grid_i = d_i - sum_j shared_ji``.

One pass (shared by every method)
    Each producer ``j`` offers ``o_ji`` to the tier's consumers ``i != own(j)``. Consumer
    ``i`` is offered ``O_i = sum_j o_ji`` and takes ``a_i = min(e_i, O_i)`` (``e_i`` its
    remaining demand); each of its offers is cut in the same proportion,
    ``shared_ji += o_ji * a_i / O_i``; what producer ``j`` offered and was not taken stays
    in ``r_j``.

STATIC (one pass per tier)
    ``o_ji = share_i * r_j`` for ``i != own(j)``, with the fixed keys ``share_i`` of the
    tier (``consumer_share``; the tier's keys must add up to at most 1). An unset key (NaN)
    is 0 under both STATIC methods: a meter without a key receives nothing from keys; set a
    key for every participant that should receive. What is not offered (keys adding up to
    less than 1, a prosumer's own key ``share_own(j)``, which stays with it) or not taken
    is passed to the next tier, and after the last tier it is feed-in.

STATIC_REDISTRIBUTED
    STATIC's pass, then redistribution passes: with ``S`` the tier's consumers still in
    demand (``e_i > 0``) and weight ``w_i = share_i``, producer ``j`` offers all it has
    left, ``o_ji = r_j * w_i / W_j`` with ``W_j = sum(w_k for k in S if k != own(j))``
    (the keys renormalised over the consumers still in demand, its own column excluded), if
    ``W_j > 0``. Passes repeat until a pass shares nothing. The prosumer's own key is thus
    withheld in the first pass (STATIC) and its energy offered to the others afterwards.

EQUAL
    STATIC_REDISTRIBUTED with equal keys: the first pass uses ``1 / n`` for each of the
    ``n`` consumers of the tier that have demand (and 0 for those without, so that a
    zero-demand consumer is absent), the redistribution passes ``w_i = 1``. Without
    prosumers this is water-filling: every consumer gets ``min(d_i, L)`` with the level
    ``L`` such that the total is ``min(sum_j r_j, sum_i d_i)``.

PRO_RATA
    Keys in proportion to the interval's demand: first pass ``d_i / sum_k d_k`` over the
    tier, redistribution weights ``w_i = d_i``. Without prosumers every consumer gets
    ``d_i * min(1, sum_j r_j / sum_k d_k)``.

Bounded passes (proof)
    A redistribution pass in which some consumer is capped (``O_i > e_i``) saturates it:
    ``e_i`` becomes exactly 0 (``e_i - min(e_i, O_i)`` with ``min`` returning ``e_i``), so it
    leaves ``S`` for good. A pass in which no consumer is capped gives every offering
    producer's whole ``r_j`` away (each ``a_i / O_i`` is exactly 1, and ``r_j`` is updated
    as ``r_j * sum_i (o_ji / r_j) * (1 - a_i / O_i)``, exactly 0), and ``S`` is unchanged,
    so in the next pass no producer both has energy and has ``W_j > 0``: it shares nothing
    and the tier ends. Hence a tier of ``n`` consumers takes at most ``n + 1``
    redistribution passes after its first pass; the code enforces this bound. Both facts
    hold in floating point, because they rest on ``min`` and ``x / x == 1`` only.

Closed form without prosumers
    When no producer with energy left has its own column in demand in the tier, every
    producer offers the same pattern, so each pass takes the same fraction of every
    ``r_j`` and ``shared_ji = a_i * r_j / R`` (``R = sum_j r_j``). The first pass plus the
    redistribution passes then give exactly the weighted water-filling
    ``a_i = min(e_i, mu * w_i)`` for the consumers with ``w_i > 0`` (STATIC_REDISTRIBUTED:
    ``min(d_i, X s_i)`` then ``min(e_i, L s_i)`` adds up to ``min(d_i, (X + L) s_i)``), with
    ``mu`` such that ``sum_i a_i = min(R, sum_i e_i)``. The engine computes those intervals
    in closed form (one sort per interval) and runs the passes only on intervals where a
    prosumer's exclusion matters.

Whole Wh (controlled rounding)
    The exact table (producers + GRID) x (consumers + GRID) of one interval has integer
    margins: ``sum_i shared_ji + feed_j = x_j`` and ``sum_j shared_ji + grid_i = d_i``.
    Every cell is rounded to its floor or ceiling (a cell that is an integer stays it) with
    those margins exact, so the sums hold in integers, ``0 <= shared_ji <= d_i`` and
    aggregating PT15M results over time gives the coarser sums exactly. Such a rounding
    always exists for a 2-D table (Bacharach 1966; Cox & Ernst 1982, "Controlled rounding",
    INFOR 20). The engine finds one deterministically, vectorised over intervals: producer
    rows are rounded one after another, each consumer and the GRID column carrying the
    residual ``rounded - exact`` of its running sum, which must stay in ``(-1, 1)``; a row
    rounds up the cells that its integer total needs, first those that must go up, then the
    free cells with the largest ``fraction - residual`` (ties by meter index, lower first);
    the GRID row is then ``d_i - sum_j shared_ji``, the floor or ceiling of the exact grid
    supply because the residual stays inside ``(-1, 1)``. In the rare interval where this
    greedy sweep runs into a row it cannot satisfy, that interval is rounded by cancelling
    cycles of fractional cells (the constructive proof of the theorem, deterministic, lowest
    index first). Values within ``1e-6 Wh`` of an integer count as that integer, which
    absorbs floating-point noise and is still the floor or ceiling of the exact value.

Zero is absence
    A consumer with zero demand is never in demand, gets key 0 under EQUAL and PRO_RATA and
    takes 0 of a STATIC offer (whose energy then stays with the producer, as if not
    offered); a producer with zero production offers nothing. Every sum over meters is a
    sequential reduction over an outer axis (numpy adds such axes in index order), so a
    zero term changes no other float; sorts are stable; so the engine's integer result for
    the other meters is identical, bit for bit, to the one without the zero meter.

Rounding of meter energy (:func:`round_energy_wh`)
    Each meter-interval energy is rounded to the nearest whole Wh, ties to even. It is
    local: a late correction of one interval changes only that interval (rounding running
    sums instead would keep multi-interval sums within 0.5 Wh, but a correction would then
    ripple through every later interval of the meter and force re-balancing them). Ties to
    even is unbiased, so the drift of a sum of ``N`` independent roundings grows like
    ``sqrt(N) * 0.29 Wh``, not ``N * 0.5``. Zero stays zero (zero is absence) and a register
    kept in whole Wh yields whole-Wh differences, which are unchanged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "AllocationMethod",
    "BalancingInput",
    "BalancingResult",
    "allocate",
    "round_energy_wh",
]

Int64Array = NDArray[np.int64]
FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

# A float within this of an integer is that integer (absolute Wh plus a relative part for
# very large values); far above float64 noise of the arithmetic here, far below 1 Wh.
_SNAP_ABS_WH = 1e-6
_SNAP_REL = 1e-12
# How close a running residual may come to +-1 (the floor/ceiling bound).
_RESIDUAL_MARGIN = 1e-6
# Priorities of the rounding sweep are compared on this grid, so that values equal in exact
# arithmetic but apart by float noise tie and fall to the lower meter index.
_PRIORITY_GRID = 1e9
# The sum of a tier's static keys may exceed 1 by float noise of the caller's arithmetic.
_SHARE_SUM_SLACK = 1e-9


class AllocationMethod(enum.IntEnum):
    """How a tier's production is keyed to its consumers; the numbers are the proto's."""

    EQUAL = 1
    PRO_RATA = 2
    STATIC = 3
    STATIC_REDISTRIBUTED = 4


@dataclass(frozen=True)
class BalancingInput:
    """One block of ``T`` intervals with a fixed set of meters and settings.

    Columns are in meter-id order; ties anywhere are broken by column index.
    """

    method: AllocationMethod
    production_wh: Int64Array
    """``[T, P]`` whole Wh >= 0 exported by each producer."""
    demand_wh: Int64Array
    """``[T, C]`` whole Wh >= 0 imported by each consumer."""
    producer_as_consumer: Int64Array
    """``[P]`` consumer column of the same (BIDIRECTIONAL) meter, or -1."""
    consumer_tier: Int64Array
    """``[C]`` priority 1, 2, ... served in that order; 0 = unprioritised, served last."""
    consumer_share: FloatArray
    """``[C]`` fixed key 0..1 for the STATIC methods; NaN = unset (key 0)."""


@dataclass(frozen=True)
class BalancingResult:
    """Whole-Wh allocation of a :class:`BalancingInput`; every margin is exact."""

    shared_wh: Int64Array
    """``[T, P, C]`` creditor producer ``p`` -> debitor consumer ``c``."""
    feed_in_wh: Int64Array
    """``[T, P]`` producer ``p`` -> GRID."""
    grid_supply_wh: Int64Array
    """``[T, C]`` GRID -> consumer ``c``."""


def round_energy_wh(values: FloatArray) -> Int64Array:
    """Meter-interval energies (Wh, finite, >= 0) to whole Wh: nearest, ties to even.

    See the module docstring for why the rounding is per interval. A value that is
    negative only by float noise (> -0.5 Wh) becomes 0; a clearly negative or non-finite
    one is a ValueError.
    """
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError("energy values must be finite")
    if np.any(array <= -0.5):
        raise ValueError("energy values must not be negative")
    rounded: Int64Array = np.rint(array).astype(np.int64)
    return np.maximum(rounded, 0)


def allocate(block: BalancingInput) -> BalancingResult:
    """Allocate every interval of ``block`` by its method and tiers, in exact whole Wh.

    Raises ValueError for malformed input (shapes, negative energy, keys outside 0..1, a
    tier's static keys adding up to more than 1, a consumer column claimed by two
    producers).
    """
    production, demand = _validated(block)
    num_producers, num_intervals = production.shape
    num_consumers = demand.shape[0]
    if num_intervals == 0 or num_producers == 0 or num_consumers == 0:
        return BalancingResult(
            shared_wh=np.zeros((num_intervals, num_producers, num_consumers), dtype=np.int64),
            feed_in_wh=np.ascontiguousarray(production.T),
            grid_supply_wh=np.ascontiguousarray(demand.T),
        )
    cells, feed_in, grid_supply = _exact_allocation(block, production, demand)
    shared_int, feed_int, grid_int = _controlled_rounding(
        cells, feed_in, grid_supply, production, demand
    )
    _check_margins(shared_int, feed_int, grid_int, production, demand)
    return BalancingResult(
        shared_wh=np.ascontiguousarray(shared_int.transpose(2, 0, 1)),
        feed_in_wh=np.ascontiguousarray(feed_int.T),
        grid_supply_wh=np.ascontiguousarray(grid_int.T),
    )


# ---------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------


def _validated(block: BalancingInput) -> tuple[Int64Array, Int64Array]:
    """Production ``[P, T]`` and demand ``[C, T]`` (time innermost), after every check."""
    try:
        method = AllocationMethod(block.method)
    except ValueError:
        raise ValueError(f"unknown allocation method {block.method!r}") from None
    production = np.asarray(block.production_wh)
    demand = np.asarray(block.demand_wh)
    if production.ndim != 2 or demand.ndim != 2:
        raise ValueError("production_wh and demand_wh must be 2-D [T, meters]")
    if production.shape[0] != demand.shape[0]:
        raise ValueError("production_wh and demand_wh must have the same number of intervals")
    for name, array in (("production_wh", production), ("demand_wh", demand)):
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must be whole Wh (an integer array)")
        if array.size and int(array.min()) < 0:
            raise ValueError(f"{name} must not be negative")
    num_producers = production.shape[1]
    num_consumers = demand.shape[1]
    own = np.asarray(block.producer_as_consumer)
    tiers = np.asarray(block.consumer_tier)
    shares = np.asarray(block.consumer_share, dtype=np.float64)
    if own.shape != (num_producers,):
        raise ValueError("producer_as_consumer must have one entry per producer column")
    if tiers.shape != (num_consumers,) or shares.shape != (num_consumers,):
        raise ValueError("consumer_tier and consumer_share must have one entry per consumer")
    if num_producers and (int(own.min()) < -1 or int(own.max()) >= num_consumers):
        raise ValueError("producer_as_consumer must be -1 or a consumer column index")
    linked = own[own >= 0]
    if np.unique(linked).size != linked.size:
        raise ValueError("a consumer column can be the same meter as one producer only")
    if num_consumers and int(tiers.min()) < 0:
        raise ValueError("consumer_tier must be 0 (unprioritised) or a positive priority")
    set_shares = shares[~np.isnan(shares)]
    if np.any((set_shares < 0) | (set_shares > 1)):
        raise ValueError("consumer_share must be between 0 and 1 (or NaN for unset)")
    if method in (AllocationMethod.STATIC, AllocationMethod.STATIC_REDISTRIBUTED):
        keys = np.nan_to_num(shares, nan=0.0)
        for tier in np.unique(tiers):
            if float(keys[tiers == tier].sum()) > 1 + _SHARE_SUM_SLACK:
                raise ValueError(f"the static keys of tier {int(tier)} add up to more than 1")
    return (
        np.ascontiguousarray(production.T, dtype=np.int64),
        np.ascontiguousarray(demand.T, dtype=np.int64),
    )


def _tier_columns(tiers: Int64Array) -> list[NDArray[np.intp]]:
    """Consumer columns of each tier in serving order: 1, 2, ..., then 0."""
    numbered = sorted(int(tier) for tier in np.unique(tiers) if tier > 0)
    order = [*numbered, 0] if np.any(tiers == 0) else numbered
    return [np.flatnonzero(tiers == tier) for tier in order]


# ---------------------------------------------------------------------------------------------
# Exact (real-valued) allocation
# ---------------------------------------------------------------------------------------------


def _exact_allocation(
    block: BalancingInput, production: Int64Array, demand: Int64Array
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Real-valued ``shared [P, C, T]``, ``feed_in [P, T]`` and ``grid_supply [C, T]``."""
    method = AllocationMethod(block.method)
    num_producers, num_intervals = production.shape
    num_consumers = demand.shape[0]
    remaining_production = production.astype(np.float64)
    remaining_demand = demand.astype(np.float64)
    cells = np.zeros((num_producers, num_consumers, num_intervals))
    own_columns = np.asarray(block.producer_as_consumer, dtype=np.int64)
    shares = np.nan_to_num(np.asarray(block.consumer_share, dtype=np.float64), nan=0.0)
    for columns in _tier_columns(np.asarray(block.consumer_tier, dtype=np.int64)):
        # Position of each producer's own column inside this tier, or -1.
        own_in_tier = np.full(num_producers, -1, dtype=np.int64)
        for producer, column in enumerate(own_columns):
            if column >= 0:
                hits = np.flatnonzero(columns == column)
                if hits.size:
                    own_in_tier[producer] = hits[0]
        tier_demand = remaining_demand[columns]
        tier_cells = np.zeros((num_producers, columns.size, num_intervals))
        _allocate_tier(
            method,
            shares[columns],
            own_in_tier,
            remaining_production,
            tier_demand,
            tier_cells,
        )
        remaining_demand[columns] = tier_demand
        cells[:, columns] = tier_cells
    return cells, remaining_production, remaining_demand


def _allocate_tier(
    method: AllocationMethod,
    shares: FloatArray,
    own_in_tier: Int64Array,
    production: FloatArray,
    demand: FloatArray,
    cells: FloatArray,
) -> None:
    """Serve one tier in place: ``production [P, T]`` and ``demand [n, T]`` are what is left."""
    num_consumers = demand.shape[0]
    not_own = np.ones((production.shape[0], num_consumers), dtype=np.bool_)
    for producer, position in enumerate(own_in_tier):
        if position >= 0:
            not_own[producer, position] = False
    if method is AllocationMethod.STATIC:
        keys = np.broadcast_to(shares[:, None], demand.shape)
        _first_pass(keys, not_own, production, demand, cells)
        return
    # Intervals where a producer with energy has its own column in demand need the passes;
    # everywhere else the closed form is exact.
    needs_passes = np.zeros(demand.shape[1], dtype=np.bool_)
    for producer, position in enumerate(own_in_tier):
        if position >= 0:
            needs_passes |= (production[producer] > 0) & (demand[position] > 0)
    weights = _redistribution_weights(method, shares, demand)
    closed = np.flatnonzero(~needs_passes)
    if closed.size:
        sub_production = production[:, closed]
        sub_demand = demand[:, closed]
        sub_cells = np.zeros((production.shape[0], num_consumers, closed.size))
        _water_fill(weights[:, closed], sub_production, sub_demand, sub_cells)
        production[:, closed] = sub_production
        demand[:, closed] = sub_demand
        cells[:, :, closed] = sub_cells
    iterated = np.flatnonzero(needs_passes)
    if iterated.size:
        sub_production = production[:, iterated]
        sub_demand = demand[:, iterated]
        sub_cells = np.zeros((production.shape[0], num_consumers, iterated.size))
        first_keys = _first_pass_keys(method, shares, sub_demand)
        _first_pass(first_keys, not_own, sub_production, sub_demand, sub_cells)
        _redistribute(weights[:, iterated], not_own, sub_production, sub_demand, sub_cells)
        production[:, iterated] = sub_production
        demand[:, iterated] = sub_demand
        cells[:, :, iterated] = sub_cells


def _redistribution_weights(
    method: AllocationMethod, shares: FloatArray, demand: FloatArray
) -> FloatArray:
    """``w_i`` per consumer and interval ``[n, T]``: 1 (EQUAL), ``d_i``, or the static key."""
    if method is AllocationMethod.EQUAL:
        return (demand > 0).astype(np.float64)
    if method is AllocationMethod.PRO_RATA:
        return demand.copy()
    return np.broadcast_to(shares[:, None], demand.shape).copy()


def _first_pass_keys(
    method: AllocationMethod, shares: FloatArray, demand: FloatArray
) -> FloatArray:
    """Keys of the first pass ``[n, T]``, adding up to at most 1 per interval."""
    if method is AllocationMethod.STATIC_REDISTRIBUTED:
        return np.broadcast_to(shares[:, None], demand.shape).copy()
    weights = _redistribution_weights(method, shares, demand)
    total = weights.sum(axis=0)
    keys = np.zeros_like(weights)
    np.divide(weights, total[None, :], out=keys, where=total[None, :] > 0)
    return keys


def _take_offers(offers: FloatArray, demand: FloatArray, cells: FloatArray) -> FloatArray:
    """Consumers take ``min(e_i, O_i)``; returns each consumer's taken ratio ``a_i / O_i``.

    ``demand`` and ``cells`` are updated in place. An uncapped consumer's ratio is exactly
    1 and a capped one's remaining demand exactly 0 (see the bound proof).
    """
    offered = offers.sum(axis=0)
    taken = np.minimum(demand, offered)
    ratio: FloatArray = np.zeros_like(offered)
    np.divide(taken, offered, out=ratio, where=offered > 0)
    cells += offers * ratio[None]
    demand -= taken
    return ratio


def _first_pass(
    keys: FloatArray,
    not_own: BoolArray,
    production: FloatArray,
    demand: FloatArray,
    cells: FloatArray,
) -> None:
    """``o_ji = key_i * r_j`` for ``i != own(j)``: the STATIC pass."""
    fractions = keys[None, :, :] * not_own[:, :, None]
    offers = production[:, None, :] * fractions
    ratio = _take_offers(offers, demand, cells)
    # What is left of r_j: r_j * (1 - sum_i key_i * ratio_i), never below 0 by float noise.
    given_fraction = (fractions * ratio[None, :, :]).sum(axis=1)
    production *= np.maximum(1.0 - given_fraction, 0.0)


def _redistribute(
    weights: FloatArray,
    not_own: BoolArray,
    production: FloatArray,
    demand: FloatArray,
    cells: FloatArray,
) -> None:
    """Redistribution passes until one shares nothing (at most ``n + 1`` of them)."""
    num_consumers = demand.shape[0]
    active = np.arange(demand.shape[1])
    for _ in range(num_consumers + 2):
        sub_demand = demand[:, active]
        sub_production = production[:, active]
        in_demand_weights = np.where(sub_demand > 0, weights[:, active], 0.0)
        keys = in_demand_weights[None, :, :] * not_own[:, :, None]
        key_totals = keys.sum(axis=1)
        offering = (sub_production > 0) & (key_totals > 0)
        still = offering.any(axis=0)
        if not still.any():
            return
        if not still.all():
            active = active[still]
            sub_demand = sub_demand[:, still]
            sub_production = sub_production[:, still]
            keys = keys[:, :, still]
            key_totals = key_totals[:, still]
            offering = offering[:, still]
        fractions = np.zeros_like(keys)
        np.divide(
            keys,
            key_totals[:, None, :],
            out=fractions,
            where=offering[:, None, :],
        )
        offers = sub_production[:, None, :] * fractions
        sub_cells = cells[:, :, active]
        ratio = _take_offers(offers, sub_demand, sub_cells)
        left_fraction = (fractions * (1.0 - ratio)[None, :, :]).sum(axis=1)
        production[:, active] = np.where(offering, sub_production * left_fraction, sub_production)
        demand[:, active] = sub_demand
        cells[:, :, active] = sub_cells
    raise RuntimeError("redistribution did not end within its proven bound of passes")


def _water_fill(
    weights: FloatArray, production: FloatArray, demand: FloatArray, cells: FloatArray
) -> None:
    """Weighted water-filling ``a_i = min(e_i, mu * w_i)``, split over producers by ``r_j / R``.

    Exact equivalent of the first pass plus redistribution when no prosumer exclusion
    matters (module docstring). Arrays are updated in place.
    """
    num_consumers, num_intervals = demand.shape
    total = production.sum(axis=0)
    valid = (demand > 0) & (weights > 0)
    level_at = np.full(demand.shape, np.inf)
    np.divide(demand, weights, out=level_at, where=valid)
    order = np.argsort(level_at, axis=0, kind="stable")
    sorted_levels = np.take_along_axis(level_at, order, axis=0)
    sorted_demand = np.take_along_axis(np.where(valid, demand, 0.0), order, axis=0)
    sorted_weights = np.take_along_axis(np.where(valid, weights, 0.0), order, axis=0)
    demand_before = np.zeros((num_consumers + 1, num_intervals))
    np.cumsum(sorted_demand, axis=0, out=demand_before[1:])
    weight_from = np.zeros((num_consumers + 1, num_intervals))
    weight_from[:num_consumers] = np.cumsum(sorted_weights[::-1], axis=0)[::-1]
    # Total allocated when the level reaches consumer k's saturation level.
    filled_at = np.full((num_consumers + 1, num_intervals), np.inf)
    sorted_valid = np.isfinite(sorted_levels)
    filled_at[:num_consumers] = np.where(
        sorted_valid,
        demand_before[:num_consumers]
        + np.where(sorted_valid, sorted_levels, 0.0) * weight_from[:num_consumers],
        np.inf,
    )
    first_unsaturated = np.argmax(filled_at >= total[None, :], axis=0)
    valid_count = valid.sum(axis=0)
    all_saturated = first_unsaturated >= valid_count
    index = first_unsaturated[None, :]
    base = np.take_along_axis(demand_before, index, axis=0)[0]
    spread = np.take_along_axis(weight_from, index, axis=0)[0]
    level = np.zeros(num_intervals)
    np.divide(total - base, spread, out=level, where=~all_saturated & (spread > 0))
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(num_consumers)[:, None], axis=0)
    saturated = valid & ((rank < first_unsaturated[None, :]) | all_saturated[None, :])
    allocation = np.where(
        saturated, demand, np.where(valid, np.minimum(demand, level[None, :] * weights), 0.0)
    )
    split = np.zeros_like(production)
    np.divide(production, total[None, :], out=split, where=total[None, :] > 0)
    cells += split[:, None, :] * allocation[None, :, :]
    taken_all = np.where(all_saturated, demand_before[num_consumers], total)
    left_fraction = np.zeros(num_intervals)
    np.divide(total - taken_all, total, out=left_fraction, where=all_saturated & (total > 0))
    production *= left_fraction[None, :]
    demand -= allocation


# ---------------------------------------------------------------------------------------------
# Controlled rounding
# ---------------------------------------------------------------------------------------------


def _is_integral(values: FloatArray, nearest: FloatArray) -> BoolArray:
    result: BoolArray = np.abs(values - nearest) <= _SNAP_ABS_WH + _SNAP_REL * np.abs(values)
    return result


def _controlled_rounding(
    cells: FloatArray,
    feed_in: FloatArray,
    grid_supply: FloatArray,
    production: Int64Array,
    demand: Int64Array,
) -> tuple[Int64Array, Int64Array, Int64Array]:
    """Whole-Wh ``shared [P, C, T]``, ``feed_in [P, T]``, ``grid_supply [C, T]``."""
    num_producers, num_consumers, num_intervals = cells.shape
    residual = np.zeros((num_consumers + 1, num_intervals))
    shared_int = np.empty((num_producers, num_consumers, num_intervals), dtype=np.int64)
    feed_int = np.empty((num_producers, num_intervals), dtype=np.int64)
    failed = np.zeros(num_intervals, dtype=np.bool_)
    positions = np.arange(num_consumers + 1)[:, None]
    for producer in range(num_producers):
        values = np.concatenate([cells[producer], feed_in[producer][None, :]], axis=0)
        nearest = np.rint(values)
        integral = _is_integral(values, nearest)
        base = np.where(integral, nearest, np.floor(values))
        fraction = values - base
        fractional = ~integral
        down_ok = residual - fraction > -1 + _RESIDUAL_MARGIN
        up_ok = residual + 1 - fraction < 1 - _RESIDUAL_MARGIN
        forced_up = fractional & ~down_ok
        free = fractional & down_ok & up_ok
        ups = production[producer] - base.sum(axis=0).astype(np.int64)
        needed = ups - forced_up.sum(axis=0)
        failed |= (needed < 0) | (needed > free.sum(axis=0))
        priority = np.where(free, np.rint((fraction - residual) * _PRIORITY_GRID), -np.inf)
        order = np.argsort(-priority, axis=0, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(positions, order.shape), axis=0)
        rounded = base + (forced_up | (free & (rank < needed[None, :])))
        residual += rounded - values
        shared_int[producer] = rounded[:num_consumers].astype(np.int64)
        feed_int[producer] = rounded[num_consumers].astype(np.int64)
    grid_int = demand - shared_int.sum(axis=0)
    # Defensive: every cell floor or ceiling of its value, whatever float noise did.
    failed |= _outside_floor_ceiling(shared_int, cells).any(axis=(0, 1))
    failed |= _outside_floor_ceiling(feed_int, feed_in).any(axis=0)
    failed |= _outside_floor_ceiling(grid_int, grid_supply).any(axis=0)
    for interval in np.flatnonzero(failed):
        table = np.zeros((num_producers + 1, num_consumers + 1))
        table[:num_producers, :num_consumers] = cells[:, :, interval]
        table[:num_producers, num_consumers] = feed_in[:, interval]
        table[num_producers, :num_consumers] = grid_supply[:, interval]
        rounded_table = _round_table_by_cycles(table)
        shared_int[:, :, interval] = rounded_table[:num_producers, :num_consumers]
        feed_int[:, interval] = rounded_table[:num_producers, num_consumers]
        grid_int[:, interval] = rounded_table[num_producers, :num_consumers]
    return shared_int, feed_int, grid_int


def _outside_floor_ceiling(rounded: Int64Array, values: FloatArray) -> BoolArray:
    nearest = np.rint(values)
    integral = _is_integral(values, nearest)
    target = np.where(integral, nearest, np.floor(values))
    step = rounded - target
    bad: BoolArray = np.where(integral, step != 0, (step != 0) & (step != 1))
    return bad


def _round_table_by_cycles(table: FloatArray) -> Int64Array:
    """Controlled rounding of one interval's table with integer producer/consumer margins.

    ``table`` is ``(P + 1) x (C + 1)``: producers then GRID by consumers then GRID, with the
    GRID x GRID corner unused. The corner is set to make the GRID row and column sums
    integral too; then, while fractional cells remain, a cycle of them (it exists, since
    every line with a fractional cell has at least two when its sum is integral) is found
    from the lowest row index and shifted by the largest step that keeps the cells in
    [0, 1], which makes at least one integral. Deterministic; lowest indices first.
    """
    nearest = np.rint(table)
    integral = _is_integral(table, nearest)
    base = np.where(integral, nearest, np.floor(table))
    fraction = np.where(integral, 0.0, table - base)
    rows, columns = table.shape
    corner = (-float(fraction[rows - 1, : columns - 1].sum())) % 1.0
    fraction[rows - 1, columns - 1] = 0.0 if min(corner, 1 - corner) < 1e-7 else corner
    for _ in range(rows * columns + 1):
        fraction[fraction < 1e-9] = 0.0
        fraction[fraction > 1 - 1e-9] = 1.0
        open_cells = (fraction > 0) & (fraction < 1)
        if not open_cells.any():
            break
        cycle = _fractional_cycle(open_cells)
        plus = cycle[0::2]
        minus = cycle[1::2]
        step = min(min(1 - fraction[cell] for cell in plus), min(fraction[cell] for cell in minus))
        for cell in plus:
            fraction[cell] += step
        for cell in minus:
            fraction[cell] -= step
    else:
        raise RuntimeError("controlled rounding did not converge")
    result: Int64Array = (base + np.rint(fraction)).astype(np.int64)
    return result


def _fractional_cycle(open_cells: BoolArray) -> list[tuple[int, int]]:
    """Cells of one cycle in the bipartite graph rows x columns of fractional cells."""
    start_row = int(np.flatnonzero(open_cells.any(axis=1))[0])
    # Vertices: ("r", index) or ("c", index); path of vertices and the cells between them.
    path: list[tuple[str, int]] = [("r", start_row)]
    seen: dict[tuple[str, int], int] = {("r", start_row): 0}
    cells: list[tuple[int, int]] = []
    previous: tuple[int, int] | None = None
    while True:
        kind, index = path[-1]
        if kind == "r":
            candidates = [(index, int(c)) for c in np.flatnonzero(open_cells[index])]
        else:
            candidates = [(int(r), index) for r in np.flatnonzero(open_cells[:, index])]
        choices = [cell for cell in candidates if cell != previous]
        if not choices:
            raise RuntimeError("a line with one fractional cell: margins are not integral")
        cell = choices[0]
        following = ("c", cell[1]) if kind == "r" else ("r", cell[0])
        cells.append(cell)
        previous = cell
        if following in seen:
            return cells[seen[following] :]
        seen[following] = len(path)
        path.append(following)


def _check_margins(
    shared: Int64Array,
    feed_in: Int64Array,
    grid_supply: Int64Array,
    production: Int64Array,
    demand: Int64Array,
) -> None:
    if (
        not np.array_equal(shared.sum(axis=1) + feed_in, production)
        or not np.array_equal(shared.sum(axis=0) + grid_supply, demand)
        or shared.min(initial=0) < 0
        or feed_in.min(initial=0) < 0
        or grid_supply.min(initial=0) < 0
    ):
        raise RuntimeError("controlled rounding broke a margin")
