"""Property tests of the allocation engine against the exact per-interval oracle.

Random sites (intervals, producers, consumers, prosumers, tiers, keys, zeros) for every
method: the engine's whole-Wh result must have exact margins, respect every bound, put each
cell on the floor or ceiling of the oracle's exact value, not depend on other intervals of
the block, be deterministic, and treat a zero meter exactly like an absent one.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.balancing import engine as engine_module
from service.balancing.engine import (
    _SNAP_ABS_WH,
    MAX_INTERVAL_WH,
    AllocationMethod,
    BalancingInput,
    BalancingResult,
    _field_wanted,
    _first_of_fields,
    _preference_fields,
    _round_table,
    _split_cells,
    allocate,
    round_energy_wh,
    within_exact_range,
)
from tests.balancing.oracle import allocate_interval

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STATIC_METHODS = (AllocationMethod.STATIC, AllocationMethod.STATIC_REDISTRIBUTED)


energy = st.one_of(st.just(0), st.integers(0, 12), st.integers(0, 2_000))
# Up to the engine's exact range: six meters of one side add up to at most MAX_INTERVAL_WH.
# Multiples of 64 make many exact cells whole Wh (the keys are n / 64), the cells whose
# float noise the snapping must absorb; the top values sit at the bound.
LARGEST = MAX_INTERVAL_WH // 6
large_energy = st.one_of(
    st.just(0),
    st.integers(0, 12),
    st.integers(0, LARGEST),
    st.integers(0, LARGEST // 64).map(lambda n: 64 * n),
    st.integers(LARGEST - 1_000, LARGEST),
)


@st.composite
def sites(
    draw: st.DrawFn,
    max_consumers: int = 6,
    max_producers: int = 3,
    energy: st.SearchStrategy[int] = energy,
) -> BalancingInput:
    method = draw(st.sampled_from(list(AllocationMethod)))
    intervals = draw(st.integers(1, 4))
    producers = draw(st.integers(1, max_producers))
    consumers = draw(st.integers(1, max_consumers))
    production = draw(
        st.lists(
            st.lists(energy, min_size=producers, max_size=producers),
            min_size=intervals,
            max_size=intervals,
        )
    )
    demand = draw(
        st.lists(
            st.lists(energy, min_size=consumers, max_size=consumers),
            min_size=intervals,
            max_size=intervals,
        )
    )
    linked = draw(st.permutations(range(consumers)))
    own = [linked[p] if p < consumers and draw(st.booleans()) else -1 for p in range(producers)]
    tiers = draw(st.lists(st.integers(0, 3), min_size=consumers, max_size=consumers))
    # Dyadic keys (n / 64) are exact in binary, so the oracle sees the same numbers.
    sixty_fourths = draw(st.lists(st.integers(0, 64), min_size=consumers, max_size=consumers))
    unset = draw(st.lists(st.booleans(), min_size=consumers, max_size=consumers))
    shares = [
        math.nan if is_unset else n / 64 for n, is_unset in zip(sixty_fourths, unset, strict=True)
    ]
    for tier in set(tiers):
        members = [c for c in range(consumers) if tiers[c] == tier and not math.isnan(shares[c])]
        while sum(shares[c] for c in members) > 1:
            largest = max(members, key=lambda c: shares[c])
            shares[largest] = max(0.0, shares[largest] - 1 / 64)
    return BalancingInput(
        method=method,
        production_wh=np.array(production, dtype=np.int64).reshape(intervals, producers),
        demand_wh=np.array(demand, dtype=np.int64).reshape(intervals, consumers),
        producer_as_consumer=np.array(own, dtype=np.int64),
        consumer_tier=np.array(tiers, dtype=np.int64),
        consumer_share=np.array(shares, dtype=np.float64),
    )


def assert_exact_and_bounded(block: BalancingInput, result: BalancingResult) -> None:
    shared, feed, grid = result.shared_wh, result.feed_in_wh, result.grid_supply_wh
    assert shared.dtype == feed.dtype == grid.dtype == np.int64
    assert np.array_equal(shared.sum(axis=2) + feed, block.production_wh)
    assert np.array_equal(shared.sum(axis=1) + grid, block.demand_wh)
    assert shared.min(initial=0) >= 0
    assert feed.min(initial=0) >= 0
    assert grid.min(initial=0) >= 0
    assert np.all(shared <= block.demand_wh[:, None, :])
    for producer, column in enumerate(block.producer_as_consumer):
        if column >= 0:
            assert not shared[:, producer, column].any(), "a prosumer received its own energy"


def assert_floor_or_ceiling(rounded: int, exact: object) -> None:
    assert math.floor(exact) <= rounded <= math.ceil(exact), (rounded, exact)  # type: ignore[call-overload]


def assert_matches_oracle(block: BalancingInput, result: BalancingResult) -> None:
    for interval in range(block.production_wh.shape[0]):
        exact = allocate_interval(
            AllocationMethod(block.method),
            [int(v) for v in block.production_wh[interval]],
            [int(v) for v in block.demand_wh[interval]],
            [int(v) for v in block.producer_as_consumer],
            [int(v) for v in block.consumer_tier],
            [float(v) for v in block.consumer_share],
        )
        for producer, row in enumerate(exact.shared):
            for consumer, value in enumerate(row):
                assert_floor_or_ceiling(int(result.shared_wh[interval, producer, consumer]), value)
            assert_floor_or_ceiling(
                int(result.feed_in_wh[interval, producer]), exact.feed_in[producer]
            )
        for consumer, value in enumerate(exact.grid_supply):
            assert_floor_or_ceiling(int(result.grid_supply_wh[interval, consumer]), value)


def interval_of(block: BalancingInput, interval: int) -> BalancingInput:
    return BalancingInput(
        method=block.method,
        production_wh=block.production_wh[interval : interval + 1],
        demand_wh=block.demand_wh[interval : interval + 1],
        producer_as_consumer=block.producer_as_consumer,
        consumer_tier=block.consumer_tier,
        consumer_share=block.consumer_share,
    )


# Found by this test: PRO_RATA's redistribution weights must be the interval's demand, not
# what the first pass left of it.
PRO_RATA_PROSUMERS = BalancingInput(
    method=AllocationMethod.PRO_RATA,
    production_wh=np.array([[0, 74, 73]], dtype=np.int64),
    demand_wh=np.array([[0, 3, 812, 459]], dtype=np.int64),
    producer_as_consumer=np.array([-1, 1, 3], dtype=np.int64),
    consumer_tier=np.zeros(4, dtype=np.int64),
    consumer_share=np.zeros(4),
)


@SETTINGS
@given(sites())
@example(PRO_RATA_PROSUMERS)
def test_exact_margins_bounds_and_oracle(block: BalancingInput) -> None:
    result = allocate(block)
    assert_exact_and_bounded(block, result)
    assert_matches_oracle(block, result)


@SETTINGS
@given(sites(max_consumers=30, max_producers=5))
def test_wide_sites_match_the_oracle(block: BalancingInput) -> None:
    result = allocate(block)
    assert_exact_and_bounded(block, result)
    assert_matches_oracle(block, result)


AT_THE_BOUND = BalancingInput(
    method=AllocationMethod.PRO_RATA,
    production_wh=np.array([[MAX_INTERVAL_WH // 3, MAX_INTERVAL_WH - MAX_INTERVAL_WH // 3]]),
    demand_wh=np.array(
        [
            [
                MAX_INTERVAL_WH // 7,
                3 * (MAX_INTERVAL_WH // 7),
                MAX_INTERVAL_WH - 4 * (MAX_INTERVAL_WH // 7),
            ]
        ]
    ),
    producer_as_consumer=np.array([-1, 2], dtype=np.int64),
    consumer_tier=np.zeros(3, dtype=np.int64),
    consumer_share=np.zeros(3),
)


@SETTINGS
@given(sites(energy=large_energy))
@example(AT_THE_BOUND)
def test_energies_up_to_the_exact_range_stay_exact(block: BalancingInput) -> None:
    result = allocate(block)
    assert_exact_and_bounded(block, result)
    assert_matches_oracle(block, result)


def test_float_noise_of_large_energies_still_counts_as_whole_wh() -> None:
    # Four units in the last place above a whole Wh near the bound (3.8e-6 Wh): noise, not
    # a fraction, once the tolerance follows the interval's energy.
    whole = float(MAX_INTERVAL_WH - 64)
    noisy = np.array([[[whole + 4 * 2.0**-20]]])
    assert noisy[0, 0, 0] != whole
    base, fractional = _split_cells(noisy, np.array([MAX_INTERVAL_WH * 2.0**-45]))
    assert (int(base[0, 0, 0]), bool(fractional[0, 0, 0])) == (int(whole), False)
    # The absolute 1e-6 Wh alone would take it for a fraction.
    assert bool(_split_cells(noisy, _SNAP_ABS_WH)[1][0, 0, 0])


def test_energy_beyond_the_exact_range_is_refused() -> None:
    def block(production: list[int], demand: list[int]) -> BalancingInput:
        return BalancingInput(
            method=AllocationMethod.EQUAL,
            production_wh=np.array([production], dtype=np.int64),
            demand_wh=np.array([demand], dtype=np.int64),
            producer_as_consumer=np.full(len(production), -1, dtype=np.int64),
            consumer_tier=np.zeros(len(demand), dtype=np.int64),
            consumer_share=np.zeros(len(demand)),
        )

    allocate(block([MAX_INTERVAL_WH], [MAX_INTERVAL_WH // 2, MAX_INTERVAL_WH // 2]))
    for production, demand in (
        ([MAX_INTERVAL_WH, 1], [5]),  # the total
        ([5], [MAX_INTERVAL_WH // 2 + 1, MAX_INTERVAL_WH // 2]),
        ([2**62, 2**62], [5]),  # a sum that would wrap around in int64
        ([5], [2**63 - 1]),
    ):
        with pytest.raises(ValueError, match="exact"):
            allocate(block(production, demand))
    assert round_energy_wh(np.array([float(MAX_INTERVAL_WH)])).tolist() == [MAX_INTERVAL_WH]
    for value in (MAX_INTERVAL_WH + 1.0, 9.3e18, 1e300):
        with pytest.raises(ValueError, match="at most"):
            round_energy_wh(np.array([value]))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.lists(
            st.sampled_from([math.nan, math.inf, -math.inf, -0.5, -0.49, 9.3e18, 1e16])
            | st.floats(0, MAX_INTERVAL_WH * 1.01)
            | st.floats(0, 2_000),
            min_size=0,
            max_size=4,
        ),
        min_size=1,
        max_size=4,
    ).filter(lambda rows: len({len(row) for row in rows}) == 1)
)
def test_within_exact_range_is_what_allocate_and_rounding_take(rows: list[list[float]]) -> None:
    """``within_exact_range`` marks an interval exactly when rounding its energies and
    allocating them against nothing succeeds."""
    energy = np.array(rows, dtype=np.float64).reshape(len(rows), len(rows[0]))
    marked = within_exact_range(energy)
    for interval, ok in enumerate(marked.tolist()):
        try:
            whole = round_energy_wh(energy[interval : interval + 1])
            allocate(
                BalancingInput(
                    method=AllocationMethod.EQUAL,
                    production_wh=whole,
                    demand_wh=np.zeros((1, 1), dtype=np.int64),
                    producer_as_consumer=np.full(whole.shape[1], -1, dtype=np.int64),
                    consumer_tier=np.zeros(1, dtype=np.int64),
                    consumer_share=np.zeros(1),
                )
            )
        except ValueError:
            assert not ok, rows[interval]
        else:
            assert ok, rows[interval]


@SETTINGS
@given(sites())
def test_intervals_are_independent_and_deterministic(block: BalancingInput) -> None:
    result = allocate(block)
    again = allocate(block)
    assert np.array_equal(result.shared_wh, again.shared_wh)
    assert np.array_equal(result.feed_in_wh, again.feed_in_wh)
    assert np.array_equal(result.grid_supply_wh, again.grid_supply_wh)
    for interval in range(block.production_wh.shape[0]):
        alone = allocate(interval_of(block, interval))
        assert np.array_equal(alone.shared_wh[0], result.shared_wh[interval])
        assert np.array_equal(alone.feed_in_wh[0], result.feed_in_wh[interval])
        assert np.array_equal(alone.grid_supply_wh[0], result.grid_supply_wh[interval])


@SETTINGS
@given(sites(), st.data())
def test_zero_meter_is_an_absent_meter(block: BalancingInput, data: st.DataObject) -> None:
    consumers = block.demand_wh.shape[1]
    producers = block.production_wh.shape[1]
    at = data.draw(st.integers(0, consumers), label="consumer position")
    tier = data.draw(st.integers(0, 3), label="tier")
    tier_keys = np.nan_to_num(block.consumer_share[block.consumer_tier == tier]).sum()
    share = data.draw(
        st.sampled_from([math.nan, 0.0, max(0.0, math.floor((1 - tier_keys) * 64) / 64)]),
        label="share",
    )
    own = np.where(
        block.producer_as_consumer >= at, block.producer_as_consumer + 1, block.producer_as_consumer
    )
    own = np.where(block.producer_as_consumer < 0, -1, own)
    p_at = data.draw(st.integers(0, producers), label="producer position")
    free_columns = [c for c in range(consumers + 1) if c not in set(own.tolist())]
    zero_link = data.draw(st.sampled_from([-1, *free_columns]), label="zero producer link")
    wider = BalancingInput(
        method=block.method,
        production_wh=np.insert(block.production_wh, p_at, 0, axis=1),
        demand_wh=np.insert(block.demand_wh, at, 0, axis=1),
        producer_as_consumer=np.insert(own, p_at, zero_link),
        consumer_tier=np.insert(block.consumer_tier, at, tier),
        consumer_share=np.insert(block.consumer_share, at, share),
    )
    narrow = allocate(block)
    wide = allocate(wider)
    assert not wide.shared_wh[:, p_at, :].any()
    assert not wide.shared_wh[:, :, at].any()
    assert not wide.feed_in_wh[:, p_at].any()
    assert not wide.grid_supply_wh[:, at].any()
    kept = np.delete(np.delete(wide.shared_wh, p_at, axis=1), at, axis=2)
    assert np.array_equal(kept, narrow.shared_wh)
    assert np.array_equal(np.delete(wide.feed_in_wh, p_at, axis=1), narrow.feed_in_wh)
    assert np.array_equal(np.delete(wide.grid_supply_wh, at, axis=1), narrow.grid_supply_wh)


@st.composite
def fractional_tables(draw: st.DrawFn) -> np.ndarray:
    rows = draw(st.integers(1, 5))
    columns = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    cells = rng.random((rows, columns)) * rng.integers(1, 50, size=(rows, columns))
    cells[rng.random((rows, columns)) < 0.2] = 0.0
    row_sums = cells.sum(axis=1)
    column_sums = cells.sum(axis=0)
    table = np.zeros((rows + 1, columns + 1))
    table[:rows, :columns] = cells
    table[:rows, columns] = np.ceil(row_sums) - row_sums + rng.integers(0, 3, size=rows)
    table[rows, :columns] = np.ceil(column_sums) - column_sums + rng.integers(0, 3, size=columns)
    return table


@settings(max_examples=300, deadline=None)
@given(fractional_tables(), st.integers(0, 2**32 - 1), st.booleans())
def test_table_rounding_keeps_margins_and_floor_or_ceiling(
    table: np.ndarray, seed: int, seeded: bool
) -> None:
    """The exact repair, from scratch or from an arbitrary (even infeasible) greedy start."""
    start = np.random.default_rng(seed).random(table.shape) < 0.5 if seeded else None
    rounded = _round_table(table, start, _SNAP_ABS_WH)
    rows, columns = table.shape
    assert np.all(
        np.abs(rounded[:, : columns - 1][: rows - 1] - table[: rows - 1, : columns - 1]) < 1
    )
    assert np.all(np.abs(rounded[: rows - 1, columns - 1] - table[: rows - 1, columns - 1]) < 1)
    assert np.all(np.abs(rounded[rows - 1, : columns - 1] - table[rows - 1, : columns - 1]) < 1)
    assert np.array_equal(rounded[: rows - 1].sum(axis=1), np.rint(table[: rows - 1].sum(axis=1)))
    assert np.array_equal(
        rounded[:, : columns - 1].sum(axis=0), np.rint(table[:, : columns - 1].sum(axis=0))
    )


@SETTINGS
@given(sites(), st.data())
def test_idle_intervals_share_nothing_and_change_nothing_else(
    block: BalancingInput, data: st.DataObject
) -> None:
    """Intervals without production (which the engine skips) or without demand (which it
    allocates, a control), interleaved with a block: they feed in all production and take
    all demand from the grid, and the other intervals' results are the block's own."""
    intervals, producers = block.production_wh.shape
    consumers = block.demand_wh.shape[1]
    positions = sorted(data.draw(st.lists(st.integers(0, intervals), max_size=5), label="at"))
    production, demand = block.production_wh, block.demand_wh
    idle_rows = []
    for offset, at in enumerate(positions):
        without_production = data.draw(st.booleans(), label="no production (else no demand)")
        row_production = (
            [0] * producers
            if without_production
            else data.draw(
                st.lists(energy, min_size=producers, max_size=producers), label="production"
            )
        )
        row_demand = (
            data.draw(st.lists(energy, min_size=consumers, max_size=consumers), label="demand")
            if without_production
            else [0] * consumers
        )
        production = np.insert(production, at + offset, row_production, axis=0)
        demand = np.insert(demand, at + offset, row_demand, axis=0)
        idle_rows.append(at + offset)
    padded = dataclasses.replace(block, production_wh=production, demand_wh=demand)
    result = allocate(padded)
    assert_exact_and_bounded(padded, result)
    assert not result.shared_wh[idle_rows].any()
    assert np.array_equal(result.feed_in_wh[idle_rows], production[idle_rows])
    assert np.array_equal(result.grid_supply_wh[idle_rows], demand[idle_rows])
    kept = np.delete(np.arange(len(production)), idle_rows)
    alone = allocate(block)
    assert np.array_equal(result.shared_wh[kept], alone.shared_wh)
    assert np.array_equal(result.feed_in_wh[kept], alone.feed_in_wh)
    assert np.array_equal(result.grid_supply_wh[kept], alone.grid_supply_wh)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 300),
    st.integers(1, 6),
    st.integers(1, 4),
    st.integers(0, 2**32 - 1),
)
def test_greedy_picks_preferred_cells_first_then_the_lowest_meter_index(
    consumers: int, intervals: int, class_count: int, seed: int
) -> None:
    """The greedy's pick per class, against a plain per-interval loop: ``n`` cells of the
    class, the preferred ones first, each group lowest meter index first (the engine's
    tie rule, which the oracle tests do not pin: any floor-or-ceiling pick passes them).
    Up to 300 consumers, past the byte ranks' 255."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, class_count + 1, size=(consumers, intervals))  # last: none
    classes = [labels == number for number in range(class_count)]
    preferred = rng.random((consumers, intervals)) < 0.5
    class_wanted = [
        rng.integers(-2, consumers + 3, size=intervals).astype(np.int64) for _ in range(class_count)
    ]
    fields, counts = _preference_fields(classes, preferred)
    wanted = [
        part
        for number, take in enumerate(class_wanted)
        for part in _field_wanted(take, counts[2 * number])
    ]
    picked = _first_of_fields(fields, counts, wanted)
    expected = np.zeros((consumers, intervals), dtype=np.bool_)
    for interval in range(intervals):
        for number, members in enumerate(classes):
            column = members[:, interval]
            ordered = [c for c in range(consumers) if column[c] and preferred[c, interval]] + [
                c for c in range(consumers) if column[c] and not preferred[c, interval]
            ]
            for consumer in ordered[: max(0, int(class_wanted[number][interval]))]:
                expected[consumer, interval] = True
    assert np.array_equal(picked, expected)


