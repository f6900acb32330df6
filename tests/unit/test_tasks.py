"""cancel_and_wait: background tasks end when stopped, whatever their cleanup does."""

from __future__ import annotations

import asyncio
import contextlib

from service.common.tasks import RECANCEL_SECONDS, cancel_and_wait


async def test_a_task_that_ends_on_its_cancellation_is_cancelled_once() -> None:
    cancellations = 0

    async def waits() -> None:
        nonlocal cancellations
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancellations += 1
            raise

    task = asyncio.create_task(waits())
    await asyncio.sleep(0)
    await cancel_and_wait([task])
    assert task.cancelled()
    assert cancellations == 1


async def test_a_loop_that_turns_its_cancellation_into_an_error_and_retries_is_ended() -> None:
    attempts = 0

    async def retries_on_errors() -> None:
        # The shape of a recorder or worker loop: an error is logged and the work retried.
        nonlocal attempts
        while True:
            attempts += 1
            try:
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    raise ConnectionError("connection is closed") from None
            except ConnectionError:
                await asyncio.sleep(RECANCEL_SECONDS * 4)

    task = asyncio.create_task(retries_on_errors())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait([task]), timeout=5)
    assert task.cancelled()
    assert attempts == 1


async def test_errors_and_results_of_the_stopped_tasks_are_not_raised() -> None:
    async def fails() -> None:
        raise ValueError("failed before it was stopped")

    async def swallows() -> int:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        return 1

    failed = asyncio.create_task(fails())
    swallowing = asyncio.create_task(swallows())
    await asyncio.sleep(0)
    await cancel_and_wait([failed, swallowing])
    assert isinstance(failed.exception(), ValueError)
    assert swallowing.result() == 1
