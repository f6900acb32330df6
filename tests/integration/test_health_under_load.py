"""Health says whether the database answers, not whether a pooled connection is free: a
replica whose pool is all at work stays SERVING (taking it out of rotation would fill its
peers the same way). A database that is gone is NOT_SERVING (test_outage_log.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.app import Service
from tests.conftest import running_service


@contextlib.asynccontextmanager
async def every_connection_busy(service: Service, seconds: float) -> AsyncIterator[None]:
    assert service.pool is not None
    pool = service.pool
    size = pool.get_max_size()
    connections = [await pool.acquire() for _ in range(size)]
    sleeps = [asyncio.ensure_future(c.execute(f"SELECT pg_sleep({seconds})")) for c in connections]
    try:
        yield
    finally:
        await asyncio.gather(*sleeps, return_exceptions=True)
        for conn in connections:
            await pool.release(conn)


async def test_a_pool_all_at_work_stays_serving(database_url: str) -> None:
    async with (
        running_service(
            database_url, db_pool_min_size=1, db_pool_max_size=2, health_interval_seconds=0.5
        ) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)

        async def status() -> int:
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
            return int(answer.status)

        assert await status() == health_pb2.HealthCheckResponse.SERVING
        seen: set[int] = set()
        async with every_connection_busy(server, seconds=3.5):
            # Six probes' time (each gives up on a connection after one interval).
            for _ in range(30):
                seen.add(await status())
                await asyncio.sleep(0.1)
        assert seen == {health_pb2.HealthCheckResponse.SERVING}
        assert not server.database_outage.ongoing
