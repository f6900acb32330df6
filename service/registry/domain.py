"""Site and resource rules of the registry: validation, normalization, status. No I/O."""

from __future__ import annotations

import math
import zoneinfo
from dataclasses import dataclass
from enum import StrEnum
from functools import cache

from service.common.errors import ViolationCollector
from service.common.network_policy import webhook_url_violation
from service.common.text import ADDRESS_LENGTH, NAME_LENGTH, URL_LENGTH, check_text
from service.grid import (
    SUPPORTED_RESOLUTIONS,
    SiteType,
    parse_resolution,
    site_type_is_balanced,
)
from service.identifiers import (
    InvalidGridIdentifier,
    default_timezone,
    is_country_code,
    normalize_country,
    parse_grid_identifier,
)

MAX_NAME_LENGTH = NAME_LENGTH
MAX_ADDRESS_LENGTH = ADDRESS_LENGTH
MAX_URL_LENGTH = URL_LENGTH
DEFAULT_BALANCE_RESOLUTION = "PT15M"
# One resource's bounds: 1 GW and 10 GWh are beyond any single flexible asset. Without a
# bound, a few resources near float's limit made a dispatch's sums overflow.
MAX_POWER_KW = 1_000_000.0
MAX_CAPACITY_KWH = 10_000_000.0


class SiteStatus(StrEnum):
    NO_RESOURCES = "no_resources"
    ONBOARDED = "onboarded"
    PAUSED = "paused"
    DELETED = "deleted"


class SupplyPointDirection(StrEnum):
    BIDIRECTIONAL = "bidirectional"
    OFFTAKE = "offtake"
    INJECTION = "injection"


class ResourceType(StrEnum):
    STATIC_BATTERY = "static_battery"
    HEAT_PUMP = "heat_pump"
    ELECTRIC_VEHICLE = "electric_vehicle"
    EV_CHARGING_POINT = "ev_charging_point"
    PHOTOVOLTAIC = "photovoltaic"
    WIND = "wind"
    OTHER = "other"
    METER = "meter"


# Generation only: a positive (consuming) bound is a typo, not a device.
PRODUCTION_ONLY = frozenset({ResourceType.PHOTOVOLTAIC, ResourceType.WIND})
CONSUMPTION_ONLY = frozenset({ResourceType.HEAT_PUMP})


def is_controllable(resource_type: ResourceType) -> bool:
    """Controllable resources are what dispatch steers; a meter only measures."""
    return resource_type is not ResourceType.METER


def derive_site_status(paused: bool, controllable_resources: int) -> SiteStatus:
    if paused:
        return SiteStatus.PAUSED
    return SiteStatus.ONBOARDED if controllable_resources > 0 else SiteStatus.NO_RESOURCES


@dataclass(frozen=True)
class Location:
    address: str = ""
    latitude: float | None = None
    longitude: float | None = None
    country: str = ""


@dataclass(frozen=True)
class SupplyPoint:
    grid_identifier: str
    direction: SupplyPointDirection | None


@dataclass(frozen=True)
class SiteFields:
    """A site's writable fields; ``validate_site`` returns them normalized."""

    name: str
    external_id: str
    location: Location
    timezone: str
    supply_points: tuple[SupplyPoint, ...]
    site_type: SiteType | None
    balance_resolution: str

    @property
    def primary(self) -> SupplyPoint | None:
        """The BIDIRECTIONAL or OFFTAKE point; ``validate_site`` guarantees there is one
        unless the site is ``BALANCED_*`` without supply points (no grid identifier: it never
        matches an upstream site and is never dispatched)."""
        return next(
            (p for p in self.supply_points if p.direction is not SupplyPointDirection.INJECTION),
            None,
        )

    @property
    def grid_identifier(self) -> str | None:
        primary = self.primary
        return primary.grid_identifier if primary is not None else None

    @property
    def injection(self) -> SupplyPoint | None:
        return next(
            (p for p in self.supply_points if p.direction is SupplyPointDirection.INJECTION), None
        )


@dataclass(frozen=True)
class Bounds:
    min: float
    max: float


