"""Sizing a page of ListAggregatedBalances without I/O: the rows an output interval holds."""

from __future__ import annotations

from uuid import UUID

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from service.balancing.aggregate import GRID, Aggregation, pair_columns
from service.balancing.reads import rows_per_interval

METERS = [UUID(int=i + 1) for i in range(6)]


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
