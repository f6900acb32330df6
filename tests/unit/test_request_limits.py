"""The rules every field of every request obeys, walked from the descriptors."""

from __future__ import annotations

import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.type import date_pb2
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import site_registry_pb2 as spb
from openvpp.v1 import telemetry_pb2 as tpb
from openvpp.v1 import upstream_registry_pb2 as upb

from service.common.errors import ValidationError
from service.common.protoconv import (
    MAX_TIMESTAMP_SECONDS,
    MIN_TIMESTAMP_SECONDS,
    from_timestamp,
)
from service.common.request_limits import check_request


def violations(message: object) -> dict[str, str]:
    try:
        check_request(message)  # type: ignore[arg-type]
    except ValidationError as error:
        return {v.field: v.rule for v in error.violations}
    return {}


def test_nul_anywhere_names_the_nested_and_repeated_field() -> None:
    request = spb.CreateSiteRequest(
        name="ok",
        location=spb.Location(address="Dok\x00Noord"),
        supply_points=[
            spb.SupplyPoint(grid_identifier="A"),
            spb.SupplyPoint(grid_identifier="\x00"),
        ],
    )
    assert violations(request) == {
        "location.address": "must not contain NUL characters (U+0000)",
        "supply_points[1].grid_identifier": "must not contain NUL characters (U+0000)",
    }
    mask = spb.UpdateSiteRequest(update_mask=field_mask_pb2.FieldMask(paths=["name", "a\x00"]))
    assert set(violations(mask)) == {"update_mask.paths[1]"}


def test_length_is_left_to_the_domain_below_the_ceiling_and_reported_with_the_field_limit() -> None:
    assert violations(spb.CreateSiteRequest(name="n" * 4096)) == {}
    assert violations(spb.CreateSiteRequest(name="n" * 4097)) == {
        "name": "must be at most 200 characters"
    }
    assert violations(spb.GetSiteRequest(site_id="x" * 4097)) == {
        "site_id": "must be at most 4096 characters"
    }


@pytest.mark.parametrize(
    ("seconds", "nanos", "ok"),
    [
        (MIN_TIMESTAMP_SECONDS, 0, True),
        (MIN_TIMESTAMP_SECONDS - 1, 0, False),
        (MAX_TIMESTAMP_SECONDS - 1, 999_999_999, True),
        (MAX_TIMESTAMP_SECONDS, 0, False),
        (0, -1, False),
        (0, 1_000_000_000, False),
        (2**40, 0, False),
    ],
)
def test_timestamps_at_and_beyond_the_limits(seconds: int, nanos: int, ok: bool) -> None:
    stamp = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    found = violations(mpb.CreateMeterRequest(start_date=stamp))
    assert (found == {}) is ok
    if not ok:
        with pytest.raises(ValidationError):
            from_timestamp(stamp, "start_date")


@pytest.mark.parametrize(
    ("year", "month", "day", "ok"),
    [
        (0, 0, 0, True),  # absent
        (1900, 1, 1, True),
        (2199, 12, 31, True),
        (1899, 12, 31, False),
        (2200, 1, 1, False),
        (2025, 2, 29, False),
        (2024, 2, 29, True),
        (2025, 0, 1, False),
        (-1, 1, 1, False),
    ],
)
def test_dates_at_and_beyond_the_limits(year: int, month: int, day: int, ok: bool) -> None:
    request = upb.CreateContractRequest(start_date=date_pb2.Date(year=year, month=month, day=day))
    assert (violations(request) == {}) is ok


def test_readings_of_a_batch_are_left_to_the_ingest() -> None:
    batch = tpb.ReadingBatch(
        batch_id="b",
        readings=[tpb.Reading(meter_id="\x00", timestamp=timestamp_pb2.Timestamp(seconds=2**40))],
    )
    assert violations(tpb.IngestReadingsRequest(batch=batch)) == {}
    batch.batch_id = "\x00"
    assert set(violations(tpb.IngestReadingsRequest(batch=batch))) == {"batch.batch_id"}
