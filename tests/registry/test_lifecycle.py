"""Graceful shutdown and the health status following the database, on dedicated instances."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openvpp.v1 import site_registry_pb2 as pb
from openvpp.v1 import site_registry_pb2_grpc

from service.app import Service
from service.auth.principal import Role
from tests.conftest import MakeOrg
from tests.conftest import test_settings as settings_for_tests
from tests.helpers import rpc_error, site_request
from tests.registry.support import Stub, wait_until_blocked_on_lock


@contextlib.asynccontextmanager
async def running(dsn: str, **overrides: object) -> AsyncIterator[tuple[Service, Stub]]:
    service = Service(settings_for_tests(**overrides), dsn)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            yield service, site_registry_pb2_grpc.SiteRegistryStub(channel)
    finally:
        await service.stop(grace=0)


async def read_past_creation(watch: Any, site_id: str) -> None:
    """Reads the stream until it ends; only the site's own CREATED event may come first."""
    for _ in range(2):
        event = await asyncio.wait_for(watch.read(), 5)
        assert event is not grpc.aio.EOF
        assert (event.event_type, event.site.id) == (pb.SITE_EVENT_TYPE_CREATED, site_id)


async def test_in_flight_call_finishes_within_the_grace_period(
    database_url: str, make_org: MakeOrg
) -> None:
    org = await make_org(Role.PARTNER)
    async with running(database_url) as (service, registry):
        site = (await registry.CreateSite(site_request(), metadata=org.auth)).site
        watch = registry.WatchSites(pb.WatchSitesRequest(), metadata=org.auth)
        await watch.initial_metadata()
        blocker = await asyncpg.connect(database_url)
        try:
            lock = blocker.transaction()
            await lock.start()
            await blocker.execute("SELECT 1 FROM sites WHERE id = $1 FOR UPDATE", site.id)
            in_flight = asyncio.ensure_future(
                registry.PauseSite(pb.PauseSiteRequest(site_id=site.id), metadata=org.auth)
            )
            await wait_until_blocked_on_lock(blocker, in_flight)
            stopping = asyncio.create_task(service.stop(grace=10))
            # The open watch stream ends at once (clients reconnect elsewhere) ... after the
            # site's CREATED event, if that was still on its way when the stream subscribed.
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await read_past_creation(watch, site.id)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            # ... new calls are refused while the in-flight one is still running ...
            refused = await rpc_error(
                registry.GetSite(pb.GetSiteRequest(site_id=site.id), metadata=org.auth)
            )
            assert refused.code() == grpc.StatusCode.UNAVAILABLE
            assert not in_flight.done()
            assert not stopping.done()
            await lock.commit()
            # ... and it completes, committed, before the server is down.
            response = await asyncio.wait_for(in_flight, 5)
            assert response.site.status == pb.SITE_STATUS_PAUSED
            await asyncio.wait_for(stopping, 5)
            assert await blocker.fetchval("SELECT paused FROM sites WHERE id = $1", site.id)
        finally:
            await blocker.close()


async def test_call_still_running_at_the_deadline_is_cancelled_and_rolled_back(
    database_url: str, make_org: MakeOrg
) -> None:
    org = await make_org(Role.PARTNER)
    async with running(database_url) as (service, registry):
        site = (await registry.CreateSite(site_request(), metadata=org.auth)).site
        blocker = await asyncpg.connect(database_url)
        try:
            async with blocker.transaction():
                await blocker.execute("SELECT 1 FROM sites WHERE id = $1 FOR UPDATE", site.id)
                in_flight = asyncio.ensure_future(
                    registry.PauseSite(pb.PauseSiteRequest(site_id=site.id), metadata=org.auth)
                )
                await wait_until_blocked_on_lock(blocker, in_flight)
                await asyncio.wait_for(service.stop(grace=0.3), 10)
                error = await rpc_error(in_flight)
                assert error.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
            # Nothing of the cancelled call was written.
            assert not await blocker.fetchval("SELECT paused FROM sites WHERE id = $1", site.id)
            status = await blocker.fetchval("SELECT status FROM sites WHERE id = $1", site.id)
            assert status == "no_resources"
        finally:
            await blocker.close()


class Proxy:
    """A TCP forwarder to the test database that can be cut and restored, so a service
    behind it sees its database become unreachable and come back."""

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        host = parse_qs(parts.query).get("host", [parts.hostname or "127.0.0.1"])[0]
        self._port = parts.port or 5432
        self._unix = f"{host}/.s.PGSQL.{self._port}" if host.startswith("/") else None
        self._host = host
        self._path = parts.path
        self._user = parts.username or "postgres"
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def dsn(self) -> str:
        return f"postgresql://{self._user}@127.0.0.1:{self.port}{self._path}"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._unix is not None:
            up_reader, up_writer = await asyncio.open_unix_connection(self._unix)
        else:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))


async def health_status(health: health_pb2_grpc.HealthStub) -> int:
    response = await health.Check(health_pb2.HealthCheckRequest(service="openvpp.v1.SiteRegistry"))
    return int(response.status)


async def wait_for_health(health: health_pb2_grpc.HealthStub, expected: int) -> None:
    for _ in range(200):
        if await health_status(health) == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"health never became {expected}")


async def test_health_follows_the_database(database_url: str, make_org: MakeOrg) -> None:
    org = await make_org(Role.PARTNER)
    proxy = Proxy(database_url)
    await proxy.open()
    async with running(proxy.dsn, token_cache_seconds=0) as (service, registry):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert await health_status(health) == serving
        await registry.ListSites(pb.ListSitesRequest(), metadata=org.auth)

        await proxy.cut()
        await wait_for_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
        # Calls fail with a retryable code, even the token lookup that comes first.
        error = await rpc_error(registry.ListSites(pb.ListSitesRequest(), metadata=org.auth))
        assert error.code() == grpc.StatusCode.UNAVAILABLE

        await proxy.open()
        await wait_for_health(health, serving)
        listed = await registry.ListSites(pb.ListSitesRequest(), metadata=org.auth)
        assert listed.total_size == 0
        await channel.close()
    await proxy.cut()


async def test_a_taken_port_fails_the_start_and_leaves_nothing_open(
    database_url: str, service: Service
) -> None:
    second = Service(settings_for_tests(grpc_address=f"127.0.0.1:{service.port}"), database_url)
    with pytest.raises(RuntimeError, match="cannot bind"):
        await second.start()
    assert second.pool is not None
    assert second.pool.is_closing()
    assert second.hub is not None
    assert not second.hub.connected
