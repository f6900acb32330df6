"""Small conversions between protobuf values and plain Python values."""

from __future__ import annotations

import functools
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeAlias, TypeVar
from uuid import UUID

from google.protobuf import timestamp_pb2
from google.type import date_pb2

from service.common.errors import ValidationError, ViolationCollector

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

# Accepted range of every Timestamp in a request: [EARLIEST_INSTANT, LATEST_INSTANT). Wide
# enough for any meter or contract, narrow enough that local-time and grid arithmetic (the
# next interval, the next month in any zone) never leaves what datetime can represent.
EARLIEST_INSTANT = datetime(1900, 1, 1, tzinfo=UTC)
LATEST_INSTANT = datetime(2200, 1, 1, tzinfo=UTC)
MIN_TIMESTAMP_SECONDS = int((EARLIEST_INSTANT - _EPOCH).total_seconds())
MAX_TIMESTAMP_SECONDS = int((LATEST_INSTANT - _EPOCH).total_seconds())  # exclusive
TIMESTAMP_RULE = (
    "must be an instant from 1900-01-01T00:00:00Z up to (not including) "
    "2200-01-01T00:00:00Z, with nanos in 0..999999999"
)
# Every Date: a full calendar date in [EARLIEST_DATE, LATEST_DATE]; all zero means absent.
EARLIEST_DATE = date(1900, 1, 1)
LATEST_DATE = date(2199, 12, 31)
DATE_RULE = "must be a full, valid calendar date from 1900-01-01 to 2199-12-31"
# Every Duration: at most 100 years either way, seconds and nanos of the same sign.
MAX_DURATION_SECONDS = 100 * 365 * 86_400 + 25 * 86_400
DURATION_RULE = "must be at most 100 years either way, seconds and nanos of the same sign"
_NANOS = 1_000_000_000


def timestamp_rule(seconds: int, nanos: int) -> str | None:
    """The rule a Timestamp of ``seconds``/``nanos`` breaks, or None."""
    if MIN_TIMESTAMP_SECONDS <= seconds < MAX_TIMESTAMP_SECONDS and 0 <= nanos < _NANOS:
        return None
    return TIMESTAMP_RULE


def date_rule(year: int, month: int, day: int) -> str | None:
    """The rule a Date breaks, or None (an all-zero Date is absent, which is fine here)."""
    if (year, month, day) == (0, 0, 0):
        return None
    try:
        value = date(year, month, day)
    except ValueError:
        return DATE_RULE
    return None if EARLIEST_DATE <= value <= LATEST_DATE else DATE_RULE


def duration_rule(seconds: int, nanos: int) -> str | None:
    if (
        abs(seconds) <= MAX_DURATION_SECONDS
        and abs(nanos) < _NANOS
        and not (seconds > 0 > nanos or seconds < 0 < nanos)
    ):
        return None
    return DURATION_RULE


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


def from_timestamp(stamp: timestamp_pb2.Timestamp, field: str = "timestamp") -> datetime:
    """The instant, or a violation on ``field`` when it is outside the accepted range (the
    call guard checks every request's Timestamps first; this keeps any other caller safe)."""
    rule = timestamp_rule(stamp.seconds, stamp.nanos)
    if rule is not None:
        raise ValidationError.single(field, rule)
    return stamp.ToDatetime(tzinfo=UTC)


def end_time_rule(
    start: timestamp_pb2.Timestamp, end: timestamp_pb2.Timestamp, longest: timedelta
) -> str | None:
    """The rule the ``end_time`` of a range from ``start`` to ``end`` breaks, or None: after
    the start, by at most ``longest`` (whole days). Judged on the stamps as sent, since the
    datetimes read from them have lost what is below a microsecond."""
    length_ns = (end.seconds - start.seconds) * _NANOS + (end.nanos - start.nanos)
    if length_ns <= 0:
        return "must be after start_time"
    if length_ns > longest // timedelta(microseconds=1) * 1000:
        return f"must be at most {longest.days} days after start_time"
    return None


def parse_uuid(value: str, field: str) -> UUID:
    """Ids are UUIDs; anything else is a field violation rather than a failed lookup."""
    if not value:
        raise ValidationError.single(field, "is required")
    try:
        return UUID(value)
    except ValueError:
        raise ValidationError.single(field, "must be a UUID") from None


def optional_uuid(value: str, field: str) -> UUID | None:
    """An optional id (a filter): unset is None, anything set must be a UUID."""
    return parse_uuid(value, field) if value else None


def date_to_proto(value: date) -> date_pb2.Date:
    return date_pb2.Date(year=value.year, month=value.month, day=value.day)


def date_from_proto(
    errors: ViolationCollector,
    field: str,
    message: date_pb2.Date,
    present: bool,
    required: bool = False,
) -> date | None:
    """A full calendar date, or None when absent (a violation if ``required``).

    An all-zero Date counts as absent; partial dates (no day, no year) are rejected: every
    date of the API (a contract boundary, a balancing setting's start) is a day.
    """
    if not present or (message.year, message.month, message.day) == (0, 0, 0):
        if required:
            errors.add(field, "is required")
        return None
    try:
        return date(message.year, message.month, message.day)
    except ValueError:
        errors.add(field, "must be a full, valid calendar date (year 1-9999, month and day)")
        return None
