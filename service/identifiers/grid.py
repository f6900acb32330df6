"""Grid connection identifiers (metering / supply point ids), as plain functions.

A site's grid identifier is the id its distribution grid operator gives the connection
point. Each country has its own scheme, most with a check digit, so a typo is caught
when the site is registered rather than months later when the operator rejects a message:

========  ==========  =========================================================
country   scheme      format
========  ==========  =========================================================
BE NL LU  ``EAN``     EAN-18 (GS1 GSRN): 18 digits, GS1 mod-10 check digit
FR        ``PRM``     PRM / PDL: 14 digits (no published check digit)
GB        ``MPAN``    MPAN core: 13 digits, last one a mod-11 check digit
IE        ``MPRN``    MPRN: 11 digits starting with ``10``
IT        ``POD``     ``IT`` + 3-digit distributor + ``E`` + 8 or 9 digits
ES        ``CUPS``    ``ES`` + 16 digits + 2 control letters (+ optional ``0F``-style
                      border point suffix)
DE        ``MALO_ID`` Marktlokations-ID: 11 digits, first 1-9, BDEW check digit
========  ==========  =========================================================

Any other (or no) country only gets the generic rules: not empty, at most 64 characters,
ASCII letters, digits and ``-`` ``_`` ``.`` ``/``.

Callers normalise first (:func:`normalize_grid_identifier`) and store the normalised form;
:func:`parse_grid_identifier` does both. Errors are :class:`InvalidGridIdentifier`, whose
``rule`` names the scheme and country so a client knows what to fix.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from service.identifiers.countries import ASCII_UPPER, normalize_country

__all__ = [
    "MAX_GRID_IDENTIFIER_LENGTH",
    "InvalidGridIdentifier",
    "normalize_grid_identifier",
    "parse_grid_identifier",
    "scheme_for_country",
    "validate_grid_identifier",
]

MAX_GRID_IDENTIFIER_LENGTH = 64

_ASCII_DIGITS = frozenset("0123456789")
_ALLOWED_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_./")
_EAN_PREFIX = "EAN"

_SCHEME_BY_COUNTRY: dict[str, str] = {
    "BE": "EAN",
    "NL": "EAN",
    "LU": "EAN",
    "FR": "PRM",
    "GB": "MPAN",
    "IE": "MPRN",
    "IT": "POD",
    "ES": "CUPS",
    "DE": "MALO_ID",
}


class InvalidGridIdentifier(ValueError):
    """The grid identifier breaks ``rule``, a human-readable sentence for the client."""

    rule: str

    def __init__(self, rule: str) -> None:
        super().__init__(rule)
        self.rule = rule


def _country_code(country: str | None) -> str | None:
    if country is None:
        return None
    code = normalize_country(country)
    return code or None


def scheme_for_country(country: str | None) -> str | None:
    """The identifier scheme checked for ``country`` (ISO 3166-1 alpha-2), or None if none is."""
    code = _country_code(country)
    if code is None:
        return None
    return _SCHEME_BY_COUNTRY.get(code)


def normalize_grid_identifier(raw: str) -> str:
    """Canonical form: no whitespace at all, ASCII letters upper-cased, no leading ``EAN``.

    ``" ean 5414 4882 ..."`` becomes ``"54144882..."``. Other characters (dashes, dots)
    are kept on purpose: a scheme that forbids them rejects them in validation, and a
    scheme-less identifier keeps them as the operator wrote them.

    Every leading ``EAN`` goes, not only the first: the form must normalise to itself
    (ListSites normalises its filter, and must find what GetSite returned). With one
    stripped, ``"EANEAN-7"`` was stored as ``"EAN-7"``, which a filter looked for as ``"-7"``.
    """
    compact = "".join(raw.split()).translate(ASCII_UPPER)
    while compact.startswith(_EAN_PREFIX):
        compact = compact[len(_EAN_PREFIX) :]
    return compact


def parse_grid_identifier(raw: str, country: str | None) -> str:
    """Normalise ``raw`` and validate it for ``country``; returns the normalised identifier."""
    normalized = normalize_grid_identifier(raw)
    validate_grid_identifier(normalized, country)
    return normalized


def validate_grid_identifier(normalized: str, country: str | None) -> None:
    """Raise :class:`InvalidGridIdentifier` unless ``normalized`` is valid for ``country``.

    ``normalized`` should come from :func:`normalize_grid_identifier`. ``country`` is an
    ISO 3166-1 alpha-2 code, or None / ``""`` when unknown (only generic rules then apply).
    """
    _check_generic(normalized)
    code = _country_code(country)
    if code is None:
        return
    scheme = _SCHEME_BY_COUNTRY.get(code)
    if scheme is None:
        return
    _VALIDATORS[scheme](normalized, code)


def _check_generic(value: str) -> None:
    if not value:
        raise InvalidGridIdentifier("grid identifier must not be empty")
    if len(value) > MAX_GRID_IDENTIFIER_LENGTH:
        raise InvalidGridIdentifier(
            f"grid identifier must be at most {MAX_GRID_IDENTIFIER_LENGTH} characters"
            f" (got {len(value)})"
        )
    for char in value:
        if char not in _ALLOWED_CHARS:
            raise InvalidGridIdentifier(
                "grid identifier may only contain ASCII letters, digits and '-', '_', '.', '/'"
                f" (found {char!r})"
            )


def _is_digits(value: str) -> bool:
    return bool(value) and all(char in _ASCII_DIGITS for char in value)


def _gs1_check_digit(data: str) -> int:
    """GS1 mod-10: weights 3, 1, 3, 1, ... from the rightmost data digit."""
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(data)))
    return (10 - total % 10) % 10


_MPAN_PRIMES = (3, 5, 7, 13, 17, 19, 23, 29, 31, 37, 41, 43)


def _mpan_check_digit(data: str) -> int:
    """MPAN core: the first 12 digits times the primes above, summed, mod 11, mod 10."""
    return sum(int(d) * p for d, p in zip(data, _MPAN_PRIMES, strict=True)) % 11 % 10


_CUPS_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def _cups_control_letters(digits16: str) -> str:
    """CUPS control letters: the 16 digits mod 529, split in base 23 over the table above."""
    high, low = divmod(int(digits16) % 529, 23)
    return _CUPS_LETTERS[high] + _CUPS_LETTERS[low]


def _malo_check_digit(data: str) -> int:
    """BDEW MaLo-ID: odd-position digits + 2 × even-position digits (1-based), to the next ten."""
    odd = sum(int(d) for d in data[0::2])
    even = sum(int(d) for d in data[1::2])
    return (10 - (odd + 2 * even) % 10) % 10


def _validate_ean18(value: str, country: str) -> None:
    if len(value) != 18 or not _is_digits(value):
        raise InvalidGridIdentifier(f"must be 18 digits (EAN-18 / GSRN) for country {country}")
    if int(value[-1]) != _gs1_check_digit(value[:-1]):
        raise InvalidGridIdentifier(
            f"EAN-18 check digit does not match (GS1 mod-10) for country {country}"
        )


def _validate_prm(value: str, country: str) -> None:
    if len(value) != 14 or not _is_digits(value):
        raise InvalidGridIdentifier(f"must be 14 digits (PRM / PDL) for country {country}")


def _validate_mpan(value: str, country: str) -> None:
    if len(value) != 13 or not _is_digits(value):
        raise InvalidGridIdentifier(f"must be the 13-digit MPAN core for country {country}")
    if int(value[-1]) != _mpan_check_digit(value[:-1]):
        raise InvalidGridIdentifier(
            f"MPAN core check digit does not match (prime-weighted mod 11) for country {country}"
        )


def _validate_mprn(value: str, country: str) -> None:
    if len(value) != 11 or not _is_digits(value):
        raise InvalidGridIdentifier(f"must be 11 digits (MPRN) for country {country}")
    if not value.startswith("10"):
        raise InvalidGridIdentifier(f"must start with 10 (electricity MPRN) for country {country}")


_POD_RE = re.compile(r"IT[0-9]{3}E[0-9]{8,9}")


def _validate_pod(value: str, country: str) -> None:
    if _POD_RE.fullmatch(value) is None:
        raise InvalidGridIdentifier(
            f"must be 'IT' + 3 digits + 'E' + 8 or 9 digits (POD) for country {country}"
        )


_CUPS_RE = re.compile(r"ES([0-9]{16})([A-Z]{2})(?:[0-9][A-Z])?")


def _validate_cups(value: str, country: str) -> None:
    match = _CUPS_RE.fullmatch(value)
    if match is None:
        raise InvalidGridIdentifier(
            "must be 'ES' + 16 digits + 2 control letters, optionally + digit and letter"
            f" border point suffix (CUPS, 20 or 22 characters) for country {country}"
        )
    digits, letters = match.group(1), match.group(2)
    if letters != _cups_control_letters(digits):
        raise InvalidGridIdentifier(
            f"CUPS control letters do not match (mod 529) for country {country}"
        )


def _validate_malo(value: str, country: str) -> None:
    if len(value) != 11 or not _is_digits(value) or value[0] == "0":
        raise InvalidGridIdentifier(
            f"must be 11 digits not starting with 0 (MaLo-ID) for country {country}"
        )
    if int(value[-1]) != _malo_check_digit(value[:-1]):
        raise InvalidGridIdentifier(
            f"MaLo-ID check digit does not match (BDEW) for country {country}"
        )


_VALIDATORS: dict[str, Callable[[str, str], None]] = {
    "EAN": _validate_ean18,
    "PRM": _validate_prm,
    "MPAN": _validate_mpan,
    "MPRN": _validate_mprn,
    "POD": _validate_pod,
    "CUPS": _validate_cups,
    "MALO_ID": _validate_malo,
}
