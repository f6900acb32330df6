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
    tier (``consumer_share``; the tier's keys must add up to at most 1, and keys a little
    over it, within :data:`SHARE_SUM_SLACK`, are scaled down to add up to 1). An unset key (NaN)
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
    INFOR 20). The engine finds one deterministically, vectorised over intervals, as a
    b-matching: each fractional cell goes up or down; producer row ``j`` needs exactly
    ``x_j - sum(floors)`` ups (one may be its feed-in cell) and consumer column ``i``
    exactly ``d_i - sum(floors)`` (one may be its grid-supply cell). Producer rows are
    decided one after another by a greedy that keeps the later rows satisfiable (see
    :func:`_controlled_rounding`; exact for up to two producers); among equally good cells
    it prefers those of consumers whose exact total is nearer its ceiling (so that no meter
    id is favoured over a year), then the lower meter index. An interval where the greedy
    runs into a row it cannot satisfy (possible with three or more producers) is repaired
    exactly by augmenting paths (:func:`_round_table`). Values within ``1e-6 Wh`` of an
    integer, or within ``2**-45`` of the interval's largest energy when that is more,
    count as that integer: this absorbs the floating-point noise, a few units in the last
    place of the interval's energy, and is still the floor or ceiling of the exact value.

Exact range (:data:`MAX_INTERVAL_WH`)
    The arithmetic is float64, so its noise grows with the energy: a few units in the last
    place (ulp) of the interval's largest energy (measured on random sites against the
    exact oracle: within one or two). Each interval's total production and total demand
    must therefore be at most ``2**33`` Wh (8.6 GWh: a quarter-hour at 34 GW, an hour at
    8.6 GW, a month at 11.5 MW). There the snapping tolerance above is at most ``2**-12``
    Wh, 128 ulp of ``2**33`` and still far below 1 Wh, so every value the rounding decides
    on is the floor or ceiling of the exact one (property-tested at the bound), and a
    year of results adds up in int64 with room to spare. Beyond it the noise outgrows any
    such tolerance (the first cell off its floor and ceiling showed at ~2e12 Wh, broken
    margins at ~1e15 Wh, and above ~9.2e18 Wh the energy wraps around in int64), so
    :func:`allocate` and :func:`round_energy_wh` refuse it and the service leaves such
    intervals unbalanced (:func:`within_exact_range`). Meter readings are bounded far
    below it at ingest (``service.telemetry.domain``).

Zero is absence
    A consumer with zero demand is never in demand, gets key 0 under EQUAL and PRO_RATA and
    takes 0 of a STATIC offer (whose energy then stays with the producer, as if not
    offered); a producer with zero production offers nothing. Every sum over meters is a
    sequential reduction over an outer axis (numpy adds such axes in index order), so a
    zero term changes no other float; sorts are stable; so the engine's integer result for
    the other meters is identical, bit for bit, to the one without the zero meter. An
    interval without production shares nothing, so :func:`allocate` does not run it
    through the allocation at all (its demand is all grid supply): a PV site's nights.

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
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "MAX_INTERVAL_WH",
    "AllocationMethod",
    "BalancingInput",
    "BalancingResult",
    "allocate",
    "round_energy_wh",
    "within_exact_range",
]

Int64Array = NDArray[np.int64]
FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

# The largest total production and total demand of one interval computed exactly (module
# docstring, "Exact range").
MAX_INTERVAL_WH = 2**33
# A float within this of an integer is that integer: far above the float64 noise of the
# arithmetic here for interval energies up to ~1e7 Wh (a 40 MW plant), far below 1 Wh ...
_SNAP_ABS_WH = 1e-6
# ... or within this fraction of the interval's largest energy (128 units in its last place):
# the noise grows with the energy. At MAX_INTERVAL_WH this is 2**-12 Wh.
_SNAP_REL = 2.0**-45
# Below this an interval's tolerance is _SNAP_ABS_WH alone (~3.5e7 Wh).
_SMALL_INTERVAL_WH = int(_SNAP_ABS_WH / _SNAP_REL)
# Cells (producers x consumers x intervals) allocated per chunk of intervals.
_CHUNK_CELLS = 1 << 17
# The sum of a tier's static keys may exceed 1 by float noise of the caller's arithmetic
# (0.1 + 0.2 + 0.7): the API accepts such keys, and the engine scales them down to 1.
SHARE_SUM_SLACK = 1e-9


