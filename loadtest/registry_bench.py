"""GetSite and ListSites under 64 concurrent calls, next to a bare grpc.aio echo server.

Usage: python -m loadtest.registry_bench [--seconds 10] [--rounds 3] [--concurrency 64]
       [--clients 2]

Starts, each in its own process: ``openvpp serve`` on a fresh embedded PostgreSQL in a
temporary directory (with authentication and the database, as deployed), and a bare
grpc.aio server that echoes a GetSiteRequest back. Then, from separate client processes
using the generated stubs, runs each phase for a bounded time and prints throughput and
p50/p95/p99 latency for echo, GetSite and ListSites, and each one's ratio to echo.
The goal of the foundation issue: GetSite >= 0.5 x echo throughput, p99 < 50 ms.
Also prints each server process's CPU per call (over whole phases, warm-up included),
which says where a ratio comes from better than the throughput alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
from openvpp.v1 import site_registry_pb2 as pb
from openvpp.v1 import site_registry_pb2_grpc

import openvpp_client
from service.cli import run_event_loop

ECHO_METHOD = "/openvpp.bench.Echo/Echo"
SITES = 500
LIST_PAGE_SIZE = 50


# --- the bare echo server ----------------------------------------------------------------


async def _echo(request: pb.GetSiteRequest, _context: Any) -> pb.GetSiteRequest:
    return request


async def _serve_echo() -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "openvpp.bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                _echo,
                request_deserializer=pb.GetSiteRequest.FromString,
                response_serializer=pb.GetSiteRequest.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"echo serving on port {port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


# --- the load -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    name: str
    port: int
    token: str
    site_ids: list[str]


def _make_call(phase: Phase, channel: grpc.aio.Channel) -> Callable[[], Awaitable[Any]]:
    metadata = (("authorization", f"Bearer {phase.token}"),)
    if phase.name == "echo":
        echo = channel.unary_unary(
            ECHO_METHOD,
            request_serializer=pb.GetSiteRequest.SerializeToString,
            response_deserializer=pb.GetSiteRequest.FromString,
        )
        request = pb.GetSiteRequest(site_id=phase.site_ids[0])
        return lambda: echo(request)
    registry = site_registry_pb2_grpc.SiteRegistryStub(channel)
    if phase.name == "GetSite":
        requests = [pb.GetSiteRequest(site_id=site_id) for site_id in phase.site_ids]
        return lambda: registry.GetSite(random.choice(requests), metadata=metadata)
    list_request = pb.ListSitesRequest(page_size=LIST_PAGE_SIZE)
    return lambda: registry.ListSites(list_request, metadata=metadata)


async def _load(
    phase: Phase, concurrency: int, seconds: float, warmup: float
) -> tuple[list[float], int]:
    """Latencies (s) of calls that began in the measured window, after a warm-up, and the
    number of calls made in all (warm-up included)."""
    latencies: list[float] = []
    completed = 0
    errors = 0
    # The token as per-call metadata and no retry policy: a plain insecure channel, so the
    # measured calls pay for no interceptor and a failure is counted, not retried.
    async with openvpp_client.aio_channel(f"127.0.0.1:{phase.port}", retry=None) as channel:
        call = _make_call(phase, channel)
        start = time.perf_counter()
        measure_from = start + warmup
        end = measure_from + seconds

        async def worker() -> None:
            nonlocal errors, completed
            while True:
                began = time.perf_counter()
                if began >= end:
                    return
                try:
                    await call()
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                completed += 1
                if began >= measure_from:
                    latencies.append(time.perf_counter() - began)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    if errors:
        raise SystemExit(f"{phase.name}: {errors} calls failed")
    return latencies, completed


def _client(phase: Phase, concurrency: int, seconds: float, warmup: float, out: Any) -> None:
    out.send(run_event_loop(_load(phase, concurrency, seconds, warmup)))


def run_phase(
    phase: Phase, concurrency: int, clients: int, seconds: float, warmup: float
) -> tuple[list[float], int]:
    """Latencies of ``seconds`` of ``concurrency`` calls in flight over ``clients`` processes."""
    context = multiprocessing.get_context("spawn")
    pipes = []
    processes = []
    for index in range(clients):
        share = concurrency // clients + (1 if index < concurrency % clients else 0)
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(
            target=_client, args=(phase, share, seconds, warmup, sender), daemon=True
        )
        process.start()
        pipes.append(receiver)
        processes.append(process)
    latencies: list[float] = []
    completed = 0
    for receiver in pipes:
        measured, made = receiver.recv()
        latencies += measured
        completed += made
    for process in processes:
        process.join()
    return latencies, completed


def summary(latencies: list[float], seconds: float) -> dict[str, float]:
    quantiles = statistics.quantiles(sorted(latencies), n=100, method="inclusive")
    return {
        "calls": len(latencies),
        "throughput": len(latencies) / seconds,
        "p50_ms": quantiles[49] * 1000,
        "p95_ms": quantiles[94] * 1000,
        "p99_ms": quantiles[98] * 1000,
    }


# --- servers as subprocesses --------------------------------------------------------------


def _start(
    command: list[str], pattern: str, env: dict[str, str]
) -> tuple[subprocess.Popen[str], list[str]]:
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if re.search(pattern, line):
            return process, lines
    process.kill()
    raise SystemExit(f"{command[0]} did not start:\n" + "\n".join(lines))


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


async def _seed(port: int, token: str, count: int) -> list[str]:
    # Seeding is not measured: the client helper adds the token and retries what may be.
    async with openvpp_client.aio_channel(f"127.0.0.1:{port}", token) as channel:
        registry = site_registry_pb2_grpc.SiteRegistryStub(channel)
        ids = []
        for index in range(count):
            response = await registry.CreateSite(
                pb.CreateSiteRequest(
                    name=f"bench site {index}",
                    location=pb.Location(address="Dok Noord, Gent", country="BE"),
                    supply_points=[
                        pb.SupplyPoint(
                            grid_identifier=_ean18(index),
                            direction=pb.SUPPLY_POINT_DIRECTION_BIDIRECTIONAL,
                        )
                    ],
                ),
            )
            ids.append(response.site.id)
        return ids


def _cpu_seconds(pid: int) -> float:
    """User and system CPU of one server process (its database, if any, runs elsewhere)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _ean18(index: int) -> str:
    body = f"54144882{index:09d}"
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(body)))
    return body + str((10 - total % 10) % 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="measured time per phase, over all rounds"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the phases")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured time per round")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        run_event_loop(_serve_echo())
        return

    home = Path(tempfile.mkdtemp(prefix="openvpp-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENVPP_")}
    env.update(
        OPENVPP_DATA_DIR=str(home / "data"),
        OPENVPP_GRPC_ADDRESS="127.0.0.1:0",
        OPENVPP_LOG_LEVEL="WARNING",
    )
    openvpp = str(Path(sys.executable).parent / "openvpp")
    servers: list[subprocess.Popen[str]] = []
    try:
        # A fresh data dir: serve's first start prints its token after the serving line.
        serve, lines = _start([openvpp, "serve"], r"API token", env)
        servers.append(serve)
        port = int(re.findall(r"\(port (\d+)\)", "\n".join(lines))[0])
        token = next(line.rsplit(" ", 1)[1] for line in lines if "API token" in line)
        echo, echo_lines = _start(
            [sys.executable, "-m", "loadtest.registry_bench", "--echo-server"],
            r"echo serving on port \d+",
            env,
        )
        servers.append(echo)
        echo_port = int(echo_lines[-1].rsplit(" ", 1)[1])
        site_ids = run_event_loop(_seed(port, token, SITES))

        # Phases alternate over several rounds, so a machine whose speed drifts (shared
        # CPUs) slows every phase alike instead of skewing the ratios.
        targets = {"echo": (echo_port, echo), "GetSite": (port, serve), "ListSites": (port, serve)}
        latencies: dict[str, list[float]] = {name: [] for name in targets}
        # CPU of the server process over whole phases, per call made (warm-up included).
        server_cpu: dict[str, float] = dict.fromkeys(targets, 0.0)
        all_calls: dict[str, int] = dict.fromkeys(targets, 0)
        share = args.seconds / args.rounds
        for _ in range(args.rounds):
            for name, (target, server) in targets.items():
                phase = Phase(name, target, token, site_ids)
                before = _cpu_seconds(server.pid)
                measured, made = run_phase(
                    phase, args.concurrency, args.clients, share, args.warmup
                )
                server_cpu[name] += _cpu_seconds(server.pid) - before
                all_calls[name] += made
                latencies[name] += measured
        results = {name: summary(values, args.seconds) for name, values in latencies.items()}
        for name, figures in results.items():
            figures["server_cpu_us_per_call"] = server_cpu[name] / all_calls[name] * 1e6
    finally:
        for server in servers:
            _stop(server)
        shutil.rmtree(home, ignore_errors=True)

    echo_rate = results["echo"]["throughput"]
    print(
        f"\n{args.concurrency} concurrent calls from {args.clients} client process(es), "
        f"{args.seconds:g} s per phase in {args.rounds} alternating rounds "
        f"(each after {args.warmup:g} s warm-up), "
        f"{os.cpu_count()} CPUs shared by clients, servers and PostgreSQL; "
        f"ListSites pages of {LIST_PAGE_SIZE} of {SITES} sites\n"
    )
    print(
        f"{'phase':<10} {'calls/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'x echo':>7} "
        f"{'server CPU us/call':>19}"
    )
    for name, figures in results.items():
        print(
            f"{name:<10} {figures['throughput']:>9.0f} {figures['p50_ms']:>8.2f} "
            f"{figures['p95_ms']:>8.2f} {figures['p99_ms']:>8.2f} "
            f"{figures['throughput'] / echo_rate:>7.2f} "
            f"{figures['server_cpu_us_per_call']:>19.0f}"
        )
    get_site = results["GetSite"]
    ratio = get_site["throughput"] / echo_rate
    print(
        f"\ngoal GetSite >= 0.5 x echo: {ratio:.3f} ({'met' if ratio >= 0.5 else 'NOT met'}); "
        f"p99 < 50 ms: {get_site['p99_ms']:.1f} ms "
        f"({'met' if get_site['p99_ms'] < 50 else 'NOT met'})"
    )
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
