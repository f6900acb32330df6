"""Dispatch records <-> protobuf messages."""

from __future__ import annotations

from uuid import UUID

from openvpp.v1 import dispatch_pb2 as pb
from openvpp.v1 import site_registry_pb2 as site_pb

from service.common.errors import FieldViolation, ValidationError, ViolationCollector
from service.common.protoconv import (
    enum_from_proto,
    enum_to_proto,
    from_timestamp,
    parse_uuid,
    to_timestamp,
)
from service.dispatch.domain import (
    QUARTER_HOUR_RULE,
    DispatchRequest,
    DispatchType,
    Selection,
    SetpointState,
)
from service.dispatch.store import UNSTORED_ID, AttemptRecord, DispatchRecord, SetpointRecord
from service.registry.domain import ResourceType

DISPATCH_TYPE_PREFIX = "DISPATCH_TYPE_"
SETPOINT_STATE_PREFIX = "SETPOINT_STATE_"


def _id(value: UUID) -> str:
    return "" if value == UNSTORED_ID else str(value)


def request_from_proto(
    request: pb.DispatchFlexibilityRequest,
) -> tuple[DispatchRequest, list[FieldViolation]]:
    """The request in domain terms, and the violations of its malformed fields (ids, enums,
    instants finer than a microsecond): ``validate_request`` reports them together with the
    domain's rules, so a client sees every broken rule of a request at once."""
    errors = ViolationCollector()
    dispatch_type: DispatchType | None = None
    try:
        dispatch_type = enum_from_proto(
            pb.DispatchType, DISPATCH_TYPE_PREFIX, request.type, DispatchType, "type"
        )
    except ValidationError as error:
        errors.violations.extend(error.violations)
    selection = request.selection
    site_ids = []
    for index, site_id in enumerate(selection.site_ids):
        try:
            site_ids.append(parse_uuid(site_id, f"selection.site_ids[{index}]"))
        except ValidationError as error:
            errors.violations.extend(error.violations)
    organization_id = None
    if selection.organization_id:
        try:
            organization_id = parse_uuid(selection.organization_id, "selection.organization_id")
        except ValidationError as error:
            errors.violations.extend(error.violations)
    resource_types: list[ResourceType] = []
    for index, number in enumerate(selection.resource_types):
        field = f"selection.resource_types[{index}]"
        try:
            kind = enum_from_proto(
                site_pb.ResourceType, "RESOURCE_TYPE_", number, ResourceType, field
            )
        except ValidationError as error:
            errors.violations.extend(error.violations)
            continue
        if kind is None:
            errors.add(field, "must name a resource type")
        else:
            resource_types.append(kind)
    for field, present, stamp in (
        ("start_time", request.HasField("start_time"), request.start_time),
        ("end_time", request.HasField("end_time"), request.end_time),
    ):
        if not present:
            errors.add(field, "is required")
        elif stamp.nanos % 1000:
            # A datetime holds microseconds: converted, the nanoseconds would be cut off
            # and an instant just past a quarter-hour taken as on it.
            errors.add(field, QUARTER_HOUR_RULE)
    parsed = DispatchRequest(
        request_id=request.request_id,
        # + 0.0 makes -0.0 the 0 it means (echoed, it would read "-0").
        power_kw=request.power_kw + 0.0,
        # Missing instants are violations above; the rules of the window skip them.
        start_time=from_timestamp(request.start_time, "start_time"),
        end_time=from_timestamp(request.end_time, "end_time"),
        dispatch_type=dispatch_type,
        selection=Selection(tuple(site_ids), organization_id, tuple(resource_types)),
        dry_run=request.dry_run,
    )
    return parsed, errors.violations


def state_to_proto(state: SetpointState) -> pb.SetpointState.ValueType:
    result: pb.SetpointState.ValueType = enum_to_proto(
        pb.SetpointState, SETPOINT_STATE_PREFIX, state
    )
    return result


def dispatch_to_proto(record: DispatchRecord) -> pb.FlexibilityDispatch:
    request = record.request
    counts = record.counts
    message = pb.FlexibilityDispatch(
        id=_id(record.id),
        request_id=request.request_id,
        power_kw=request.power_kw,
        start_time=to_timestamp(request.start_time),
        end_time=to_timestamp(request.end_time),
        type=enum_to_proto(pb.DispatchType, DISPATCH_TYPE_PREFIX, str(request.dispatch_type)),
        selection=pb.DispatchSelection(
            site_ids=[str(s) for s in request.selection.site_ids],
            organization_id=str(request.selection.organization_id or ""),
            resource_types=[
                enum_to_proto(site_pb.ResourceType, "RESOURCE_TYPE_", t)
                for t in request.selection.resource_types
            ],
        ),
        allocated_power_kw=record.allocated_power_kw,
        shortfall_power_kw=record.shortfall_power_kw,
        pending_count=counts.get(SetpointState.PENDING, 0),
        delivering_count=counts.get(SetpointState.DELIVERING, 0),
        accepted_count=counts.get(SetpointState.ACCEPTED, 0),
        rejected_count=counts.get(SetpointState.REJECTED, 0),
        failed_count=counts.get(SetpointState.FAILED, 0),
        cancelled_count=counts.get(SetpointState.CANCELLED, 0),
        expired_count=counts.get(SetpointState.EXPIRED, 0),
        not_eligible_count=counts.get(SetpointState.NOT_ELIGIBLE, 0),
        eligible_site_count=record.eligible_site_count,
        ineligible_site_count=record.ineligible_site_count,
        create_time=to_timestamp(record.created_at),
    )
    if record.cancelled_at is not None:
        message.cancel_time.CopyFrom(to_timestamp(record.cancelled_at))
    return message


def attempt_to_proto(attempt: AttemptRecord) -> pb.DeliveryAttempt:
    return pb.DeliveryAttempt(
        attempt_time=to_timestamp(attempt.attempt_time),
        http_status=attempt.http_status or 0,
        error=attempt.error,
        latency_ms=attempt.latency_ms,
        cancellation=attempt.cancellation,
    )


def setpoint_to_proto(record: SetpointRecord) -> pb.Setpoint:
    return pb.Setpoint(
        id=_id(record.id),
        dispatch_id=_id(record.dispatch_id),
        site_id=str(record.site_id),
        resource_id=str(record.resource_id),
        power_kw=record.power_kw,
        start_time=to_timestamp(record.start_time),
        end_time=to_timestamp(record.end_time),
        state=state_to_proto(record.state),
        attempts=[attempt_to_proto(a) for a in record.attempts],
        reason=record.reason,
        create_time=to_timestamp(record.created_at),
        update_time=to_timestamp(record.updated_at),
    )