def static_keys_total(keys: Iterable[float]) -> float:
    """A tier's static keys added up, correctly rounded (``math.fsum``): the same sum in
    any order, so the API's check of a site's shares and the engine's check of a block's
    agree on every set of keys (numpy's pairwise sum and a running sum differ by an ulp
    from nine keys on, and a total right at the slack passed one check and failed the other).
    """
    return math.fsum(float(key) for key in keys)


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
    one, or one above :data:`MAX_INTERVAL_WH` (which no interval balances, and which could
    wrap around in int64) is a ValueError.
    """
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError("energy values must be finite")
    if np.any(array <= -0.5):
        raise ValueError("energy values must not be negative")
    rounded_float = np.rint(array)
    if np.any(rounded_float > MAX_INTERVAL_WH):
        raise ValueError(f"energy values must be at most {MAX_INTERVAL_WH} Wh")
    rounded: Int64Array = rounded_float.astype(np.int64)
    return np.maximum(rounded, 0)


def within_exact_range(energy_wh: FloatArray) -> BoolArray:
    """Per interval (row) of meter energies ``[T, meters]`` in Wh, as read (NaN and
    infinities allowed): whether :func:`round_energy_wh` takes every value and
    :func:`allocate` their whole-Wh total, i.e. each is finite, not negative (beyond float
    noise) and they add up to at most :data:`MAX_INTERVAL_WH`. False where any is NaN.
    """
    array = np.asarray(energy_wh, dtype=np.float64)
    rounded = np.rint(array)
    # NaN compares False both ways, infinities fail one of the two.
    each = np.logical_and.reduce((array > -0.5) & (rounded <= MAX_INTERVAL_WH), axis=1)
    # Whole Wh of at most 2**33 each: their float sum is exact (far below 2**53).
    total = np.where(each[:, None], np.maximum(rounded, 0.0), 0.0).sum(axis=1)
    result: BoolArray = each & (total <= MAX_INTERVAL_WH)
    return result


def allocate(block: BalancingInput) -> BalancingResult:
    """Allocate every interval of ``block`` by its method and tiers, in exact whole Wh.

    Raises ValueError for malformed input (shapes, negative energy, keys outside 0..1, a
    tier's static keys adding up to more than 1, a consumer column claimed by two
    producers) and for an interval whose total production or demand exceeds
    :data:`MAX_INTERVAL_WH`.
    """
    production, demand, scale = _validated(block)
    num_intervals, num_producers = production.shape
    num_consumers = demand.shape[1]
    if num_intervals == 0 or num_producers == 0 or num_consumers == 0:
        return BalancingResult(
            shared_wh=np.zeros((num_intervals, num_producers, num_consumers), dtype=np.int64),
            feed_in_wh=production.copy(),
            grid_supply_wh=demand.copy(),
        )
    # An interval without production shares nothing: all its demand is grid supply, exactly
    # what the allocation gives it (zero is absence). Only the others go through it: a PV
    # site has no production half the time. (Intervals without demand are rare; testing
    # for them would cost a pass over all demand, more than allocating them.)
    busy = np.flatnonzero(production.any(axis=1))
    shared = np.zeros((num_intervals, num_producers, num_consumers), dtype=np.int64)
    feed_in = production.copy()
    grid_supply = demand.copy()
    # Intervals are independent: chunks keep every temporary in cache instead of paging in
    # fresh memory for each step over the whole block (3x faster on a site-year).
    chunk = max(1, _CHUNK_CELLS // max(1, num_producers * num_consumers))
    method = AllocationMethod(block.method)
    tiers = _tiers(block)
    for start in range(0, busy.size, chunk):
        rows = _as_slice(busy[start : start + chunk])
        # Transposed per chunk (time innermost): a chunk fits in cache, the whole block not.
        part_production = np.ascontiguousarray(production[rows].T)
        part_demand = np.ascontiguousarray(demand[rows].T)
        cells, feed_exact, grid_exact = _exact_allocation(
            method, tiers, part_production, part_demand
        )
        # One number where no interval's energy is large enough for the relative part to
        # count: comparisons with a scalar are the cheaper ones.
        tolerance: FloatArray | float = (
            _SNAP_ABS_WH if scale is None else np.maximum(_SNAP_ABS_WH, scale[rows] * _SNAP_REL)
        )
        shared_int, feed_int, grid_int = _controlled_rounding(
            cells, feed_exact, grid_exact, part_production, part_demand, tolerance
        )
        _check_margins(shared_int, feed_int, grid_int, part_production, part_demand)
        shared[rows] = shared_int.transpose(2, 0, 1)
        feed_in[rows] = feed_int.T
        grid_supply[rows] = grid_int.T
    return BalancingResult(shared_wh=shared, feed_in_wh=feed_in, grid_supply_wh=grid_supply)


def _as_slice(rows: NDArray[np.intp]) -> slice | NDArray[np.intp]:
    """A run of consecutive intervals as a slice: views and plain copies, no gathers."""
    if rows.size and int(rows[-1]) - int(rows[0]) == rows.size - 1:
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


# ---------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------


def _validated(block: BalancingInput) -> tuple[Int64Array, Int64Array, Int64Array | None]:
    """Production ``[T, P]`` and demand ``[T, C]`` as int64, after every check, and each
    interval's scale ``[T]``: the larger of its total production and total demand (None
    when no interval can reach ``_SMALL_INTERVAL_WH``)."""
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
    # The largest total an interval can have, from the largest value and the meter count.
    largest_total = 0
    for name, array in (("production_wh", production), ("demand_wh", demand)):
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must be whole Wh (an integer array)")
        if array.size and int(array.min()) < 0:
            raise ValueError(f"{name} must not be negative")
        largest = int(array.max()) if array.size else 0
        # Checked before the totals, which could wrap around in int64 otherwise.
        if largest > MAX_INTERVAL_WH:
            raise ValueError(f"{name} must be at most {MAX_INTERVAL_WH} Wh (the exact range)")
        largest_total = max(largest_total, largest * array.shape[1])
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
            if static_keys_total(keys[tiers == tier]) > 1 + SHARE_SUM_SLACK:
                raise ValueError(f"the static keys of tier {int(tier)} add up to more than 1")
    production = np.asarray(production, dtype=np.int64)
    demand = np.asarray(demand, dtype=np.int64)
    if largest_total <= _SMALL_INTERVAL_WH:
        # Every interval within the range and below where the relative tolerance counts:
        # no need to add up each one (the usual case, a few % of a site-year's time).
        return production, demand, None
    scale: Int64Array = np.maximum(production.sum(axis=1), demand.sum(axis=1))
    if scale.size and int(scale.max()) > MAX_INTERVAL_WH:
        raise ValueError(
            f"an interval's total production or demand exceeds {MAX_INTERVAL_WH} Wh, "
            "the range the engine computes exactly"
        )
    return production, demand, scale


def _tier_columns(tiers: Int64Array) -> list[NDArray[np.intp]]:
    """Consumer columns of each tier in serving order: 1, 2, ..., then 0."""
    numbered = sorted(int(tier) for tier in np.unique(tiers) if tier > 0)
    order = [*numbered, 0] if np.any(tiers == 0) else numbered
    return [np.flatnonzero(tiers == tier) for tier in order]


# ---------------------------------------------------------------------------------------------
# Exact (real-valued) allocation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tier:
    """One tier of a block, the same for every chunk of it."""

    columns: NDArray[np.intp]
    """Its consumer columns."""
    own_in_tier: Int64Array
    """``[P]`` position of each producer's own column inside the tier, or -1."""
    shares: FloatArray
    """The tier's static keys, unset ones 0."""


