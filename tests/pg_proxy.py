"""TCP proxies in front of PostgreSQL: one that can lose the answer to a commit, one whose
network can go silent or be slow to let a new connection through.

A commit whose answer never arrives is the one failure a client cannot tell apart: the
transaction may have committed or not. The proxy makes it happen on a real connection: once
armed, the first transaction of the kind it was armed for (by default one that inserted rows)
has its COMMIT forwarded, the server's answer read and thrown away, and the connection cut, so
the commit is known to be done while the client sees only a dropped connection. Armed to hold,
the proxy keeps the client waiting for that answer until ``let_go``, so the client can be
cancelled while its commit is done.

A silent network drops every byte both ways and keeps the sockets open (a partition): no
reset, no error, the client only ever waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from typing import Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# The command tag of an INSERT's CommandComplete message, and the simple query asyncpg sends
# to commit a transaction.
_INSERT_TAG = b"INSERT 0 "
_COMMIT = b"COMMIT"
_ROLLBACK = b"ROLLBACK"
# Command tags of statements that updated or returned at least one row.
_UPDATED = re.compile(rb"UPDATE [1-9]")
_READ = re.compile(rb"SELECT [1-9]")
# What the delivery worker's claim and re-check transactions begin with (and no other does).
_PLANNED_AFRESH = b"plan_cache_mode"
# The first eight bytes of a CancelRequest: its length (16) and its request code, 80877102.
_CANCEL_REQUEST = b"\x00\x00\x00\x10\x04\xd2\x16\x2e"


class PgProxy:
    """Forwards every connection to the database as it is; subclasses change the pumps."""

    def __init__(self, database_url: str) -> None:
        self._database_url = database_url
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        """The database's URL, through the proxy."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(self._database_url)
        user, at, _ = parts.netloc.rpartition("@")
        # Any unix-socket ``host`` parameter goes: the proxy is reached over TCP.
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "host"])
        return urlunsplit(parts._replace(netloc=f"{user}{at}127.0.0.1:{port}", query=query))

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        parts = urlsplit(self._database_url)
        socket_dir = dict(parse_qsl(parts.query)).get("host")
        if socket_dir is not None or parts.hostname is None:
            # The embedded server of the suite listens on a unix socket only.
            path = f"{socket_dir or '/tmp'}/.s.PGSQL.{parts.port or 5432}"
            return await asyncio.open_unix_connection(path)
        return await asyncio.open_connection(parts.hostname, parts.port or 5432)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def _before_upstream(self) -> None:
        """Awaited for each new connection before it is forwarded."""

    async def _connection(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        await self._before_upstream()
        server_reader, server_writer = await self._open_upstream()
        state = _Link()
        pumps = [
            asyncio.create_task(self._to_server(client_reader, server_writer, state)),
            asyncio.create_task(self._to_client(server_reader, client_writer, state)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            for writer in (client_writer, server_writer):
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _to_server(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: _Link
    ) -> None:
        await self._forward(reader, writer)

    async def _to_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: _Link
    ) -> None:
        await self._forward(reader, writer)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


class FlakyNetwork(PgProxy):
    """Forwards until ``go_silent``, from then on dropping every byte both ways; and, while
    told to hold them, keeps new connections waiting before they reach the database."""

    def __init__(self, database_url: str) -> None:
        super().__init__(database_url)
        self._silent = False
        self._let_through = asyncio.Event()
        self._let_through.set()
        self.connection_held = asyncio.Event()

    def go_silent(self) -> None:
        self._silent = True

    def hold_new_connections(self) -> None:
        self._let_through.clear()

    def let_connections_through(self) -> None:
        self._let_through.set()

    async def _before_upstream(self) -> None:
        if not self._let_through.is_set():
            self.connection_held.set()
            await self._let_through.wait()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if not self._silent:
                writer.write(data)
                await writer.drain()


class CommitAnswerCutter(PgProxy):
    def __init__(self, database_url: str) -> None:
        super().__init__(database_url)
        self._armed = False
        self._holding = False
        self._when: Callable[[_Link], bool] = _inserted_rows
        self._let_go = asyncio.Event()
        self.cuts = 0
        self.cut_done = asyncio.Event()
        # The answer is held (when armed to hold), and a client asked to cancel its command.
        self.answer_held = asyncio.Event()
        self.cancel_requested = asyncio.Event()

    def arm(self, hold: bool = False, when: Callable[[_Link], bool] | None = None) -> None:
        """Loses the answer to the next commit of a transaction that inserted rows (or, with
        ``when``, of one it is true for: ``outbox_claim_that_took_rows``,
        ``outbox_check_that_settled_rows``); with ``hold``, only once ``let_go`` is called."""
        self._armed = True
        self._holding = hold
        self._when = when or _inserted_rows

    def let_go(self) -> None:
        self._let_go.set()

    async def _to_server(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: _Link
    ) -> None:
        while data := await reader.read(65536):
            if data.startswith(_CANCEL_REQUEST):
                self.cancel_requested.set()
            if _PLANNED_AFRESH in data:
                state.planned_afresh = True
            if self._armed and self._when(state) and _COMMIT in data:
                self._armed = False
                state.losing_answer = True
            elif _COMMIT in data or _ROLLBACK in data:
                state.reset()
            writer.write(data)
            await writer.drain()

    async def _to_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: _Link
    ) -> None:
        while data := await reader.read(65536):
            if state.losing_answer:
                # The server answered the commit: it is done. The client never hears of it.
                if self._holding:
                    self.answer_held.set()
                    await self._let_go.wait()
                self.cuts += 1
                self.cut_done.set()
                return
            if _INSERT_TAG in data:
                state.inserted = True
            if _UPDATED.search(data):
                state.updated = True
            if _READ.search(data):
                state.read_rows = True
            writer.write(data)
            await writer.drain()


class _Link:
    """What the transaction under way on one proxied connection has done so far."""

    def __init__(self) -> None:
        self.losing_answer = False
        self.reset()

    def reset(self) -> None:
        self.inserted = False
        self.updated = False
        self.read_rows = False
        self.planned_afresh = False


def _inserted_rows(link: _Link) -> bool:
    return link.inserted


def outbox_claim_that_took_rows(link: _Link) -> bool:
    """The delivery worker's claim when it took setpoints (or a re-check that read some)."""
    return link.planned_afresh and link.read_rows


def outbox_check_that_settled_rows(link: _Link) -> bool:
    """A re-check of queued setpoints that settled some (or a claim that settled some)."""
    return link.planned_afresh and link.updated
