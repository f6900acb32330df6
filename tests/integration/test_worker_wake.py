"""A worker's wake channel is a real PostgreSQL NOTIFY through the service's event hub."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from service.app import Service
from service.common.clock import ManualClock
from service.common.worker import Worker


async def test_a_notify_committed_elsewhere_wakes_the_worker(service: Service) -> None:
    assert service.pool is not None
    assert service.hub is not None
    channel = f"test_wake_{uuid.uuid4().hex[:8]}"
    passes = asyncio.Queue[None]()

    async def step() -> bool:
        passes.put_nowait(None)
        return False

    worker = Worker(
        "notified",
        step,
        interval_seconds=0,
        clock=ManualClock(datetime(2030, 1, 1, tzinfo=UTC)),
        wake_channels=[channel],
    )
    await worker.start(service.hub)
    try:
        assert passes.empty()
        async with service.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_notify($1, '{}')", channel)
        async with asyncio.timeout(10):
            await passes.get()
    finally:
        await worker.stop()
