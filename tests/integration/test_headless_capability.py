"""A capability without a gRPC service (a headless worker) fits the Service lifecycle."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.app import Capability, Service
from service.common.clock import SYSTEM_CLOCK
from service.common.worker import Worker
from tests import conftest as harness


@dataclass
class WithHeadless(Service):
    """The service plus one headless capability whose worker records what it saw."""

    wake_channel: str = ""
    passes: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    headless: Worker | None = None

    def _capabilities(self) -> list[Capability]:
        async def step() -> bool:
            assert self.pool is not None
            # Runs after the migrations: the schema is there.
            applied = await self.pool.fetchval("SELECT count(*) FROM schema_migrations")
            self.passes.put_nowait(applied)
            return False

        self.headless = Worker(
            "headless",
            step,
            interval_seconds=0,
            clock=SYSTEM_CLOCK,
            wake_channels=[self.wake_channel],
        )
        return [
            *super()._capabilities(),
            Capability(descriptor=None, servicer=None, method_roles={}, workers=[self.headless]),
        ]


async def test_a_headless_worker_runs_and_stops_with_the_service(database_url: str) -> None:
    service = WithHeadless(
        harness.test_settings(), database_url, wake_channel=f"test_headless_{uuid.uuid4().hex[:8]}"
    )
    await service.start()
    try:
        assert service.headless is not None
        assert service.headless.running
        assert service.pool is not None
        await service.pool.execute("SELECT pg_notify($1, '{}')", service.wake_channel)
        async with asyncio.timeout(10):
            applied = await service.passes.get()
        assert applied >= 7
        # The gRPC side is unaffected: every served service reports SERVING.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert overall.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await service.stop(grace=1)
    assert not service.headless.running
