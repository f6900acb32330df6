"""Site types: whether a site's meters are accurate, and whether the site is balanced."""

from __future__ import annotations

from enum import StrEnum


class SiteType(StrEnum):
    BALANCED_ACCURATE = "balanced_accurate"
    BALANCED_INACCURATE = "balanced_inaccurate"
    UNBALANCED_ACCURATE = "unbalanced_accurate"
    UNBALANCED_INACCURATE = "unbalanced_inaccurate"


_ACCURATE_SITE_TYPES = frozenset({SiteType.BALANCED_ACCURATE, SiteType.UNBALANCED_ACCURATE})
_BALANCED_SITE_TYPES = frozenset({SiteType.BALANCED_ACCURATE, SiteType.BALANCED_INACCURATE})


def site_type_is_accurate(site_type: SiteType) -> bool:
    """True for the ``*_ACCURATE`` site types."""
    return site_type in _ACCURATE_SITE_TYPES


def site_type_is_balanced(site_type: SiteType) -> bool:
    """True for the ``BALANCED_*`` site types: only these take part in energy sharing."""
    return site_type in _BALANCED_SITE_TYPES
