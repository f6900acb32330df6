"""Countries (ISO 3166-1 alpha-2) and their main time zone, shared by both registries."""

from __future__ import annotations

import pytz

# Only ASCII letters are upper-cased: str.upper() turns "ß" into "SS", the dotless "ı" into
# "I" and the ligature "ﬁ" into "FI", so non-ASCII input would pass as ASCII ("ß", "ıt" as
# South Sudan and Italy). Shared with the grid identifiers.
ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def normalize_country(text: str) -> str:
    """A country as given, stripped and upper-cased in ASCII only (check it with
    :func:`is_country_code`)."""
    return text.strip().translate(ASCII_UPPER)


def default_timezone(country: str) -> str:
    """The country's first-listed (main) IANA zone, else UTC."""
    zones = pytz.country_timezones.get(country) if country else None
    return zones[0] if zones else "UTC"


def is_country_code(country: str) -> bool:
    return len(country) == 2 and country.isalpha() and country in pytz.country_names
