"""One way to run background work: a loop of ``step()`` passes, woken by a timer or a NOTIFY.

Every background loop of the service (health probe, readings partitions, upstream scheduler,
balancing, dispatch delivery) is a :class:`Worker` that the :class:`service.app.Service`
lifecycle starts after migrations and stops on shutdown, so none of them hand-writes its
own ``while True: sleep`` with its own error handling.

A pass returns True when more work is likely waiting (the worker runs the next pass at once,
as a queue consumer draining a backlog does) and False when it is idle; an idle worker waits
for the next timer tick or a wake-up, whichever comes first. A wake-up that arrives while a
pass runs is kept, so a notification committed during a pass is never slept through.

A failing pass (the database briefly away, a bug) is logged as one line, at most once per
``retry_seconds`` window with a count of the failures folded into it, and retried: background
work must outlive an outage without filling the log. Time is read from the injected
:class:`~service.common.clock.Clock`, so tests drive the timer with a ``ManualClock``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from service.common.clock import Clock
from service.common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# While a worker keeps failing, one summary line per this many seconds.
FAILURE_REPORT_SECONDS = 60.0


class NotificationSource(Protocol):
    """What a worker needs of the event hub: a callback per notification on a channel."""

    async def listen(self, channel: str, callback: Callable[[str], None]) -> None: ...


class Worker:
    def __init__(
        self,
        name: str,
        step: Callable[[], Awaitable[bool]],
        *,
        interval_seconds: float,
        clock: Clock,
        wake_channels: Sequence[str] = (),
        retry_seconds: float = 1.0,
    ) -> None:
        """``interval_seconds`` <= 0 runs passes only when woken (tests call ``step`` or
        ``wake`` themselves); a worker without a timer and without wake channels never runs."""
        self.name = name
        self._step = step
        self._interval = interval_seconds
        self._clock = clock
        self._wake_channels = tuple(wake_channels)
        self._retry_seconds = retry_seconds
        self._woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures_unreported = 0
        self._failing_since: float | None = None
        self._last_report = 0.0
        self.passes = 0
        self.failures = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        """Runs the next pass now (or right after the one in progress)."""
        self._woken.set()

    async def start(self, notifications: NotificationSource | None = None) -> None:
        if self._task is not None:
            return
        if notifications is not None:
            for channel in self._wake_channels:
                await notifications.listen(channel, self._notified)
        if self._interval <= 0 and not self._wake_channels:
            return
        self._task = asyncio.create_task(self._run(), name=f"worker-{self.name}")

    async def stop(self) -> None:
        """Cancels the loop; a pass in progress is cancelled, so its transaction rolls back
        and whatever it claimed stays for the next pass (here or on another replica). The
        loop ends even when the pass's cleanup turns the cancellation into an error."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait([task])

    def _notified(self, _payload: str) -> None:
        self._woken.set()

    async def _run(self) -> None:
        # A timer worker's first pass runs at once (catching up after downtime); a worker
        # that is only woken waits for its first notification.
        more = self._interval > 0
        while not _cancel_requested():
            if not more:
                await self._idle()
            self._woken.clear()
            try:
                more = await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if _cancel_requested():
                    # stop() cancelled this pass, and its cleanup raised instead.
                    return
                self._failed(error)
                await self._clock.sleep(self._retry_seconds)
                more = False
                # The retry above already waited: the next pass runs now, not a tick later.
                self._woken.set()
                continue
            self.passes += 1
            self._recovered()

    async def _idle(self) -> None:
        if self._woken.is_set():
            return
        woken = asyncio.ensure_future(self._woken.wait())
        timer = (
            asyncio.ensure_future(self._clock.sleep(self._interval)) if self._interval > 0 else None
        )
        waiting = {woken} if timer is None else {woken, timer}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in waiting:
                pending.cancel()

    def _failed(self, error: Exception) -> None:
        self.failures += 1
        self._failures_unreported += 1
        loop_time = asyncio.get_running_loop().time()
        first = self._failing_since is None
        if not first and loop_time - self._last_report < FAILURE_REPORT_SECONDS:
            return
        if first:
            self._failing_since = loop_time
        log.warning(
            "background worker %s: pass failed (%s: %s); %d failure(s) since the last report, "
            "retrying every %.1f s",
            self.name,
            type(error).__name__,
            _first_line(error),
            self._failures_unreported,
            self._retry_seconds,
        )
        self._failures_unreported = 0
        self._last_report = loop_time

    def _recovered(self) -> None:
        if self._failing_since is None:
            return
        if self._failures_unreported:
            log.warning(
                "background worker %s: %d more failure(s) before recovering",
                self.name,
                self._failures_unreported,
            )
        log.info("background worker %s: recovered", self.name)
        self._failing_since = None
        self._failures_unreported = 0


def _cancel_requested() -> bool:
    """The running task was cancelled, though what it awaited may have swallowed the
    CancelledError or raised another error in its place."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _first_line(error: Exception) -> str:
    text = str(error)
    return text.splitlines()[0][:200] if text else ""