@dataclass(frozen=True)
class ResourceFields:
    resource_type: ResourceType | None
    name: str
    external_id: str
    power_kw: Bounds | None
    capacity_kwh: Bounds | None
    webhook_url: str


# Names zoneinfo can find in the host's zone directory that are no place's IANA zone.
# ``localtime`` is Debian's link to the host's /etc/localtime: a different zone on each
# replica, and unknown to PostgreSQL, so SQL converting with AT TIME ZONE fails on it.
# ``posixrules`` is zic's template for POSIX TZ strings, also unknown to PostgreSQL
# (available_timezones() drops it itself; named here so the rule does not rest on that).
# ``Factory`` is tzdata's placeholder for "no zone configured": its time is no one's.
_NOT_SITE_TIMEZONES = frozenset({"localtime", "posixrules", "Factory"})


@cache
def _known_timezones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) - _NOT_SITE_TIMEZONES


def validate_site(site: SiteFields, prefix: str = "") -> SiteFields:
    """Checks every rule, reports all violations at once, returns the normalized fields."""
    errors = ViolationCollector()
    _check_length(errors, prefix + "name", site.name, MAX_NAME_LENGTH)
    _check_length(errors, prefix + "external_id", site.external_id, MAX_NAME_LENGTH)

    location = site.location
    country = normalize_country(location.country)
    loc = prefix + "location."
    _check_length(errors, loc + "address", location.address, MAX_ADDRESS_LENGTH)
    if country and not is_country_code(country):
        errors.add(loc + "country", "must be an ISO 3166-1 alpha-2 code, e.g. BE or GB")
        country = ""
    if (location.latitude is None) != (location.longitude is None):
        missing = "latitude" if location.latitude is None else "longitude"
        errors.add(loc + missing, "must be set together with the other coordinate")
    if location.latitude is not None and not (
        math.isfinite(location.latitude) and -90 <= location.latitude <= 90
    ):
        errors.add(loc + "latitude", "must be between -90 and 90")
    if location.longitude is not None and not (
        math.isfinite(location.longitude) and -180 <= location.longitude <= 180
    ):
        errors.add(loc + "longitude", "must be between -180 and 180")

    timezone = site.timezone.strip()
    if not timezone:
        timezone = default_timezone(country)
    elif timezone not in _known_timezones():
        errors.add(prefix + "timezone", "must be an IANA time zone name, e.g. Europe/Brussels")

    points = _validate_supply_points(
        errors, site.supply_points, country, prefix, site_type_is_balanced_or_none(site.site_type)
    )

    resolution = site.balance_resolution.strip() or DEFAULT_BALANCE_RESOLUTION
    try:
        parse_resolution(resolution)
    except ValueError:
        errors.add(
            prefix + "balance_resolution",
            f"must be one of {', '.join(SUPPORTED_RESOLUTIONS)} (ISO 8601 duration)",
        )

    errors.raise_if_any()
    return SiteFields(
        name=site.name.strip(),
        external_id=site.external_id.strip(),
        location=Location(location.address.strip(), location.latitude, location.longitude, country),
        timezone=timezone,
        supply_points=points,
        site_type=site.site_type,
        balance_resolution=resolution,
    )


def site_type_is_balanced_or_none(site_type: SiteType | None) -> bool:
    return site_type is not None and site_type_is_balanced(site_type)


