"""A site's time zone must be an IANA zone that every replica and the database read alike."""

from __future__ import annotations

import pytest

from service.common.errors import ValidationError
from service.registry.domain import (
    Location,
    SiteFields,
    SupplyPoint,
    SupplyPointDirection,
    validate_site,
)

UNKNOWN_ZONE_RULE = "must be an IANA time zone name, e.g. Europe/Brussels"


def site(timezone: str) -> SiteFields:
    return SiteFields(
        name="Dok Noord",
        external_id="",
        location=Location(),
        timezone=timezone,
        supply_points=(SupplyPoint("T0123456789ABCDEF", SupplyPointDirection.BIDIRECTIONAL),),
        site_type=None,
        balance_resolution="",
    )


def timezone_violations(timezone: str) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as caught:
        validate_site(site(timezone))
    return [(v.field, v.rule) for v in caught.value.violations]


@pytest.mark.parametrize("name", ["localtime", "posixrules", "Factory"])
def test_host_zone_files_that_are_not_iana_zones_are_refused_like_unknown_zones(
    name: str,
) -> None:
    # Refused even on hosts whose zone directory has no such file: the rule is the same
    # on every replica.
    assert timezone_violations(name) == timezone_violations("Bad/Zone")
    assert timezone_violations(name) == [("timezone", UNKNOWN_ZONE_RULE)]


@pytest.mark.parametrize("name", ["Europe/Brussels", "UTC", "US/Eastern", "Etc/GMT-2"])
def test_iana_zones_and_their_links_are_accepted(name: str) -> None:
    assert validate_site(site(name)).timezone == name
