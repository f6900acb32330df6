"""The rules every field of every request obeys, walked from the descriptors."""

from __future__ import annotations

import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.type import date_pb2
from openvpp.v1 import dispatch_pb2 as dpb
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
from service.common.request_limits import DEFAULT_MAX_ITEMS, check_request


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


def test_millions_of_empty_elements_are_refused_by_their_count_alone() -> None:
    # 1,000,000 empty supply points in 2 MB: the count is refused before any element is
    # judged, so the answer is one violation, not two million.
    request = spb.CreateSiteRequest.FromString(b"\x2a\x00" * 1_000_000)
    assert violations(request) == {"supply_points": "must hold at most 100 elements"}


def test_counts_are_checked_before_the_elements_and_alone() -> None:
    request = spb.UpdateSiteRequest(
        site=spb.Site(supply_points=[spb.SupplyPoint(grid_identifier="\x00")] * 101),
        update_mask=field_mask_pb2.FieldMask(paths=["name"] * 101),
    )
    assert violations(request) == {
        "site.supply_points": "must hold at most 100 elements",
        "update_mask.paths": "must hold at most 100 elements",
    }
    # Within the limits, the elements are judged as before.
    request.site.ClearField("supply_points")
    request.site.supply_points.extend([spb.SupplyPoint(grid_identifier="\x00")] * 100)
    del request.update_mask.paths[100:]
    found = violations(request)
    assert "site.supply_points" not in found
    assert found["site.supply_points[99].grid_identifier"].startswith("must not contain NUL")


def test_a_field_without_a_lower_limit_holds_up_to_the_default() -> None:
    def selecting(count: int) -> dpb.DispatchFlexibilityRequest:
        return dpb.DispatchFlexibilityRequest(
            selection=dpb.DispatchSelection(site_ids=["x"] * count)
        )

    assert "selection.site_ids" not in violations(selecting(DEFAULT_MAX_ITEMS))
    assert violations(selecting(DEFAULT_MAX_ITEMS + 1)) == {
        "selection.site_ids": "must hold at most 10,000 elements"
    }


def test_the_readings_of_a_batch_are_left_to_the_ingest() -> None:
    batch = tpb.ReadingBatch(readings=[tpb.Reading()] * 20_000)
    assert violations(batch) == {}
