"""Webhook transport benchmark: WebhookSender against a raw aiohttp client, same run.

Usage: python -m loadtest.webhook_bench [--deliveries 10000] [--concurrency 32] [--rounds 2]

1. Starts a receiver in a separate process (aiohttp on 127.0.0.1) that verifies every
   request's signature with ``standardwebhooks`` and answers 200 (or 400 when it fails).
2. In this process, alternating over ``--rounds``:
   - ``sender``: ``WebhookSender.send`` for each delivery (signing per attempt, address
     policy, breaker, per-host and global limits), ``--concurrency`` in flight;
   - ``raw``: one aiohttp session posting the same bodies with headers signed beforehand,
     ``--concurrency`` in flight behind one semaphore: the floor of what any sender costs.
3. Prints deliveries/s, latency p50/p99 of each phase and the sender/raw ratio.

It asserts nothing. Bounded: each phase stops at ``--time-limit`` seconds. The receiver and
this process share the machine's CPUs, so compare figures of the same run only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aiohttp
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from service.auth.signing import new_signing_secret
from service.cli import run_event_loop
from service.common.clock import SYSTEM_CLOCK
from service.dispatch.delivery import (
    Delivery,
    DeliverySettings,
    OutcomeKind,
    WebhookSender,
    signed_headers,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve_receiver(port: int, secret: str, ready: multiprocessing.synchronize.Event) -> None:
    webhook = Webhook(secret)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            webhook.verify(body, dict(request.headers), json_parse=False)
        except WebhookVerificationError:
            return web.Response(status=400)
        return web.Response(status=200)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/hook", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        ready.set()
        await asyncio.Event().wait()

    run_event_loop(main())


def bodies(count: int) -> list[bytes]:
    return [
        json.dumps(
            {
                "setpoint_id": str(uuid.uuid4()),
                "dispatch_id": str(uuid.uuid4()),
                "site_id": str(uuid.uuid4()),
                "resource_id": str(uuid.uuid4()),
                "power_kw": "-3.250",
                "start_time": "2026-12-01T10:00:00Z",
                "end_time": "2026-12-01T10:15:00Z",
                "valid_until": "2026-12-01T10:15:00Z",
            }
        ).encode()
        for _ in range(count)
    ]


async def bounded(
    items: int, concurrency: int, one: Callable[[int], Awaitable[bool]], limit: float
) -> tuple[float, list[float], int]:
    """Runs ``one(i)`` for every item, ``concurrency`` at a time; (seconds, latencies, failed)."""
    latencies: list[float] = []
    failed = 0
    next_item = 0
    deadline = time.monotonic() + limit

    async def lane() -> None:
        nonlocal next_item, failed
        while next_item < items and time.monotonic() < deadline:
            index = next_item
            next_item += 1
            started = time.perf_counter()
            ok = await one(index)
            latencies.append((time.perf_counter() - started) * 1000)
            failed += 0 if ok else 1

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, failed


def summary(name: str, seconds: float, latencies: list[float], failed: int) -> float:
    rate = len(latencies) / seconds
    cuts = statistics.quantiles(latencies, n=100)
    print(
        f"{name:>6}: {len(latencies):6d} in {seconds:6.2f} s = {rate:8.0f}/s  "
        f"p50 {cuts[49]:6.1f} ms  p99 {cuts[98]:6.1f} ms  failed {failed}",
        flush=True,
    )
    return rate


async def sender_phase(
    args: argparse.Namespace, deliveries: list[Delivery]
) -> tuple[float, list[float], int]:
    settings = DeliverySettings(
        allow_private_networks=True,
        max_concurrency=args.concurrency,
        max_concurrency_per_host=args.concurrency,
        breaker_failure_threshold=10**9,
    )
    async with WebhookSender(settings, SYSTEM_CLOCK) as sender:

        async def one(i: int) -> bool:
            outcome = await sender.send(deliveries[i])
            return outcome.kind is OutcomeKind.ACCEPTED

        return await bounded(len(deliveries), args.concurrency, one, args.time_limit)


async def raw_phase(
    args: argparse.Namespace, deliveries: list[Delivery]
) -> tuple[float, list[float], int]:
    now = datetime.now(UTC)
    presigned = [signed_headers(d, now) for d in deliveries]
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> bool:
            delivery = deliveries[i]
            async with session.post(
                delivery.url, data=delivery.body, headers=presigned[i]
            ) as response:
                await response.read()
                return response.status == 200

        return await bounded(len(deliveries), args.concurrency, one, args.time_limit)


async def run(args: argparse.Namespace, url: str, secret: str) -> None:
    deliveries = [
        Delivery(delivery_id=f"msg_{i}", url=url, body=body, signing_secrets=(secret,))
        for i, body in enumerate(bodies(args.deliveries))
    ]
    ratios = []
    for round_number in range(1, args.rounds + 1):
        print(f"round {round_number}", flush=True)
        ours = summary("sender", *await sender_phase(args, deliveries))
        theirs = summary("raw", *await raw_phase(args, deliveries))
        ratios.append(ours / theirs)
        print(f" ratio: {ours / theirs:.2f}", flush=True)
    print(f"sender/raw per round: {', '.join(f'{r:.2f}' for r in ratios)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per phase")
    args = parser.parse_args()

    port = free_port()
    secret = new_signing_secret()
    ready = multiprocessing.Event()
    receiver = multiprocessing.Process(target=serve_receiver, args=(port, secret, ready))
    receiver.start()
    try:
        if not ready.wait(30):
            raise SystemExit("receiver did not start")
        run_event_loop(run(args, f"http://127.0.0.1:{port}/hook", secret))
    finally:
        receiver.terminate()
        receiver.join(5)


if __name__ == "__main__":
    main()
