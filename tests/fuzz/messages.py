"""Hostile request bytes for any protobuf message type, drawn by hypothesis from descriptors.

Nothing here knows our RPCs: a message is built field by field from its descriptor, with
values chosen to break things (NUL and very long strings, unknown enum numbers, NaN,
infinities and extreme numbers, reading values at and beyond ingest's bounds, timestamps
and dates at and beyond the accepted limits, large repeated fields), mixed with plausible
ones (ids of existing rows, valid codes) so that calls also get past the first check. The
encoding may then be truncated or corrupted, or replaced by random bytes.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from service.common.protoconv import MAX_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS
from service.grid import P1M, PT1H, PT15M
from service.telemetry.domain import MAX_REGISTER_WH, max_interval_wh
from tests.helpers import random_ean18, random_identifier

MAX_DEPTH = 4
F = FieldDescriptor

_INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}

HOSTILE_TEXT = [
    "",
    "\x00",
    "a\x00b",
    "x" * 4097,
    "x" * 100_000,
    "é" * 201,
    "\u202e\ufeff\U0001f600",
    " ",
    "\n\r\t",
    "'; DROP TABLE sites; --",
    "%s%n{0}",
]
PLAUSIBLE_TEXT = {
    "timezone": ["Europe/Brussels", "UTC", "America/New_York", "Bad/Zone", "Etc/GMT+14"],
    "country": ["BE", "NL", "FR", "GB", "IE", "IT", "ES", "DE", "XX", "be"],
    "balance_resolution": ["PT15M", "PT1H", "P1M", "PT5M", "P1Y"],
    "webhook_url": [
        "https://partner.example/hook",
        "http://[::1",
        "ftp://x",
        "https://",
        "https://[::1]@/hook",
    ],
    "name": ["site", "battery"],
    "agreed_by": ["Jane Doe"],
    "service": ["", "openvpp.v1.SiteRegistry", "openvpp.v1.Telemetry"],
    "file_containing_symbol": ["openvpp.v1.SiteRegistry", "openvpp.v1.Site", "nope"],
    "file_by_filename": ["openvpp/v1/site_registry.proto", "nope.proto"],
}
MASK_PATHS = [
    "name",
    "external_id",
    "location",
    "location.address",
    "timezone",
    "supply_points",
    "balance_resolution",
    "type",
    "power_kw",
    "capacity_kwh",
    "webhook_url",
    "identifier",
    "serial",
    "mpo",
    "start_date",
    "end_date",
    "transformer_factor",
    "id",
    "",
    "a.b.c",
    "\x00",
]
# Reading values at and just beyond ingest's bounds (a quarter-hour, an hour and a month of
# 5 GW, the largest register), the review's unit mix-up and one that wraps around in int64.
VALUE_BOUNDS = [
    bound
    for limit in (*(max_interval_wh(r) for r in (PT15M, PT1H, P1M)), MAX_REGISTER_WH)
    for bound in (limit, math.nextafter(limit, math.inf))
] + [2.01e16, 9.3e18, 2.0**63]
SPECIAL_FLOATS = [
    math.nan,
    math.inf,
    -math.inf,
    1e308,
    -1e308,
    0.0,
    -0.0,
    5e-324,
    1e-3,
    *VALUE_BOUNDS,
]
TIMESTAMP_SECONDS = [
    MIN_TIMESTAMP_SECONDS - 1,
    MIN_TIMESTAMP_SECONDS,
    MAX_TIMESTAMP_SECONDS - 900,
    MAX_TIMESTAMP_SECONDS - 1,
    MAX_TIMESTAMP_SECONDS,
    0,
    -1,
    2**40,
    -(2**40),
    -62_135_596_800,  # 0001-01-01T00:00:00Z, the protobuf minimum
    253_402_300_799,  # 9999-12-31T23:59:59Z, the protobuf maximum
    253_402_299_900,  # 9999-12-31T23:45:00Z
    1_735_693_200,  # 2025-01-01T01:00:00Z, a quarter-hour after the test meters start
    1_735_693_200 + 900,
    1_700_000_000,
]


@dataclass
class World:
    """Ids of rows that exist, so some fuzzed calls reach the stores."""

    ids: list[str] = field(default_factory=list)
    grid_identifiers: list[str] = field(default_factory=list)
    # Callers by role (tests.conftest.Org values).
    tokens: dict[Any, Any] = field(default_factory=dict)
    # Meters by what their readings carry: register_wh, interval_wh (PT15M sites).
    register_meters: list[str] = field(default_factory=list)
    profile_meters: list[str] = field(default_factory=list)


def message_class(descriptor: Descriptor) -> Any:
    return message_factory.GetMessageClass(descriptor)


def _text(data: st.DataObject, name: str, world: World, hostile: bool) -> str:
    choice = data.draw(st.integers(0, 9 if hostile else 4))
    meters = [*world.register_meters, *world.profile_meters]
    if choice <= 2 and name == "meter_id" and meters:
        # Mostly a meter that exists: its readings reach the value rules.
        return data.draw(st.sampled_from(meters))
    if choice <= 2 and (name == "id" or name.endswith("_id")):
        options = [*world.ids, str(uuid.uuid4()), "not-a-uuid", str(uuid.uuid4()).upper()]
        return data.draw(st.sampled_from(options))
    if choice <= 3 and "grid_identifier" in name:
        options = [*world.grid_identifiers, random_ean18(), random_identifier(), "EAN 5414"]
        return data.draw(st.sampled_from(options))
    if choice <= 4 and name in PLAUSIBLE_TEXT:
        return data.draw(st.sampled_from(PLAUSIBLE_TEXT[name]))
    if not hostile:
        return data.draw(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", max_size=20))
    if choice <= 6:
        return data.draw(st.sampled_from(HOSTILE_TEXT))
    return data.draw(st.text(max_size=40))


def _scalar(data: st.DataObject, fd: FieldDescriptor, world: World, hostile: bool) -> Any:
    kind = fd.type
    if kind == F.TYPE_STRING:
        return _text(data, fd.name, world, hostile)
    if kind == F.TYPE_BYTES:
        return data.draw(st.binary(max_size=64))
    if kind == F.TYPE_BOOL:
        return data.draw(st.booleans())
    if kind in (F.TYPE_DOUBLE, F.TYPE_FLOAT) and not hostile:
        # Energies (register_wh, interval_wh) at and beyond ingest's bounds half the time.
        if data.draw(st.integers(0, 3)) < (2 if fd.name.endswith("_wh") else 1):
            return data.draw(st.sampled_from(VALUE_BOUNDS))
        return data.draw(st.sampled_from([-5.0, 0.0, 1.0, 5.0, 10.0, 100.5]))
    if kind in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        floats = st.floats() if kind == F.TYPE_DOUBLE else st.floats(width=32)
        return data.draw(st.sampled_from(SPECIAL_FLOATS) | floats)
    if kind == F.TYPE_ENUM:
        assert fd.enum_type is not None
        known = [value.number for value in fd.enum_type.values]
        if not hostile:
            return data.draw(st.sampled_from(known))
        return data.draw(st.sampled_from(known) | st.integers(-(2**31), 2**31 - 1))
    low, high = _INT_RANGES[kind]
    if not hostile:
        return data.draw(st.integers(max(low, 0), 100))
    edges = [v for v in (low, high, 0, -1, 1, 1000, 1001, 10_000) if low <= v <= high]
    return data.draw(st.sampled_from(edges) | st.integers(low, high))


def _well_known(data: st.DataObject, descriptor: Descriptor, hostile: bool) -> Message | None:
    name = descriptor.full_name
    cls = message_class(descriptor)
    if name == "google.protobuf.Timestamp" and not hostile:
        quarter = data.draw(st.integers(0, 96 * 40))
        plausible: Message = cls(seconds=1_735_693_200 + 900 * quarter)
        return plausible
    if name == "google.type.Date" and not hostile:
        year, month, day = data.draw(st.integers(2024, 2035)), data.draw(st.integers(1, 12)), 1
        plausible = cls(year=year, month=month, day=day)
        return plausible
    if name == "google.protobuf.Timestamp":
        seconds = data.draw(st.sampled_from(TIMESTAMP_SECONDS) | st.integers(-(2**63), 2**63 - 1))
        nanos = data.draw(
            st.sampled_from([0, 0, 0, 999_999_999, 1_000_000_000, -1])
            | st.integers(-(2**31), 2**31 - 1)
        )
        message: Message = cls(seconds=seconds, nanos=nanos)
        return message
    if name == "google.type.Date":
        year = data.draw(
            st.sampled_from([0, 1, 1899, 1900, 2025, 2031, 2199, 2200, 9999, 10_000, -1])
            | st.integers(-(2**31), 2**31 - 1)
        )
        month = data.draw(st.sampled_from([0, 1, 2, 6, 12, 13, -1]))
        day = data.draw(st.sampled_from([0, 1, 15, 28, 29, 30, 31, 32, -1]))
        message = cls(year=year, month=month, day=day)
        return message
    if name == "google.protobuf.Duration":
        seconds = data.draw(
            st.sampled_from([0, 1, -1, 900, 315_576_000_001, -(2**63)])
            | st.integers(-(2**63), 2**63 - 1)
        )
        nanos = data.draw(st.sampled_from([0, 1, -1, 999_999_999, 2**31 - 1]))
        message = cls(seconds=seconds, nanos=nanos)
        return message
    if name == "google.protobuf.FieldMask":
        paths = data.draw(st.lists(st.sampled_from(MASK_PATHS) | st.text(max_size=20), max_size=4))
        message = cls(paths=paths)
        return message
    return None


def draw_message(
    data: st.DataObject,
    descriptor: Descriptor,
    world: World,
    depth: int = 0,
    hostile: bool = True,
) -> Message:
    """A message of ``descriptor``'s type with hostile (or only plausible) field values."""
    special = _well_known(data, descriptor, hostile)
    if special is not None:
        return special
    message: Message = message_class(descriptor)()
    if depth > MAX_DEPTH:
        return message
    for fd in descriptor.fields:
        # Plausible messages set most fields, so required-field rules pass more often.
        if data.draw(st.integers(0, 9)) >= (8 if not hostile else 5):
            continue
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            continue  # none of our requests has a map; their checks are unit-sized
        if fd.is_repeated:
            _fill_repeated(data, message, fd, world, depth, hostile)
        elif fd.message_type is not None:
            getattr(message, fd.name).CopyFrom(
                draw_message(data, fd.message_type, world, depth + 1, hostile)
            )
        else:
            setattr(message, fd.name, _scalar(data, fd, world, hostile))
    return message


