"""Balance resolutions and their grid arithmetic in a site's timezone (see :mod:`service.grid`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

SUPPORTED_RESOLUTIONS: tuple[str, ...] = ("PT15M", "PT1H", "P1M")

_ONE_MICROSECOND = timedelta(microseconds=1)
# Real zones change offset at most once within a day; this bounds the grid search loops.
_MAX_SEARCH_STEPS = 8


def _require_aware(ts: datetime) -> None:
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError(f"timezone-aware datetime required, got naive {ts.isoformat()}")


def _offset(ts_utc: datetime, tz: ZoneInfo) -> timedelta:
    offset = ts_utc.astimezone(tz).utcoffset()
    assert offset is not None  # a ZoneInfo always yields an offset for an aware datetime
    return offset


def _month_start(year: int, month: int, tz: ZoneInfo) -> datetime:
    """First instant (UTC) of local day 1 of ``year``/``month``.

    ``fold=0`` picks the first occurrence if local midnight repeats, and for zones that
    skip midnight (a spring-forward gap at 00:00) it yields the transition instant.
    """
    while month > 12:
        year, month = year + 1, month - 12
    while month < 1:
        year, month = year - 1, month + 12
    return datetime(year, month, 1, tzinfo=tz).astimezone(UTC)


def local_midnight(day: date, tz: ZoneInfo) -> datetime:
    """First instant (UTC) of ``day`` in ``tz``: where a balance block of that day starts."""
    return datetime.combine(day, time(0), tzinfo=tz).astimezone(UTC)


@dataclass(frozen=True)
class Resolution:
    """A supported balance resolution; build it with :func:`parse_resolution`.

    ``step`` is the fixed length of PT15M/PT1H, ``months`` the calendar length of P1M
    (exactly one of them is set).
    """

    iso: str
    step: timedelta | None
    months: int = 0

    def __str__(self) -> str:
        return self.iso

    @property
    def is_calendar(self) -> bool:
        """True for month-based resolutions (length varies with the calendar)."""
        return self.step is None

    # -- alignment --------------------------------------------------------------------------

    def _step_minutes(self) -> int:
        assert self.step is not None
        return int(self.step.total_seconds()) // 60

    def _wall_aligned(self, local: datetime) -> bool:
        """Fixed steps only: the local wall time sits on a quarter-hour / full hour."""
        if local.second or local.microsecond:
            return False
        return local.minute % self._step_minutes() == 0

    def is_on_grid(self, ts: datetime, tz: ZoneInfo) -> bool:
        """True when ``ts`` is a grid point in the local time of ``tz``."""
        _require_aware(ts)
        if self.step is None:
            # The first instant of local day 1 (normally local midnight of the 1st).
            local = ts.astimezone(tz)
            return ts == _month_start(local.year, local.month, tz)
        return self._wall_aligned(ts.astimezone(tz))

    # -- fixed-step helpers (offset-aware, UTC arithmetic) ------------------------------------

    def _floor_under(self, t_utc: datetime, offset: timedelta) -> datetime:
        """Latest instant <= t whose wall time under ``offset`` is aligned (unchecked)."""
        wall = (t_utc + offset).replace(tzinfo=None)
        minutes = self._step_minutes()
        floored = wall.replace(minute=wall.minute - wall.minute % minutes, second=0, microsecond=0)
        return (floored - offset).replace(tzinfo=UTC)

    def _ceil_under(self, t_utc: datetime, offset: timedelta) -> datetime:
        """Earliest instant >= t whose wall time under ``offset`` is aligned (unchecked)."""
        floored = self._floor_under(t_utc, offset)
        if floored == t_utc:
            return floored
        assert self.step is not None
        return floored + self.step

    def _floor_fixed(self, ts_utc: datetime, tz: ZoneInfo) -> datetime:
        assert self.step is not None
        t = ts_utc
        for _ in range(_MAX_SEARCH_STEPS):
            # Any grid point in (t - step, t] carries one of these two offsets.
            best: datetime | None = None
            for offset in {_offset(t, tz), _offset(t - self.step, tz)}:
                candidate = self._floor_under(t, offset)
                if _offset(candidate, tz) == offset and (best is None or candidate > best):
                    best = candidate
            if best is not None:
                return best
            t -= self.step
        raise ValueError(f"no {self.iso} grid point found at or before {ts_utc.isoformat()}")

    def _ceil_fixed(self, ts_utc: datetime, tz: ZoneInfo) -> datetime:
        assert self.step is not None
        t = ts_utc
        for _ in range(_MAX_SEARCH_STEPS):
            # Any grid point in [t, t + step) carries one of these two offsets.
            best: datetime | None = None
            for offset in {_offset(t, tz), _offset(t + self.step, tz)}:
                candidate = self._ceil_under(t, offset)
                if _offset(candidate, tz) == offset and (best is None or candidate < best):
                    best = candidate
            if best is not None:
                return best
            t += self.step
        raise ValueError(f"no {self.iso} grid point found at or after {ts_utc.isoformat()}")

    # -- public grid arithmetic ---------------------------------------------------------------

    def floor(self, ts: datetime, tz: ZoneInfo) -> datetime:
        """The grid point at or before ``ts``, in UTC."""
        _require_aware(ts)
        ts_utc = ts.astimezone(UTC)
        if self.step is not None:
            return self._floor_fixed(ts_utc, tz)
        local = ts_utc.astimezone(tz)
        start = _month_start(local.year, local.month, tz)
        if start > ts_utc:  # only possible inside an odd gap on the 1st
            start = _month_start(local.year, local.month - self.months, tz)
        return start

    def ceil(self, ts: datetime, tz: ZoneInfo) -> datetime:
        """The grid point at or after ``ts``, in UTC."""
        _require_aware(ts)
        ts_utc = ts.astimezone(UTC)
        if self.step is not None:
            return self._ceil_fixed(ts_utc, tz)
        floored = self.floor(ts_utc, tz)
        return floored if floored == ts_utc else self.next_start(floored, tz)

    def next_start(self, ts: datetime, tz: ZoneInfo) -> datetime:
        """The first grid point strictly after ``ts``, in UTC.

        For an on-grid ``ts`` this is the end of the interval starting at ``ts``: 15 minutes
        or one hour later in UTC, or local midnight of the next month's 1st.
        """
        _require_aware(ts)
        ts_utc = ts.astimezone(UTC)
        if self.step is not None:
            return self._ceil_fixed(ts_utc + _ONE_MICROSECOND, tz)
        floored = self.floor(ts_utc, tz)
        local = floored.astimezone(tz)
        return _month_start(local.year, local.month + self.months, tz)

    def iter_starts(self, start: datetime, end: datetime, tz: ZoneInfo) -> Iterator[datetime]:
        """Grid points in ``[start, end)``, in UTC, ascending."""
        _require_aware(end)
        end_utc = end.astimezone(UTC)
        current = self.ceil(start, tz)
        while current < end_utc:
            yield current
            current = self.next_start(current, tz)


PT15M = Resolution("PT15M", timedelta(minutes=15))
PT1H = Resolution("PT1H", timedelta(hours=1))
P1M = Resolution("P1M", None, months=1)

_RESOLUTIONS = {r.iso: r for r in (PT15M, PT1H, P1M)}


def parse_resolution(text: str) -> Resolution:
    """Parse an ISO 8601 balance resolution; exactly ``PT15M``, ``PT1H`` or ``P1M``."""
    resolution = _RESOLUTIONS.get(text)
    if resolution is None:
        supported = ", ".join(SUPPORTED_RESOLUTIONS)
        raise ValueError(
            f"unsupported balance resolution {text!r}: must be one of {supported} "
            "(ISO 8601 duration, upper case)"
        )
    return resolution
