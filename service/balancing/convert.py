"""Balancing records <-> protobuf messages."""

from __future__ import annotations

from datetime import date

from google.type import date_pb2
from openvpp.v1 import balancing_pb2 as pb

from service.balancing.domain import BalancingRole, Policy, Setting, SettingFields
from service.balancing.engine import AllocationMethod
from service.common.errors import ViolationCollector
from service.common.protoconv import enum_from_proto, enum_to_proto, to_timestamp


def date_to_proto(value: date) -> date_pb2.Date:
    return date_pb2.Date(year=value.year, month=value.month, day=value.day)


def date_from_proto(
    errors: ViolationCollector, field: str, message: date_pb2.Date, present: bool
) -> date | None:
    """A full calendar date, or None when absent (an all-zero Date counts as absent)."""
    if not present or (message.year, message.month, message.day) == (0, 0, 0):
        return None
    try:
        return date(message.year, message.month, message.day)
    except ValueError:
        errors.add(field, "must be a full, valid calendar date (year 1-9999, month and day)")
        return None


def role_from_proto(number: int, field: str) -> BalancingRole | None:
    return enum_from_proto(pb.BalancingRole, "BALANCING_ROLE_", number, BalancingRole, field)


def method_from_proto(
    errors: ViolationCollector, number: int, field: str
) -> AllocationMethod | None:
    if number == pb.ALLOCATION_METHOD_UNSPECIFIED:
        errors.add(
            field,
            "is required: ALLOCATION_METHOD_EQUAL, _PRO_RATA, _STATIC or _STATIC_REDISTRIBUTED",
        )
        return None
    try:
        return AllocationMethod(number)
    except ValueError:
        errors.add(field, f"unknown enum value {number}")
        return None


def setting_fields_from_create(
    request: pb.CreateMeterBalancingSettingRequest,
) -> SettingFields:
    errors = ViolationCollector()
    start = date_from_proto(
        errors, "start_date", request.start_date, request.HasField("start_date")
    )
    end = date_from_proto(errors, "end_date", request.end_date, request.HasField("end_date"))
    errors.raise_if_any()
    return SettingFields(
        balancing=role_from_proto(request.balancing, "balancing"),
        start_date=start,
        end_date=end,
        priority=request.priority if request.HasField("priority") else None,
        share=request.share if request.HasField("share") else None,
    )


def setting_to_proto(setting: Setting) -> pb.MeterBalancingSetting:
    message = pb.MeterBalancingSetting(
        id=str(setting.id),
        site_id=str(setting.site_id),
        meter_id=str(setting.meter_id),
        balancing=enum_to_proto(pb.BalancingRole, "BALANCING_ROLE_", setting.balancing),
        start_date=date_to_proto(setting.period.start),
        create_time=to_timestamp(setting.created_at),
    )
    if setting.period.end is not None:
        message.end_date.CopyFrom(date_to_proto(setting.period.end))
    if setting.priority is not None:
        message.priority = setting.priority
    if setting.share is not None:
        message.share = setting.share
    return message


def policy_to_proto(policy: Policy) -> pb.SiteBalancingPolicy:
    message = pb.SiteBalancingPolicy(
        id=str(policy.id),
        site_id=str(policy.site_id),
        allocation_method=int(policy.method),  # type: ignore[arg-type]
        start_date=date_to_proto(policy.period.start),
        create_time=to_timestamp(policy.created_at),
    )
    if policy.period.end is not None:
        message.end_date.CopyFrom(date_to_proto(policy.period.end))
    return message
