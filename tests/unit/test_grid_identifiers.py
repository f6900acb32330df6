"""Grid connection identifiers: normalisation, generic rules and each country's scheme.

Valid examples are published ones where one exists (MPAN cores from public D0010 sample
flows, the MaLo-IDs of the BDEW guide, the CUPS of the Spanish Wikipedia article);
otherwise the check digits were computed here and cross-checked with python-stdnum.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import service.identifiers as identifiers_pkg
from service.identifiers import (
    MAX_GRID_IDENTIFIER_LENGTH,
    InvalidGridIdentifier,
    normalize_grid_identifier,
    parse_grid_identifier,
    scheme_for_country,
    validate_grid_identifier,
)

# EAN-18 (GSRN), GS1 mod-10 check digit computed (and checked against stdnum.ean).
VALID_EAN_BE = "541448820000000008"
VALID_EAN_NL = "871234567890123451"
VALID_PRM = "30001610071843"
VALID_MPAN_CORES = ("1200023305967", "1013004420117", "2200031930792")
VALID_MPRN = "10012345678"
VALID_PODS = ("IT001E12345678", "IT001E123456789")
# ES1234123456789012JY is the worked example of the Spanish Wikipedia article / stdnum.
VALID_CUPS = ("ES1234123456789012JY", "ES1234123456789012JY1F", "ES0021000000000000RC")
# 51238696781 and 41373559241 are the examples of the BDEW MaLo-ID guide.
VALID_MALO_IDS = ("51238696781", "41373559241")


def rule_of(raw: str, country: str | None) -> str:
    with pytest.raises(InvalidGridIdentifier) as excinfo:
        parse_grid_identifier(raw, country)
    return excinfo.value.rule


def replace_char(value: str, index: int, char: str) -> str:
    return value[:index] + char + value[index + 1 :]


def single_digit_substitutions(value: str, positions: range) -> list[str]:
    """Every variant of ``value`` with exactly one digit at ``positions`` changed."""
    return [replace_char(value, i, d) for i in positions for d in "0123456789" if d != value[i]]


# --- public surface -------------------------------------------------------------------


def test_package_reexports_public_api() -> None:
    for name in (
        "InvalidGridIdentifier",
        "normalize_grid_identifier",
        "validate_grid_identifier",
        "parse_grid_identifier",
        "scheme_for_country",
    ):
        assert name in identifiers_pkg.__all__
        assert hasattr(identifiers_pkg, name)


def test_error_is_value_error_carrying_rule() -> None:
    error = InvalidGridIdentifier("must not be empty")
    assert isinstance(error, ValueError)
    assert error.rule == "must not be empty"
    assert str(error) == "must not be empty"


# --- scheme_for_country -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("country", "scheme"),
    [
        ("BE", "EAN"),
        ("NL", "EAN"),
        ("LU", "EAN"),
        ("FR", "PRM"),
        ("GB", "MPAN"),
        ("IE", "MPRN"),
        ("IT", "POD"),
        ("ES", "CUPS"),
        ("DE", "MALO_ID"),
        ("US", None),
        ("AT", None),
        ("", None),
        (None, None),
    ],
)
def test_scheme_for_country(country: str | None, scheme: str | None) -> None:
    assert scheme_for_country(country) == scheme


def test_scheme_for_country_tolerates_lower_case() -> None:
    assert scheme_for_country("be") == "EAN"


# --- normalisation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("EAN1234567890", "1234567890"),
        ("ean1234567890", "1234567890"),
        ("Ean 5414 4882 0000 0000 08", "541448820000000008"),
        ("  541448820000000008\t", "541448820000000008"),
        ("5414\t4882 0000\u00a00000 08\n", "541448820000000008"),
        ("es1234123456789012jy", "ES1234123456789012JY"),
        ("  it001e12345678 ", "IT001E12345678"),
        ("5414-4882", "5414-4882"),
        ("a.b/c_d-e", "A.B/C_D-E"),
        # Every leading EAN, so that the result normalises to itself ("EANEAN1" was
        # "EAN1", which is "1" again).
        ("EANEAN1", "1"),
        ("ean EAN-METER-7", "-METER-7"),
        ("EAN", ""),
        ("   ", ""),
        ("", ""),
    ],
)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize_grid_identifier(raw) == expected


def test_normalize_is_idempotent_for_valid_identifiers() -> None:
    for value in (VALID_EAN_BE, VALID_CUPS[1], VALID_PODS[0], "1234567890"):
        assert normalize_grid_identifier(normalize_grid_identifier(value)) == value


@given(st.text(alphabet=st.sampled_from("EANean 0123456789-x\u0661\t"), max_size=12) | st.text())
def test_normalize_is_idempotent(raw: str) -> None:
    once = normalize_grid_identifier(raw)
    assert normalize_grid_identifier(once) == once


def test_normalize_upper_cases_ascii_only() -> None:
    # str.upper() would turn the ligature into plain "FI" and let it pass as ASCII.
    assert normalize_grid_identifier("\ufb01x") == "\ufb01X"
    assert "ASCII" in rule_of("\ufb01x", None)


# --- generic rules (any country) --------------------------------------------------------


@pytest.mark.parametrize("country", [None, "", "US", "BE", "GB", "DE"])
@pytest.mark.parametrize("raw", ["", "   ", "EAN", " ean "])
def test_empty_is_rejected_for_any_country(raw: str, country: str | None) -> None:
    assert "must not be empty" in rule_of(raw, country)


def test_seed_example_without_country() -> None:
    assert parse_grid_identifier("EAN1234567890", None) == "1234567890"
    assert parse_grid_identifier("EAN1234567890", "") == "1234567890"
    assert parse_grid_identifier("EAN1234567890", "US") == "1234567890"


def test_unknown_country_only_applies_generic_rules() -> None:
    assert parse_grid_identifier("at-0010000000000.0/x_1", "AT") == "AT-0010000000000.0/X_1"
    validate_grid_identifier("X", None)


def test_length_limit() -> None:
    at_limit = "A" * MAX_GRID_IDENTIFIER_LENGTH
    assert MAX_GRID_IDENTIFIER_LENGTH == 64
    assert parse_grid_identifier(at_limit, None) == at_limit
    assert "must be at most 64 characters" in rule_of(at_limit + "A", None)
    # The limit is checked before the scheme, whatever the country.
    assert "must be at most 64 characters" in rule_of("1" * 65, "BE")


@pytest.mark.parametrize(
    "raw", ["ABC#1", "ABC:1", "ABC+1", "Ä123", "12\u0663", "A,B", "A\x00B", "A\u200bB"]
)
@pytest.mark.parametrize("country", [None, "US"])
def test_disallowed_characters(raw: str, country: str | None) -> None:
    rule = rule_of(raw, country)
    assert "may only contain ASCII letters, digits" in rule


def test_validate_does_not_normalize() -> None:
    with pytest.raises(InvalidGridIdentifier):
        validate_grid_identifier(" 1234", None)
    with pytest.raises(InvalidGridIdentifier):
        validate_grid_identifier("es1234123456789012jy", "ES")


# --- EAN-18 (BE, NL, LU) ----------------------------------------------------------------


@pytest.mark.parametrize("country", ["BE", "NL", "LU"])
@pytest.mark.parametrize("value", [VALID_EAN_BE, VALID_EAN_NL])
def test_ean18_valid(value: str, country: str) -> None:
    # No national prefix is enforced: any 18 digits with a correct GS1 check digit.
    assert parse_grid_identifier(value, country) == value


def test_ean18_normalized_forms() -> None:
    assert parse_grid_identifier("EAN 5414 4882 0000 0000 08", "BE") == VALID_EAN_BE
    assert parse_grid_identifier(" ean871234567890123451 ", "NL") == VALID_EAN_NL


@pytest.mark.parametrize(
    "value",
    [
        VALID_EAN_BE[:-1],  # 17 digits
        VALID_EAN_BE + "0",  # 19 digits
        "54144882000000000A",
        "5414-4882-0000-0000-08",
        "BE541448820000000008",
        "1234567890",
    ],
)
def test_ean18_wrong_format(value: str) -> None:
    rule = rule_of(value, "BE")
    assert "must be 18 digits" in rule
    assert "EAN-18" in rule
    assert "BE" in rule


@pytest.mark.parametrize("country", ["BE", "NL", "LU"])
def test_ean18_wrong_check_digit(country: str) -> None:
    rule = rule_of(replace_char(VALID_EAN_BE, 17, "9"), country)
    assert "check digit does not match (GS1 mod-10)" in rule
    assert "EAN-18" in rule
    assert country in rule


def test_ean18_every_single_digit_error_is_caught() -> None:
    for value in single_digit_substitutions(VALID_EAN_BE, range(18)):
        with pytest.raises(InvalidGridIdentifier, match="GS1 mod-10"):
            validate_grid_identifier(value, "BE")


# --- PRM (FR) ---------------------------------------------------------------------------


def test_prm_valid() -> None:
    assert parse_grid_identifier(VALID_PRM, "FR") == VALID_PRM
    assert parse_grid_identifier("300 016 100 718 43", "FR") == VALID_PRM


@pytest.mark.parametrize(
    "value", [VALID_PRM[:-1], VALID_PRM + "1", "3000161007184A", "30001-61007184", "FR30001610071"]
)
def test_prm_wrong_format(value: str) -> None:
    rule = rule_of(value, "FR")
    assert "must be 14 digits" in rule
    assert "PRM" in rule
    assert "FR" in rule


# --- MPAN core (GB) ---------------------------------------------------------------------


@pytest.mark.parametrize("value", VALID_MPAN_CORES)
def test_mpan_valid(value: str) -> None:
    assert parse_grid_identifier(value, "GB") == value


def test_mpan_normalized_form() -> None:
    assert parse_grid_identifier(" 12 0002 3305 967 ", "GB") == "1200023305967"


@pytest.mark.parametrize(
    "value",
    [
        "120002330596",  # 12 digits
        "12000233059671",  # 14 digits
        "S1200023305967",
        "12000233O5967",  # letter O for zero
        "12-0002-3305-967",
        "001112221200023305967",  # full 21-digit MPAN: only the core is accepted
    ],
)
def test_mpan_wrong_format(value: str) -> None:
    rule = rule_of(value, "GB")
    assert "must be the 13-digit MPAN core" in rule
    assert "GB" in rule


@pytest.mark.parametrize(
    "value",
    [
        "1200023305966",  # last digit changed
        "1200023305968",
        "2100023305967",  # distributor digits swapped
        "1300023305967",
    ],
)
def test_mpan_wrong_check_digit(value: str) -> None:
    rule = rule_of(value, "GB")
    assert "MPAN core check digit does not match" in rule
    assert "GB" in rule


# --- MPRN (IE) --------------------------------------------------------------------------


def test_mprn_valid() -> None:
    assert parse_grid_identifier(VALID_MPRN, "IE") == VALID_MPRN
    assert parse_grid_identifier("100 1234 5678", "IE") == VALID_MPRN


@pytest.mark.parametrize(
    "value", ["1001234567", "100123456789", "1001234567A", "10-01234567", "IE10012345678"]
)
def test_mprn_wrong_format(value: str) -> None:
    rule = rule_of(value, "IE")
    assert "must be 11 digits" in rule
    assert "MPRN" in rule
    assert "IE" in rule


@pytest.mark.parametrize("value", ["20012345678", "01012345678", "11012345678"])
def test_mprn_must_start_with_10(value: str) -> None:
    rule = rule_of(value, "IE")
    assert "must start with 10" in rule
    assert "MPRN" in rule
    assert "IE" in rule


# --- POD (IT) ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", VALID_PODS)
def test_pod_valid(value: str) -> None:
    assert parse_grid_identifier(value, "IT") == value


def test_pod_normalized_form() -> None:
    assert parse_grid_identifier("it 001 e 1234 5678", "IT") == "IT001E12345678"


@pytest.mark.parametrize(
    "value",
    [
        "IT001E1234567",  # 7 digits after E
        "IT001E1234567890",  # 10 digits after E
        "IT01E12345678",  # 2-digit distributor
        "IT001G12345678",  # G (gas) instead of E
        "FR001E12345678",
        "001E12345678",
        "IT001E1234567X",
        "IT-001-E-12345678",
    ],
)
def test_pod_wrong_format(value: str) -> None:
    rule = rule_of(value, "IT")
    assert "POD" in rule
    assert "IT" in rule
    assert "'E'" in rule


# --- CUPS (ES) --------------------------------------------------------------------------


@pytest.mark.parametrize("value", VALID_CUPS)
def test_cups_valid(value: str) -> None:
    assert parse_grid_identifier(value, "ES") == value


def test_cups_normalized_form() -> None:
    assert parse_grid_identifier("es 1234 1234 5678 9012 jy 1f", "ES") == VALID_CUPS[1]


@pytest.mark.parametrize(
    "value",
    [
        "ES1234123456789012J",  # 19 characters
        "ES1234123456789012JY1",  # 21 characters: half a border point suffix
        "ES1234123456789012JY1F2",
        "ES123412345678901JY",  # 15 digits
        "FR1234123456789012JY",
        "1234123456789012JY",
        "ES12341234567890A2JY",  # letter among the digits
        "ES123412345678901212",  # digits where the control letters go
        "ES1234123456789012JYF1",  # suffix letter then digit
        "ES1234-123456789012-JY",
    ],
)
def test_cups_wrong_format(value: str) -> None:
    rule = rule_of(value, "ES")
    assert "CUPS" in rule
    assert "20 or 22 characters" in rule
    assert "ES" in rule


@pytest.mark.parametrize(
    "value",
    [
        "ES1234123456789012YJ",  # control letters swapped
        "ES1234123456789012XY1F",
        "ES0021000000000000AA",  # looks plausible, but the letters are RC
        "ES1234123456789013JY",
    ],
)
def test_cups_wrong_control_letters(value: str) -> None:
    rule = rule_of(value, "ES")
    assert "CUPS control letters do not match" in rule
    assert "ES" in rule


def test_cups_every_single_digit_error_is_caught() -> None:
    for value in single_digit_substitutions(VALID_CUPS[0], range(2, 18)):
        with pytest.raises(InvalidGridIdentifier, match="control letters"):
            validate_grid_identifier(value, "ES")


# --- MaLo-ID (DE) -----------------------------------------------------------------------


@pytest.mark.parametrize("value", VALID_MALO_IDS)
def test_malo_valid(value: str) -> None:
    assert parse_grid_identifier(value, "DE") == value


def test_malo_normalized_form() -> None:
    assert parse_grid_identifier(" 5123 8696 781 ", "DE") == "51238696781"


@pytest.mark.parametrize(
    "value",
    [
        "5123869678",  # 10 digits
        "512386967811",  # 12 digits
        "01238696781",  # leading zero
        "5123869678A",
        "DE51238696781",
        "512-386-967-81",
    ],
)
def test_malo_wrong_format(value: str) -> None:
    rule = rule_of(value, "DE")
    assert "must be 11 digits" in rule
    assert "MaLo-ID" in rule
    assert "DE" in rule


@pytest.mark.parametrize(
    "value",
    [
        "51238696780",  # last digit changed
        "51238696782",
        "15238696781",  # first two digits swapped
        "41373559242",
    ],
)
def test_malo_wrong_check_digit(value: str) -> None:
    rule = rule_of(value, "DE")
    assert "MaLo-ID check digit does not match" in rule
    assert "DE" in rule


# --- the scheme follows the country -----------------------------------------------------


def test_same_identifier_judged_by_country() -> None:
    # A valid MaLo-ID is a fine free-form id elsewhere, but no Belgian EAN.
    assert parse_grid_identifier("51238696781", None) == "51238696781"
    assert parse_grid_identifier("51238696781", "US") == "51238696781"
    assert "EAN-18" in rule_of("51238696781", "BE")
    assert "MPRN" in rule_of("51238696781", "IE")
