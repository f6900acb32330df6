"""Unit tests for the pure upstream-contract rules in ``service.upstream.domain``."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from service.common.errors import FailedPreconditionError, FieldViolation, ValidationError
from service.upstream.domain import (
    ContractState,
    ContractTerms,
    UpstreamStatus,
    contract_state,
    derive_upstream_status,
    next_transition_date,
    validate_agreement,
    validate_new_contract,
    validate_termination,
)

AGREED = datetime(2025, 1, 5, 12, 0, tzinfo=UTC)
SWITCH = date(2025, 3, 1)


def terms(
    start: date,
    end: date | None = None,
    *,
    requires_agreement: bool = False,
    agreed_at: datetime | None = None,
    termination: date | None = None,
) -> ContractTerms:
    return ContractTerms(
        start_date=start,
        end_date=end,
        requires_agreement=requires_agreement,
        agreed_at=agreed_at,
        termination_date=termination,
    )


# --- ContractTerms.effective_end -------------------------------------------------------------


@pytest.mark.parametrize(
    ("end", "termination", "expected"),
    [
        (None, None, None),
        (date(2025, 6, 1), None, date(2025, 6, 1)),
        (None, date(2025, 4, 1), date(2025, 4, 1)),
        (date(2025, 6, 1), date(2025, 4, 1), date(2025, 4, 1)),
        (date(2025, 4, 1), date(2025, 6, 1), date(2025, 4, 1)),
    ],
)
def test_effective_end_is_earliest_set_end(
    end: date | None, termination: date | None, expected: date | None
) -> None:
    assert terms(date(2025, 1, 1), end, termination=termination).effective_end == expected


def test_contract_terms_are_frozen() -> None:
    t = terms(date(2025, 1, 1))
    with pytest.raises(AttributeError):
        t.start_date = date(2025, 2, 1)  # type: ignore[misc]


# --- contract_state --------------------------------------------------------------------------


def test_state_pending_before_start() -> None:
    assert contract_state(terms(date(2025, 2, 1)), date(2025, 1, 31)) is ContractState.PENDING


def test_state_active_on_start_day_half_open() -> None:
    t = terms(date(2025, 2, 1), date(2025, 3, 1))
    assert contract_state(t, date(2025, 2, 1)) is ContractState.ACTIVE
    assert contract_state(t, date(2025, 2, 28)) is ContractState.ACTIVE


def test_state_inactive_on_end_day_half_open() -> None:
    t = terms(date(2025, 2, 1), date(2025, 3, 1))
    assert contract_state(t, date(2025, 3, 1)) is ContractState.INACTIVE
    assert contract_state(t, date(2026, 1, 1)) is ContractState.INACTIVE


def test_state_open_ended_stays_active() -> None:
    assert contract_state(terms(date(2025, 1, 1)), date(2099, 1, 1)) is ContractState.ACTIVE


def test_state_needs_agreement_before_and_after_start() -> None:
    t = terms(date(2025, 2, 1), date(2025, 3, 1), requires_agreement=True)
    assert contract_state(t, date(2025, 1, 1)) is ContractState.NEEDS_AGREEMENT
    assert contract_state(t, date(2025, 2, 15)) is ContractState.NEEDS_AGREEMENT


def test_state_inactive_wins_over_needs_agreement() -> None:
    t = terms(date(2025, 2, 1), date(2025, 3, 1), requires_agreement=True)
    assert contract_state(t, date(2025, 3, 1)) is ContractState.INACTIVE


def test_state_agreed_contract_is_pending_then_active() -> None:
    t = terms(date(2025, 2, 1), requires_agreement=True, agreed_at=AGREED)
    assert contract_state(t, date(2025, 1, 31)) is ContractState.PENDING
    assert contract_state(t, date(2025, 2, 1)) is ContractState.ACTIVE


def test_state_terminated_inactive_from_termination_day() -> None:
    t = terms(date(2025, 1, 1), date(2025, 12, 1), termination=date(2025, 6, 1))
    assert contract_state(t, date(2025, 5, 31)) is ContractState.ACTIVE
    assert contract_state(t, date(2025, 6, 1)) is ContractState.INACTIVE


def test_a_contract_terminated_before_its_start_is_inactive_at_once() -> None:
    # Cancelled: it will never be in force, so it is neither pending nor in the way of a
    # replacement that starts before its termination date.
    cancelled = terms(date(2025, 3, 1), termination=date(2025, 2, 10))
    assert contract_state(cancelled, date(2025, 2, 1)) is ContractState.INACTIVE
    validate_new_contract(terms(date(2025, 2, 3)), [cancelled], date(2025, 2, 1))
    assert derive_upstream_status([[cancelled]], date(2025, 2, 1)) is (
        UpstreamStatus.CONTRACT_INACTIVE
    )


def test_state_values() -> None:
    assert [s.value for s in ContractState] == ["needs_agreement", "pending", "active", "inactive"]


# --- derive_upstream_status ------------------------------------------------------------------

TODAY = date(2025, 2, 15)
ACTIVE = terms(date(2025, 1, 1))
PENDING = terms(date(2025, 6, 1))
NEEDS = terms(date(2025, 1, 1), requires_agreement=True)
INACTIVE = terms(date(2024, 1, 1), date(2025, 1, 1))


@pytest.mark.parametrize(
    ("sites", "expected"),
    [
        ([], UpstreamStatus.NO_UPSTREAM_REGISTERED),
        ([[]], UpstreamStatus.NO_CONTRACT),
        ([[], []], UpstreamStatus.NO_CONTRACT),
        ([[INACTIVE]], UpstreamStatus.CONTRACT_INACTIVE),
        ([[NEEDS]], UpstreamStatus.CONTRACT_NEEDS_AGREEMENT),
        ([[PENDING]], UpstreamStatus.CONTRACT_PENDING),
        ([[ACTIVE]], UpstreamStatus.CONTRACT_ACTIVE),
        ([[INACTIVE, NEEDS]], UpstreamStatus.CONTRACT_NEEDS_AGREEMENT),
        ([[INACTIVE, NEEDS, PENDING]], UpstreamStatus.CONTRACT_PENDING),
        ([[INACTIVE, NEEDS, PENDING, ACTIVE]], UpstreamStatus.CONTRACT_ACTIVE),
        ([[], [INACTIVE]], UpstreamStatus.CONTRACT_INACTIVE),
    ],
)
def test_derive_upstream_status(sites: list[list[ContractTerms]], expected: UpstreamStatus) -> None:
    assert derive_upstream_status(sites, TODAY) is expected


def test_every_upstream_status_is_reachable() -> None:
    cases: list[list[list[ContractTerms]]] = [
        [],
        [[]],
        [[INACTIVE]],
        [[NEEDS]],
        [[PENDING]],
        [[ACTIVE]],
    ]
    assert {derive_upstream_status(c, TODAY) for c in cases} == set(UpstreamStatus)


def test_precedence_across_upstream_sites_of_different_suppliers() -> None:
    supplier_a_site = [INACTIVE, PENDING]
    supplier_b_site = [NEEDS]
    assert (
        derive_upstream_status([supplier_a_site, supplier_b_site], TODAY)
        is UpstreamStatus.CONTRACT_PENDING
    )
    assert (
        derive_upstream_status([supplier_b_site, [ACTIVE]], TODAY) is UpstreamStatus.CONTRACT_ACTIVE
    )
    assert (
        derive_upstream_status([[INACTIVE], supplier_b_site], TODAY)
        is UpstreamStatus.CONTRACT_NEEDS_AGREEMENT
    )


# --- supplier switch -------------------------------------------------------------------------

OLD = terms(date(2024, 1, 1), SWITCH)


def test_supplier_switch_agreed_new_contract() -> None:
    new = terms(SWITCH, requires_agreement=True, agreed_at=AGREED)
    sites = [[OLD], [new]]
    assert derive_upstream_status(sites, date(2025, 2, 28)) is UpstreamStatus.CONTRACT_ACTIVE
    assert contract_state(new, date(2025, 2, 28)) is ContractState.PENDING
    assert derive_upstream_status(sites, SWITCH) is UpstreamStatus.CONTRACT_ACTIVE
    assert contract_state(OLD, SWITCH) is ContractState.INACTIVE
    assert contract_state(new, SWITCH) is ContractState.ACTIVE


def test_supplier_switch_new_contract_without_agreement() -> None:
    new = terms(SWITCH, requires_agreement=True)
    sites = [[OLD], [new]]
    assert derive_upstream_status(sites, date(2025, 2, 28)) is UpstreamStatus.CONTRACT_ACTIVE
    assert derive_upstream_status(sites, SWITCH) is UpstreamStatus.CONTRACT_NEEDS_AGREEMENT


def test_supplier_switch_same_upstream_site_is_not_an_overlap() -> None:
    validate_new_contract(terms(SWITCH), [OLD], date(2025, 2, 1))


# --- next_transition_date --------------------------------------------------------------------


def test_next_transition_none_without_contracts() -> None:
    assert next_transition_date([], TODAY) is None


def test_next_transition_none_for_open_ended_active() -> None:
    assert next_transition_date([ACTIVE], TODAY) is None


def test_next_transition_none_for_inactive() -> None:
    assert next_transition_date([INACTIVE], TODAY) is None


def test_next_transition_start_of_pending() -> None:
    assert next_transition_date([PENDING], TODAY) == date(2025, 6, 1)


def test_next_transition_end_of_active() -> None:
    assert next_transition_date([terms(date(2025, 1, 1), SWITCH)], TODAY) == SWITCH


def test_next_transition_is_strictly_after_today() -> None:
    t = terms(TODAY, date(2025, 4, 1))
    assert next_transition_date([t], TODAY) == date(2025, 4, 1)
    assert next_transition_date([terms(TODAY)], TODAY) is None


def test_next_transition_earliest_across_contracts() -> None:
    contracts = [PENDING, terms(date(2025, 1, 1), date(2025, 5, 1)), ACTIVE, INACTIVE]
    assert next_transition_date(contracts, TODAY) == date(2025, 5, 1)


def test_next_transition_uses_termination_date() -> None:
    t = terms(date(2025, 1, 1), date(2025, 12, 1), termination=date(2025, 4, 1))
    assert next_transition_date([t], TODAY) == date(2025, 4, 1)


def test_next_transition_ignores_start_of_unagreed_contract() -> None:
    t = terms(date(2025, 3, 1), date(2025, 9, 1), requires_agreement=True)
    assert next_transition_date([t], TODAY) == date(2025, 9, 1)
    assert next_transition_date([terms(date(2025, 3, 1), requires_agreement=True)], TODAY) is None


def test_next_transition_none_for_a_contract_cancelled_before_its_start() -> None:
    # Inactive from its termination on, whatever the calendar: nothing left to apply.
    t = terms(date(2025, 6, 1), termination=date(2025, 3, 1))
    assert next_transition_date([t], TODAY) is None


def test_next_transition_supplier_switch() -> None:
    new = terms(SWITCH, date(2026, 3, 1))
    assert next_transition_date([OLD, new], TODAY) == SWITCH
    assert next_transition_date([OLD, new], SWITCH) == date(2026, 3, 1)


# --- validate_new_contract -------------------------------------------------------------------


def violations(exc: pytest.ExceptionInfo[ValidationError]) -> list[FieldViolation]:
    return exc.value.violations


def test_new_contract_valid_open_ended_and_backdated() -> None:
    validate_new_contract(terms(date(2024, 1, 1)), [], TODAY)
    validate_new_contract(terms(date(2024, 1, 1), date(2024, 6, 1)), [], TODAY)


def test_new_contract_end_must_be_after_start() -> None:
    validate_new_contract(terms(TODAY, date(2025, 2, 16)), [], TODAY)
    for end in (TODAY, date(2025, 2, 1)):
        with pytest.raises(ValidationError) as exc:
            validate_new_contract(terms(TODAY, end), [], TODAY)
        assert violations(exc) == [FieldViolation("end_date", "must be after start_date")]


def test_new_contract_overlap_rejected() -> None:
    existing = [terms(date(2025, 1, 1), date(2025, 6, 1))]
    with pytest.raises(ValidationError) as exc:
        validate_new_contract(terms(date(2025, 5, 31)), existing, TODAY)
    assert violations(exc) == [
        FieldViolation("start_date", "overlaps contract starting 2025-01-01 on this upstream site")
    ]


def test_new_contract_overlap_with_open_ended_and_future_contracts() -> None:
    existing = [terms(date(2025, 1, 1), date(2025, 3, 1)), terms(date(2025, 3, 1))]
    with pytest.raises(ValidationError) as exc:
        validate_new_contract(terms(date(2024, 12, 1), date(2025, 4, 1)), existing, TODAY)
    assert [v.rule for v in violations(exc)] == [
        "overlaps contract starting 2025-01-01 on this upstream site",
        "overlaps contract starting 2025-03-01 on this upstream site",
    ]


def test_new_contract_overlap_with_needs_agreement_contract() -> None:
    existing = [terms(date(2025, 6, 1), requires_agreement=True)]
    with pytest.raises(ValidationError):
        validate_new_contract(terms(date(2025, 1, 1)), existing, TODAY)
    validate_new_contract(terms(date(2025, 1, 1), date(2025, 6, 1)), existing, TODAY)


def test_new_contract_adjacent_periods_do_not_overlap() -> None:
    existing = [terms(date(2025, 3, 1), date(2025, 6, 1))]
    validate_new_contract(terms(date(2025, 1, 1), date(2025, 3, 1)), existing, TODAY)
    validate_new_contract(terms(date(2025, 6, 1)), existing, TODAY)


def test_new_contract_inactive_contracts_are_ignored() -> None:
    validate_new_contract(terms(date(2024, 6, 1)), [INACTIVE], TODAY)


def test_new_contract_terminated_period_is_respected() -> None:
    existing = [terms(date(2025, 1, 1), date(2025, 12, 1), termination=date(2025, 4, 1))]
    validate_new_contract(terms(date(2025, 4, 1)), existing, TODAY)
    with pytest.raises(ValidationError):
        validate_new_contract(terms(date(2025, 3, 31)), existing, TODAY)


def test_new_contract_reports_all_violations() -> None:
    existing = [ACTIVE]
    with pytest.raises(ValidationError) as exc:
        validate_new_contract(terms(date(2025, 5, 1), date(2025, 5, 1)), existing, TODAY)
    # An empty period overlaps nothing; only the end_date rule is reported.
    assert [v.field for v in violations(exc)] == ["end_date"]
    existing = [ACTIVE, terms(date(2024, 1, 1), date(2026, 1, 1))]
    with pytest.raises(ValidationError) as exc:
        validate_new_contract(terms(date(2025, 5, 1)), existing, TODAY)
    assert [v.field for v in violations(exc)] == ["start_date", "start_date"]


# --- validate_agreement ----------------------------------------------------------------------


def test_agreement_allowed_when_required_and_not_agreed() -> None:
    validate_agreement(NEEDS, TODAY)
    validate_agreement(terms(date(2025, 6, 1), requires_agreement=True), TODAY)


def test_agreement_rejected_when_not_required() -> None:
    with pytest.raises(FailedPreconditionError, match="does not require agreement"):
        validate_agreement(ACTIVE, TODAY)


def test_agreement_rejected_when_already_agreed() -> None:
    t = terms(date(2025, 1, 1), requires_agreement=True, agreed_at=AGREED)
    with pytest.raises(FailedPreconditionError, match="already agreed"):
        validate_agreement(t, TODAY)


def test_agreement_rejected_when_inactive() -> None:
    t = terms(date(2024, 1, 1), date(2025, 1, 1), requires_agreement=True)
    with pytest.raises(FailedPreconditionError, match="no longer in force"):
        validate_agreement(t, TODAY)


# --- validate_termination --------------------------------------------------------------------


def test_termination_allowed_today_and_later() -> None:
    t = terms(date(2025, 1, 1), date(2025, 6, 1))
    validate_termination(t, TODAY, TODAY)
    validate_termination(t, date(2025, 5, 31), TODAY)
    validate_termination(ACTIVE, date(2030, 1, 1), TODAY)


def test_termination_before_start_cancels_future_contract() -> None:
    validate_termination(PENDING, date(2025, 3, 1), TODAY)
    validate_termination(terms(date(2025, 6, 1), requires_agreement=True), TODAY, TODAY)


def test_termination_rejected_when_inactive() -> None:
    with pytest.raises(FailedPreconditionError, match="no longer in force"):
        validate_termination(INACTIVE, date(2025, 3, 1), TODAY)


def test_termination_rejected_when_already_terminated() -> None:
    t = terms(date(2025, 1, 1), termination=date(2025, 6, 1))
    with pytest.raises(FailedPreconditionError, match="already terminated"):
        validate_termination(t, date(2025, 3, 1), TODAY)


def test_termination_effective_date_not_in_past() -> None:
    with pytest.raises(ValidationError) as exc:
        validate_termination(ACTIVE, date(2025, 2, 14), TODAY)
    assert violations(exc) == [FieldViolation("effective_date", "must be today or later")]


def test_termination_effective_date_before_end() -> None:
    t = terms(date(2025, 1, 1), date(2025, 6, 1))
    for effective in (date(2025, 6, 1), date(2025, 7, 1)):
        with pytest.raises(ValidationError) as exc:
            validate_termination(t, effective, TODAY)
        assert violations(exc) == [
            FieldViolation("effective_date", "must be before the contract's end_date 2025-06-01")
        ]
