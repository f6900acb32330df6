"""Small conversions between protobuf values and plain Python values."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeAlias, TypeVar
from uuid import UUID

from google.protobuf import timestamp_pb2

from service.common.errors import ValidationError

E = TypeVar("E", bound=StrEnum)


# Generated enum wrappers are distinct classes per enum with no common typed base.
ProtoEnum: TypeAlias = Any


def enum_to_proto(proto_enum: ProtoEnum, prefix: str, value: StrEnum | str) -> Any:
    """Domain value "contract_active" -> proto number of PREFIX_CONTRACT_ACTIVE."""
    return _enum_number(proto_enum, prefix, str(value))


@functools.cache
def _enum_number(proto_enum: ProtoEnum, prefix: str, value: str) -> Any:
    # Cached: every message written converts several enums, and the set of values is tiny.
    return proto_enum.Value(prefix + value.upper())


def enum_from_proto(
    proto_enum: ProtoEnum, prefix: str, number: int, domain: type[E], field: str
) -> E | None:
    """Proto number -> domain value; None for UNSPECIFIED; a field violation when unknown."""
    try:
        name = proto_enum.Name(number)
    except ValueError:
        raise ValidationError.single(field, f"unknown enum value {number}") from None
    suffix = name.removeprefix(prefix)
    if suffix == "UNSPECIFIED":
        return None
    return domain(suffix.lower())


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """An aware datetime as a Timestamp (naive ones are taken as local time, like astimezone).

    Plain arithmetic: Timestamp.FromDatetime goes through utctimetuple and calendar.timegm,
    which showed up in profiles of every read."""
    if value.tzinfo is None:
        value = value.astimezone(UTC)
    delta = value - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000
    )


def from_timestamp(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def parse_uuid(value: str, field: str) -> UUID:
    """Ids are UUIDs; anything else is a field violation rather than a failed lookup."""
    if not value:
        raise ValidationError.single(field, "is required")
    try:
        return UUID(value)
    except ValueError:
        raise ValidationError.single(field, "must be a UUID") from None
