"""The webhook body is written out by hand for speed: it must be the bytes ``json.dumps``
of the same fields gives, whatever partners put in their external ids."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.dispatch.domain import format_power
from service.dispatch.outbox import setpoint_body

START = datetime(2026, 12, 1, 10, 15, tzinfo=UTC)


def reference_body(row: dict[str, Any], cancellation: bool) -> bytes:
    def iso(value: datetime) -> str:
        return value.isoformat().replace("+00:00", "Z")

    return json.dumps(
        {
            "type": "setpoint.cancelled" if cancellation else "setpoint",
            "setpoint_id": str(row["id"]),
            "dispatch_id": str(row["dispatch_id"]),
            "site_id": str(row["site_id"]),
            "site_external_id": row["site_external_id"] or "",
            "resource_id": str(row["resource_id"]),
            "resource_external_id": row["resource_external_id"] or "",
            "start": iso(row["start_time"]),
            "end": iso(row["end_time"]),
            "power_kw": None if cancellation else format_power(row["power_kw"]),
            "valid_until": iso(row["end_time"]),
        },
        separators=(",", ":"),
    ).encode()


# Every code point, lone surrogates included (st.text leaves them out by default).
external_ids = st.one_of(st.none(), st.text(st.characters(blacklist_categories=()), max_size=40))


@given(
    site_external_id=external_ids,
    resource_external_id=external_ids,
    power_kw=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    quarters=st.integers(min_value=1, max_value=96),
    cancellation=st.booleans(),
)
def test_the_body_is_what_json_dumps_gives(
    site_external_id: str | None,
    resource_external_id: str | None,
    power_kw: float,
    quarters: int,
    cancellation: bool,
) -> None:
    row = {
        "id": uuid.uuid4(),
        "dispatch_id": uuid.uuid4(),
        "site_id": uuid.uuid4(),
        "site_external_id": site_external_id,
        "resource_id": uuid.uuid4(),
        "resource_external_id": resource_external_id,
        "start_time": START,
        "end_time": START + timedelta(minutes=15 * quarters),
        "power_kw": power_kw,
    }
    body = setpoint_body(row, cancellation)
    assert body == reference_body(row, cancellation)
    assert json.loads(body)["site_external_id"] == (site_external_id or "")


def test_quotes_backslashes_control_and_non_ascii_characters_are_escaped() -> None:
    row = {
        "id": uuid.uuid4(),
        "dispatch_id": uuid.uuid4(),
        "site_id": uuid.uuid4(),
        "site_external_id": 'a"b\\c\n\x01é€😀',
        "resource_id": uuid.uuid4(),
        "resource_external_id": "</script>",
        "start_time": START,
        "end_time": START + timedelta(hours=1),
        "power_kw": -2.5,
    }
    body = setpoint_body(row, False)
    assert body == reference_body(row, False)
    assert body.isascii()
    assert json.loads(body)["site_external_id"] == 'a"b\\c\n\x01é€😀'


@pytest.mark.parametrize(
    "external_id",
    [
        'say "hi"',
        "back\\slash",
        "tab\there",
        "del\x7f",
        "",
        "plain-id_01:/",
        "lone \ud800",
        "\u2028",
    ],
)
def test_ids_that_need_escaping_are_escaped_as_json_dumps_does(external_id: str) -> None:
    row = {
        "id": uuid.uuid4(),
        "dispatch_id": uuid.uuid4(),
        "site_id": uuid.uuid4(),
        "site_external_id": external_id,
        "resource_id": uuid.uuid4(),
        "resource_external_id": external_id,
        "start_time": START,
        "end_time": START + timedelta(hours=1),
        "power_kw": 0.0,
    }
    assert setpoint_body(row, True) == reference_body(row, True)
