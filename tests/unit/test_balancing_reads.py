"""Sizing a page of ListAggregatedBalances without I/O: the rows an output interval holds."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from service.balancing.aggregate import GRID, Aggregation, aggregate, pair_columns
from service.balancing.blocks import empty_block
from service.balancing.reads import rows_per_interval

METERS = [UUID(int=i + 1) for i in range(6)]
QUARTER_US = 900_000_000


def _at(quarters: int) -> datetime:
    return datetime.fromtimestamp(quarters * QUARTER_US / 1_000_000, UTC)


def one_interval(producers: list[UUID], consumers: list[UUID]) -> Aggregation:
    p, c = len(producers), len(consumers)
    return Aggregation(
        bounds=np.array([0, 900_000_000], dtype=np.int64),
        balance_intervals=np.ones(1, dtype=np.int64),
        complete_intervals=np.ones(1, dtype=np.int64),
        producer_ids=producers,
        consumer_ids=consumers,
        shared_wh=np.zeros((1, p, c), dtype=np.int64),
        feed_in_wh=np.zeros((1, p), dtype=np.int64),
        grid_supply_wh=np.zeros((1, c), dtype=np.int64),
        producer_present=np.ones((1, p), dtype=np.bool_),
        consumer_present=np.ones((1, c), dtype=np.bool_),
        pair_present=np.ones((1, p, c), dtype=np.bool_),
    )


@given(
    producers=st.sets(st.sampled_from(METERS)),
    consumers=st.sets(st.sampled_from(METERS)),
    creditor=st.none() | st.just(GRID) | st.sampled_from(METERS).map(str),
    debitor=st.none() | st.just(GRID) | st.sampled_from(METERS).map(str),
)
def test_rows_per_interval_counts_the_rows_pair_columns_lists(
    producers: set[UUID], consumers: set[UUID], creditor: str | None, debitor: str | None
) -> None:
    # A meter in both sets is a prosumer: never a row to itself.
    estimate = rows_per_interval(sorted(producers), sorted(consumers), creditor, debitor)
    if creditor is not None and debitor is not None:
        assert estimate == 1  # both filters name at most one pair
        return
    # A filtered meter the block lacks is counted as if it took part on its side.
    if creditor not in (None, GRID):
        producers = producers | {UUID(creditor)}
    if debitor not in (None, GRID):
        consumers = consumers | {UUID(debitor)}
    listed = pair_columns(one_interval(sorted(producers), sorted(consumers)), creditor, debitor)
    assert estimate == max(1, len(listed.creditors))


def test_a_pair_is_listed_only_where_its_two_meters_took_part_together() -> None:
    # One output interval of two balance intervals: the producer takes part in the first
    # only, the consumer in the second only (each block has its own participants).
    producer, consumer, other = METERS[0], METERS[1], METERS[2]
    first = empty_block(_at(0), _at(1), np.array([0], dtype=np.int64), (producer,), (other,))
    second = empty_block(
        _at(1), _at(2), np.array([QUARTER_US], dtype=np.int64), (other,), (consumer,)
    )
    bounds = np.array([0, 2 * QUARTER_US], dtype=np.int64)
    agg = aggregate([first, second], bounds, np.array([0, QUARTER_US], dtype=np.int64))
    listed = pair_columns(agg, None, None)
    present = {
        (cred, deb)
        for k, (cred, deb) in enumerate(zip(listed.creditors, listed.debitors, strict=True))
        if listed.present[0, k]
    }
    assert present == {
        (str(producer), str(other)),
        (str(other), str(consumer)),
        (str(producer), GRID),
        (str(other), GRID),
        (GRID, str(other)),
        (GRID, str(consumer)),
    }
