"""A fast lane for single-statement reads: a few pool connections kept checked out.

Checking a connection out of asyncpg's pool and back in costs more than the primary-key
read it is for (a shielded task, a timeout and a reset per release): in the registry
benchmark it was about an eighth of the server's CPU per GetSite. ``ReadLane`` borrows up
to ``size`` connections from the pool once and hands them from call to call. Anything
unusual (an error from the connection, a cancelled query) returns the connection to the
pool, which already knows how to wait out a cancellation or drop a broken connection, and a
fresh one is borrowed on the next read.

Only for statements that stand alone: each runs in its own implicit transaction, so no
state is left on a connection between calls.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import asyncpg


class Reads(Protocol):
    """What a store needs for single-statement reads: a ``ReadLane`` or the pool itself."""

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None: ...

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]: ...


T = TypeVar("T")

# Errors after which the connection is still fit for the next statement.
_STATEMENT_ERRORS = (asyncpg.PostgresError,)


class ReadLane:
    def __init__(self, pool: asyncpg.Pool, size: int) -> None:
        if size < 1:
            raise ValueError("a read lane needs at least one connection")
        self._pool = pool
        self._size = size
        self._borrowed = 0
        self._idle: list[asyncpg.Connection] = []
        # Callers waiting for a connection; each gets one, or None to borrow its own.
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._returning: set[asyncio.Task[None]] = set()
        self._closed = False

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        return await self._run(lambda conn: conn.fetchrow(query, *args))

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await self._run(lambda conn: conn.fetch(query, *args))

    async def close(self) -> None:
        """Returns every connection to the pool; reads after this go to the pool directly."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            self._give_back(conn)
        while self._waiters:
            self._wake_one()
        if self._returning:
            await asyncio.gather(*self._returning, return_exceptions=True)

    async def _run(self, statement: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        conn = await self._checkout()
        try:
            result = await statement(conn)
        except _STATEMENT_ERRORS:
            self._checkin(conn)
            raise
        except BaseException:
            self._give_back(conn)
            raise
        self._checkin(conn)
        return result

    async def _checkout(self) -> asyncpg.Connection:
        while self._idle:
            conn = self._idle.pop()
            if _usable(conn):
                return conn
            self._give_back(conn)
        if self._borrowed >= self._size and not self._closed:
            waiter: asyncio.Future[asyncpg.Connection | None] = (
                asyncio.get_running_loop().create_future()
            )
            self._waiters.append(waiter)
            try:
                conn = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                    # Handed a connection in the same instant: pass it on.
                    self._checkin(waiter.result())
                elif waiter.done() and not waiter.cancelled():
                    self._wake_one()
                raise
            if conn is not None:
                return conn
        self._borrowed += 1
        try:
            conn = await self._pool.acquire()
        except BaseException:
            self._borrowed -= 1
            self._wake_one()
            raise
        return conn

    def _checkin(self, conn: asyncpg.Connection) -> None:
        if self._closed:
            self._give_back(conn)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def _give_back(self, conn: asyncpg.Connection) -> None:
        """To the pool, which resets or replaces it; a waiter may then borrow afresh."""
        self._borrowed -= 1
        task = asyncio.get_running_loop().create_task(self._pool.release(conn))
        self._returning.add(task)
        task.add_done_callback(self._returning.discard)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _usable(conn: asyncpg.Connection) -> bool:
    """False once the connection closed while idle (the server ended it, say): the pool
    then takes it back on its own, and any call on it raises InterfaceError."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False
