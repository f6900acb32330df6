"""Upstream-site rules and the local-calendar arithmetic of the scheduler. No I/O.

"Today" is always a local date: for a partner site's ``upstream_status`` in that site's own
time zone, for a supplier's view of its contracts in the upstream site's time zone (its
country's main zone). A date-driven change happens at local midnight of that date.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo

from service.common.errors import ViolationCollector
from service.common.text import NAME_LENGTH, check_text
from service.grid import local_midnight as grid_local_midnight
from service.identifiers import (
    InvalidGridIdentifier,
    default_timezone,
    is_country_code,
    normalize_country,
    parse_grid_identifier,
)

# A supplier's own reference for an upstream site (as long as a partner site's names).
MAX_EXTERNAL_ID_LENGTH = NAME_LENGTH
# Who agreed: a name or a reference, not a document.
MAX_AGREED_BY_LENGTH = NAME_LENGTH
# If local midnight of the next transition is not after "now" (a clock going back over
# midnight), look again this much later instead of at once, so no site is due forever.
MIN_RECHECK = timedelta(minutes=1)


@dataclass(frozen=True)
class UpstreamSiteFields:
    grid_identifier: str
    country: str
    external_id: str
    timezone: str


def validate_upstream_site(
    grid_identifier: str, country: str, external_id: str
) -> UpstreamSiteFields:
    """Checks every rule, reports all violations at once, returns the normalized fields.

    The identifier goes through the very same parser as a partner site's, so the two match
    exactly when they denote the same connection point.
    """
    errors = ViolationCollector()
    code = normalize_country(country)
    if code and not is_country_code(code):
        errors.add("country", "must be an ISO 3166-1 alpha-2 code, e.g. BE or GB")
        code = ""
    identifier = grid_identifier
    try:
        identifier = parse_grid_identifier(grid_identifier, code or None)
    except InvalidGridIdentifier as invalid:
        errors.add("grid_identifier", invalid.rule)
    reference = external_id.strip()
    check_text(errors, "external_id", reference, MAX_EXTERNAL_ID_LENGTH)
    errors.raise_if_any()
    return UpstreamSiteFields(identifier, code, reference, default_timezone(code))


def validate_agreement_input(agreed_by: str, agreed_at: datetime, now: datetime) -> str:
    """``agreed_by`` normalized; violations for a missing name or an agreement in the future."""
    errors = ViolationCollector()
    who = agreed_by.strip()
    if not who:
        errors.add("agreed_by", "is required: who agreed on behalf of the end-customer")
    else:
        check_text(errors, "agreed_by", who, MAX_AGREED_BY_LENGTH)
    if agreed_at > now:
        errors.add("agree_time", "must not be in the future")
    errors.raise_if_any()
    return who


@cache
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def local_date(now: datetime, timezone: str) -> date:
    """The calendar date at ``now`` in ``timezone``."""
    return now.astimezone(zone(timezone)).date()


def local_midnight(day: date, timezone: str) -> datetime:
    """The instant ``day`` begins in ``timezone`` (by name): the grid's rule, the one the
    balance blocks start at, so a contract and a block change on the same instant."""
    return grid_local_midnight(day, zone(timezone))


def next_check_at(next_date: date | None, timezone: str, now: datetime) -> datetime | None:
    """When the scheduler must recompute: local midnight of ``next_date``, never at or
    before ``now``; None when no date will change anything."""
    if next_date is None:
        return None
    at = local_midnight(next_date, timezone)
    return at if at > now else now + MIN_RECHECK
