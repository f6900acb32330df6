"""A partner's setpoint endpoint for the dispatch tests: a real aiohttp server on 127.0.0.1.

Every request's signature is verified with the ``standardwebhooks`` package against the
partner organizations' secrets (a tampered or unsigned request gets 401 and is counted in
``bad_signatures``). What it answers is up to the test (``answer``). It also checks that no
setpoint is being delivered twice at the same time (``overlaps``).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass(frozen=True)
class Received:
    webhook_id: str
    body: dict[str, Any]
    headers: dict[str, str]
    raw: bytes


# Answer to one verified request: an HTTP status (and optional headers), possibly after a wait.
Answer = Callable[[Received], Awaitable[int | tuple[int, dict[str, str]]]]


async def accept(_received: Received) -> int:
    return 200


@dataclass
class SetpointReceiver:
    secrets: list[str] = field(default_factory=list)
    answer: Answer = accept
    port: int = 0
    received: list[Received] = field(default_factory=list)
    bad_signatures: int = 0
    overlaps: int = 0
    answered: Counter[str] = field(default_factory=Counter)
    _active: Counter[str] = field(default_factory=Counter)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str = "/setpoints") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def trust(self, secret: str) -> None:
        self.secrets.append(secret)

    def verify(self, raw: bytes, headers: dict[str, str]) -> bool:
        for secret in self.secrets:
            try:
                Webhook(secret).verify(raw, headers)
                return True
            except WebhookVerificationError:
                continue
        return False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        if not self.verify(raw, headers):
            self.bad_signatures += 1
            return web.Response(status=401, text="bad signature")
        webhook_id = headers["webhook-id"]
        received = Received(webhook_id, json.loads(raw), headers, raw)
        self._active[webhook_id] += 1
        if self._active[webhook_id] > 1:
            self.overlaps += 1
        try:
            self.received.append(received)
            self._arrived.set()
            answer = await self.answer(received)
        finally:
            self._active[webhook_id] -= 1
        status, extra = answer if isinstance(answer, tuple) else (answer, {})
        if 200 <= status < 300:
            self.answered[webhook_id] += 1
        return web.Response(status=status, headers=extra, text="ok")

    def for_setpoint(self, setpoint_id: str) -> list[Received]:
        return [r for r in self.received if r.body["setpoint_id"] == setpoint_id]

    async def wait_for(self, count: int, within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while len(self.received) < count:
                self._arrived.clear()
                await self._arrived.wait()


@asynccontextmanager
async def running_receiver(answer: Answer = accept) -> AsyncIterator[SetpointReceiver]:
    receiver = SetpointReceiver(answer=answer)
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.port = runner.addresses[0][1]
    try:
        yield receiver
    finally:
        await runner.cleanup()
