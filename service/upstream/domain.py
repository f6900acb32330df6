"""Upstream contracts and the ``upstream_status`` of partner sites: pure rules, no I/O.

Partners register sites named by a grid identifier; energy suppliers register *upstream
sites* with the same grid identifier and put contracts on them. Every partner site shows an
``upstream_status`` derived from the contracts of all matching upstream sites.

Dates
    All dates are ``datetime.date`` and every period is **half-open**. A contract is in force
    on the days ``d`` with ``start_date <= d < effective_end``, where ``effective_end`` is the
    earliest of ``end_date`` and ``termination_date`` that is set (``None`` = open-ended).
    ``end_date`` is the first day the contract is no longer in force; a termination's
    ``effective_date`` means the same. A supplier switch is therefore clean: the old contract
    ends on 2025-03-01 and the new one starts on 2025-03-01, with neither gap nor overlap.

Everything here is a plain function of its arguments (``today`` is always passed in), so the
rules are testable without a clock, a database or gRPC. Broken rules raise the domain errors
of :mod:`service.common.errors`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import StrEnum

from service.common.errors import FailedPreconditionError, ViolationCollector

__all__ = [
    "ContractState",
    "ContractTerms",
    "UpstreamStatus",
    "contract_state",
    "derive_upstream_status",
    "next_transition_date",
    "validate_agreement",
    "validate_new_contract",
    "validate_termination",
]


class ContractState(StrEnum):
    """State of one contract on a given day (see :func:`contract_state`)."""

    NEEDS_AGREEMENT = "needs_agreement"
    PENDING = "pending"
    ACTIVE = "active"
    INACTIVE = "inactive"


class UpstreamStatus(StrEnum):
    """Upstream status of a partner site (see :func:`derive_upstream_status`)."""

    NO_UPSTREAM_REGISTERED = "no_upstream_registered"
    NO_CONTRACT = "no_contract"
    CONTRACT_NEEDS_AGREEMENT = "contract_needs_agreement"
    CONTRACT_PENDING = "contract_pending"
    CONTRACT_ACTIVE = "contract_active"
    CONTRACT_INACTIVE = "contract_inactive"


@dataclass(frozen=True)
class ContractTerms:
    """The date-relevant terms of one contract on an upstream site.

    ``start_date`` is the first day in force; ``end_date`` the first day no longer in force
    (``None`` = open-ended). ``requires_agreement`` says the partner must agree before the
    contract can become pending/active; ``agreed_at`` records when that happened.
    ``termination_date`` is the ``effective_date`` of a termination, if any: like ``end_date``
    it is the first day no longer in force.

    Construction does not validate; use :func:`validate_new_contract` for that.
    """

    start_date: date
    end_date: date | None
    requires_agreement: bool
    agreed_at: datetime | None = None
    termination_date: date | None = None

    @property
    def effective_end(self) -> date | None:
        """First day no longer in force: the earliest of ``end_date`` and ``termination_date``
        that is set, or ``None`` if neither is (open-ended)."""
        ends = [d for d in (self.end_date, self.termination_date) if d is not None]
        return min(ends) if ends else None


def contract_state(terms: ContractTerms, today: date) -> ContractState:
    """State of the contract on ``today``, checked in this order:

    1. ``INACTIVE`` if ``effective_end`` is set and ``today >= effective_end`` (ended or
       terminated; the end day itself is already inactive), or ``effective_end`` is not
       after ``start_date`` (terminated before it started: it will never be in force);
    2. ``NEEDS_AGREEMENT`` if agreement is required and not yet given, whether or not
       ``start_date`` has passed;
    3. ``PENDING`` if ``today < start_date``;
    4. ``ACTIVE`` otherwise (the start day itself is active).
    """
    end = terms.effective_end
    if end is not None and (today >= end or end <= terms.start_date):
        return ContractState.INACTIVE
    if terms.requires_agreement and terms.agreed_at is None:
        return ContractState.NEEDS_AGREEMENT
    if today < terms.start_date:
        return ContractState.PENDING
    return ContractState.ACTIVE


# Highest precedence first; see derive_upstream_status.
_PRECEDENCE: tuple[tuple[ContractState, UpstreamStatus], ...] = (
    (ContractState.ACTIVE, UpstreamStatus.CONTRACT_ACTIVE),
    (ContractState.PENDING, UpstreamStatus.CONTRACT_PENDING),
    (ContractState.NEEDS_AGREEMENT, UpstreamStatus.CONTRACT_NEEDS_AGREEMENT),
    (ContractState.INACTIVE, UpstreamStatus.CONTRACT_INACTIVE),
)


def derive_upstream_status(
    contracts_per_upstream_site: Sequence[Sequence[ContractTerms]], today: date
) -> UpstreamStatus:
    """Upstream status of a partner site on ``today``.

    ``contracts_per_upstream_site`` holds, for each upstream site (of any supplier) whose grid
    identifier matches the partner site, that upstream site's contracts.

    * no matching upstream site -> ``NO_UPSTREAM_REGISTERED``;
    * upstream sites, but not a single contract on any of them -> ``NO_CONTRACT``;
    * otherwise the highest-precedence :func:`contract_state` among all contracts of all
      matching upstream sites, with precedence
      ``ACTIVE > PENDING > NEEDS_AGREEMENT > INACTIVE``, mapped to ``CONTRACT_*``.

    Rationale: a contract in force now is what matters for dispatch, so it wins over anything
    in the future. During a supplier switch the old contract keeps the site
    ``CONTRACT_ACTIVE`` until its end; from the switch date on the new contract's state shows
    (``CONTRACT_ACTIVE``, or ``CONTRACT_NEEDS_AGREEMENT`` if it was never agreed). An inactive
    contract only shows when nothing current or future exists.
    """
    if not contracts_per_upstream_site:
        return UpstreamStatus.NO_UPSTREAM_REGISTERED
    states = {
        contract_state(terms, today)
        for contracts in contracts_per_upstream_site
        for terms in contracts
    }
    for state, status in _PRECEDENCE:
        if state in states:
            return status
    return UpstreamStatus.NO_CONTRACT


def next_transition_date(contracts: Iterable[ContractTerms], today: date) -> date | None:
    """Earliest date strictly after ``today`` on which the :func:`contract_state` of any of
    ``contracts`` changes by the calendar alone, or ``None`` if none ever will.

    Candidates are each contract's ``start_date`` and ``effective_end``; a candidate counts
    only if the state really differs from the day before (e.g. the ``start_date`` of a
    contract still needing agreement changes nothing, nor does any date of a contract
    terminated before it starts, inactive at once). Agreement and termination are API calls, not
    dates: whoever performs them recomputes. Meant for a scheduler deciding when to
    recompute ``upstream_status``.
    """
    best: date | None = None
    for terms in contracts:
        for candidate in (terms.start_date, terms.effective_end):
            if candidate is None or candidate <= today:
                continue
            if best is not None and candidate >= best:
                continue
            before = contract_state(terms, candidate - timedelta(days=1))
            if contract_state(terms, candidate) != before:
                best = candidate
    return best


def _overlaps(start_a: date, end_a: date | None, start_b: date, end_b: date | None) -> bool:
    """Whether half-open ``[start_a, end_a)`` and ``[start_b, end_b)`` share a day."""
    return (end_b is None or start_a < end_b) and (end_a is None or start_b < end_a)


def validate_new_contract(
    terms: ContractTerms, existing: Sequence[ContractTerms], today: date
) -> None:
    """Check a contract about to be created on an upstream site that already has
    ``existing`` contracts; raise ``ValidationError`` listing every broken rule.

    * ``end_date``, if set, must be after ``start_date`` (a contract is in force at least one
      day). Backdated ``start_date`` is allowed: contracts are often registered late.
    * ``start_date``: the new in-force period ``[start_date, effective_end)`` must not overlap
      the in-force period of any existing contract on the same upstream site that is not
      ``INACTIVE`` today (one violation per such contract, named by its start date, since
      contracts carry no id here). Adjacent periods (old ends the day the new starts) do not
      overlap. Skipped when the new period is empty, which the ``end_date`` rule reports.
    """
    violations = ViolationCollector()
    if terms.end_date is not None and terms.end_date <= terms.start_date:
        violations.add("end_date", "must be after start_date")
    new_end = terms.effective_end
    if new_end is None or new_end > terms.start_date:
        clashing = sorted(
            (
                other.start_date
                for other in existing
                if contract_state(other, today) is not ContractState.INACTIVE
                and _overlaps(terms.start_date, new_end, other.start_date, other.effective_end)
            ),
        )
        for start in clashing:
            violations.add(
                "start_date",
                f"overlaps contract starting {start.isoformat()} on this upstream site",
            )
    violations.raise_if_any()


def validate_agreement(terms: ContractTerms, today: date) -> None:
    """Check that the partner may agree to the contract now; raise
    ``FailedPreconditionError`` unless it requires agreement, is not yet agreed and is not
    ``INACTIVE`` today."""
    if contract_state(terms, today) is ContractState.INACTIVE:
        raise FailedPreconditionError(
            f"contract is no longer in force (ended {_iso(terms.effective_end)}); "
            "it cannot be agreed"
        )
    if not terms.requires_agreement:
        raise FailedPreconditionError("contract does not require agreement")
    if terms.agreed_at is not None:
        raise FailedPreconditionError(
            f"contract was already agreed at {terms.agreed_at.isoformat()}"
        )


def validate_termination(terms: ContractTerms, effective_date: date, today: date) -> None:
    """Check a termination of the contract taking effect on ``effective_date`` (the first day
    no longer in force).

    Raises ``FailedPreconditionError`` if the contract is already ``INACTIVE`` today or
    already has a ``termination_date``. Otherwise raises ``ValidationError`` on field
    ``effective_date`` if it is before ``today`` ("must be today or later") or not before the
    contract's current ``effective_end`` ("must be before the contract's end_date ...").
    ``effective_date == today`` ends the contract at once; an ``effective_date`` on or before
    ``start_date`` is allowed and cancels a contract that has not started.
    """
    if contract_state(terms, today) is ContractState.INACTIVE:
        raise FailedPreconditionError(
            f"contract is no longer in force (ended {_iso(terms.effective_end)}); "
            "it cannot be terminated"
        )
    if terms.termination_date is not None:
        raise FailedPreconditionError(
            f"contract is already terminated effective {terms.termination_date.isoformat()}"
        )
    violations = ViolationCollector()
    if effective_date < today:
        violations.add("effective_date", "must be today or later")
    end = terms.effective_end
    if end is not None and effective_date >= end:
        violations.add(
            "effective_date", f"must be before the contract's end_date {end.isoformat()}"
        )
    violations.raise_if_any()


def _iso(day: date | None) -> str:
    return day.isoformat() if day is not None else "never"
