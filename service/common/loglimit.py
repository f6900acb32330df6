"""Log lines that stay bounded whatever clients (or a failing database) do.

Anyone who can reach the port can send bad requests as fast as the network allows, and a
database outage fails every call at once: a line (let alone a stack trace) per event would
let either fill the disk. :class:`LogLimiter` lets one line per key through per period and
counts the rest; :class:`OutageLog` turns a stream of failures of one dependency into a
start line, a periodic summary and an end line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable

# Distinct keys remembered; beyond that the oldest period's keys are dropped at once, so a
# client varying its requests cannot grow this without bound.
MAX_KEYS = 10_000


class LogLimiter:
    """At most one line per key per ``period_seconds``; the lines held back are counted and
    reported by the next line of that key that gets through."""

    def __init__(
        self, period_seconds: float, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._period = period_seconds
        self._monotonic = monotonic
        # key -> (time the last line of it was let through, lines held back since)
        self._seen: dict[Hashable, tuple[float, int]] = {}

    def admit(self, key: Hashable) -> int | None:
        """None when the line for ``key`` is to be dropped, else how many lines of that key
        were dropped since the last one let through."""
        now = self._monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self._period:
            self._seen[key] = (seen[0], seen[1] + 1)
            return None
        if seen is None and len(self._seen) >= MAX_KEYS:
            self._seen.clear()
        self._seen[key] = (now, 0)
        return 0 if seen is None else seen[1]


def error_key(error: BaseException) -> tuple[str, str, int]:
    """A LogLimiter key that tells one bug from another: its type and where it was raised."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is None:
        return (type(error).__qualname__, "", 0)
    return (type(error).__qualname__, frame.tb_frame.f_code.co_filename, frame.tb_lineno)


def held_back(count: int) -> str:
    """The suffix telling how many like lines were not written."""
    return f" ({count} more like it not logged)" if count else ""


class OutageLog:
    """The log of one dependency's outage: its start, every ``summary_seconds`` a summary of
    the calls refused so far, and its end with the total.

    ``refused`` is called for every call that failed because of the outage (it starts one if
    none is under way); ``down`` when a probe finds the dependency gone; ``up`` when it is
    back. Summaries are written by ``refused`` and ``tick`` (a prober calls that on every
    round), so a quiet outage still reports that it lasts.
    """

    def __init__(
        self,
        what: str,
        logger: logging.Logger,
        summary_seconds: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._what = what
        self._log = logger
        self._summary_seconds = summary_seconds
        self._monotonic = monotonic
        self._since: float | None = None
        self._last_line = 0.0
        self._refused = 0

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    @property
    def refused_count(self) -> int:
        return self._refused

    def down(self, cause: str) -> None:
        if self._since is None:
            self._since = self._last_line = self._monotonic()
            self._refused = 0
            self._log.warning("%s unavailable (%s)", self._what, cause)
        else:
            self.tick()

    def refused(self, error: BaseException) -> None:
        self.down(_describe(error))
        self._refused += 1

    def tick(self) -> None:
        if self._since is None:
            return
        now = self._monotonic()
        if now - self._last_line >= self._summary_seconds:
            self._last_line = now
            self._log.warning(
                "%s still unavailable after %.0f s; %d call(s) refused so far",
                self._what,
                now - self._since,
                self._refused,
            )

    def up(self) -> None:
        if self._since is None:
            return
        lasted = self._monotonic() - self._since
        self._log.warning(
            "%s available again after %.1f s; %d call(s) were refused",
            self._what,
            lasted,
            self._refused,
        )
        self._since = None
        self._refused = 0


def _describe(error: BaseException) -> str:
    text = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class OneLinePerPeriod(logging.Filter):
    """For a library logger that logs each retry with a stack trace (asyncpg's pool while
    the database is down): one line per message and period, the exception reduced to its
    type and text."""

    def __init__(self, period_seconds: float = 60.0) -> None:
        super().__init__()
        self._limiter = LogLimiter(period_seconds)

    def filter(self, record: logging.LogRecord) -> bool:
        dropped = self._limiter.admit((record.name, record.msg))
        if dropped is None:
            return False
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()} ({_describe(record.exc_info[1])})"
            record.args = None
        record.exc_info = None
        record.exc_text = None
        if dropped:
            record.msg = f"{record.getMessage()}{held_back(dropped)}"
            record.args = None
        return True


def quiet_library_retries(*logger_names: str) -> None:
    """Installs :class:`OneLinePerPeriod` on each named logger, once."""
    for name in logger_names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLinePerPeriod) for f in logger.filters):
            logger.addFilter(OneLinePerPeriod())
