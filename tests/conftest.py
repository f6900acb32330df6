"""Test harness: a real PostgreSQL (embedded, or OPENVPP_DATABASE_URL) and real gRPC channels.

One database per test session; every test creates its own organizations, so tests are
isolated by the same tenant scoping that isolates production callers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import hypothesis
import pytest
from opentelemetry.metrics import MeterProvider
from openvpp.v1 import meter_registry_pb2_grpc, site_registry_pb2_grpc, telemetry_pb2_grpc

from service.app import Service
from service.auth.principal import Role
from service.auth.store import IdentityStore
from service.config import Settings
from service.db.database import EmbeddedPostgres
from service.db.migrate import migrate

# A test about to time out shows what each asyncio task is waiting for.
pytest_plugins = ["tests.task_dump"]

# Property tests check results, not speed (speed is the benchmarks' business): no example
# fails for taking longer than hypothesis's default 200 ms on a busy CI machine.
hypothesis.settings.register_profile("openvpp", deadline=None)
hypothesis.settings.load_profile("openvpp")


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("OPENVPP_DATABASE_URL")
    if not configured:
        # Not under pytest's tmp dir: every pytest run resets /tmp/pytest-of-<user> to mode
        # 0700, which locks out the embedded server's own user while another run is starting.
        home = Path(tempfile.mkdtemp(prefix="openvpp-test-pg-"))
        embedded = EmbeddedPostgres(home)
        try:
            yield embedded.start()
        finally:
            embedded.stop()
            shutil.rmtree(home, ignore_errors=True)
        return
    name = f"openvpp_test_{uuid.uuid4().hex[:12]}"
    import asyncio

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(configured)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    parts = urlsplit(configured)
    try:
        yield urlunsplit(parts._replace(path="/" + name))
    finally:
        asyncio.run(admin(f'DROP DATABASE "{name}" WITH (FORCE)'))


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


async def admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def migrated_template(database_url: str) -> AsyncIterator[str]:
    name = f"openvpp_template_{uuid.uuid4().hex[:10]}"
    await admin(database_url, f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(with_database(database_url, name))
    try:
        await migrate(conn)
    finally:
        await conn.close()
    yield name
    await admin(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def fresh_database(database_url: str, migrated_template: str) -> AsyncIterator[str]:
    """A migrated database of the test's own (a copy of a template migrated once a session),
    for tests that change what other tests' servers would see."""
    name = f"openvpp_fresh_{uuid.uuid4().hex[:12]}"
    await admin(database_url, f'CREATE DATABASE "{name}" TEMPLATE "{migrated_template}"')
    yield with_database(database_url, name)
    await admin(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_settings(**overrides: object) -> Settings:
    base = Settings(
        grpc_address="127.0.0.1:0",
        bootstrap=False,
        health_interval_seconds=0.5,
        shutdown_grace_seconds=2,
        db_pool_min_size=1,
        db_pool_max_size=10,
        # Tests tick the upstream scheduler themselves (run_once) with their own clocks.
        upstream_scheduler_interval_seconds=0,
        # Balancing tests drive the queue consumer themselves, or start a worker of their own.
        balancing_poll_seconds=-1,
        # Webhook receivers in tests listen on 127.0.0.1; tests of the address rule turn it off.
        webhook_allow_private_networks=True,
        # No delivery worker on the shared database: its sites have made-up webhook URLs
        # (partner.example) that nothing may try to reach. The dispatch tests run their own
        # replicas, with workers, on databases of their own (tests/dispatch/conftest.py).
        dispatch_delivery_enabled=False,
    )
    from dataclasses import replace

    return replace(base, **overrides)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running_service(
    database_url: str, meter_provider: MeterProvider | None = None, **overrides: object
) -> AsyncIterator[Service]:
    """A server of its own on ``database_url``, with ``overrides`` of the test settings;
    ``meter_provider`` records its metrics."""
    running = Service(test_settings(**overrides), database_url, meter_provider=meter_provider)
    await running.start()
    try:
        yield running
    finally:
        await running.stop(grace=1)


@pytest.fixture(scope="session")
async def service(database_url: str) -> AsyncIterator[Service]:
    running = Service(test_settings(), database_url)
    await running.start()
    yield running
    await running.stop(grace=1)


@pytest.fixture(scope="session")
async def channel(service: Service) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as open_channel:
        yield open_channel


@pytest.fixture(scope="session")
def registry(channel: grpc.aio.Channel) -> site_registry_pb2_grpc.SiteRegistryAsyncStub:
    return site_registry_pb2_grpc.SiteRegistryStub(channel)


@pytest.fixture(scope="session")
def meters(channel: grpc.aio.Channel) -> meter_registry_pb2_grpc.MeterRegistryAsyncStub:
    return meter_registry_pb2_grpc.MeterRegistryStub(channel)


@pytest.fixture(scope="session")
def telemetry(channel: grpc.aio.Channel) -> telemetry_pb2_grpc.TelemetryAsyncStub:
    return telemetry_pb2_grpc.TelemetryStub(channel)


@dataclass(frozen=True)
class Org:
    id: uuid.UUID
    role: Role
    token: str
    token_id: uuid.UUID

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


MakeOrg = Callable[[Role], Awaitable[Org]]


@pytest.fixture(scope="session")
def make_org(service: Service) -> MakeOrg:
    async def make(role: Role = Role.PARTNER) -> Org:
        assert service.pool is not None
        store = IdentityStore(service.pool)
        org = await store.create_org(f"test-{role}-{uuid.uuid4().hex[:6]}", role)
        issued = await store.create_token(org.id)
        return Org(org.id, role, issued.token, issued.id)

    return make


@pytest.fixture
async def partner(make_org: MakeOrg) -> Org:
    return await make_org(Role.PARTNER)


@pytest.fixture
async def other_partner(make_org: MakeOrg) -> Org:
    return await make_org(Role.PARTNER)


REPO_ROOT = Path(__file__).resolve().parent.parent
