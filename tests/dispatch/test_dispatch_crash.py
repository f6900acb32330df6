"""``kill -9`` of a delivering server mid-delivery: after a restart every setpoint still
reaches a terminal state (the killed worker's leases expire and are claimed again)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
import time

import pytest
from openvpp.v1 import dispatch_pb2 as pb
from openvpp.v1 import site_registry_pb2 as site_pb

from tests.dispatch.conftest import Cluster, Flow
from tests.dispatch.setpoint_receiver import Received, running_receiver
from tests.e2e.conftest import OPENVPP, START_TIMEOUT

BATTERY = site_pb.RESOURCE_TYPE_STATIC_BATTERY
LEASE_SECONDS = 2


class ServeProcess:
    """``openvpp serve`` on the test's database, delivering setpoints."""

    def __init__(self, database_url: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENVPP_")}
        env.update(
            OPENVPP_DATABASE_URL=database_url,
            OPENVPP_GRPC_ADDRESS="127.0.0.1:0",
            OPENVPP_BOOTSTRAP="false",
            OPENVPP_LOG_LEVEL="WARNING",
            OPENVPP_WEBHOOK_ALLOW_PRIVATE_NETWORKS="true",
            OPENVPP_DISPATCH_LEASE_SECONDS=str(LEASE_SECONDS),
            OPENVPP_DISPATCH_POLL_INTERVAL_SECONDS="0.2",
            OPENVPP_DISPATCH_MAX_CONCURRENCY_PER_HOST="4",
            OPENVPP_DISPATCH_TIMEOUT_SECONDS="1",
        )
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [OPENVPP, "serve"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    async def serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if any(re.search(r"serving gRPC on", line) for line in self.lines):
                return
            if self.process.poll() is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError("serve did not start:\n" + "\n".join(self.lines))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.mark.timeout(120)
async def test_kill_9_mid_delivery_then_restart_settles_every_setpoint(
    cluster: Cluster,
) -> None:
    # Set-up and the dispatch go through a replica that does not deliver.
    api = await cluster.replica(dispatch_delivery_enabled=False)
    flow = Flow(api)
    operator, partner, supplier = await flow.parties()

    async def slow(_received: Received) -> int:
        await asyncio.sleep(0.3)
        return 200

    async with running_receiver(slow) as receiver:
        receiver.trust(await flow.secret(partner))
        for _ in range(6):
            await flow.site(partner, supplier, receiver.url(), resources=[(BATTERY, -5, 5)] * 5)
        server = ServeProcess(cluster.url)
        try:
            await server.serving()
            dispatch = (await flow.dispatch(operator)).dispatch
            assert dispatch.pending_count == 30
            await receiver.wait_for(4)  # deliveries under way
            server.kill()
            states = {s.state for s in await flow.setpoints(operator, dispatch.id)}
            assert pb.SETPOINT_STATE_DELIVERING in states  # claimed by the dead worker
            before_restart = len(receiver.received)
            assert before_restart < 30
            server = ServeProcess(cluster.url)
            await server.serving()
            settled = await flow.settle(operator, dispatch.id, within=60)
        finally:
            server.stop()
        assert {s.state for s in settled} == {pb.SETPOINT_STATE_ACCEPTED}
        every = {s.id for s in settled}
        assert set(receiver.answered) == every
        assert receiver.overlaps == 0
        assert receiver.bad_signatures == 0
