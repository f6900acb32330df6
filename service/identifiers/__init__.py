"""Countries and the identifier schemes the service validates (grid connection ids, ...).

Plain functions, shared by both registries.
"""

from service.identifiers.countries import default_timezone, is_country_code, normalize_country
from service.identifiers.grid import (
    MAX_GRID_IDENTIFIER_LENGTH,
    InvalidGridIdentifier,
    normalize_grid_identifier,
    parse_grid_identifier,
    scheme_for_country,
    validate_grid_identifier,
)

__all__ = [
    "MAX_GRID_IDENTIFIER_LENGTH",
    "InvalidGridIdentifier",
    "default_timezone",
    "is_country_code",
    "normalize_country",
    "normalize_grid_identifier",
    "parse_grid_identifier",
    "scheme_for_country",
    "validate_grid_identifier",
]
