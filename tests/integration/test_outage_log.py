"""A database outage under a retrying client is a handful of log lines, not one per call.

The service reaches PostgreSQL through a TCP relay of ours on 127.0.0.1; taking the relay
down (existing connections cut, new ones refused) makes the database unreachable for the
service exactly as a network failure or a restart would, while the test's own database
stays up for the other tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
from openvpp.v1 import site_registry_pb2 as pb
from openvpp.v1 import site_registry_pb2_grpc

from service.app import Service
from service.auth.principal import Role
from service.auth.store import IdentityStore
from service.common.loglimit import OutageLog
from tests import conftest as harness
from tests.helpers import site_request

OUTAGE_SECONDS = 4.0


class Relay:
    """Forwards TCP connections from a local port to PostgreSQL; can be taken down."""

    def __init__(self, host: str, port: int) -> None:
        # A host that is a directory means PostgreSQL's Unix socket in it.
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self._target
        try:
            if host.startswith("/"):
                up_reader, up_writer = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
            else:
                up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while chunk := await source.read(65536):
                    sink.write(chunk)
                    await sink.drain()
            sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
async def relayed(database_url: str, service: Service) -> AsyncIterator[tuple[Service, Relay]]:
    parts = urlsplit(database_url)
    query = dict(pair.partition("=")[::2] for pair in parts.query.split("&") if pair)
    relay = Relay(query.pop("host", parts.hostname or "127.0.0.1"), parts.port or 5432)
    await relay.start()
    credentials = parts.netloc.rpartition("@")[0]
    netloc = (credentials + "@" if credentials else "") + f"127.0.0.1:{relay.port}"
    parts = parts._replace(query="&".join(f"{k}={v}" for k, v in query.items()))
    running = Service(
        harness.test_settings(health_interval_seconds=0.5, db_read_connections=0),
        urlunsplit(parts._replace(netloc=netloc)),
        database_outage=OutageLog("database", logging.getLogger("service.app"), 1.0),
    )
    await running.start()
    yield running, relay
    await relay.start()
    await running.stop(grace=1)
    await relay.stop()


async def test_an_outage_logs_start_summaries_and_end(relayed: tuple[Service, Relay]) -> None:
    running, relay = relayed
    assert running.pool is not None
    identity = IdentityStore(running.pool)
    org = await identity.create_org("outage", Role.PARTNER)
    token = (await identity.create_token(org.id)).token
    auth = (("authorization", f"Bearer {token}"),)
    lines = Lines()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(lines)
    root.setLevel(logging.INFO)
    codes: dict[str, int] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = site_registry_pb2_grpc.SiteRegistryStub(channel)
            site = (await stub.CreateSite(site_request(), metadata=auth)).site

            async def retrying_client(until: float) -> None:
                while time.monotonic() < until:
                    try:
                        await stub.GetSite(pb.GetSiteRequest(site_id=site.id), metadata=auth)
                        codes["OK"] = codes.get("OK", 0) + 1
                    except grpc.aio.AioRpcError as error:
                        name = error.code().name
                        codes[name] = codes.get(name, 0) + 1
                        await asyncio.sleep(0.005)

            await relay.stop()
            down_until = time.monotonic() + OUTAGE_SECONDS
            clients = [asyncio.create_task(retrying_client(down_until)) for _ in range(4)]
            await asyncio.gather(*clients)
            refused_during_outage = codes.get("UNAVAILABLE", 0)
            await relay.start()
            # Back: the retrying client succeeds again and the health probe sees the end.
            deadline = time.monotonic() + 15
            while running.database_outage.ongoing and time.monotonic() < deadline:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.GetSite(pb.GetSiteRequest(site_id=site.id), metadata=auth)
                await asyncio.sleep(0.1)
            back = await stub.GetSite(pb.GetSiteRequest(site_id=site.id), metadata=auth)
            assert back.site.id == site.id
    finally:
        root.removeHandler(lines)
        root.setLevel(old_level)

    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert refused_during_outage >= 100, codes
    assert not running.database_outage.ongoing
    messages = [record.getMessage() for record in lines.records]
    print("\n".join(["", f"calls: {codes}", *messages]))
    assert not [r for r in lines.records if r.exc_info], messages
    assert not [m for m in messages if "Traceback" in m or token in m]
    outage = [m for m in messages if m.startswith("database ")]
    assert outage[0].startswith("database unavailable ("), outage
    summaries = [m for m in outage if "still unavailable" in m]
    assert summaries, outage
    assert outage[-1].startswith("database available again after"), outage
    assert "call(s) were refused" in outage[-1]
    listener = [m for m in messages if m.startswith("event listener ")]
    assert listener[0].startswith("event listener unavailable"), listener
    assert listener[-1].startswith("event listener available again"), listener
    assert len(listener) <= 2 + OUTAGE_SECONDS / 10, listener
    # Start, about one summary a second, end; the event listener's own start and end; the
    # rest (e.g. the listener's reconnect) is a few lines more, whatever the call count.
    assert len(messages) <= OUTAGE_SECONDS + 20, messages
