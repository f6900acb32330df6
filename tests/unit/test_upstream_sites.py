"""Unit tests for service.upstream.sites: upstream-site rules and local-calendar arithmetic."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from service.common.errors import ValidationError
from service.registry.domain import (
    Location,
    SiteFields,
    SupplyPoint,
    SupplyPointDirection,
    validate_site,
)
from service.upstream.sites import (
    MIN_RECHECK,
    local_date,
    local_midnight,
    next_check_at,
    validate_agreement_input,
    validate_upstream_site,
)


def violations(error: ValidationError) -> dict[str, str]:
    return {v.field: v.rule for v in error.violations}


def test_upstream_site_normalized_like_partner_sites() -> None:
    fields = validate_upstream_site(" ean 541448820000000008 ", " be ", " ref ")
    assert fields.grid_identifier == "541448820000000008"
    assert fields.country == "BE"
    assert fields.external_id == "ref"
    assert fields.timezone == "Europe/Brussels"


def test_upstream_site_without_country_uses_generic_rules_and_utc() -> None:
    fields = validate_upstream_site("abc-123", "", "")
    assert fields.grid_identifier == "ABC-123"
    assert fields.timezone == "UTC"


def test_upstream_site_reports_every_violation() -> None:
    with pytest.raises(ValidationError) as caught:
        validate_upstream_site("", "ZZ", "x" * 201)
    assert set(violations(caught.value)) == {"grid_identifier", "country", "external_id"}


def test_upstream_site_checks_the_country_scheme() -> None:
    with pytest.raises(ValidationError) as caught:
        validate_upstream_site("541448820000000004", "BE", "")
    assert "check digit" in violations(caught.value)["grid_identifier"]


def test_agreement_input() -> None:
    now = datetime(2031, 1, 1, tzinfo=UTC)
    assert validate_agreement_input("  Jan ", now, now) == "Jan"
    with pytest.raises(ValidationError) as caught:
        validate_agreement_input(" ", now + timedelta(seconds=1), now)
    assert set(violations(caught.value)) == {"agreed_by", "agree_time"}
    with pytest.raises(ValidationError):
        validate_agreement_input("x" * 201, now, now)


def test_local_date_depends_on_zone() -> None:
    instant = datetime(2031, 1, 15, 11, 30, tzinfo=UTC)
    assert local_date(instant, "Pacific/Auckland") == date(2031, 1, 16)
    assert local_date(instant, "America/Los_Angeles") == date(2031, 1, 15)


def test_local_midnight_across_dst() -> None:
    # Brussels: winter UTC+1, summer UTC+2 (switch on 2031-03-30 at 02:00).
    assert local_midnight(date(2031, 3, 30), "Europe/Brussels") == datetime(
        2031, 3, 29, 23, 0, tzinfo=UTC
    )
    assert local_midnight(date(2031, 3, 31), "Europe/Brussels") == datetime(
        2031, 3, 30, 22, 0, tzinfo=UTC
    )


def test_local_midnight_inside_a_dst_gap_is_the_start_of_the_day() -> None:
    # Santiago springs forward at 24:00 local: 00:00 of that day does not exist.
    start = local_midnight(date(2031, 9, 7), "America/Santiago")
    assert local_date(start, "America/Santiago") == date(2031, 9, 7)
    assert local_date(start - timedelta(microseconds=1), "America/Santiago") == date(2031, 9, 6)


def test_next_check_at() -> None:
    now = datetime(2031, 1, 15, 12, tzinfo=UTC)
    assert next_check_at(None, "UTC", now) is None
    assert next_check_at(date(2031, 1, 16), "UTC", now) == datetime(2031, 1, 16, tzinfo=UTC)
    # A date whose midnight is already past (clock moved back) is looked at again soon,
    # never "due forever".
    assert next_check_at(date(2031, 1, 15), "UTC", now) == now + MIN_RECHECK


# str.upper() makes ASCII of these: "SS" (South Sudan), "IT", "IE".
NOT_ASCII_COUNTRIES = pytest.mark.parametrize("country", ["ß", "ıt", "ıe", "ＢＥ"])


@NOT_ASCII_COUNTRIES
def test_a_country_in_letters_that_upper_case_to_ascii_is_refused(country: str) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_upstream_site("abc-123", country, "")
    assert violations(caught.value) == {
        "country": "must be an ISO 3166-1 alpha-2 code, e.g. BE or GB"
    }


@NOT_ASCII_COUNTRIES
def test_a_partner_site_country_in_such_letters_is_refused(country: str) -> None:
    site = SiteFields(
        name="Dok Noord",
        external_id="",
        location=Location(country=country),
        timezone="",
        supply_points=(SupplyPoint("T0123456789ABCDEF", SupplyPointDirection.BIDIRECTIONAL),),
        site_type=None,
        balance_resolution="",
    )
    with pytest.raises(ValidationError) as caught:
        validate_site(site)
    assert violations(caught.value) == {
        "location.country": "must be an ISO 3166-1 alpha-2 code, e.g. BE or GB"
    }
