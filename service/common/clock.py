"""The current time, injectable: date-driven behaviour is tested by moving a clock, not sleeping."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current instant, timezone-aware."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Returns once ``seconds`` have passed on this clock."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()


class ManualClock:
    """A clock that only moves when told to; sleepers wake when it passes their deadline.

    Tests drive timers (workers, schedulers, retry back-off) with it instead of waiting.
    """

    def __init__(self, at: datetime) -> None:
        self.at = at
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> datetime:
        return self.at

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(
            self._sleepers, (self.at + timedelta(seconds=seconds), next(self._order), woken)
        )
        await woken

    def set(self, at: datetime) -> None:
        self.at = at
        while self._sleepers and self._sleepers[0][0] <= at:
            _, _, woken = heapq.heappop(self._sleepers)
            if not woken.done():
                woken.set_result(None)

    def advance(self, delta: timedelta) -> None:
        self.set(self.at + delta)

    @property
    def sleeping(self) -> int:
        """How many sleepers wait for this clock (tests wait for a worker to be idle)."""
        return sum(1 for _, _, woken in self._sleepers if not woken.done())
