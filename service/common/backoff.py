"""Capped doubling back-off, the one rule every retry of ours waits by."""

from __future__ import annotations


def doubling_delay(failures: int, first_seconds: float, max_seconds: float) -> float:
    """The wait after the ``failures``-th failure in a row (1 = the first): ``first_seconds``,
    doubling with each further failure, never more than ``max_seconds``."""
    # Bounded, so that a long outage's count cannot overflow the float.
    exponent = min(max(failures, 1) - 1, 62)
    return min(max_seconds, first_seconds * 2.0**exponent)
