"""Countries (ISO 3166-1 alpha-2) and their main time zone, shared by both registries."""

from __future__ import annotations

import pytz

# Only ASCII letters: str.upper() turns "ß" into "SS" and the dotless "ı" into "I", so
# "ß", "ıt" or "ıe" would pass as South Sudan, Italy or Ireland.
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def normalize_country(text: str) -> str:
    """A country as given, stripped and upper-cased in ASCII only (check it with
    :func:`is_country_code`)."""
    return text.strip().translate(_ASCII_UPPER)


def default_timezone(country: str) -> str:
    """The country's first-listed (main) IANA zone, else UTC."""
    zones = pytz.country_timezones.get(country) if country else None
    return zones[0] if zones else "UTC"


def is_country_code(country: str) -> bool:
    return len(country) == 2 and country.isalpha() and country in pytz.country_names
