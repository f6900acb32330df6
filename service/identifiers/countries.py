"""Countries (ISO 3166-1 alpha-2) and their main time zone, shared by both registries."""

from __future__ import annotations

import pytz


def default_timezone(country: str) -> str:
    """The country's first-listed (main) IANA zone, else UTC."""
    zones = pytz.country_timezones.get(country) if country else None
    return zones[0] if zones else "UTC"


def is_country_code(country: str) -> bool:
    return len(country) == 2 and country.isalpha() and country in pytz.country_names
