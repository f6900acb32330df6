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
    """At most ``size`` connections, each counted from the moment a caller is given the right
    to borrow it until it goes back to the pool."""

    def __init__(self, pool: asyncpg.Pool, size: int) -> None:
        if size < 1:
            raise ValueError("a read lane needs at least one connection")
        self._pool = pool
        self._size = size
        self._borrowed = 0
        self._idle: list[asyncpg.Connection] = []
        # Callers waiting for a connection: each is handed one, or None with a slot to
        # borrow its own from the pool.
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._returning: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def waiting(self) -> int:
        """Callers waiting for a connection of the lane right now."""
        return sum(1 for waiter in self._waiters if not waiter.done())

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
            self._pass_slot()
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
            idle = self._idle.pop()
            if _usable(idle):
                return idle
            self._give_back(idle)
        if self._borrowed < self._size or self._closed:
            self._borrowed += 1
        else:
            handed = await self._wait()
            if handed is not None:
                if _usable(handed):
                    return handed
                self._return_to_pool(handed)  # its slot is ours now
        try:
            fresh: asyncpg.Connection = await self._pool.acquire()
        except BaseException:
            self._free_slot()
            raise
        return fresh

    async def _wait(self) -> asyncpg.Connection | None:
        waiter: asyncio.Future[asyncpg.Connection | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # Handed a connection or a slot in the same instant: pass it on.
                handed = waiter.result()
                if handed is not None:
                    self._checkin(handed)
                else:
                    self._free_slot()
            raise

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
        """To the pool, which resets or replaces it; its slot goes to a waiter, if any."""
        self._return_to_pool(conn)
        self._free_slot()

    def _return_to_pool(self, conn: asyncpg.Connection) -> None:
        task = asyncio.get_running_loop().create_task(self._pool.release(conn))
        self._returning.add(task)
        task.add_done_callback(self._returning.discard)

    def _free_slot(self) -> None:
        self._borrowed -= 1
        self._pass_slot()

    def _pass_slot(self) -> None:
        """Lets the longest waiting caller borrow a connection of its own, if any waits."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._borrowed += 1
                waiter.set_result(None)
                return


def _usable(conn: asyncpg.Connection) -> bool:
    """False once the connection closed while idle (the server ended it, say): the pool
    then takes it back on its own, and any call on it raises InterfaceError."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False