@SETTINGS
@given(sites(), st.integers(1, 3), st.lists(st.integers(0, 8), max_size=4))
def test_chunks_of_gathered_rows_give_each_interval_its_own_result(
    block: BalancingInput, intervals_per_chunk: int, idle_at: list[int]
) -> None:
    """A block cut into chunks of 1-3 intervals, with intervals without production between
    them (the rows of a chunk then gathered, not sliced), gives every interval the result
    it has alone (intervals are independent): the tiers worked out once serve every chunk,
    and each chunk's result lands on its own rows."""
    production, demand = block.production_wh, block.demand_wh
    for offset, at in enumerate(sorted(idle_at)):
        row = min(at, len(block.production_wh)) + offset
        production = np.insert(production, row, 0, axis=0)
        demand = np.insert(demand, row, 7 * (offset + 1), axis=0)

    def with_energy(rows: slice) -> BalancingInput:
        return dataclasses.replace(block, production_wh=production[rows], demand_wh=demand[rows])

    cells_per_interval = production.shape[1] * demand.shape[1]
    original = engine_module._CHUNK_CELLS
    engine_module._CHUNK_CELLS = max(1, cells_per_interval) * intervals_per_chunk
    try:
        chunked = allocate(with_energy(slice(None)))
    finally:
        engine_module._CHUNK_CELLS = original
    for interval in range(len(production)):
        alone = allocate(with_energy(slice(interval, interval + 1)))
        assert np.array_equal(chunked.shared_wh[interval], alone.shared_wh[0])
        assert np.array_equal(chunked.feed_in_wh[interval], alone.feed_in_wh[0])
        assert np.array_equal(chunked.grid_supply_wh[interval], alone.grid_supply_wh[0])


