"""Balancing rules without I/O: settings and policies as histories by date, who takes part
on a day, and the checks a write must pass.

Periods are half-open calendar days in the site's time zone: a setting or policy applies
on ``start_date <= day < end_date``; no ``end_date`` means open-ended.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from uuid import UUID

from service.balancing.engine import SHARE_SUM_SLACK, AllocationMethod, static_keys_total
from service.common.errors import ViolationCollector

# Stands for "no end" in comparisons; never stored.
OPEN_END = date.max
DEFAULT_METHOD = AllocationMethod.EQUAL
STATIC_METHODS = frozenset({AllocationMethod.STATIC, AllocationMethod.STATIC_REDISTRIBUTED})
# Tier number of meters without a priority: served after every numbered tier.
UNPRIORITISED = 0


class BalancingRole(StrEnum):
    PARTICIPANT = "participant"
    EXCLUDED = "excluded"


@dataclass(frozen=True)
class Period:
    start: date
    end: date | None

    @property
    def end_or_open(self) -> date:
        return self.end if self.end is not None else OPEN_END

    def overlaps(self, other: Period) -> bool:
        return self.start < other.end_or_open and other.start < self.end_or_open

    def contains(self, day: date) -> bool:
        return self.start <= day < self.end_or_open


@dataclass(frozen=True)
class SettingFields:
    """A meter balancing setting's writable fields (as given; ``validate_setting`` checks)."""

    balancing: BalancingRole | None
    start_date: date | None
    end_date: date | None
    priority: int | None
    share: float | None


@dataclass(frozen=True)
class Setting:
    id: UUID
    site_id: UUID
    meter_id: UUID
    balancing: BalancingRole
    period: Period
    priority: int | None
    share: float | None
    created_at: datetime

    @property
    def tier(self) -> int:
        return self.priority if self.priority is not None else UNPRIORITISED


@dataclass(frozen=True)
class Policy:
    id: UUID
    site_id: UUID
    method: AllocationMethod
    period: Period
    created_at: datetime


def validate_setting(fields: SettingFields, prefix: str = "") -> Period:
    """Field rules of one setting; its period."""
    errors = ViolationCollector()
    if fields.balancing is None:
        errors.add(prefix + "balancing", "is required: BALANCING_ROLE_PARTICIPANT or _EXCLUDED")
    if fields.start_date is None:
        errors.add(prefix + "start_date", "is required (a day in the site's time zone)")
    elif fields.end_date is not None and fields.end_date <= fields.start_date:
        errors.add(prefix + "end_date", "must be after start_date (it is exclusive)")
    if fields.priority is not None and fields.priority < 1:
        errors.add(prefix + "priority", "must be >= 1 (1 is served first), or unset")
    if fields.share is not None and not (math.isfinite(fields.share) and 0 <= fields.share <= 1):
        errors.add(prefix + "share", "must be between 0 and 1, or unset")
    errors.raise_if_any()
    assert fields.start_date is not None
    return Period(fields.start_date, fields.end_date)


def validate_policy_period(start: date | None, end: date | None, prefix: str = "") -> Period:
    errors = ViolationCollector()
    if start is None:
        errors.add(prefix + "start_date", "is required (a day in the site's time zone)")
    elif end is not None and end <= start:
        errors.add(prefix + "end_date", "must be after start_date (it is exclusive)")
    errors.raise_if_any()
    assert start is not None
    return Period(start, end)


def overlap_violation(
    errors: ViolationCollector,
    period: Period,
    others: Iterable[Period],
    what: str,
    prefix: str = "",
) -> None:
    """A history by date: ``period`` must not overlap any of ``others``. The field named is
    ``start_date`` when an earlier entry still runs on it, else ``end_date`` (it runs into a
    later one)."""
    for other in sorted(others, key=lambda p: p.start):
        if not period.overlaps(other):
            continue
        end_text = other.end.isoformat() if other.end else "open-ended"
        if other.contains(period.start):
            errors.add(
                prefix + "start_date",
                f"overlaps another {what} valid from {other.start.isoformat()} to {end_text}; "
                f"start on or after its end, or end it first",
            )
        else:
            errors.add(
                prefix + "end_date",
                f"overlaps another {what} starting {other.start.isoformat()}; "
                f"end on or before {other.start.isoformat()}",
            )
        return


def method_on(policies: Sequence[Policy], day: date) -> AllocationMethod:
    """The site's method on ``day``: its policy then, else EQUAL."""
    for policy in policies:
        if policy.period.contains(day):
            return policy.method
    return DEFAULT_METHOD


def participants_on(settings: Iterable[Setting], day: date) -> list[Setting]:
    """The PARTICIPANT settings valid on ``day``, at most one per meter (histories do not
    overlap), in meter-id order."""
    chosen = {
        s.meter_id: s
        for s in settings
        if s.balancing is BalancingRole.PARTICIPANT and s.period.contains(day)
    }
    return [chosen[meter_id] for meter_id in sorted(chosen)]


def _breakpoints(periods: Iterable[Period]) -> list[date]:
    points = set()
    for period in periods:
        points.add(period.start)
        if period.end is not None:
            points.add(period.end)
    return sorted(points)


@dataclass(frozen=True)
class ShareExcess:
    day: date
    tier: int
    total: float


def static_share_excess(
    settings: Sequence[Setting], policies: Sequence[Policy]
) -> ShareExcess | None:
    """The first day on which the site uses a STATIC method and the shares of one tier's
    participants add up to more than 1 (unset shares count 0), or None.

    Settings and policies only change at their start and end dates, so checking the first
    day of each segment between those dates checks every day.
    """
    for day in _breakpoints([*(s.period for s in settings), *(p.period for p in policies)]):
        if method_on(policies, day) not in STATIC_METHODS:
            continue
        keys: dict[int, list[float]] = defaultdict(list)
        for setting in participants_on(settings, day):
            keys[setting.tier].append(setting.share or 0.0)
        for tier, tier_keys in sorted(keys.items()):
            # Added up as the engine adds a block's keys: what is accepted here, it takes.
            total = static_keys_total(tier_keys)
            if total > 1 + SHARE_SUM_SLACK:
                return ShareExcess(day, tier, total)
    return None


def share_excess_rule(excess: ShareExcess) -> str:
    tier = (
        "unprioritised participants" if excess.tier == UNPRIORITISED else f"priority {excess.tier}"
    )
    return (
        f"the shares of {tier} add up to {excess.total:.6g} on {excess.day.isoformat()}, "
        "where the site uses a STATIC method; they must not exceed 1"
    )
