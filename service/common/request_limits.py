"""Checks every request, of every RPC, against the rules no field may break.

Run by the call guard right after decoding, so no handler (and no RPC added later) ever
sees a string PostgreSQL cannot store, a string beyond ``text.UNREAD_LENGTH``, or a
Timestamp, Date or Duration outside what the service accepts (see ``service.common.text`` and
``service.common.protoconv`` for the rules), nor a repeated field of more elements than
``max_items`` allows. Field paths are those of the request (``site.name``,
``supply_points[1].grid_identifier``).

The element counts are checked first, and alone when one is exceeded: a 16 MiB request
holds millions of empty elements, and judging each (in this module, then in the handler's
domain rules) would hold the event loop, and every other call of the replica, for minutes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from service.common.errors import FieldViolation, ValidationError
from service.common.protoconv import date_rule, duration_rule, timestamp_rule
from service.common.text import unreadable_rule

TIMESTAMP = "google.protobuf.Timestamp"
DATE = "google.type.Date"
DURATION = "google.protobuf.Duration"
_TIME_TYPES = frozenset({TIMESTAMP, DATE, DURATION})

# Fields whose elements are checked by their handler one by one, so that one bad element is
# rejected on its own instead of failing the request: the readings of a batch each get a
# reject reason (see service.telemetry.validate).
CHECKED_BY_HANDLER = frozenset({"openvpp.v1.ReadingBatch.readings"})

# Elements a repeated field of a request may hold: far above any use (a dispatch selecting
# more sites than this selects them by organization), far below what stalls the service.
DEFAULT_MAX_ITEMS = 10_000
# Fields whose domain allows far fewer (a site has at most two supply points, a field mask
# names a few fields, the resource types are a short enum): bounded near that, so that the
# per-element rules run on a few elements at most.
_MAX_ITEMS = {
    "openvpp.v1.CreateSiteRequest.supply_points": 100,
    "openvpp.v1.Site.supply_points": 100,
    "openvpp.v1.DispatchSelection.resource_types": 100,
    "google.protobuf.FieldMask.paths": 100,
}

_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def max_items(field: FieldDescriptor) -> int:
    """The most elements the repeated ``field`` of a request may hold."""
    return _MAX_ITEMS.get(field.full_name, DEFAULT_MAX_ITEMS)


def check_request(message: Message) -> None:
    """Raises ValidationError naming every field that breaks a rule."""
    descriptor = message.DESCRIPTOR
    violations: list[FieldViolation] = []
    if _has_repeated(descriptor):
        _check_counts(message, "", violations)
        if violations:
            raise ValidationError(violations)
    if not _needs_check(descriptor):
        return
    _check(message, "", violations)
    if violations:
        raise ValidationError(violations)


@functools.cache
def _has_repeated(descriptor: Descriptor) -> bool:
    """Whether a message of this type can hold a repeated field to count (cached per type)."""
    return _reaches(descriptor, _is_repeated, frozenset())


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _check_counts(message: Message, prefix: str, out: list[FieldViolation]) -> None:
    for field, value in message.ListFields():
        if field.full_name in CHECKED_BY_HANDLER:
            continue
        path = prefix + field.name
        if field.is_repeated:
            limit = max_items(field)
            if len(value) > limit:
                out.append(FieldViolation(path, f"must hold at most {limit:,} elements"))
                continue
        nested = field.message_type
        if nested is None or not _has_repeated(nested) or nested.GetOptions().map_entry:
            continue
        if field.is_repeated:
            for index, item in enumerate(value):
                _check_counts(item, f"{path}[{index}]", out)
        else:
            _check_counts(value, path + ".", out)


@functools.cache
def _needs_check(descriptor: Descriptor) -> bool:
    """Whether a message of this type can hold anything to check (cached per type)."""
    return descriptor.full_name in _TIME_TYPES or _reaches(descriptor, _is_checked, frozenset())


def _is_checked(field: FieldDescriptor) -> bool:
    return field.type == _STRING or (
        field.message_type is not None and field.message_type.full_name in _TIME_TYPES
    )


def _reaches(
    descriptor: Descriptor, wanted: Callable[[FieldDescriptor], bool], seen: frozenset[str]
) -> bool:
    """Whether a message of this type, or one nested in it, has a field ``wanted`` is true
    for (the fields of CHECKED_BY_HANDLER aside); a recursive type counts as having one."""
    seen = seen | {descriptor.full_name}
    for field in descriptor.fields:
        if field.full_name in CHECKED_BY_HANDLER:
            continue
        if wanted(field):
            return True
        nested = field.message_type
        if nested is not None and (nested.full_name in seen or _reaches(nested, wanted, seen)):
            return True
    return False


def _check(message: Message, prefix: str, out: list[FieldViolation]) -> None:
    for field, value in message.ListFields():
        if field.full_name in CHECKED_BY_HANDLER:
            continue
        path = prefix + field.name
        if field.type == _STRING:
            if field.is_repeated:
                for index, item in enumerate(value):
                    _check_text(item, field.name, f"{path}[{index}]", out)
            else:
                _check_text(value, field.name, path, out)
        elif field.message_type is not None:
            descriptor = field.message_type
            if descriptor.GetOptions().map_entry:
                _check_map(descriptor, value, path, out)
            elif not _needs_check(descriptor):
                continue
            elif field.is_repeated:
                for index, item in enumerate(value):
                    _check_message(item, f"{path}[{index}]", out)
            else:
                _check_message(value, path, out)


def _check_message(message: Message, path: str, out: list[FieldViolation]) -> None:
    name = message.DESCRIPTOR.full_name
    rule: str | None
    if name == TIMESTAMP:
        rule = timestamp_rule(message.seconds, message.nanos)  # type: ignore[attr-defined]
    elif name == DATE:
        rule = date_rule(message.year, message.month, message.day)  # type: ignore[attr-defined]
    elif name == DURATION:
        rule = duration_rule(message.seconds, message.nanos)  # type: ignore[attr-defined]
    else:
        _check(message, path + ".", out)
        return
    if rule is not None:
        out.append(FieldViolation(path, rule))


def _check_text(value: str, name: str, path: str, out: list[FieldViolation]) -> None:
    rule = unreadable_rule(value, name)
    if rule is not None:
        out.append(FieldViolation(path, rule))


def _check_map(entry: Descriptor, value: Any, path: str, out: list[FieldViolation]) -> None:
    key_field = entry.fields_by_name["key"]
    value_field = entry.fields_by_name["value"]
    for key, item in value.items():
        item_path = f"{path}[{key!r}]" if isinstance(key, str) and len(key) <= 64 else path
        if key_field.type == _STRING:
            _check_text(key, key_field.name, path, out)
        if value_field.type == _STRING:
            _check_text(item, value_field.name, item_path, out)
        elif value_field.type == _MESSAGE and _needs_check(value_field.message_type):
            _check_message(item, item_path, out)
