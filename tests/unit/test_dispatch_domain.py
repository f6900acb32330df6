"""Dispatch rules without a server: validation, eligibility, allocation, states, settling."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.common.errors import ValidationError
from service.dispatch.domain import (
    TRANSITIONS,
    CancellationState,
    Candidate,
    DispatchRequest,
    DispatchType,
    InvalidTransition,
    OutboxRow,
    Outcome,
    Selection,
    SetpointState,
    SiteEligibility,
    after_attempt,
    allocate,
    before_attempt,
    check_transition,
    format_power,
    holds_a_whole_watt,
    ineligibility,
    is_terminal,
    outside_bounds,
    unsendable,
    validate_request,
)
from service.dispatch.store import plan
from service.registry.domain import ResourceType, SiteStatus
from service.upstream.domain import UpstreamStatus

NOW = datetime(2031, 5, 4, 10, 7, 30, tzinfo=UTC)
START = datetime(2031, 5, 4, 10, 15, tzinfo=UTC)
END = datetime(2031, 5, 4, 11, 0, tzinfo=UTC)


def request(**changes: object) -> DispatchRequest:
    values: dict[str, object] = {
        "request_id": "r-1",
        "power_kw": 10.0,
        "start_time": START,
        "end_time": END,
        "dispatch_type": DispatchType.EXACT,
    }
    values.update(changes)
    return DispatchRequest(**values)  # type: ignore[arg-type]


def violations(bad: DispatchRequest) -> dict[str, str]:
    with pytest.raises(ValidationError) as caught:
        validate_request(bad, NOW)
    return {v.field: v.rule for v in caught.value.violations}


class TestValidation:
    def test_a_valid_request_passes(self) -> None:
        assert validate_request(request(), NOW) == request()

    def test_an_ongoing_window_is_allowed(self) -> None:
        validate_request(request(start_time=START - timedelta(minutes=15)), NOW)

    @pytest.mark.parametrize(
        ("changes", "field"),
        [
            ({"request_id": ""}, "request_id"),
            ({"request_id": "x" * 129}, "request_id"),
            ({"request_id": " padded"}, "request_id"),
            ({"request_id": "tab\there"}, "request_id"),
            ({"power_kw": math.nan}, "power_kw"),
            ({"power_kw": math.inf}, "power_kw"),
            # Finite, but infinite in watts.
            ({"power_kw": 1e306}, "power_kw"),
            ({"power_kw": -1e306}, "power_kw"),
            ({"power_kw": 1e9 + 1}, "power_kw"),
            ({"dispatch_type": DispatchType.MAXIMISE_UPWARDS, "power_kw": 1e306}, "power_kw"),
            ({"dispatch_type": None}, "type"),
            ({"start_time": START + timedelta(minutes=1)}, "start_time"),
            ({"start_time": START + timedelta(seconds=0.5)}, "start_time"),
            ({"end_time": END + timedelta(minutes=7)}, "end_time"),
            ({"end_time": START}, "end_time"),
            ({"end_time": START + timedelta(hours=24, minutes=15)}, "end_time"),
            (
                {
                    "start_time": START - timedelta(hours=1),
                    "end_time": START - timedelta(minutes=15),
                },
                "end_time",
            ),
            ({"dispatch_type": DispatchType.MAXIMISE_UPWARDS, "power_kw": -1.0}, "power_kw"),
            ({"dispatch_type": DispatchType.MAXIMISE_DOWNWARDS, "power_kw": 1.0}, "power_kw"),
            (
                {"selection": Selection(resource_types=(ResourceType.METER,))},
                "selection.resource_types[0]",
            ),
            (
                {"selection": Selection(site_ids=(uuid.UUID(int=1), uuid.UUID(int=1)))},
                "selection.site_ids",
            ),
            (
                {
                    "selection": Selection(
                        resource_types=(ResourceType.STATIC_BATTERY, ResourceType.STATIC_BATTERY)
                    )
                },
                "selection.resource_types",
            ),
        ],
    )
    def test_each_rule_names_its_field(self, changes: dict[str, object], field: str) -> None:
        found = violations(request(**changes))
        assert field in found, found
        assert found[field]

    def test_a_target_of_one_terawatt_is_allowed_and_allocated(self) -> None:
        for power_kw in (1e9, -1e9):
            validate_request(request(power_kw=power_kw), NOW)
            allocation = allocate(DispatchType.EXACT, power_kw, [candidate(-5, 5)])
            assert allocation.allocated_power_kw == math.copysign(5.0, power_kw)
            assert allocation.shortfall_power_kw == power_kw - allocation.allocated_power_kw

    def test_exactly_24_hours_is_allowed(self) -> None:
        validate_request(request(end_time=START + timedelta(hours=24)), NOW)

    def test_every_violation_is_reported_at_once(self) -> None:
        found = violations(request(request_id="", power_kw=math.nan, dispatch_type=None))
        assert {"request_id", "power_kw", "type"} <= set(found)

    def test_the_digest_ignores_dry_run_and_site_order(self) -> None:
        a, b = uuid.uuid4(), uuid.uuid4()
        one = request(selection=Selection(site_ids=(a, b)))
        two = request(selection=Selection(site_ids=(b, a)), dry_run=True)
        assert one.digest() == two.digest()
        assert one.digest() != request(power_kw=10.5).digest()
        assert one.digest() != request().digest()

    def test_the_digest_takes_negative_zero_for_zero(self) -> None:
        # Protobuf carries -0.0; a retry of a goal-less MAXIMISE may send it either way.
        assert request(power_kw=-0.0).digest() == request(power_kw=0.0).digest()


class TestEligibility:
    @pytest.mark.parametrize("status", list(SiteStatus))
    @pytest.mark.parametrize("upstream", list(UpstreamStatus))
    def test_only_onboarded_and_contract_active_is_eligible(
        self, status: SiteStatus, upstream: UpstreamStatus
    ) -> None:
        reason = ineligibility(SiteEligibility(status, status is SiteStatus.PAUSED, upstream))
        if status is SiteStatus.ONBOARDED and upstream is UpstreamStatus.CONTRACT_ACTIVE:
            assert reason is None
        elif status is not SiteStatus.ONBOARDED:
            assert reason == f"site status {status}"
        else:
            assert reason == f"upstream_status {upstream}"

    def test_a_paused_flag_wins_over_a_stale_status(self) -> None:
        site = SiteEligibility(SiteStatus.ONBOARDED, True, UpstreamStatus.CONTRACT_ACTIVE)
        assert ineligibility(site) == "site status paused"

    def test_a_deleted_site_is_not_eligible(self) -> None:
        assert ineligibility(None) == "site deleted"


def candidate(low: float, high: float) -> Candidate:
    return Candidate(uuid.uuid4(), uuid.uuid4(), low, high)


def powers(dispatch_type: DispatchType, target: float, *bounds: tuple[float, float]) -> list[float]:
    allocation = allocate(dispatch_type, target, [candidate(lo, hi) for lo, hi in bounds])
    return [value for _, value in allocation.setpoints]


def bounds_lists(magnitude: float, most: int) -> st.SearchStrategy[list[tuple[float, float]]]:
    """Lists of (min, max) power bounds, min <= max, each within +-2 * magnitude kW and
    holding a whole watt (as every candidate's must)."""
    return st.lists(
        st.tuples(st.floats(-magnitude, magnitude), st.floats(0, magnitude))
        .map(lambda pair: (pair[0], pair[0] + pair[1]))
        .filter(lambda bounds: holds_a_whole_watt(*bounds)),
        min_size=1,
        max_size=most,
    )


def whole_watts(low: float, high: float) -> tuple[int, int]:
    """The lowest and highest whole watt within [low, high] kW, counted apart from the
    allocation's own helper."""
    return math.ceil(round(low * 1000, 6)), math.floor(round(high * 1000, 6))


class TestAllocation:
    def test_exact_upwards_splits_by_upper_bound(self) -> None:
        allocation = allocate(
            DispatchType.EXACT, 6.0, [candidate(-5, 5), candidate(0, 10), candidate(-8, 0)]
        )
        assert [v for _, v in allocation.setpoints] == [2.0, 4.0, 0.0]
        assert allocation.allocated_power_kw == 6.0
        assert allocation.shortfall_power_kw == 0.0

    def test_exact_downwards_splits_by_lower_bound(self) -> None:
        allocation = allocate(
            DispatchType.EXACT, -6.5, [candidate(-5, 5), candidate(0, 11), candidate(-8, 0)]
        )
        assert [v for _, v in allocation.setpoints] == [-2.5, 0.0, -4.0]
        assert allocation.allocated_power_kw == -6.5
        assert allocation.shortfall_power_kw == 0.0

    def test_exact_beyond_the_headroom_is_shortfall(self) -> None:
        allocation = allocate(DispatchType.EXACT, 40.0, [candidate(-5, 5), candidate(0, 11)])
        assert [v for _, v in allocation.setpoints] == [5.0, 11.0]
        assert allocation.allocated_power_kw == 16.0
        assert allocation.shortfall_power_kw == 24.0

    def test_exact_downwards_shortfall_keeps_the_sign(self) -> None:
        allocation = allocate(DispatchType.EXACT, -20.0, [candidate(-5, 5), candidate(0, 11)])
        assert allocation.allocated_power_kw == -5.0
        assert allocation.shortfall_power_kw == -15.0

    def test_exact_without_resources_is_all_shortfall(self) -> None:
        allocation = allocate(DispatchType.EXACT, 3.0, [])
        assert allocation.setpoints == []
        assert allocation.allocated_power_kw == 0.0
        assert allocation.shortfall_power_kw == 3.0

    def test_a_setpoint_stays_within_bounds_that_exclude_zero(self) -> None:
        # A resource that must consume at least 2 kW keeps 2 kW even when asked for less;
        # the others make up for it as far as they can.
        assert powers(DispatchType.EXACT, 1.0, (2, 10), (0, 10)) == [2.0, 0.0]
        assert powers(DispatchType.EXACT, -3.0, (2, 10), (-6, 0)) == [2.0, -5.0]

    def test_exact_reaches_a_target_that_a_minimum_consumption_pushes_away(self) -> None:
        # A battery and a heat pump with a 2 kW minimum reach any total in [-3, 15] kW.
        battery, heat_pump = (-5, 5), (2, 10)
        for target, expected in ((1.5, [-0.5, 2.0]), (-1.0, [-3.0, 2.0]), (-3.0, [-5.0, 2.0])):
            allocation = allocate(
                DispatchType.EXACT, target, [candidate(*battery), candidate(*heat_pump)]
            )
            assert [v for _, v in allocation.setpoints] == expected
            assert (allocation.allocated_power_kw, allocation.shortfall_power_kw) == (target, 0)

    def test_a_split_that_already_reaches_the_target_is_kept(self) -> None:
        # Shares of +5 and +10 headroom reach +6 with the heat pump above its minimum.
        assert powers(DispatchType.EXACT, 6.0, (-5, 5), (2, 10), (-8, 0)) == [2.0, 4.0, 0.0]

    def test_a_target_on_the_far_side_of_a_minimum_is_a_signed_shortfall(self) -> None:
        # Nothing can go below the heat pump's 2 kW: 1 kW asked for, 2 kW is the least.
        allocation = allocate(DispatchType.EXACT, 1.0, [candidate(2, 10)])
        assert [v for _, v in allocation.setpoints] == [2.0]
        assert (allocation.allocated_power_kw, allocation.shortfall_power_kw) == (2.0, -1.0)

    @given(
        st.floats(-1e3, 1e3, allow_nan=False),
        bounds_lists(magnitude=1e2, most=6),
    )
    def test_exact_reaches_every_target_within_the_bounds_to_the_watt(
        self, target: float, bounds: list[tuple[float, float]]
    ) -> None:
        allocation = allocate(DispatchType.EXACT, target, [candidate(*b) for b in bounds])
        setpoint_watts = [round(value * 1000) for _, value in allocation.setpoints]
        for watts, (low, high) in zip(setpoint_watts, bounds, strict=True):
            lowest, highest = whole_watts(low, high)
            assert lowest <= watts <= highest
        # The target in watts, or the nearest the bounds' whole watts can reach.
        target_watts = round(target * 1000)
        reachable = (
            sum(whole_watts(*b)[0] for b in bounds),
            sum(whole_watts(*b)[1] for b in bounds),
        )
        nearest = min(max(target_watts, reachable[0]), reachable[1])
        assert sum(setpoint_watts) == nearest
        assert round(allocation.allocated_power_kw * 1000) == nearest
        assert round(allocation.shortfall_power_kw * 1000) == target_watts - nearest

    @given(
        st.floats(-1e3, 1e3, allow_nan=False),
        st.lists(st.sampled_from([(-5.0, 5.0), (0.0, 11.0), (-8.0, 0.0)]), min_size=1),
    )
    def test_exact_keeps_each_share_to_within_a_watt_of_the_split(
        self, target: float, bounds: list[tuple[float, float]]
    ) -> None:
        # Bounds that include zero: the split by headroom alone reaches any reachable target.
        candidates = [candidate(*b) for b in bounds]
        allocation = allocate(DispatchType.EXACT, target, candidates)
        upwards = target >= 0
        headrooms = [max(high, 0.0) if upwards else min(low, 0.0) for low, high in bounds]
        total = math.fsum(headrooms)
        share = 0.0 if total == 0 else min(1.0, target / total)
        for (_, value), headroom in zip(allocation.setpoints, headrooms, strict=True):
            assert abs(value - headroom * share) < 0.001 + 1e-9

    def test_a_fleet_of_like_resources_adds_up_to_the_target(self) -> None:
        # 1.5 W each, rounded alike, would be 2 kW or 1 kW in all.
        fleet = [candidate(-5, 5) for _ in range(1000)]
        for target in (1.5, -1.5, 0.002, 4999.999):
            allocation = allocate(DispatchType.EXACT, target, fleet)
            assert allocation.allocated_power_kw == target
            assert allocation.shortfall_power_kw == 0.0
        values = [v for _, v in allocate(DispatchType.EXACT, 1.5, fleet).setpoints]
        assert sorted(set(values)) == [0.001, 0.002]

    def test_a_target_finer_than_a_watt_is_taken_to_the_watt(self) -> None:
        allocation = allocate(DispatchType.EXACT, 0.0004, [candidate(-5, 5)])
        assert (allocation.allocated_power_kw, allocation.shortfall_power_kw) == (0.0, 0.0)

    def test_shares_are_rounded_to_watts_and_within_bounds(self) -> None:
        values = powers(DispatchType.EXACT, 10.0, (0, 3), (0, 3), (0, 3))
        assert values == [3.0, 3.0, 3.0]
        values = powers(DispatchType.EXACT, 1.0, (0, 3), (0, 3), (0, 3))
        # A third of a kW each, to the watt, adding up to the target: the remaining watt to
        # the first.
        assert values == [0.334, 0.333, 0.333]
        for value, (low, high) in zip(values, [(0, 3)] * 3, strict=True):
            assert low <= value <= high

    def test_maximise_upwards_takes_every_upper_bound(self) -> None:
        allocation = allocate(
            DispatchType.MAXIMISE_UPWARDS, 0.0, [candidate(-5, 5), candidate(-8, 0)]
        )
        assert [v for _, v in allocation.setpoints] == [5.0, 0.0]
        assert allocation.allocated_power_kw == 5.0
        assert allocation.shortfall_power_kw == 0.0

    def test_maximise_with_a_goal_reports_shortfall(self) -> None:
        allocation = allocate(DispatchType.MAXIMISE_UPWARDS, 12.0, [candidate(-5, 5)])
        assert allocation.shortfall_power_kw == 7.0
        allocation = allocate(
            DispatchType.MAXIMISE_DOWNWARDS, -20.0, [candidate(-5, 5), candidate(-8, 0)]
        )
        assert [v for _, v in allocation.setpoints] == [-5.0, -8.0]
        assert allocation.allocated_power_kw == -13.0
        assert allocation.shortfall_power_kw == -7.0

    @pytest.mark.parametrize(
        ("dispatch_type", "low", "high"),
        [
            # Bounds that exclude zero: the resource cannot reach the other side.
            (DispatchType.MAXIMISE_DOWNWARDS, 1.0, 5.0),
            (DispatchType.MAXIMISE_UPWARDS, -5.0, -1.0),
        ],
    )
    def test_without_a_goal_nothing_falls_short(
        self, dispatch_type: DispatchType, low: float, high: float
    ) -> None:
        allocation = allocate(dispatch_type, 0.0, [candidate(low, high)])
        assert allocation.shortfall_power_kw == 0.0

    @pytest.mark.parametrize(
        "dispatch_type",
        [DispatchType.EXACT, DispatchType.MAXIMISE_UPWARDS, DispatchType.MAXIMISE_DOWNWARDS],
    )
    def test_a_bound_finer_than_a_watt_is_rounded_inwards(
        self, dispatch_type: DispatchType
    ) -> None:
        target = {DispatchType.MAXIMISE_DOWNWARDS: -100.0}.get(dispatch_type, 100.0)
        allocation = allocate(dispatch_type, target, [candidate(-1.2346, 1.2346)])
        [(_, value)] = allocation.setpoints
        assert -1.2346 <= value <= 1.2346
        assert abs(float(format_power(value))) == 1.234

    def test_a_goal_exceeded_is_no_shortfall(self) -> None:
        allocation = allocate(DispatchType.MAXIMISE_DOWNWARDS, -1.0, [candidate(-5, 5)])
        assert allocation.shortfall_power_kw == 0.0

    def test_decimal_strings(self) -> None:
        assert format_power(2.5) == "2.500"
        assert format_power(-0.0004) == "0.000"
        assert format_power(-1234.5678) == "-1234.568"


class TestBoundsAtDelivery:
    """A setpoint is sent only while its power is within its resource's bounds as they are."""

    def test_bounds_narrowed_below_the_setpoint_stop_it(self) -> None:
        assert outside_bounds(4.0, -2.0, 2.0) == (
            "power_kw 4.000 outside the resource's bounds now [-2.000, 2.000]"
        )
        assert outside_bounds(-2.5, -2.0, 5.0) == (
            "power_kw -2.500 outside the resource's bounds now [-2.000, 5.000]"
        )
        assert outside_bounds(0.0, 2.0, 10.0) is not None  # now a minimum consumption

    def test_bounds_that_still_hold_it_let_it_go(self) -> None:
        assert outside_bounds(2.0, -2.0, 2.0) is None
        assert outside_bounds(1.5, 0.0, 10.0) is None

    def test_a_resource_without_bounds_is_not_sent_to(self) -> None:
        assert outside_bounds(1.0, None, 5.0) == "resource has no power bounds"
        assert outside_bounds(1.0, -5.0, None) == "resource has no power bounds"

    def test_judged_in_the_whole_watts_setpoints_are_sent_in(self) -> None:
        assert outside_bounds(2.0, 0.0, 2.0000000001) is None
        # 2.000 is not within a maximum of 1.9996; 1.999 is the watt sent for it.
        assert outside_bounds(2.0, 0.0, 1.9996) is not None
        assert outside_bounds(1.999, 0.0, 1.9996) is None
        # A range narrower than a watt may hold no whole watt: nothing can be sent within it.
        assert outside_bounds(1.235, 1.2346, 1.2349) is not None
        assert outside_bounds(1.234, 1.2346, 1.2349) is not None

    @given(
        st.sampled_from(list(DispatchType)),
        st.floats(-1e4, 1e4, allow_nan=False),
        bounds_lists(magnitude=1e3, most=5),
    )
    def test_every_setpoint_the_allocation_makes_is_within_its_bounds(
        self, dispatch_type: DispatchType, target: float, bounds: list[tuple[float, float]]
    ) -> None:
        for (low, high), power in zip(bounds, powers(dispatch_type, target, *bounds), strict=True):
            assert outside_bounds(power, low, high) is None, (power, low, high)


class TestStates:
    def test_terminal_states_have_no_way_out(self) -> None:
        for state in (
            SetpointState.REJECTED,
            SetpointState.CANCELLED,
            SetpointState.EXPIRED,
        ):
            assert is_terminal(state)
        # Each may have reached the partner, so a cancellation still withdraws it.
        for state in (SetpointState.ACCEPTED, SetpointState.FAILED, SetpointState.NOT_ELIGIBLE):
            assert not is_terminal(state)
            assert TRANSITIONS[state] == {SetpointState.CANCELLED}

    def test_allowed_and_refused_transitions(self) -> None:
        assert check_transition(SetpointState.PENDING, SetpointState.DELIVERING)
        with pytest.raises(InvalidTransition):
            check_transition(SetpointState.ACCEPTED, SetpointState.DELIVERING)
        with pytest.raises(InvalidTransition):
            check_transition(SetpointState.PENDING, SetpointState.ACCEPTED)
        assert set(TRANSITIONS) == set(SetpointState)

    @pytest.mark.parametrize("state", [SetpointState.PENDING, SetpointState.DELIVERING])
    def test_a_claimed_setpoint_that_cannot_be_sent_may_fail(self, state: SetpointState) -> None:
        # The claim settles it in its own transaction; a refused transition would roll the
        # whole claim back on every pass, and the other rows of the batch with it.
        settled = unsendable(row(state=state), "partner organization has no signing secret")
        assert settled.state is SetpointState.FAILED
        assert check_transition(state, settled.state)


def row(**changes: object) -> OutboxRow:
    values: dict[str, object] = {
        "state": SetpointState.DELIVERING,
        "reason": "",
        "attempt_count": 0,
        "end_time": END,
        "cancel_requested": False,
        "cancellation_state": None,
        "cancellation_attempt_count": 0,
    }
    values.update(changes)
    return OutboxRow(**values)  # type: ignore[arg-type]


def settle(current: OutboxRow, outcome: Outcome, status: int | None = None, retry: float = 5.0):  # type: ignore[no-untyped-def]
    settled = after_attempt(current, outcome, status, None, NOW, 3, retry)
    # Every result must be one the state machine allows.
    if settled.state is not current.state:
        check_transition(current.state, settled.state)
    return settled


class TestSettling:
    def test_accepted(self) -> None:
        settled = settle(row(), Outcome.ACCEPTED, 200)
        assert settled.state is SetpointState.ACCEPTED
        assert settled.attempt_count == 1
        assert settled.next_attempt_at is None

    def test_rejected_is_not_retried(self) -> None:
        settled = settle(row(), Outcome.REJECTED, 422)
        assert (settled.state, settled.reason, settled.next_attempt_at) == (
            SetpointState.REJECTED,
            "HTTP 422",
            None,
        )

    def test_retryable_is_rescheduled_then_fails_at_the_limit(self) -> None:
        settled = settle(row(attempt_count=1), Outcome.RETRYABLE, 503)
        assert settled.state is SetpointState.DELIVERING
        assert settled.next_attempt_at == NOW + timedelta(seconds=5)
        assert settled.attempt_count == 2
        failed = settle(row(attempt_count=2), Outcome.RETRYABLE, 503)
        assert failed.state is SetpointState.FAILED
        assert "3 attempts" in failed.reason

    def test_a_retry_after_the_window_is_expiry(self) -> None:
        settled = settle(row(), Outcome.RETRYABLE, 503, retry=3600)
        assert settled.state is SetpointState.EXPIRED

    def test_circuit_open_counts_no_attempt(self) -> None:
        settled = settle(row(attempt_count=2), Outcome.CIRCUIT_OPEN)
        assert settled.state is SetpointState.DELIVERING
        assert settled.attempt_count == 2
        assert settled.next_attempt_at is not None

    def test_refused_endpoint_fails(self) -> None:
        assert settle(row(), Outcome.REFUSED).state is SetpointState.FAILED

    def test_a_refused_attempt_of_a_setpoint_cancelled_meanwhile_is_a_cancellation(self) -> None:
        # No connection was made: nothing was delivered by this attempt.
        never = settle(row(cancel_requested=True), Outcome.REFUSED)
        assert (never.state, never.reason, never.cancellation_state) == (
            SetpointState.CANCELLED,
            "cancelled before delivery",
            None,
        )
        assert never.attempt_count == 1  # the refusal is in the history
        assert never.next_attempt_at is None
        # An earlier attempt may have arrived: that one is withdrawn.
        earlier = settle(row(cancel_requested=True, attempt_count=1), Outcome.REFUSED)
        assert (earlier.state, earlier.cancellation_state) == (
            SetpointState.CANCELLED,
            CancellationState.PENDING,
        )
        assert earlier.attempt_count == 2

    def test_cancel_during_an_attempt(self) -> None:
        accepted = settle(row(cancel_requested=True), Outcome.ACCEPTED, 200)
        assert accepted.state is SetpointState.ACCEPTED
        assert accepted.cancellation_state is CancellationState.PENDING
        assert accepted.next_attempt_at == NOW
        unanswered = settle(row(cancel_requested=True), Outcome.RETRYABLE, 503)
        assert unanswered.state is SetpointState.CANCELLED
        # The failed attempt may have reached the partner (its answer lost, a 5xx after
        # acting on it): the setpoint is withdrawn, like an accepted one.
        assert unanswered.cancellation_state is CancellationState.PENDING
        assert unanswered.next_attempt_at == NOW
        assert unanswered.reason == (
            "cancelled after an attempt that may have arrived; cancellation pending"
        )
        # An open breaker sent nothing: nothing to withdraw.
        held_back = settle(row(cancel_requested=True), Outcome.CIRCUIT_OPEN)
        assert (held_back.state, held_back.cancellation_state) == (SetpointState.CANCELLED, None)
        assert held_back.reason == "cancelled before delivery"

    def test_an_attempt_an_earlier_claim_left_unrecorded_counts(self) -> None:
        # Its worker died or lost its lease after the claim: it may have sent it.
        lapsed = row(cancel_requested=True, unrecorded_claim=True)
        claimed = before_attempt(lapsed, None, NOW)
        assert claimed is not None
        assert (claimed.state, claimed.cancellation_state) == (
            SetpointState.CANCELLED,
            CancellationState.PENDING,
        )
        assert claimed.attempt_count == 1
        assert claimed.reason.startswith("cancelled after an attempt that may have arrived")
        # Never claimed before: nothing to withdraw.
        fresh = before_attempt(row(cancel_requested=True), None, NOW)
        assert fresh is not None
        assert (fresh.reason, fresh.cancellation_state) == ("cancelled before delivery", None)
        # Sent again instead: both attempts count, even when the breaker held this one back.
        assert settle(row(unrecorded_claim=True), Outcome.RETRYABLE, 503).attempt_count == 2
        assert settle(row(unrecorded_claim=True), Outcome.CIRCUIT_OPEN).attempt_count == 1
        held_back = settle(row(cancel_requested=True, unrecorded_claim=True), Outcome.CIRCUIT_OPEN)
        assert held_back.cancellation_state is CancellationState.PENDING

    def test_a_cancelled_setpoint_attempted_before_is_withdrawn(self) -> None:
        retried = row(cancel_requested=True, attempt_count=2)
        claimed = before_attempt(retried, None, NOW)
        assert claimed is not None
        assert claimed.state is SetpointState.CANCELLED
        assert claimed.cancellation_state is CancellationState.PENDING
        assert claimed.next_attempt_at == NOW
        withdrawing = row(
            state=SetpointState.CANCELLED,
            attempt_count=2,
            cancel_requested=True,
            cancellation_state=CancellationState.PENDING,
        )
        assert withdrawing.delivers_cancellation
        # Eligibility does not hold back a withdrawal.
        assert before_attempt(withdrawing, "site status paused", NOW) is None
        done = settle(withdrawing, Outcome.ACCEPTED, 204)
        assert done.state is SetpointState.CANCELLED
        assert done.cancellation_state is CancellationState.DELIVERED
        assert (
            done.reason
            == "cancelled after an attempt that may have arrived; cancellation delivered"
        )
        failed = settle(withdrawing, Outcome.REJECTED, 422)
        assert (failed.state, failed.cancellation_state) == (
            SetpointState.CANCELLED,
            CancellationState.FAILED,
        )
        # Its window over, the setpoint is no longer valid: nothing to withdraw.
        late = before_attempt(retried, None, END)
        assert late is not None
        assert (late.state, late.cancellation_state, late.next_attempt_at) == (
            SetpointState.CANCELLED,
            None,
            None,
        )

    def test_cancellation_delivery(self) -> None:
        withdrawing = row(
            state=SetpointState.ACCEPTED,
            cancel_requested=True,
            cancellation_state=CancellationState.PENDING,
        )
        done = settle(withdrawing, Outcome.ACCEPTED, 204)
        assert done.state is SetpointState.CANCELLED
        assert done.cancellation_state is CancellationState.DELIVERED
        assert done.cancellation_attempt_count == 1
        refused = settle(withdrawing, Outcome.REJECTED, 422)
        assert refused.state is SetpointState.ACCEPTED
        assert refused.cancellation_state is CancellationState.FAILED

    def test_before_attempt(self) -> None:
        pending = row(state=SetpointState.PENDING)
        assert before_attempt(pending, None, NOW) is None
        not_eligible = before_attempt(pending, "site status paused", NOW)
        assert not_eligible is not None
        assert not_eligible.state is SetpointState.NOT_ELIGIBLE
        assert not_eligible.reason == "site status paused"
        expired = before_attempt(pending, None, END)
        assert expired is not None
        assert expired.state is SetpointState.EXPIRED
        cancelled = before_attempt(row(cancel_requested=True), None, NOW)
        assert cancelled is not None
        assert cancelled.state is SetpointState.CANCELLED
        # A cancellation goes out whatever the site's status.
        withdrawing = row(
            state=SetpointState.ACCEPTED,
            cancel_requested=True,
            cancellation_state=CancellationState.PENDING,
        )
        assert before_attempt(withdrawing, "site status paused", NOW) is None

    def test_a_failed_setpoint_of_a_cancelled_dispatch_is_withdrawn(self) -> None:
        failed = settle(row(attempt_count=2), Outcome.RETRYABLE, 503)
        assert failed.state is SetpointState.FAILED
        claimed = row(
            state=failed.state,
            reason=failed.reason,
            attempt_count=failed.attempt_count,
            cancel_requested=True,
        )
        withdrawn = before_attempt(claimed, "site status paused", NOW)
        assert withdrawn is not None
        check_transition(SetpointState.FAILED, withdrawn.state)
        assert withdrawn == (
            SetpointState.CANCELLED,
            "cancelled after an attempt that may have arrived; cancellation pending",
            3,
            NOW,
            CancellationState.PENDING,
            0,
        )

    @pytest.mark.parametrize(
        ("attempt_count", "cancelled"), [(1, False), (2, True)], ids=["only", "after another"]
    )
    def test_a_refused_attempt_of_a_failed_setpoint_is_not_withdrawn(
        self, attempt_count: int, cancelled: bool
    ) -> None:
        failed = settle(row(attempt_count=attempt_count - 1), Outcome.REFUSED)
        assert failed.reason.startswith("endpoint refused: ")
        claimed = row(
            state=failed.state,
            reason=failed.reason,
            attempt_count=failed.attempt_count,
            cancel_requested=True,
        )
        settled = before_attempt(claimed, None, NOW)
        assert settled is not None
        assert settled.attempt_count == attempt_count
        if cancelled:
            assert settled.state is SetpointState.CANCELLED
            assert settled.cancellation_state is CancellationState.PENDING
        else:
            assert settled == (SetpointState.FAILED, failed.reason, attempt_count, None, None, 0)

    def test_a_not_eligible_setpoint_attempted_before_is_withdrawn(self) -> None:
        claimed = row(
            state=SetpointState.NOT_ELIGIBLE,
            reason="site status paused",
            attempt_count=1,
            cancel_requested=True,
        )
        withdrawn = before_attempt(claimed, "site status paused", NOW)
        assert withdrawn is not None
        check_transition(SetpointState.NOT_ELIGIBLE, withdrawn.state)
        assert (withdrawn.state, withdrawn.attempt_count, withdrawn.cancellation_state) == (
            SetpointState.CANCELLED,
            1,
            CancellationState.PENDING,
        )
        never_sent = before_attempt(
            row(state=SetpointState.NOT_ELIGIBLE, cancel_requested=True), None, NOW
        )
        assert never_sent is not None
        assert (never_sent.state, never_sent.next_attempt_at) == (SetpointState.NOT_ELIGIBLE, None)

    def test_an_expiry_names_the_last_failure_whichever_step_finds_it(self) -> None:
        # The attempt's own outcome finds that no retry fits the window...
        tried = settle(row(end_time=NOW + timedelta(seconds=5)), Outcome.RETRYABLE, 503)
        assert tried.reason == "window ended before delivery (last: HTTP 503)"
        # ...or the retry is due only after it (a worker down or late): the same reason, not
        # the waiting row's "retrying (last: ...)" inside it.
        waiting = settle(row(), Outcome.RETRYABLE, 503)
        assert waiting.reason == "retrying (last: HTTP 503)"
        expired = before_attempt(row(reason=waiting.reason, attempt_count=1), None, END)
        assert expired is not None
        assert expired.reason == "window ended before delivery (last: HTTP 503)"
        never_tried = before_attempt(row(state=SetpointState.PENDING), None, END)
        assert never_tried is not None
        assert never_tried.reason == "window ended before delivery"

    def test_an_earlier_claims_unrecorded_attempt_counts_when_a_setpoint_is_not_sent(
        self,
    ) -> None:
        # Its worker died with the request perhaps sent: a later withdrawal must know.
        lapsed = row(attempt_count=1, unrecorded_claim=True)
        expired = before_attempt(lapsed, None, END)
        not_eligible = before_attempt(lapsed, "site status paused", NOW)
        assert expired is not None
        assert not_eligible is not None
        assert (expired.state, expired.attempt_count) == (SetpointState.EXPIRED, 2)
        assert (not_eligible.state, not_eligible.attempt_count) == (
            SetpointState.NOT_ELIGIBLE,
            2,
        )
        no_secret = unsendable(lapsed, "partner organization has no signing secret")
        assert (no_secret.state, no_secret.attempt_count) == (SetpointState.FAILED, 2)

    def test_a_failed_setpoint_whose_window_ended_is_not_withdrawn(self) -> None:
        claimed = row(
            state=SetpointState.FAILED,
            reason="no success after 3 attempts (last: HTTP 503)",
            attempt_count=3,
            cancel_requested=True,
        )
        settled = before_attempt(claimed, None, END)
        assert settled is not None
        assert (settled.state, settled.next_attempt_at) == (SetpointState.FAILED, None)


def test_plan_counts_each_site_once_and_only_sites_with_a_candidate() -> None:
    partner = uuid.uuid4()
    with_two, with_one, without_any, paused = (uuid.uuid4() for _ in range(4))
    resources = [uuid.uuid4() for _ in range(4)]

    def row(site: uuid.UUID, resource: uuid.UUID | None, **site_fields: object) -> dict[str, Any]:
        return {
            "site_id": site,
            "partner_org_id": partner,
            "status": "onboarded",
            "paused": False,
            "upstream_status": "contract_active",
            "resource_id": resource,
            "power_min_kw": None if resource is None else -1.0,
            "power_max_kw": None if resource is None else 2.0,
            **site_fields,
        }

    # Rows come site by site, as _CANDIDATES_SQL orders them.
    rows = [
        row(with_two, resources[0]),
        row(with_two, resources[1]),
        row(with_one, resources[2]),
        row(without_any, None),
        row(paused, resources[3], paused=True),
    ]
    request = DispatchRequest("plan", 3.0, NOW, NOW + timedelta(hours=1), DispatchType.EXACT)
    planned = plan(request, rows)
    assert [c.resource_id for c, _ in planned.allocation.setpoints] == resources[:3]
    assert [power for _, power in planned.allocation.setpoints] == [1.0, 1.0, 1.0]
    # An eligible site without a controllable resource is neither eligible nor not.
    assert (planned.eligible_site_count, planned.ineligible_site_count) == (2, 1)
    assert planned.partner_of_site == {with_two: partner, with_one: partner}


def test_plan_leaves_out_resources_no_whole_watt_fits() -> None:
    partner = uuid.uuid4()
    usable, sub_watt_only, paused = (uuid.uuid4() for _ in range(3))
    resources = [uuid.uuid4() for _ in range(4)]

    def row(
        site: uuid.UUID, resource: uuid.UUID | None, low: float, high: float, paused: bool
    ) -> dict[str, Any]:
        return {
            "site_id": site,
            "partner_org_id": partner,
            "status": "onboarded",
            "paused": paused,
            "upstream_status": "contract_active",
            "resource_id": resource,
            "power_min_kw": None if resource is None else low,
            "power_max_kw": None if resource is None else high,
        }

    rows = [
        row(usable, resources[0], 1.2341, 1.2349, paused=False),  # holds no whole watt
        row(usable, resources[1], -1.0, 1.0, paused=False),
        row(sub_watt_only, resources[2], 0.0004, 0.0006, paused=False),
        row(paused, resources[3], -1.0, 1.0, paused=True),
    ]
    request = DispatchRequest("plan", 0.5, NOW, NOW + timedelta(hours=1), DispatchType.EXACT)
    planned = plan(request, rows)
    assert [(c.resource_id, p) for c, p in planned.allocation.setpoints] == [(resources[1], 0.5)]
    # A site whose only resource no whole watt fits gets nothing, as one without any.
    assert (planned.eligible_site_count, planned.ineligible_site_count) == (1, 1)