@st.composite
def keys_just_over_one(draw: st.DrawFn) -> list[float]:
    """Static keys of one tier adding up to within the slack of 1, as the API accepts them:
    random parts scaled to 1 and then nudged by up to the slack, either way."""
    parts = draw(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=12))
    nudge = draw(st.floats(-engine_module.SHARE_SUM_SLACK, engine_module.SHARE_SUM_SLACK))
    total = math.fsum(parts)
    keys = [min(1.0, part / total * (1 + nudge)) for part in parts]
    assert engine_module.static_keys_total(keys) <= 1 + 2 * engine_module.SHARE_SUM_SLACK
    return keys


@SETTINGS
@example(keys=[0.6, 0.4000000009], energy_wh=2_000_000_000, method=AllocationMethod.STATIC)
@given(
    keys_just_over_one(),
    st.one_of(st.integers(1, 1_000), st.integers(MAX_INTERVAL_WH // 16, MAX_INTERVAL_WH // 12)),
    st.sampled_from(STATIC_METHODS),
)
def test_static_keys_the_api_accepts_allocate_with_exact_margins(
    keys: list[float], energy_wh: int, method: AllocationMethod
) -> None:
    """Keys a little over 1 offered a producer's energy a little over what it had: from about
    1e9 Wh an interval, more than the rounding snaps, and the allocation raised."""
    if engine_module.static_keys_total(keys) > 1 + engine_module.SHARE_SUM_SLACK:
        with pytest.raises(ValueError, match="add up to more than 1"):
            allocate(_one_producer(method, keys, energy_wh))
        return
    block = _one_producer(method, keys, energy_wh)
    result = allocate(block)
    assert_exact_and_bounded(block, result)
    # Everyone wants all of it and the keys add up to 1: nothing is fed in beyond rounding.
    assert result.feed_in_wh.sum() <= len(keys)


def _one_producer(method: AllocationMethod, keys: list[float], energy_wh: int) -> BalancingInput:
    return BalancingInput(
        method=method,
        production_wh=np.array([[energy_wh]], dtype=np.int64),
        demand_wh=np.full((1, len(keys)), energy_wh, dtype=np.int64),
        producer_as_consumer=np.array([-1], dtype=np.int64),
        consumer_tier=np.zeros(len(keys), dtype=np.int64),
        consumer_share=np.array(keys, dtype=np.float64),
    )


def test_the_api_and_the_engine_add_the_keys_alike() -> None:
    """Nine keys at 1 + 1e-9 one by one, one ulp above it as numpy pairs them up: the API
    accepted them and the engine refused them, so RunBalancing answered INTERNAL."""
    nine = [
        0.14326733703072186,
        0.11569730588112762,
        0.05236256591434324,
        0.10141866116745812,
        0.15231925260463125,
        0.14605691263981405,
        0.08721392104667393,
        0.10166404371523,
        0.10000000100000007,
    ]
    assert float(np.array(nine).sum()) > 1 + engine_module.SHARE_SUM_SLACK  # the old check
    total = engine_module.static_keys_total(nine)
    assert total == engine_module.static_keys_total(reversed(nine))
    if total <= 1 + engine_module.SHARE_SUM_SLACK:
        allocate(_one_producer(AllocationMethod.STATIC, nine, 900))
