from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import timestamp_pb2
from openvpp.v1 import site_registry_pb2 as pb

from service.common.protoconv import enum_to_proto, from_timestamp, to_timestamp
from service.registry.domain import SiteStatus


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 21, 22, 1, 2, 345678, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),
        datetime(2026, 3, 29, 2, 30, tzinfo=timezone(timedelta(hours=2))),
        datetime(2026, 10, 25, 1, 0, 0, 1, tzinfo=timezone(timedelta(hours=-9, minutes=-30))),
    ],
)
def test_to_timestamp_matches_the_protobuf_conversion(value: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value)
    assert to_timestamp(value) == expected
    assert from_timestamp(to_timestamp(value)) == value


def test_enum_to_proto() -> None:
    assert enum_to_proto(pb.SiteStatus, "SITE_STATUS_", SiteStatus.PAUSED) == pb.SITE_STATUS_PAUSED
    assert enum_to_proto(pb.SiteStatus, "SITE_STATUS_", "onboarded") == pb.SITE_STATUS_ONBOARDED
    with pytest.raises(ValueError, match="NOPE"):
        enum_to_proto(pb.SiteStatus, "SITE_STATUS_", "nope")
