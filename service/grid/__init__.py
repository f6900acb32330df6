"""The balance grid every capability shares: site types and balance resolutions.

A site's ``balance_resolution`` (``PT15M``, ``PT1H`` or ``P1M``) defines grid points in the
site's *local* wall time: quarter-hours, full hours, or local midnight of the 1st. Fixed-length
steps are computed in UTC and checked against the local offset of each instant, so both
occurrences of the repeated hour on the fall-back day are distinct grid points (a
Europe/Berlin day has 92, 96 or 100 quarter-hours). Months are computed in local wall time.
Nothing here does I/O.
"""

from service.grid.ranges import TimeRange, merge_ranges
from service.grid.resolution import (
    P1M,
    PT1H,
    PT15M,
    SUPPORTED_RESOLUTIONS,
    Resolution,
    local_midnight,
    parse_resolution,
)
from service.grid.site_type import SiteType, site_type_is_accurate, site_type_is_balanced

__all__ = [
    "P1M",
    "PT1H",
    "PT15M",
    "SUPPORTED_RESOLUTIONS",
    "Resolution",
    "SiteType",
    "TimeRange",
    "local_midnight",
    "merge_ranges",
    "parse_resolution",
    "site_type_is_accurate",
    "site_type_is_balanced",
]
