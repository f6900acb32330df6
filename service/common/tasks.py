"""Ending background tasks for certain.

Cancelling a task does not always end it: cleanup on the way out can raise an error in place
of the CancelledError. An asyncpg transaction cancelled mid-query rolls back on a connection
the cancellation may have broken (its cancel request could not reach the server), and the
rollback's ``InterfaceError`` replaces the cancellation; a loop that retries on errors then
carries on as if nothing had asked it to stop, and whoever awaits it waits for ever (a
replica's shutdown hung so when its database went away during a claim).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

# How long a cancelled task has to end before it is cancelled again: ample for cleanup that
# goes as planned (a rollback takes milliseconds), and not much for a shutdown to wait.
RECANCEL_SECONDS = 0.5


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancels ``tasks`` and returns once all have ended, cancelling again the ones that run
    on; their results and errors are not raised here (they were stopped, not awaited)."""
    every = list(tasks)
    running = {task for task in every if not task.done()}
    for task in running:
        task.cancel()
    while running:
        _, running = await asyncio.wait(running, timeout=RECANCEL_SECONDS)
        for task in running:
            task.cancel()
    for task in every:
        if not task.cancelled():
            # Retrieved, so that asyncio does not log it as never retrieved.
            task.exception()