def _fill_repeated(
    data: st.DataObject,
    message: Message,
    fd: FieldDescriptor,
    world: World,
    depth: int,
    hostile: bool,
) -> None:
    target = getattr(message, fd.name)
    count = data.draw(st.integers(0, 3))
    items: list[Any] = []
    for _ in range(count):
        if fd.message_type is not None:
            items.append(draw_message(data, fd.message_type, world, depth + 1, hostile))
        else:
            items.append(_scalar(data, fd, world, hostile))
    # Now and then a large repeated field: the first item many times over.
    if hostile and items and data.draw(st.integers(0, 19)) == 0:
        items = items[:1] * data.draw(st.sampled_from([1000, 10_001]))
    target.extend(items)


def draw_request_bytes(data: st.DataObject, descriptor: Descriptor, world: World) -> bytes:
    """An encoding of a drawn message, often mangled, or random bytes."""
    how = data.draw(st.sampled_from(["message"] * 6 + ["truncated", "corrupted", "random"]))
    if how == "random":
        return data.draw(st.binary(max_size=256))
    # Half the messages are plausible throughout, so calls get past the first check; their
    # truncated and corrupted encodings are those of (nearly) valid requests.
    hostile = data.draw(st.booleans())
    encoded = draw_message(data, descriptor, world, hostile=hostile).SerializeToString()
    if how == "truncated" and encoded:
        return encoded[: data.draw(st.integers(0, len(encoded) - 1))]
    if how == "corrupted" and encoded:
        mangled = bytearray(encoded)
        for _ in range(data.draw(st.integers(1, 4))):
            position = data.draw(st.integers(0, len(mangled) - 1))
            mangled[position] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            position = data.draw(st.integers(0, len(mangled)))
            mangled[position:position] = data.draw(st.binary(min_size=1, max_size=8))
        return bytes(mangled)
    return encoded


def draw_stream(data: st.DataObject, descriptor: Descriptor, world: World) -> Sequence[bytes]:
    return [
        draw_request_bytes(data, descriptor, world) for _ in range(data.draw(st.integers(1, 3)))
    ]
