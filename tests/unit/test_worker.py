"""The background worker: timer ticks, wake-ups, draining, failures, stop; on a ManualClock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from service.common.clock import ManualClock
from service.common.worker import Worker

START = datetime(2030, 6, 1, tzinfo=UTC)


async def until(condition: Callable[[], bool]) -> None:
    """Yields to the loop until ``condition`` holds (bounded so a broken worker fails)."""
    async with asyncio.timeout(5):
        # Polling is the point: the worker under test owns every event that could be awaited.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0)


class Recorder:
    def __init__(self, results: list[bool | Exception] | None = None) -> None:
        self.calls = 0
        self._results = results or []

    async def step(self) -> bool:
        self.calls += 1
        if self._results:
            result = self._results.pop(0)
            if isinstance(result, Exception):
                raise result
            return result
        return False


async def test_a_timer_worker_runs_at_once_then_each_interval() -> None:
    clock = ManualClock(START)
    work = Recorder()
    worker = Worker("timer", work.step, interval_seconds=10, clock=clock)
    await worker.start()
    try:
        await until(lambda: work.calls == 1 and clock.sleeping == 1)
        clock.advance(timedelta(seconds=9))
        await asyncio.sleep(0)
        assert work.calls == 1
        clock.advance(timedelta(seconds=1))
        await until(lambda: work.calls == 2 and clock.sleeping == 1)
    finally:
        await worker.stop()
    assert not worker.running


async def test_a_pass_that_reports_more_work_runs_again_without_waiting() -> None:
    clock = ManualClock(START)
    work = Recorder([True, True, False])
    worker = Worker("drain", work.step, interval_seconds=60, clock=clock)
    await worker.start()
    try:
        await until(lambda: work.calls == 3 and clock.sleeping == 1)
        assert clock.now() == START
    finally:
        await worker.stop()


async def test_a_wake_up_runs_the_next_pass_before_the_timer() -> None:
    clock = ManualClock(START)
    work = Recorder()
    worker = Worker("woken", work.step, interval_seconds=3600, clock=clock)
    await worker.start()
    try:
        await until(lambda: work.calls == 1 and clock.sleeping == 1)
        worker.wake()
        await until(lambda: work.calls == 2)
    finally:
        await worker.stop()


async def test_a_wake_up_during_a_pass_is_not_slept_through() -> None:
    clock = ManualClock(START)
    inside = asyncio.Event()
    release = asyncio.Event()
    calls = 0

    async def step() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            inside.set()
            await release.wait()
        return False

    worker = Worker("busy", step, interval_seconds=3600, clock=clock)
    await worker.start()
    try:
        await inside.wait()
        worker.wake()  # arrives while the first pass runs
        release.set()
        await until(lambda: calls == 2)
    finally:
        await worker.stop()


async def test_a_worker_without_a_timer_runs_only_when_woken() -> None:
    clock = ManualClock(START)
    work = Recorder()
    worker = Worker("on-demand", work.step, interval_seconds=0, clock=clock, wake_channels=["x"])
    await worker.start()
    try:
        await asyncio.sleep(0.01)
        assert work.calls == 0
        worker.wake()
        await until(lambda: work.calls == 1)
    finally:
        await worker.stop()


async def test_no_timer_and_no_channel_means_disabled() -> None:
    work = Recorder()
    worker = Worker("off", work.step, interval_seconds=0, clock=ManualClock(START))
    await worker.start()
    assert not worker.running
    await worker.stop()


async def test_failures_are_retried_and_logged_once_per_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock(START)
    failures: list[bool | Exception] = [ConnectionError(f"down {n}\ntrace") for n in range(5)]
    work = Recorder([*failures, False])
    worker = Worker("flaky", work.step, interval_seconds=3600, clock=clock, retry_seconds=2)
    with caplog.at_level(logging.INFO, logger="service.common.worker"):
        await worker.start()
        try:
            for expected in range(1, 6):

                def retrying(calls: int = expected) -> bool:
                    return work.calls == calls and clock.sleeping == 1

                await until(retrying)
                clock.advance(timedelta(seconds=2))
            await until(lambda: work.calls == 6 and worker.passes == 1)
        finally:
            await worker.stop()
    lines = [r for r in caplog.records if r.name == "service.common.worker"]
    # One line when it starts failing, one summary of the rest, one when it recovered.
    assert len(lines) == 3, [r.getMessage() for r in lines]
    assert "down 0" in lines[0].getMessage()
    assert "trace" not in lines[0].getMessage()
    assert "4 more failure(s)" in lines[1].getMessage()
    assert "recovered" in lines[2].getMessage()
    assert all(r.exc_info is None for r in lines)
    assert worker.failures == 5


async def test_stop_cancels_a_pass_in_progress() -> None:
    clock = ManualClock(START)
    inside = asyncio.Event()
    cancelled = asyncio.Event()

    async def step() -> bool:
        inside.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return False

    worker = Worker("stuck", step, interval_seconds=1, clock=clock)
    await worker.start()
    await inside.wait()
    await worker.stop()
    assert cancelled.is_set()
    assert not worker.running


async def test_stop_ends_a_pass_whose_cleanup_turns_the_cancellation_into_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock(START)
    inside = asyncio.Event()

    async def step() -> bool:
        inside.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            # As an asyncpg transaction does when its rollback finds the connection that the
            # cancellation broke: the rollback's error replaces the CancelledError.
            raise ConnectionError("cannot perform operation: connection is closed") from None
        return False

    worker = Worker("cut-off", step, interval_seconds=1, clock=clock)
    await worker.start()
    await inside.wait()
    with caplog.at_level(logging.INFO, logger="service.common.worker"):
        await asyncio.wait_for(worker.stop(), timeout=5)
    assert not worker.running
    # Stopped, not failed: no "pass failed" line for what the stop itself caused.
    assert not [r for r in caplog.records if r.name == "service.common.worker"]
    assert worker.failures == 0


async def test_stop_ends_a_pass_that_swallows_its_cancellation_and_returns() -> None:
    clock = ManualClock(START)
    inside = asyncio.Event()

    async def step() -> bool:
        inside.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        return True  # "more work": the loop would run the next pass at once

    worker = Worker("swallower", step, interval_seconds=1, clock=clock)
    await worker.start()
    await inside.wait()
    await asyncio.wait_for(worker.stop(), timeout=5)
    assert not worker.running