def _validate_supply_points(
    errors: ViolationCollector,
    points: tuple[SupplyPoint, ...],
    country: str,
    prefix: str,
    may_be_empty: bool,
) -> tuple[SupplyPoint, ...]:
    field = prefix + "supply_points"
    if not points:
        # An energy-sharing community of meters needs no head meter of its own.
        if not may_be_empty:
            errors.add(
                field,
                "must contain at least one supply point (only SITE_TYPE_BALANCED_* sites "
                "may have none)",
            )
        return ()
    normalized: list[SupplyPoint] = []
    for index, point in enumerate(points):
        path = f"{field}[{index}]"
        if point.direction is None:
            errors.add(path + ".direction", "must be BIDIRECTIONAL, OFFTAKE or INJECTION")
        try:
            identifier = parse_grid_identifier(point.grid_identifier, country or None)
        except InvalidGridIdentifier as invalid:
            errors.add(path + ".grid_identifier", invalid.rule)
            identifier = point.grid_identifier
        normalized.append(SupplyPoint(identifier, point.direction))
    if errors.has(field):
        return tuple(normalized)

    directions = sorted(str(p.direction) for p in normalized)
    allowed = (["bidirectional"], ["offtake"], ["injection", "offtake"])
    if directions not in allowed:
        errors.add(
            field,
            "must be one BIDIRECTIONAL point, one OFFTAKE point, or one OFFTAKE and one INJECTION",
        )
    elif len(normalized) == 2 and normalized[0].grid_identifier == normalized[1].grid_identifier:
        errors.add(field + "[1].grid_identifier", "must differ from the offtake point's identifier")
    # Primary point first, so reads return a stable order.
    normalized.sort(key=lambda p: p.direction is SupplyPointDirection.INJECTION)
    return tuple(normalized)


def validate_resource(
    resource: ResourceFields, prefix: str = "", *, allow_private_networks: bool = False
) -> ResourceFields:
    """Checks and normalizes a resource; ``allow_private_networks`` lets ``webhook_url`` name
    a loopback, private or link-local address (see ``service/common/network_policy.py``)."""
    errors = ViolationCollector()
    kind = resource.resource_type
    if kind is None:
        errors.add(prefix + "type", "is required")
    _check_length(errors, prefix + "name", resource.name, MAX_NAME_LENGTH)
    _check_length(errors, prefix + "external_id", resource.external_id, MAX_NAME_LENGTH)

    power = resource.power_kw
    if power is None:
        if kind is not None and is_controllable(kind):
            errors.add(prefix + "power_kw", "is required for controllable resources")
    elif _check_bounds(errors, prefix + "power_kw", power, MAX_POWER_KW) and kind is not None:
        if kind in PRODUCTION_ONLY and power.max > 0:
            errors.add(
                prefix + "power_kw.max",
                f"must be <= 0 for {kind.name}: it only produces (negative is production)",
            )
        if kind in CONSUMPTION_ONLY and power.min < 0:
            errors.add(
                prefix + "power_kw.min",
                f"must be >= 0 for {kind.name}: it only consumes (positive is consumption)",
            )

    capacity = resource.capacity_kwh
    if capacity is None:
        if kind is ResourceType.STATIC_BATTERY:
            errors.add(prefix + "capacity_kwh", "is required for STATIC_BATTERY")
    elif _check_bounds(errors, prefix + "capacity_kwh", capacity, MAX_CAPACITY_KWH):
        if capacity.min < 0:
            errors.add(prefix + "capacity_kwh.min", "must be >= 0")
        if capacity.max <= 0:
            errors.add(prefix + "capacity_kwh.max", "must be > 0")

    url = resource.webhook_url.strip()
    if url:
        _check_url(errors, prefix + "webhook_url", url, allow_private_networks)

    errors.raise_if_any()
    return ResourceFields(
        resource_type=kind,
        name=resource.name.strip(),
        external_id=resource.external_id.strip(),
        power_kw=power,
        capacity_kwh=capacity,
        webhook_url=url,
    )


def _check_length(errors: ViolationCollector, field: str, value: str, limit: int) -> None:
    check_text(errors, field, value, limit)


def _check_bounds(errors: ViolationCollector, field: str, bounds: Bounds, limit: float) -> bool:
    finite = True
    for name, value in (("min", bounds.min), ("max", bounds.max)):
        if not math.isfinite(value):
            errors.add(f"{field}.{name}", "must be a finite number")
            finite = False
        elif abs(value) > limit:
            errors.add(f"{field}.{name}", f"must be between {-limit:.0f} and {limit:.0f}")
            finite = False
    if finite and bounds.min > bounds.max:
        errors.add(field, "min must be <= max")
        return False
    return finite


def _check_url(
    errors: ViolationCollector, field: str, url: str, allow_private_networks: bool
) -> None:
    if not check_text(errors, field, url, MAX_URL_LENGTH):
        return
    violation = webhook_url_violation(url, allow_private_networks=allow_private_networks)
    if violation is not None:
        errors.add(field, violation)
