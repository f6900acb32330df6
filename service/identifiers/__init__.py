"""Identifier schemes the service validates (grid connection ids, ...), as plain functions."""

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
    "normalize_grid_identifier",
    "parse_grid_identifier",
    "scheme_for_country",
    "validate_grid_identifier",
]
