"""Update masks (``google.protobuf.FieldMask``) of the Update* RPCs: checked, then merged.

Every capability's servicer uses these, so an update means the same everywhere: an empty
mask is an error (not "all fields"), an unknown path is an error naming the updatable
ones, and exactly the named fields change.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

from service.common.errors import ValidationError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Fields = TypeVar("_Fields", bound="DataclassInstance")


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


def merge_masked(
    current: _Fields,
    paths: Collection[str],
    given: Mapping[str, object],
    attributes: Mapping[str, str] | None = None,
) -> _Fields:
    """``current`` (a dataclass) with exactly the fields named by ``paths`` from ``given``.

    ``given`` maps every updatable path to its new value from the request; ``attributes``
    names the dataclass field of a path spelled differently in the API (``type`` ->
    ``site_type``). A path without a value in ``given`` is a bug in the caller (KeyError).
    """
    renamed = attributes or {}
    return replace(current, **{renamed.get(path, path): given[path] for path in paths})
