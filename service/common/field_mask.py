"""Update masks (``google.protobuf.FieldMask``) of the Update* RPCs: checked, then merged.

Every capability's servicer uses these, so an update means the same everywhere: an empty
mask is an error (not "all fields"), an unknown path is an error naming the updatable
ones, and exactly the named fields change.
"""

from __future__ import annotations

from service.common.errors import ValidationError


def require_mask(paths: list[str], allowed: frozenset[str], field: str = "update_mask") -> set[str]:
    """The mask's paths, each one an updatable field; an empty mask is an error, not 'all'."""
    if not paths:
        raise ValidationError.single(
            field, f"must name the fields to change, any of: {', '.join(sorted(allowed))}"
        )
    unknown = [path for path in paths if path not in allowed]
    if unknown:
        raise ValidationError.single(
            f"{field}.paths",
            f"cannot update {', '.join(unknown)}; updatable: {', '.join(sorted(allowed))}",
        )
    return set(paths)
