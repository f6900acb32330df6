"""A plain per-interval implementation of the balancing rules in exact rational arithmetic.

It follows the rules of ``service.balancing.engine`` literally, pass after pass, with
``fractions.Fraction`` and no vectorisation, no closed forms and no rounding, so that the
engine's float, vectorised and rounded result can be checked against the exact values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from service.balancing.engine import AllocationMethod


@dataclass(frozen=True)
class ExactInterval:
    """Exact energies of one interval: ``shared[p][c]``, ``feed_in[p]``, ``grid_supply[c]``."""

    shared: list[list[Fraction]]
    feed_in: list[Fraction]
    grid_supply: list[Fraction]
    passes: int


def tier_order(tiers: Sequence[int]) -> list[list[int]]:
    numbered = sorted({tier for tier in tiers if tier > 0})
    order = [*numbered, 0] if 0 in tiers else numbered
    return [[column for column, tier in enumerate(tiers) if tier == wanted] for wanted in order]


def allocate_interval(
    method: AllocationMethod,
    production: Sequence[int],
    demand: Sequence[int],
    producer_as_consumer: Sequence[int],
    consumer_tier: Sequence[int],
    consumer_share: Sequence[float],
) -> ExactInterval:
    """The rules for one interval, exactly."""
    producers = range(len(production))
    left = [Fraction(value) for value in production]
    wanted = [Fraction(value) for value in demand]
    shared = [[Fraction(0)] * len(demand) for _ in producers]
    shares = [Fraction(0) if math.isnan(share) else Fraction(share) for share in consumer_share]
    passes = 0

    def one_pass(offers: dict[tuple[int, int], Fraction]) -> None:
        for consumer in {c for _, c in offers}:
            offered = sum((v for (p, c), v in offers.items() if c == consumer), Fraction(0))
            if offered == 0:
                continue
            taken = min(wanted[consumer], offered)
            for (producer, c), value in offers.items():
                if c == consumer:
                    given = value * taken / offered
                    shared[producer][consumer] += given
                    left[producer] -= given
            wanted[consumer] -= taken

    for columns in tier_order(consumer_tier):
        demand_in_tier = {c: Fraction(demand[c]) for c in columns}
        if method is AllocationMethod.EQUAL:
            weights = {c: Fraction(1 if demand_in_tier[c] > 0 else 0) for c in columns}
        elif method is AllocationMethod.PRO_RATA:
            weights = dict(demand_in_tier)
        else:
            weights = {c: shares[c] for c in columns}
        if method in (AllocationMethod.EQUAL, AllocationMethod.PRO_RATA):
            total = sum(weights.values(), Fraction(0))
            first_keys = {c: (weights[c] / total if total else Fraction(0)) for c in columns}
        else:
            first_keys = {c: shares[c] for c in columns}
        one_pass(
            {
                (p, c): left[p] * first_keys[c]
                for p in producers
                for c in columns
                if c != producer_as_consumer[p]
            }
        )
        passes += 1
        if method is AllocationMethod.STATIC:
            continue
        for _ in range(len(columns) + 2):
            in_demand = [c for c in columns if wanted[c] > 0]
            offers: dict[tuple[int, int], Fraction] = {}
            for p in producers:
                others = [c for c in in_demand if c != producer_as_consumer[p]]
                total = sum((weights[c] for c in others), Fraction(0))
                if left[p] > 0 and total > 0:
                    for c in others:
                        offers[(p, c)] = left[p] * weights[c] / total
            if not offers:
                break
            one_pass(offers)
            passes += 1
        else:
            raise AssertionError("the oracle's passes did not end within the proven bound")
    return ExactInterval(
        shared=shared,
        feed_in=left,
        grid_supply=wanted,
        passes=passes,
    )
