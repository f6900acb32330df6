"""Organization names: what the table stores and what `orgs list` prints one line per org."""

from __future__ import annotations

import pytest

from service.auth.store import org_name_rule


@pytest.mark.parametrize(
    "name", ["acme", "Volt Supply", "Société Générale", "東京電力", "x" * 200, "a  b"]
)
def test_printable_names_up_to_200_characters_are_accepted(name: str) -> None:
    assert org_name_rule(name) is None


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("", "must be 1 to 200 characters"),
        ("   ", "must be 1 to 200 characters"),
        ("x" * 201, "must be 1 to 200 characters"),
        ("Soci\udce9t\udce9", "must be valid UTF-8 text"),
        ("Volt\tSupply", "must not contain tab, line feed, carriage return"),
        ("Volt\nSupply", "must not contain tab, line feed, carriage return"),
        ("Volt\r\nSupply", "must not contain tab, line feed, carriage return"),
        # Where str.splitlines() breaks a line too.
        ("Volt\x85Supply", "must not contain tab, line feed, carriage return or another"),
        ("Volt\u2028Supply", "must not contain tab, line feed, carriage return or another"),
        ("Volt\u2029Supply", "must not contain tab, line feed, carriage return or another"),
        ("Volt\x00Supply", "must not contain NUL characters"),
        ("Volt\x07Supply", "must not contain control characters"),
    ],
)
def test_names_the_table_or_orgs_list_cannot_take_are_refused(name: str, rule: str) -> None:
    broken = org_name_rule(name)
    assert broken is not None
    assert broken.startswith(rule)
