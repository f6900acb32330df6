"""Flexibility dispatch rules: pure functions, no I/O.

A dispatch request asks for an aggregate power change over a window. It becomes one setpoint
per controllable resource of the eligible sites; how much each resource gets is decided here
(:func:`allocate`), as is who is eligible (:func:`ineligibility`), what a valid request is
(:func:`validate_request`) and which setpoint state may follow which (:func:`check_transition`).

Power follows the registry's sign: positive = consumption, negative = production.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import NamedTuple
from uuid import UUID

from service.common.errors import FieldViolation, ValidationError, ViolationCollector
from service.registry.domain import ResourceType, SiteStatus
from service.upstream.domain import UpstreamStatus

QUARTER_HOUR_SECONDS = 900
MAX_WINDOW = timedelta(hours=24)
MAX_REQUEST_ID_LENGTH = 128
# 1 TW: far above any fleet (a resource is bounded to 1 GW), and its watts are exact in a
# float. A finite target beyond it, ~1e306, overflowed to infinity in watts (INTERNAL).
MAX_TARGET_POWER_KW = 1e9
# Setpoints are sent with watt resolution: a decimal string with three decimals of kW.
POWER_DECIMALS = 3


class DispatchType(StrEnum):
    EXACT = "exact"
    MAXIMISE_UPWARDS = "maximise_upwards"
    MAXIMISE_DOWNWARDS = "maximise_downwards"


class SetpointState(StrEnum):
    PENDING = "pending"
    DELIVERING = "delivering"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    NOT_ELIGIBLE = "not_eligible"


# Which state may follow which. ACCEPTED -> CANCELLED only once a cancellation is delivered.
# PENDING -> FAILED: a setpoint that cannot be sent at all (its partner has no signing
# secret) is settled in the claim, before it was ever DELIVERING.
TRANSITIONS: dict[SetpointState, frozenset[SetpointState]] = {
    SetpointState.PENDING: frozenset(
        {
            SetpointState.DELIVERING,
            SetpointState.FAILED,
            SetpointState.CANCELLED,
            SetpointState.EXPIRED,
            SetpointState.NOT_ELIGIBLE,
        }
    ),
    SetpointState.DELIVERING: frozenset(
        {
            SetpointState.ACCEPTED,
            SetpointState.REJECTED,
            SetpointState.FAILED,
            SetpointState.CANCELLED,
            SetpointState.EXPIRED,
            SetpointState.NOT_ELIGIBLE,
        }
    ),
    SetpointState.ACCEPTED: frozenset({SetpointState.CANCELLED}),
    SetpointState.REJECTED: frozenset(),
    # Attempts that failed may still have reached the partner: a CancelDispatch withdraws them.
    SetpointState.FAILED: frozenset({SetpointState.CANCELLED}),
    SetpointState.CANCELLED: frozenset(),
    SetpointState.EXPIRED: frozenset(),
    # Attempts made before the site stopped being eligible may have reached the partner too.
    SetpointState.NOT_ELIGIBLE: frozenset({SetpointState.CANCELLED}),
}

# States in which a setpoint still waits for (more) delivery attempts.
OPEN_STATES = frozenset({SetpointState.PENDING, SetpointState.DELIVERING})


class InvalidTransition(Exception):
    """A state change the state machine does not allow (a bug, never the caller's input)."""


def can_transition(current: SetpointState, new: SetpointState) -> bool:
    return new in TRANSITIONS[current]


def check_transition(current: SetpointState, new: SetpointState) -> SetpointState:
    if not can_transition(current, new):
        raise InvalidTransition(f"setpoint cannot go from {current} to {new}")
    return new


def is_terminal(state: SetpointState) -> bool:
    """No further change, not even a cancellation (ACCEPTED, FAILED and NOT_ELIGIBLE may
    still become CANCELLED)."""
    return not TRANSITIONS[state]


@dataclass(frozen=True)
class Selection:
    site_ids: tuple[UUID, ...] = ()
    organization_id: UUID | None = None
    resource_types: tuple[ResourceType, ...] = ()


@dataclass(frozen=True)
class DispatchRequest:
    request_id: str
    power_kw: float
    start_time: datetime
    end_time: datetime
    dispatch_type: DispatchType | None
    selection: Selection = field(default_factory=Selection)
    dry_run: bool = False

    def digest(self) -> str:
        """Identifies the request (not dry_run) so a retry with other terms is told apart."""
        canonical = {
            # + 0.0: -0.0 (which protobuf carries) is the same request as 0.0.
            "power_kw": repr(float(self.power_kw) + 0.0),
            "start": self.start_time.timestamp(),
            "end": self.end_time.timestamp(),
            "type": str(self.dispatch_type),
            "sites": sorted(str(s) for s in self.selection.site_ids),
            "org": str(self.selection.organization_id or ""),
            "types": sorted(str(t) for t in self.selection.resource_types),
        }
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


QUARTER_HOUR_RULE = "must be on a quarter-hour (hh:00, :15, :30 or :45, 0 s)"


def _on_quarter_hour(value: datetime) -> bool:
    return value.microsecond == 0 and int(value.timestamp()) % QUARTER_HOUR_SECONDS == 0


def require_open_window(request: DispatchRequest, now: datetime) -> None:
    """A new dispatch must end in the future."""
    if request.end_time <= now:
        raise ValidationError.single("end_time", "must be in the future")


def validate_request(
    request: DispatchRequest,
    now: datetime | None,
    malformed: Sequence[FieldViolation] = (),
) -> DispatchRequest:
    """Every broken rule at once (a ValidationError naming each field).

    ``now`` None leaves out "end in the future": a retry of a dispatch whose window has
    since ended must still find the first dispatch, so the store checks that rule
    (:func:`require_open_window`) only for a request it has not seen. ``malformed``: the
    violations found while reading the request (missing or unreadable fields), reported
    with these; no rule here judges a field that is among them."""
    errors = ViolationCollector()
    errors.violations.extend(malformed)
    unreadable = {violation.field for violation in malformed}
    request_id = request.request_id
    if not request_id:
        errors.add("request_id", "is required")
    elif len(request_id) > MAX_REQUEST_ID_LENGTH:
        errors.add("request_id", f"must be at most {MAX_REQUEST_ID_LENGTH} characters")
    elif not request_id.isprintable() or request_id != request_id.strip():
        errors.add("request_id", "must be printable, without leading or trailing white space")
    if not math.isfinite(request.power_kw):
        errors.add("power_kw", "must be a finite number")
    elif abs(request.power_kw) > MAX_TARGET_POWER_KW:
        errors.add("power_kw", f"must be within +-{MAX_TARGET_POWER_KW:.0e} kW (1 TW)")
    elif request.dispatch_type is DispatchType.MAXIMISE_UPWARDS and request.power_kw < 0:
        errors.add("power_kw", "must be >= 0 (an optional goal) for DISPATCH_TYPE_MAXIMISE_UPWARDS")
    elif request.dispatch_type is DispatchType.MAXIMISE_DOWNWARDS and request.power_kw > 0:
        errors.add(
            "power_kw", "must be <= 0 (an optional goal) for DISPATCH_TYPE_MAXIMISE_DOWNWARDS"
        )
    if request.dispatch_type is None and "type" not in unreadable:
        errors.add("type", "is required")
    start, end = request.start_time, request.end_time
    if "start_time" not in unreadable and not _on_quarter_hour(start):
        errors.add("start_time", QUARTER_HOUR_RULE)
    if "end_time" not in unreadable:
        if not _on_quarter_hour(end):
            errors.add("end_time", QUARTER_HOUR_RULE)
        # An unreadable start leaves nothing to measure the window from.
        if "start_time" not in unreadable:
            if end <= start:
                errors.add("end_time", "must be after start_time")
            elif end - start > MAX_WINDOW:
                errors.add("end_time", "must be at most 24 h after start_time")
        if now is not None and end <= now:
            errors.add("end_time", "must be in the future")
    if len(set(request.selection.site_ids)) != len(request.selection.site_ids):
        errors.add("selection.site_ids", "must not repeat a site")
    if len(set(request.selection.resource_types)) != len(request.selection.resource_types):
        errors.add("selection.resource_types", "must not repeat a resource type")
    for index, kind in enumerate(request.selection.resource_types):
        if kind is ResourceType.METER:
            errors.add(
                f"selection.resource_types[{index}]",
                "RESOURCE_TYPE_METER is not controllable",
            )
    errors.raise_if_any()
    return request


@dataclass(frozen=True)
class SiteEligibility:
    status: SiteStatus
    paused: bool
    upstream_status: UpstreamStatus


def ineligibility(site: SiteEligibility | None) -> str | None:
    """None when the site may be dispatched; else the status that forbids it, as a reason."""
    if site is None:
        return "site deleted"
    if site.paused or site.status is SiteStatus.PAUSED:
        return "site status paused"
    if site.status is not SiteStatus.ONBOARDED:
        return f"site status {site.status}"
    if site.upstream_status is not UpstreamStatus.CONTRACT_ACTIVE:
        return f"upstream_status {site.upstream_status}"
    return None


class Candidate(NamedTuple):
    """A controllable resource of an eligible site, with its power bounds."""

    # A tuple rather than a frozen dataclass: one is made per resource of a dispatch
    # (10,000 for 1,000 sites), several times faster.

    resource_id: UUID
    site_id: UUID
    power_min_kw: float
    power_max_kw: float


@dataclass(frozen=True)
class Allocation:
    # (candidate, setpoint power_kw), in the candidates' order.
    setpoints: list[tuple[Candidate, float]]
    allocated_power_kw: float
    shortfall_power_kw: float


def _round(value: float) -> float:
    return round(value, POWER_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0


_WATTS_PER_KW: int = 10**POWER_DECIMALS


def _within(value: float, low: float, high: float) -> float:
    """The whole watt nearest to ``value`` within the bounds: a bound finer than a watt
    (1.2346 kW) must not be sent as the watt beyond it (1.235). The same value again gives
    itself, which is what ``outside_bounds`` relies on. The bounds must hold a whole watt
    (``holds_a_whole_watt``)."""
    lowest, highest = _whole_watts_within(low, high)
    if lowest > highest:
        raise ValueError(f"[{low}, {high}] kW holds no whole watt")
    return _kw(min(max(round(value * _WATTS_PER_KW), lowest), highest))


def _kw(watts: int) -> float:
    return watts / _WATTS_PER_KW + 0.0  # + 0.0 turns -0.0 into 0.0


def holds_a_whole_watt(low: float, high: float) -> bool:
    """Whether any setpoint can be sent within [low, high] kW: setpoints are sent in watts,
    and a range narrower than one (1.2341-1.2349 kW) may hold none."""
    lowest, highest = _whole_watts_within(low, high)
    return lowest <= highest


@functools.lru_cache(maxsize=1024)
def _whole_watts_within(low: float, high: float) -> tuple[int, int]:
    """The lowest and highest whole watt within [low, high] kW. Cached: the resources of a
    dispatch mostly share a few bound pairs, and each is asked once per setpoint."""
    # Rounded first: 2.0 kW is 2000.0000000000002 W in floating point, and holds 2000 W.
    return math.ceil(round(low * _WATTS_PER_KW, 6)), math.floor(round(high * _WATTS_PER_KW, 6))


def _headroom(candidate: Candidate, upwards: bool) -> float:
    """The bound on the requested side of zero: how far the resource can go that way."""
    return max(candidate.power_max_kw, 0.0) if upwards else min(candidate.power_min_kw, 0.0)


def allocate(
    dispatch_type: DispatchType, power_kw: float, candidates: Sequence[Candidate]
) -> Allocation:
    """Each candidate's setpoint, within its bounds, and what of the target is left unmet.

    EXACT: the target is split in proportion to the candidates' headroom in its direction;
    where bounds that exclude zero make that split miss a target the candidates can reach,
    the difference is spread over the room each has left (``_towards``). The shares are
    then apportioned in whole watts (``_in_whole_watts``), so that they add up to the target
    in watts. A target beyond what the bounds allow takes every candidate to that bound and
    the rest is shortfall, with its sign.
    MAXIMISE_*: every candidate at its bound; ``power_kw`` is then only a goal against which
    shortfall is measured (0 = no goal). A setpoint is rounded to watts and kept within the
    resource's bounds, so a resource whose range excludes zero (e.g. a minimum consumption)
    keeps at least that. Every candidate's bounds must hold a whole watt
    (``holds_a_whole_watt``).
    """
    if dispatch_type is DispatchType.EXACT:
        upwards = power_kw >= 0
        total = sum(_headroom(c, upwards) for c in candidates)
        share = 0.0 if total == 0 else min(1.0, power_kw / total)
        shares = [
            min(max(_headroom(c, upwards) * share, c.power_min_kw), c.power_max_kw)
            for c in candidates
        ]
        reached = _towards(power_kw, shares, candidates)
        target_watts = round(power_kw * _WATTS_PER_KW)
        watts = _in_whole_watts(target_watts, reached, candidates)
        allocated_watts = sum(watts)
        return Allocation(
            [(c, _kw(w)) for c, w in zip(candidates, watts, strict=True)],
            _kw(allocated_watts),
            # What the bounds cannot reach, with its sign (also the other side of zero: a
            # target below the resources' minimum consumption).
            _kw(target_watts - allocated_watts),
        )
    upwards = dispatch_type is DispatchType.MAXIMISE_UPWARDS
    setpoints: list[tuple[Candidate, float]] = []
    for candidate in candidates:
        bound = candidate.power_max_kw if upwards else candidate.power_min_kw
        setpoints.append(
            (candidate, _within(bound, candidate.power_min_kw, candidate.power_max_kw))
        )
    allocated = _round(math.fsum(value for _, value in setpoints))
    if power_kw == 0:
        # No goal, so nothing can fall short of it (resources whose range excludes zero
        # would otherwise show up as a shortfall of a goal nobody set).
        return Allocation(setpoints, allocated, 0.0)
    missing = power_kw - allocated
    # Only what falls short of the goal counts, not a goal exceeded.
    shortfall = max(missing, 0.0) if upwards else min(missing, 0.0)
    return Allocation(setpoints, allocated, _round(shortfall))


def _in_whole_watts(
    target_watts: int, shares_kw: Sequence[float], candidates: Sequence[Candidate]
) -> list[int]:
    """``shares_kw`` (each within its candidate's bounds) in whole watts within the bounds,
    adding up to ``target_watts`` as far as the bounds allow.

    Each share rounded on its own would miss the target by up to half a watt per setpoint,
    and the same way for every one of a fleet of like resources (1.5 kW over 1,000 batteries
    would be 2 kW). So each share is taken down to its whole watt, and the watts still
    missing go one by one to the shares that lost most to that (largest remainder); a
    surplus, which bounds finer than a watt can leave, is taken back the same way.
    """
    scale = _WATTS_PER_KW
    floor = math.floor
    bounds = [_whole_watts_within(c.power_min_kw, c.power_max_kw) for c in candidates]
    # A millionth of a watt up first, as the bounds are rounded: 0.3 kW is
    # 299.99999999999994 W.
    watts = [
        min(max(floor(share * scale + 1e-6), lowest), highest)
        for share, (lowest, highest) in zip(shares_kw, bounds, strict=True)
    ]
    left = target_watts - sum(watts)
    if left == 0:
        return watts
    deficits = [share * scale - whole for share, whole in zip(shares_kw, watts, strict=True)]
    step = 1 if left > 0 else -1
    # Most short of its share first for a watt more, most over it first for a watt less;
    # ties in the candidates' order.
    order = sorted(range(len(watts)), key=deficits.__getitem__, reverse=step > 0)
    while left:
        moved = False
        for index in order:
            lowest, highest = bounds[index]
            if lowest <= watts[index] + step <= highest:
                watts[index] += step
                left -= step
                moved = True
                if not left:
                    break
        if not moved:
            break  # every candidate is at its bound that way: the rest is shortfall
    return watts


def _towards(
    target_kw: float, values: Sequence[float], candidates: Sequence[Candidate]
) -> list[float]:
    """``values`` (each within its candidate's bounds) moved together towards ``target_kw``,
    each in proportion to its room that way, never beyond a bound.

    The split by headroom misses a target when a resource's range excludes zero: clamped to
    its bound nearest zero (a minimum consumption), it adds power the split did not count,
    and a resource with no headroom in the target's direction may have room in the other.
    Where the split already reaches the target nothing moves.
    """
    missing = target_kw - math.fsum(values)
    if missing == 0:
        return list(values)
    rooms = [
        (c.power_max_kw if missing > 0 else c.power_min_kw) - value
        for c, value in zip(candidates, values, strict=True)
    ]
    room = math.fsum(rooms)
    if room == 0:
        return list(values)
    share = min(1.0, missing / room)
    moved = [
        min(max(value + each * share, c.power_min_kw), c.power_max_kw)
        for c, value, each in zip(candidates, values, rooms, strict=True)
    ]
    return moved


def outside_bounds(
    power_kw: float, power_min_kw: float | None, power_max_kw: float | None
) -> str | None:
    """Why a setpoint's power may no longer be sent to its resource, or None.

    The resource's bounds may have changed since the setpoint was made (UpdateResource): a
    partner is never sent a value outside what it now declares its resource can do. Within
    means what the allocation would make of it within the bounds as they are now: the
    setpoint's own power, at the watt resolution setpoints are sent in.
    """
    if power_min_kw is None or power_max_kw is None:
        return "resource has no power bounds"
    if (
        holds_a_whole_watt(power_min_kw, power_max_kw)
        and _within(power_kw, power_min_kw, power_max_kw) == power_kw
    ):
        return None
    return (
        f"power_kw {format_power(power_kw)} outside the resource's bounds now "
        f"[{format_power(power_min_kw)}, {format_power(power_max_kw)}]"
    )


def format_power(value_kw: float) -> str:
    """The decimal string sent to partners: watt resolution, no exponent."""
    return f"{_round(value_kw):.{POWER_DECIMALS}f}"


# Delivery outcomes, as the HTTP transport classifies an attempt (its OutcomeKind by name).
class Outcome(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RETRYABLE = "retryable"
    REFUSED = "refused"
    CIRCUIT_OPEN = "circuit_open"


class CancellationState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class OutboxRow(NamedTuple):
    """What settling a claimed setpoint needs to know of it.

    A NamedTuple, as is ``Settled``: the delivery worker makes two of them per attempt, and a
    tuple is made several times faster than a frozen dataclass.
    """

    state: SetpointState
    reason: str
    attempt_count: int
    end_time: datetime
    cancel_requested: bool
    cancellation_state: CancellationState | None
    cancellation_attempt_count: int
    # Claimed before by a worker that never recorded what came of it (it was killed, or lost
    # its lease): that worker may have sent it. Counted as one more attempt (of the setpoint
    # or of its cancellation) when the row is next settled.
    unrecorded_claim: bool = False

    @property
    def delivers_cancellation(self) -> bool:
        """The pending delivery is a withdrawal: of an ACCEPTED setpoint, or of a CANCELLED
        one an earlier attempt may have reached."""
        return self.cancellation_state is CancellationState.PENDING and (
            self.state is SetpointState.ACCEPTED or self.state is SetpointState.CANCELLED
        )


class Settled(NamedTuple):
    """A claimed setpoint's next values; ``next_attempt_at`` None = nothing left to send."""

    state: SetpointState
    reason: str
    attempt_count: int
    next_attempt_at: datetime | None
    cancellation_state: CancellationState | None
    cancellation_attempt_count: int


def _keep(
    row: OutboxRow,
    *,
    state: SetpointState | None = None,
    reason: str | None = None,
    attempt_count: int | None = None,
    next_attempt_at: datetime | None = None,
    cancellation_state: CancellationState | None = None,
    cancellation_attempt_count: int | None = None,
) -> Settled:
    """``row``'s values with the given ones changed (None keeps a value; nothing is due
    unless ``next_attempt_at`` says when). Every attempt's result goes through here."""
    return Settled(
        row.state if state is None else state,
        row.reason if reason is None else reason,
        row.attempt_count if attempt_count is None else attempt_count,
        next_attempt_at,
        row.cancellation_state if cancellation_state is None else cancellation_state,
        row.cancellation_attempt_count
        if cancellation_attempt_count is None
        else cancellation_attempt_count,
    )


MAY_HAVE_ARRIVED = "cancelled after an attempt that may have arrived"
# The reason of a setpoint FAILED by a refused endpoint: that last attempt sent nothing.
ENDPOINT_REFUSED = "endpoint refused"


def _cancelled(row: OutboxRow, attempts: int, now: datetime) -> Settled:
    """A cancelled setpoint that was not accepted. Never attempted: nothing to withdraw.
    Attempted (an answer that was lost, an error, a 5xx, an attempt never recorded): the
    partner may hold it, so a withdrawal goes out while the window lasts; withdrawing is
    always safe."""
    if attempts == 0:
        return _keep(row, state=SetpointState.CANCELLED, reason="cancelled before delivery")
    if row.end_time <= now:
        return _keep(
            row, state=SetpointState.CANCELLED, reason=MAY_HAVE_ARRIVED, attempt_count=attempts
        )
    return _keep(
        row,
        state=SetpointState.CANCELLED,
        reason=f"{MAY_HAVE_ARRIVED}; cancellation pending",
        attempt_count=attempts,
        next_attempt_at=now,
        cancellation_state=CancellationState.PENDING,
    )


# Settled without success, yet attempts may have reached the partner: CancelDispatch marks
# these, and the worker that claims one withdraws it (before_attempt).
WITHDRAWN_AFTER_SETTLING = frozenset({SetpointState.FAILED, SetpointState.NOT_ELIGIBLE})


def _settled_then_cancelled(row: OutboxRow, now: datetime) -> Settled:
    """A FAILED or NOT_ELIGIBLE setpoint of a dispatch cancelled since: every attempt may
    have reached the partner (timeouts, 5xx, lost answers) but a refused endpoint's, which
    fails the setpoint at once, so it is the last. Those that may have are withdrawn while
    the window lasts; with none, or with the window over, the setpoint stays as it is."""
    may_have_arrived = row.attempt_count - row.reason.startswith(f"{ENDPOINT_REFUSED}:")
    if row.cancellation_state is not None or may_have_arrived <= 0 or row.end_time <= now:
        return _keep(row)
    return _cancelled(row, may_have_arrived, now)._replace(attempt_count=row.attempt_count)


def before_attempt(row: OutboxRow, not_eligible: str | None, now: datetime) -> Settled | None:
    """Settles a just-claimed setpoint that must not be sent; None = send it now.

    ``not_eligible`` is the site's ineligibility reason as of the claim (None = eligible). A
    cancellation is sent whatever the site's status: withdrawing a setpoint is always safe.
    """
    if row.delivers_cancellation:
        if row.end_time <= now:
            return _keep(
                row,
                cancellation_state=CancellationState.FAILED,
                reason="window ended before the cancellation was delivered "
                "(the setpoint is no longer valid anyway)",
            )
        return None
    if row.state in WITHDRAWN_AFTER_SETTLING and row.cancel_requested:
        return _settled_then_cancelled(row, now)
    if row.state not in OPEN_STATES:
        return _keep(row)  # nothing to deliver (a stale outbox entry)
    if row.cancel_requested:
        return _cancelled(row, row.attempt_count + row.unrecorded_claim, now)
    # An earlier claim's unrecorded attempt counts, as it would with one made now: a
    # cancellation later withdraws what it may have delivered.
    attempts = row.attempt_count + row.unrecorded_claim
    if row.end_time <= now:
        return _keep(
            row,
            state=SetpointState.EXPIRED,
            reason=_expired_reason(row.reason),
            attempt_count=attempts,
        )
    if not_eligible is not None:
        return _keep(
            row, state=SetpointState.NOT_ELIGIBLE, reason=not_eligible, attempt_count=attempts
        )
    return None


def unsendable(row: OutboxRow, reason: str) -> Settled:
    """Settles a claimed setpoint (or cancellation) that cannot be sent at all."""
    if row.delivers_cancellation:
        return _keep(
            row,
            cancellation_state=CancellationState.FAILED,
            reason=f"cancellation not delivered: {reason}",
        )
    return _keep(
        row,
        state=SetpointState.FAILED,
        reason=reason,
        attempt_count=row.attempt_count + row.unrecorded_claim,
    )


# The reason of a setpoint waiting for its next attempt, around the last attempt's failure.
_RETRYING_BEFORE, _RETRYING_AFTER = "retrying (last: ", ")"


def _expired_reason(last: str) -> str:
    # The last failure itself, whether it is what an attempt just ended with or what the
    # stored "retrying (...)" reason of a row expired before its next attempt holds.
    if last.startswith(_RETRYING_BEFORE) and last.endswith(_RETRYING_AFTER):
        last = last[len(_RETRYING_BEFORE) : -len(_RETRYING_AFTER)]
    return "window ended before delivery" + (f" (last: {last})" if last else "")


def describe_failure(http_status: int | None, error: str | None) -> str:
    if http_status:
        return f"HTTP {http_status}"
    return error or "no answer"


def after_attempt(
    row: OutboxRow,
    outcome: Outcome,
    http_status: int | None,
    error: str | None,
    now: datetime,
    max_attempts: int,
    retry_in_seconds: float,
) -> Settled:
    """The setpoint's next values after one attempt (of the setpoint or its cancellation).

    ``retry_in_seconds`` is when to try again should the outcome allow it (the transport's
    backoff for this attempt number, Retry-After honoured). CIRCUIT_OPEN sent nothing, so it
    is rescheduled without counting an attempt; an attempt an earlier claim left unrecorded
    (``row.unrecorded_claim``) is counted with this one. ``row.cancel_requested`` is read
    after the attempt, so a CancelDispatch that came while it was in flight is taken into
    account.
    """
    failure = describe_failure(http_status, error)
    retry_at = now + timedelta(seconds=retry_in_seconds) if retry_in_seconds > 0 else now
    if row.delivers_cancellation:
        attempts = (
            row.cancellation_attempt_count
            + (outcome is not Outcome.CIRCUIT_OPEN)
            + row.unrecorded_claim
        )
        if outcome is Outcome.ACCEPTED:
            after = (
                "cancelled after acceptance"
                if row.state is SetpointState.ACCEPTED
                else MAY_HAVE_ARRIVED
            )
            return _keep(
                row,
                state=SetpointState.CANCELLED,
                reason=f"{after}; cancellation delivered",
                cancellation_state=CancellationState.DELIVERED,
                cancellation_attempt_count=attempts,
            )
        if outcome in (Outcome.REJECTED, Outcome.REFUSED) or attempts >= max_attempts:
            return _keep(
                row,
                reason=f"cancellation not delivered: {failure}",
                cancellation_state=CancellationState.FAILED,
                cancellation_attempt_count=attempts,
            )
        if retry_at >= row.end_time:
            return _keep(
                row,
                reason=f"window ended before the cancellation was delivered (last: {failure})",
                cancellation_state=CancellationState.FAILED,
                cancellation_attempt_count=attempts,
            )
        return _keep(
            row,
            reason=f"cancellation pending (last: {failure})",
            next_attempt_at=retry_at,
            cancellation_attempt_count=attempts,
        )

    attempts = row.attempt_count + (outcome is not Outcome.CIRCUIT_OPEN) + row.unrecorded_claim
    if outcome is Outcome.ACCEPTED:
        if row.cancel_requested and row.end_time > now:
            # Cancelled while this attempt was in flight: the partner has it, so withdraw it.
            return _keep(
                row,
                state=SetpointState.ACCEPTED,
                reason="cancellation pending",
                attempt_count=attempts,
                next_attempt_at=now,
                cancellation_state=CancellationState.PENDING,
            )
        return _keep(row, state=SetpointState.ACCEPTED, reason="", attempt_count=attempts)
    if outcome is Outcome.REJECTED:
        return _keep(row, state=SetpointState.REJECTED, reason=failure, attempt_count=attempts)
    if outcome is Outcome.REFUSED:
        if row.cancel_requested:
            # Cancelled while queued, and this attempt made no connection: only what earlier
            # attempts may have delivered is withdrawn. The refusal stays in the history.
            return _cancelled(row, attempts - 1, now)._replace(attempt_count=attempts)
        return _keep(
            row,
            state=SetpointState.FAILED,
            reason=f"{ENDPOINT_REFUSED}: {failure}",
            attempt_count=attempts,
        )
    if row.cancel_requested:
        return _cancelled(row, attempts, now)
    if attempts >= max_attempts:
        return _keep(
            row,
            state=SetpointState.FAILED,
            reason=f"no success after {attempts} attempts (last: {failure})",
            attempt_count=attempts,
        )
    if retry_at >= row.end_time:
        return _keep(
            row,
            state=SetpointState.EXPIRED,
            reason=_expired_reason(failure),
            attempt_count=attempts,
        )
    return _keep(
        row,
        state=SetpointState.DELIVERING,
        reason=f"{_RETRYING_BEFORE}{failure}{_RETRYING_AFTER}",
        attempt_count=attempts,
        next_attempt_at=retry_at,
    )
