"""Balancing records <-> protobuf messages."""

from __future__ import annotations

from openvpp.v1 import balancing_pb2 as pb

from service.balancing.domain import BalancingRole, Policy, Setting, SettingFields
from service.balancing.engine import AllocationMethod
from service.common.errors import ViolationCollector
from service.common.protoconv import (
    date_from_proto,
    date_to_proto,
    enum_from_proto,
    enum_to_proto,
    to_timestamp,
)


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
