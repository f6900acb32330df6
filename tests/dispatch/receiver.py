"""A real aiohttp webhook receiver on 127.0.0.1 for delivery tests.

Paths choose the answer: ``/status/<code>`` (optional ``?retry_after=<value>``), ``/slow``
(never answers before the client gives up), ``/hold`` (waits until the test opens the gate),
``/big`` (a 1 MiB body), ``/drop`` (closes the connection without answering), anything
else 200. Every request is recorded with its headers and
body, and the number of requests in flight (and its peak) is counted.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    port: int = 0
    scheme: str = "http"
    requests: list[Received] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Received(request.path, dict(request.headers), body))
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        parts = request.path.strip("/").split("/")
        if parts[0] == "status":
            headers = {}
            if "retry_after" in request.query:
                headers["Retry-After"] = request.query["retry_after"]
            if "location" in request.query:
                headers["Location"] = request.query["location"]
            return web.Response(status=int(parts[1]), headers=headers, text="answer")
        if parts[0] == "slow":
            await asyncio.sleep(30)
        if parts[0] == "hold":
            await self.gate.wait()
        if parts[0] == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if parts[0] == "big":
            return web.Response(body=b"x" * (1 << 20))
        return web.Response(status=200, text="ok")


@asynccontextmanager
async def running_receiver(ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Receiver]:
    receiver = Receiver(scheme="https" if ssl_context else "http")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    receiver.port = runner.addresses[0][1]
    try:
        yield receiver
    finally:
        receiver.gate.set()
        await runner.cleanup()