def _tiers(block: BalancingInput) -> list[_Tier]:
    """The block's tiers in serving order, worked out once instead of once per chunk."""
    own_columns = np.asarray(block.producer_as_consumer, dtype=np.int64)
    shares = np.nan_to_num(np.asarray(block.consumer_share, dtype=np.float64), nan=0.0)
    tiers = []
    for columns in _tier_columns(np.asarray(block.consumer_tier, dtype=np.int64)):
        own_in_tier = np.full(own_columns.size, -1, dtype=np.int64)
        for producer, column in enumerate(own_columns):
            if column >= 0:
                hits = np.flatnonzero(columns == column)
                if hits.size:
                    own_in_tier[producer] = hits[0]
        tier_shares = shares if columns.size == shares.size else shares[columns]
        if block.method in (AllocationMethod.STATIC, AllocationMethod.STATIC_REDISTRIBUTED):
            total = static_keys_total(tier_shares)
            if total > 1:
                # Within the slack (``_validated``), but keys over 1 offer more than a
                # producer has: at 2e9 Wh an interval, 1e-9 too much is 2 Wh, beyond what
                # the rounding may snap, and the margins no longer add up.
                tier_shares = tier_shares / total
        tiers.append(_Tier(columns, own_in_tier, tier_shares))
    return tiers


