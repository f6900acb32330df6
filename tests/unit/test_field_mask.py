"""The one update-mask check and merge every Update* RPC uses."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from service.common.errors import ValidationError
from service.common.field_mask import merge_masked, require_mask


@dataclass(frozen=True)
class Fields:
    name: str
    site_type: str | None
    factor: float


CURRENT = Fields(name="old", site_type="balanced", factor=2.0)
GIVEN = {"name": "new", "type": None, "factor": 0.0}


def test_only_the_masked_fields_change() -> None:
    assert merge_masked(CURRENT, {"name"}, GIVEN) == Fields("new", "balanced", 2.0)
    # Zero and None are values like any other once the path is named.
    assert merge_masked(CURRENT, {"factor"}, GIVEN) == Fields("old", "balanced", 0.0)


def test_a_path_spelled_differently_in_the_api() -> None:
    merged = merge_masked(CURRENT, {"type", "name"}, GIVEN, {"type": "site_type"})
    assert merged == Fields("new", None, 2.0)


def test_a_path_without_a_value_is_a_bug() -> None:
    with pytest.raises(KeyError):
        merge_masked(CURRENT, {"serial"}, GIVEN)


def test_require_mask() -> None:
    allowed = frozenset({"name", "factor"})
    assert require_mask(["name"], allowed) == {"name"}
    with pytest.raises(ValidationError) as empty:
        require_mask([], allowed)
    assert empty.value.violations[0].field == "update_mask"
    with pytest.raises(ValidationError) as unknown:
        require_mask(["name", "id"], allowed)
    assert unknown.value.violations[0].field == "update_mask.paths"
    assert "cannot update id" in unknown.value.violations[0].rule