def _exact_allocation(
    method: AllocationMethod, tiers: list[_Tier], production: Int64Array, demand: Int64Array
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Real-valued ``shared [P, C, T]``, ``feed_in [P, T]`` and ``grid_supply [C, T]``."""
    num_producers, num_intervals = production.shape
    num_consumers = demand.shape[0]
    remaining_production = production.astype(np.float64)
    remaining_demand = demand.astype(np.float64)
    cells = np.zeros((num_producers, num_consumers, num_intervals))
    for tier in tiers:
        if tier.columns.size == num_consumers:  # one tier: work in place, no copies
            _allocate_tier(
                method, tier.shares, tier.own_in_tier, remaining_production, remaining_demand, cells
            )
            continue
        tier_demand = remaining_demand[tier.columns]
        tier_cells = np.zeros((num_producers, tier.columns.size, num_intervals))
        _allocate_tier(
            method,
            tier.shares,
            tier.own_in_tier,
            remaining_production,
            tier_demand,
            tier_cells,
        )
        remaining_demand[tier.columns] = tier_demand
        cells[:, tier.columns] = tier_cells
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
    # Intervals where a producer with energy has its own column in demand need the passes;
    # everywhere else the closed form is exact.
    needs_passes = np.zeros(demand.shape[1], dtype=np.bool_)
    for producer, position in enumerate(own_in_tier):
        if position >= 0:
            needs_passes |= (production[producer] > 0) & (demand[position] > 0)
    if method is AllocationMethod.STATIC:
        if needs_passes.any():
            keys = np.broadcast_to(shares[:, None], demand.shape)
            _first_pass(keys, not_own, production, demand, cells)
        else:
            _closed_form(method, shares, production, demand, cells)
        return
    if not needs_passes.any():
        _closed_form(method, shares, production, demand, cells)
        return
    closed = np.flatnonzero(~needs_passes)
    if closed.size:
        sub_production = production[:, closed]
        sub_demand = demand[:, closed]
        sub_cells = np.zeros((production.shape[0], num_consumers, closed.size))
        _closed_form(method, shares, sub_production, sub_demand, sub_cells)
        production[:, closed] = sub_production
        demand[:, closed] = sub_demand
        cells[:, :, closed] = sub_cells
    iterated = np.flatnonzero(needs_passes)
    if iterated.size:
        sub_production = production[:, iterated]
        sub_demand = demand[:, iterated]
        sub_cells = np.zeros((production.shape[0], num_consumers, iterated.size))
        first_keys = _first_pass_keys(method, shares, sub_demand)
        # PRO_RATA keeps the demand of the interval as its weights, not what is left.
        weights = _redistribution_weights(method, shares, sub_demand)
        _first_pass(first_keys, not_own, sub_production, sub_demand, sub_cells)
        _redistribute(weights, not_own, sub_production, sub_demand, sub_cells)
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


def _closed_form(
    method: AllocationMethod,
    shares: FloatArray,
    production: FloatArray,
    demand: FloatArray,
    cells: FloatArray,
) -> None:
    """A tier without prosumer exclusions, in place (module docstring).

    Weighted water-filling ``a_i = min(e_i, mu * w_i)`` over the consumers with ``w_i > 0``
    and ``e_i > 0``, ``mu`` such that ``sum_i a_i = min(R, sum_i e_i)``, split over the
    producers by ``r_j / R``. ``cells`` of the tier must be zero on entry.
    """
    total = production.sum(axis=0)
    if method is AllocationMethod.STATIC:
        # One pass: O_i = R * share_i, a_i = min(e_i, O_i), cell_ji = r_j * a_i / R.
        allocation = np.multiply(total[None, :], shares[:, None])
        np.minimum(demand, allocation, out=allocation)
        given = allocation.sum(axis=0)
        split = np.zeros_like(production)
        np.divide(production, total[None, :], out=split, where=total[None, :] > 0)
        for producer in range(production.shape[0]):
            np.multiply(allocation, split[producer][None, :], out=cells[producer])
        left_fraction = np.zeros_like(total)
        np.divide(total - given, total, out=left_fraction, where=total > 0)
        production *= np.maximum(left_fraction, 0.0)[None, :]
        demand -= allocation
        return
    if method is AllocationMethod.PRO_RATA:
        wanted = demand.sum(axis=0)
        factor = np.ones_like(total)
        np.divide(total, wanted, out=factor, where=total < wanted)
        allocation = demand * factor[None, :]
        all_saturated = total >= wanted
        saturated_total = wanted
    elif method is AllocationMethod.EQUAL:
        level, all_saturated, saturated_total = _equal_level(demand, total)
        allocation = np.minimum(demand, level[None, :])
    else:
        level, all_saturated, saturated_total = _water_level(demand, shares, total)
        with np.errstate(invalid="ignore"):  # inf * 0 where all are saturated
            allocation = np.where(
                shares[:, None] > 0, np.minimum(demand, level[None, :] * shares[:, None]), 0.0
            )
    split = np.zeros_like(production)
    np.divide(production, total[None, :], out=split, where=total[None, :] > 0)
    for producer in range(production.shape[0]):
        np.multiply(allocation, split[producer][None, :], out=cells[producer])
    left_fraction = np.zeros_like(total)
    np.divide(total - saturated_total, total, out=left_fraction, where=all_saturated & (total > 0))
    production *= left_fraction[None, :]
    demand -= allocation


def _equal_level(demand: FloatArray, total: FloatArray) -> tuple[FloatArray, BoolArray, FloatArray]:
    """Water level ``L`` per interval with ``sum_i min(e_i, L) = min(total, sum_i e_i)``.

    The demands are sorted per interval, zeros first (they are saturated at any level and
    add nothing, so a zero-demand consumer changes no float of the others). At the k-th
    smallest ``s_k`` the allocation is ``sum_{m<k} s_m + s_k * (n - k)``; the first k at
    which it reaches ``total`` brackets ``L = (total - sum_{m<k} s_m) / (n - k)``. Returns
    the level (inf where everyone is saturated), that mask and the total demand.
    """
    num_consumers, num_intervals = demand.shape
    ordered = np.empty((num_intervals, num_consumers))
    ordered[:] = demand.T
    ordered.sort(axis=1)
    before = np.empty((num_intervals, num_consumers))
    before[:, 0] = 0.0
    np.cumsum(ordered[:, :-1], axis=1, out=before[:, 1:])
    wanted = before[:, -1] + ordered[:, -1]
    remaining = np.arange(num_consumers, 0, -1, dtype=np.float64)
    reached = before + ordered * remaining[None, :]
    all_saturated = wanted <= total
    first = np.argmax(reached >= total[:, None], axis=1)
    rows = np.arange(num_intervals)
    level = np.full(num_intervals, np.inf)
    np.divide(total - before[rows, first], remaining[first], out=level, where=~all_saturated)
    return level, all_saturated, wanted


def _water_level(
    demand: FloatArray, weights: FloatArray, total: FloatArray
) -> tuple[FloatArray, BoolArray, FloatArray]:
    """Level ``mu`` per interval with ``sum_i min(e_i, mu * w_i) = min(total, sum_i e_i)``.

    Over the consumers with ``e_i > 0`` and ``w_i > 0`` (``weights [n]`` fixed per column).
    Returns the level (inf where all are saturated), that mask and the total demand. The
    saturation levels ``e_i / w_i`` are sorted per interval (stable, so ties keep column
    order); at the k-th smallest the allocation is ``sum_{m<k} e_m + level_k * sum_{m>=k}
    w_m``, and the first k at which that reaches ``total`` brackets ``mu``.
    """
    num_consumers, num_intervals = demand.shape
    valid = (demand > 0) & (weights[:, None] > 0)
    equal_weights = bool(np.all(weights == 1.0))
    by_interval = np.where(valid, demand, 0.0).T  # [T, n]
    levels = np.full((num_intervals, num_consumers), np.inf)
    if equal_weights:
        np.copyto(levels, by_interval, where=valid.T)
        levels.sort(axis=1)
        sorted_demand = np.where(np.isfinite(levels), levels, 0.0)
        weight_from = (valid.sum(axis=0)[:, None] - np.arange(num_consumers)[None, :]).astype(
            np.float64
        )
        np.maximum(weight_from, 0.0, out=weight_from)
    else:
        np.divide(by_interval, weights[None, :], out=levels, where=valid.T)
        order = np.argsort(levels, axis=1, kind="stable")
        levels = np.take_along_axis(levels, order, axis=1)
        sorted_demand = np.take_along_axis(by_interval, order, axis=1)
        sorted_weights = np.where(valid.T, weights[None, :], 0.0)
        sorted_weights = np.take_along_axis(sorted_weights, order, axis=1)
        weight_from = np.cumsum(sorted_weights[:, ::-1], axis=1)[:, ::-1]
    demand_before = np.zeros((num_intervals, num_consumers + 1))
    np.cumsum(sorted_demand, axis=1, out=demand_before[:, 1:])
    filled_at = np.full((num_intervals, num_consumers + 1), np.inf)
    finite = np.isfinite(levels)
    filled_at[:, :num_consumers] = np.where(
        finite,
        demand_before[:, :num_consumers] + np.where(finite, levels, 0.0) * weight_from,
        np.inf,
    )
    first = np.argmax(filled_at >= total[:, None], axis=1)
    all_saturated = first >= valid.sum(axis=0)
    base = np.take_along_axis(demand_before, first[:, None], axis=1)[:, 0]
    spread_padded = np.zeros((num_intervals, num_consumers + 1))
    spread_padded[:, :num_consumers] = weight_from
    spread = np.take_along_axis(spread_padded, first[:, None], axis=1)[:, 0]
    level = np.full(num_intervals, np.inf)
    np.divide(total - base, spread, out=level, where=~all_saturated & (spread > 0))
    return level, all_saturated, demand_before[:, num_consumers]


# ---------------------------------------------------------------------------------------------
# Controlled rounding
# ---------------------------------------------------------------------------------------------


def _split(
    values: FloatArray, tolerance: FloatArray | float
) -> tuple[FloatArray, FloatArray, BoolArray]:
    """Integer base, fraction in (0, 1) and the mask of cells that are not integral.

    A value within ``tolerance`` (per interval, the last axis) of an integer is that
    integer (fraction 0).
    """
    base = np.floor(values)
    fraction = values - base
    near_ceiling = fraction > 1 - tolerance
    fractional = fraction >= tolerance
    fractional &= ~near_ceiling
    base += near_ceiling
    fraction *= fractional
    return base, fraction, fractional


def _split_cells(values: FloatArray, tolerance: FloatArray | float) -> tuple[Int64Array, BoolArray]:
    """:func:`_split` without the fractions: integer base and the fractional mask."""
    shifted = values + tolerance  # a value just below an integer counts as it
    base = np.floor(shifted)
    shifted -= base
    fractional = shifted >= 2 * tolerance
    return base.astype(np.int64), fractional


def _sum_rows(values: Int64Array) -> Int64Array:
    """``values.sum(axis=0)`` over the few producer rows: plain adds are twice as fast."""
    total: Int64Array = values[0].copy()
    for row in values[1:]:
        total += row
    return total


def _count_true(mask: BoolArray, axis: int = 0) -> Int64Array:
    """``np.count_nonzero(mask, axis)``, summed as bytes when the axis is short (6x faster)."""
    counts: Int64Array
    if mask.shape[axis] < 255:
        counts = np.add.reduce(mask.view(np.uint8), axis=axis, dtype=np.uint8).astype(np.int64)
    else:
        counts = np.asarray(np.count_nonzero(mask, axis=axis), dtype=np.int64)
    return counts


def _preference_fields(
    classes: list[BoolArray], preferred: BoolArray
) -> tuple[NDArray[np.uint8], list[Int64Array]]:
    """Each cell's field: ``2k`` in class ``k`` and preferred, ``2k + 1`` in class ``k`` and
    not, ``2 * len(classes)`` or one more in none (at most 4 classes: the fields of the
    classes are the bits of one byte in :func:`_first_of_fields`); with each field's count
    per interval.

    The classes must be disjoint. Picking "the first ``n`` of a class, preferred cells
    first, each group by index" is then picking a prefix of each field by index, and one
    rank computation serves every field at once (see :func:`_first_of_fields`).
    """
    # A fifth class's fields would not fit the byte of whole-field bits: never taken.
    assert len(classes) <= 4, "at most 4 classes"
    # Byte arithmetic on the masks: several times faster than a masked copy per class.
    fields = (~preferred).view(np.uint8)
    outside = ~classes[0]
    for number, members in enumerate(classes[1:], start=1):
        fields = fields + members.view(np.uint8) * np.uint8(2 * number)
        outside &= ~members
    fields += outside.view(np.uint8) * np.uint8(2 * len(classes))
    counts: list[Int64Array] = []
    for members in classes:
        counts += [_count_true(members & preferred), _count_true(members & ~preferred)]
    return fields, counts


def _field_wanted(class_wanted: Int64Array, preferred_count: Int64Array) -> tuple[Int64Array, ...]:
    """How many of a class's preferred and other cells a pick of ``class_wanted`` takes."""
    wanted = np.maximum(class_wanted, 0)
    from_preferred = np.minimum(wanted, preferred_count)
    return from_preferred, wanted - from_preferred


def _first_of_fields(
    fields: NDArray[np.uint8], counts: list[Int64Array], wanted: list[Int64Array]
) -> BoolArray:
    """The first ``wanted[f][t]`` cells (lowest index) of each field ``f`` in interval ``t``.

    A field taken whole or not at all needs no ranks; the ranks (a cumulative sum down the
    meters, the costly step) are computed once for all the fields that are taken in part,
    one such field per interval at a time. The greedy's class order leaves at most two of
    them in an interval, so one or two rank passes replace one per field.
    """
    num_consumers, num_intervals = fields.shape
    wanted_by_field = np.stack(wanted)
    whole = wanted_by_field >= np.stack(counts)
    partial = (wanted_by_field > 0) & ~whole
    # Bit f of an interval's byte: field f is taken whole. A cell is taken whole when the
    # bit of its field is set: two byte passes instead of two per field. The cells outside
    # every field (field 8 or 9, or 2 or 3 of one class) shift it out: numpy's unsigned
    # shift by the width or more is 0, not C's undefined behaviour.
    field_bits = np.arange(len(wanted), dtype=np.uint8)[:, None]
    whole_bits = np.bitwise_or.reduce(whole.view(np.uint8) << field_bits, axis=0)
    selected: BoolArray = ((whole_bits[None, :] >> fields) & np.uint8(1)).view(np.bool_)
    every_interval = np.arange(num_intervals)
    while partial.any():
        slot = np.argmax(partial, axis=0)
        in_slot = partial[slot, every_interval]
        mask = (fields == slot.astype(np.uint8)[None, :]) & in_slot[None, :]
        limit = wanted_by_field[slot, every_interval]
        if num_consumers < 255:
            # numpy accumulates bytes along an outer axis several times faster than int16
            # and a rank never exceeds the number of rows (a partial take is below it).
            ranks = np.cumsum(mask.view(np.uint8), axis=0, dtype=np.uint8)
            selected |= mask & (ranks <= limit.astype(np.uint8)[None, :])
        else:
            ranks32 = np.cumsum(mask, axis=0, dtype=np.int32)
            selected |= mask & (ranks32 <= limit[None, :])
        partial[slot, every_interval] = False
    return selected


def _greedy_row(
    free: BoolArray,
    forced_up: BoolArray,
    missing: NDArray[np.int16],
    room: NDArray[np.int16],
    rows_after: NDArray[np.int16],
    ups_to_place: Int64Array,
    feed_options: tuple[BoolArray, BoolArray],
    need_low: Int64Array,
    need_high: Int64Array,
    preferred: BoolArray,
) -> tuple[Int64Array, BoolArray, BoolArray]:
    """One producer row that has rows after it: (feed-in up, cell ups, failed) per interval.

    ``ups_to_place`` is the row's ups besides its forced ones; the rows after it need
    between ``need_low`` and ``need_high`` ups in all, and can take between ``low`` (the
    columns' missing ups) and ``high`` (their room, at most one per fractional row left).
    """
    low = np.maximum(missing, 0).sum(axis=0, dtype=np.int32).astype(np.int64)
    high = np.minimum(room, rows_after).sum(axis=0, dtype=np.int32).astype(np.int64)
    lowers_low = free & (missing > 0)
    lowers_high = free & (room <= rows_after)
    class_a = lowers_low & ~lowers_high
    class_b = free & ~lowers_low & ~lowers_high
    class_c = lowers_low & lowers_high
    class_d = free & ~lowers_low & lowers_high
    fields, field_counts = _preference_fields([class_a, class_b, class_c, class_d], preferred)
    count_a, count_b, count_c, count_d = (
        field_counts[2 * k] + field_counts[2 * k + 1] for k in range(4)
    )
    chosen: tuple[Int64Array, ...] | None = None
    feasible = np.zeros(free.shape[1], dtype=np.bool_)
    for feed_up in feed_options:
        wanted = ups_to_place - feed_up
        take_a = np.clip(wanted, 0, count_a)
        rest = wanted - take_a
        # Lowering the low end never hurts, lowering the high end may: class c only as far
        # as the low end must come down, then b, then c, then d.
        first_c = np.clip(low - take_a - need_high, 0, np.minimum(rest, count_c))
        take_b = np.minimum(rest - first_c, count_b)
        take_c = first_c + np.minimum(rest - first_c - take_b, count_c - first_c)
        take_d = rest - take_b - take_c
        window_low = low - take_a - take_c
        window_high = high - take_c - take_d
        ok = (
            (wanted >= 0)
            & (take_d <= count_d)
            & (np.maximum(window_low, need_low) <= np.minimum(window_high, need_high))
        )
        option = (feed_up.astype(np.int64), take_a, take_b, take_c, take_d)
        if chosen is None:
            chosen, feasible = option, ok
        else:
            switch = ~feasible & ok
            chosen = tuple(
                np.where(switch, new, old) for new, old in zip(option, chosen, strict=True)
            )
            feasible = feasible | ok
    assert chosen is not None
    feed_up_count, take_a, take_b, take_c, take_d = chosen
    wanted_by_field = [
        wanted
        for number, take in enumerate((take_a, take_b, take_c, take_d))
        for wanted in _field_wanted(take, field_counts[2 * number])
    ]
    up = forced_up | _first_of_fields(fields, field_counts, wanted_by_field)
    return feed_up_count, up, ~feasible


def _controlled_rounding(
    cells: FloatArray,
    feed_in: FloatArray,
    grid_supply: FloatArray,
    production: Int64Array,
    demand: Int64Array,
    tolerance: FloatArray | float,
) -> tuple[Int64Array, Int64Array, Int64Array]:
    """Whole-Wh ``shared [P, C, T]``, ``feed_in [P, T]``, ``grid_supply [C, T]``.

    ``tolerance [T]`` (or one for all): how close to an integer a value of the interval
    counts as it.

    Each fractional cell is rounded up or down. Producer row ``j`` needs
    ``U_j = x_j - sum(its bases)`` ups, one of which may be its feed-in cell; consumer
    column ``i`` needs between ``lo_i`` and ``hi_i`` ups from the producer rows (``hi_i =
    d_i - sum(bases)``, ``lo_i = hi_i - 1`` when its grid-supply cell is fractional and can
    take the last one). Rows are decided in order, vectorised over intervals. In row ``j`` a
    column is forced up when every fractional row left must go up to reach ``lo_i``, and
    closed when it has ``hi_i`` ups. The row then takes its free cells by what they do to the
    rows after it (whose total need is known): first cells that lower the rows' minimum
    without lowering their maximum (a), then cells that lower both (c) as far as the
    minimum must come down, then cells that change neither (b), then more of c, and cells
    that only lower the maximum (d) last; inside a class the cells of consumers whose exact
    grid supply is nearer its floor first, then the lowest meter index.
    Whether the feed-in cell goes up is chosen likewise (nearest first). With two producers
    the choice is exact (the last row's window is all that matters and the class order
    keeps it whenever it can be kept); an interval the greedy still cannot satisfy is
    repaired by :func:`_round_table`.
    """
    num_producers, num_consumers, num_intervals = cells.shape
    base, fractional = _split_cells(cells, tolerance)
    feed_base, feed_fraction, feed_fractional = _split(feed_in, tolerance)
    grid_base, grid_fraction, grid_fractional = _split(grid_supply, tolerance)
    # Up in a consumer column lowers its grid supply: prefer the columns whose exact grid
    # supply is nearer its floor, so that each consumer's total rounds to nearest if it can.
    preferred = grid_fraction < 0.5
    row_ups = production - base.sum(axis=1) - feed_base.astype(np.int64)
    grid_floor = grid_base.astype(np.int64)
    column_most = demand - _sum_rows(base) - grid_floor
    column_least = column_most - grid_fractional
    feed_flex = feed_fractional.astype(np.int64)
    # Needs of the rows after j: [sum(U - feed_flex), sum(U)].
    later_most = np.cumsum(row_ups[::-1], axis=0)[::-1] - row_ups
    later_least = later_most - (np.cumsum(feed_flex[::-1], axis=0)[::-1] - feed_flex)
    # Per-cell counters stay below P + 2: small integers keep the passes over [C, T] cheap.
    column_most = column_most.astype(np.int16)
    column_least = column_least.astype(np.int16)
    rows_left = np.zeros((num_consumers, num_intervals), dtype=np.int16)
    for producer in range(num_producers):
        rows_left += fractional[producer]
    taken = np.zeros((num_consumers, num_intervals), dtype=np.int16)
    ups = np.zeros(cells.shape, dtype=np.bool_)
    feed_ups = np.zeros((num_producers, num_intervals), dtype=np.int64)
    failed = np.zeros(num_intervals, dtype=np.bool_)
    for producer in range(num_producers):
        candidates = fractional[producer]
        rows_after = rows_left - candidates
        missing = column_least - taken
        forced_up = candidates & (missing >= rows_left)
        missing -= forced_up
        room = column_most - taken
        room -= forced_up
        free = candidates & ~forced_up & (room > 0)
        forced_count = _count_true(forced_up)
        nearest_up = feed_fractional[producer] & (feed_fraction[producer] >= 0.5)
        other_up = feed_fractional[producer] & ~nearest_up
        if producer == num_producers - 1:
            # The last row: the columns' bounds are all that is left (forced and free).
            fields, field_counts = _preference_fields([free], preferred)
            free_count = field_counts[0] + field_counts[1]
            wanted = row_ups[producer] - nearest_up - forced_count
            use_other = ((wanted < 0) | (wanted > free_count)) & feed_fractional[producer]
            feed_up_count = np.where(use_other, other_up, nearest_up).astype(np.int64)
            wanted = row_ups[producer] - feed_up_count - forced_count
            failed |= (wanted < 0) | (wanted > free_count)
            up = forced_up | _first_of_fields(
                fields, field_counts, list(_field_wanted(wanted, field_counts[0]))
            )
        else:
            feed_up_count, up, row_failed = _greedy_row(
                free,
                forced_up,
                missing,
                room,
                rows_after,
                row_ups[producer] - forced_count,
                (nearest_up, other_up),
                later_least[producer],
                later_most[producer],
                preferred,
            )
            failed |= row_failed
        ups[producer] = up
        taken += up
        rows_left = rows_after
        feed_ups[producer] = feed_up_count
    grid_ups = column_most - taken
    # A negative count seen as unsigned is huge: one comparison checks 0 <= ups <= 1.
    failed |= (grid_ups.view(np.uint16) > grid_fractional).any(axis=0)
    failed |= ((feed_ups < 0) | (feed_ups > feed_fractional)).any(axis=0)
    failed |= (_count_true(ups, axis=1) + feed_ups != row_ups).any(axis=0)
    shared_int = base
    shared_int += ups
    feed_int = feed_base.astype(np.int64) + feed_ups
    grid_int = grid_floor + grid_ups
    for interval in np.flatnonzero(failed):
        table = np.zeros((num_producers + 1, num_consumers + 1))
        table[:num_producers, :num_consumers] = cells[:, :, interval]
        table[:num_producers, num_consumers] = feed_in[:, interval]
        table[num_producers, :num_consumers] = grid_supply[:, interval]
        initial = np.zeros(table.shape, dtype=np.bool_)
        initial[:num_producers, :num_consumers] = ups[:, :, interval]
        initial[:num_producers, num_consumers] = feed_ups[:, interval] > 0
        initial[num_producers, :num_consumers] = grid_ups[:, interval] > 0
        rounded_table = _round_table(
            table,
            initial,
            tolerance if isinstance(tolerance, float) else float(tolerance[interval]),
        )
        shared_int[:, :, interval] = rounded_table[:num_producers, :num_consumers]
        feed_int[:, interval] = rounded_table[:num_producers, num_consumers]
        grid_int[:, interval] = rounded_table[num_producers, :num_consumers]
    return shared_int, feed_int, grid_int


def _round_table(
    table: FloatArray,
    initial_ups: BoolArray | None,
    tolerance: float,
) -> Int64Array:
    """Controlled rounding of one interval's table by augmenting paths (exact, deterministic).

    ``table`` is ``(P + 1) x (C + 1)``: producers then GRID by consumers then GRID, with the
    GRID x GRID corner unused. The corner is set so that every row and column of fractions
    adds up to an integer; rounding is then a bipartite b-matching: each row ``r`` needs
    ``R_r`` of its fractional cells up, each column ``K_c``. It exists because the
    fractions themselves are a fractional solution of that transportation polytope, whose
    vertices are integral (Bacharach 1966). Starting from ``initial_ups`` (the greedy
    sweep's choice) where given, excess ups are dropped (highest index first) and every row
    short of ups is served by a breadth-first augmenting path (lowest index first), which
    exists as long as a full solution does. Returns the rounded table.
    """
    base, fraction, fractional = _split(table, tolerance)
    rows, columns = table.shape
    corner = (-float(fraction[rows - 1, : columns - 1].sum())) % 1.0
    corner_noise = tolerance / 10
    if corner_noise < corner < 1 - corner_noise:
        fractional[rows - 1, columns - 1] = True
        fraction[rows - 1, columns - 1] = corner
    else:
        fractional[rows - 1, columns - 1] = False
        fraction[rows - 1, columns - 1] = 0.0
    row_need = [round(float(v)) for v in fraction.sum(axis=1)]
    column_need = [round(float(v)) for v in fraction.sum(axis=0)]
    row_cells = [[int(c) for c in np.flatnonzero(fractional[r])] for r in range(rows)]
    column_cells = [[int(r) for r in np.flatnonzero(fractional[:, c])] for c in range(columns)]
    up = np.zeros((rows, columns), dtype=np.bool_)
    if initial_ups is not None:
        up[:] = initial_ups & fractional
    row_degree = [int(v) for v in up.sum(axis=1)]
    column_degree = [int(v) for v in up.sum(axis=0)]
    for r in range(rows):
        for c in reversed(row_cells[r]):
            if row_degree[r] <= row_need[r]:
                break
            if up[r, c]:
                up[r, c] = False
                row_degree[r] -= 1
                column_degree[c] -= 1
    for c in range(columns):
        for r in reversed(column_cells[c]):
            if column_degree[c] <= column_need[c]:
                break
            if up[r, c]:
                up[r, c] = False
                row_degree[r] -= 1
                column_degree[c] -= 1
    for r in range(rows):
        while row_degree[r] < row_need[r]:
            _augment(r, up, row_cells, column_cells, column_degree, column_need)
            row_degree[r] += 1
    if column_degree != column_need:
        raise RuntimeError("controlled rounding left a column short: margins are not integral")
    result: Int64Array = (base + up).astype(np.int64)
    return result


def _augment(
    start: int,
    up: BoolArray,
    row_cells: list[list[int]],
    column_cells: list[list[int]],
    column_degree: list[int],
    column_need: list[int],
) -> None:
    """One more up in row ``start``: a shortest alternating path to a column short of ups."""
    came_from_column: dict[int, int] = {}  # column -> row it was reached from
    came_from_row: dict[int, int] = {start: -1}  # row -> column it was reached through
    frontier = [start]
    while frontier:
        following: list[int] = []
        for r in frontier:
            for c in row_cells[r]:
                if up[r, c] or c in came_from_column:
                    continue
                came_from_column[c] = r
                if column_degree[c] < column_need[c]:
                    column_degree[c] += 1
                    while True:  # flip the path back to the start
                        row = came_from_column[c]
                        up[row, c] = True
                        previous = came_from_row[row]
                        if previous < 0:
                            return
                        up[row, previous] = False
                        c = previous
                for r2 in column_cells[c]:
                    if up[r2, c] and r2 not in came_from_row:
                        came_from_row[r2] = c
                        following.append(r2)
        frontier = following
    raise RuntimeError("no augmenting path: the table has no controlled rounding")


def _check_margins(
    shared: Int64Array,
    feed_in: Int64Array,
    grid_supply: Int64Array,
    production: Int64Array,
    demand: Int64Array,
) -> None:
    if (
        not np.array_equal(shared.sum(axis=1) + feed_in, production)
        or not np.array_equal(_sum_rows(shared) + grid_supply, demand)
        or shared.min(initial=0) < 0
        or feed_in.min(initial=0) < 0
        or grid_supply.min(initial=0) < 0
    ):
        raise RuntimeError("controlled rounding broke a margin")
