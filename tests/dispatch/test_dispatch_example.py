"""examples/dispatch_flow.py runs against a real server and its receiver verifies signatures."""

from __future__ import annotations

import asyncio
import sys

from service.auth.principal import Role
from tests.conftest import REPO_ROOT
from tests.dispatch.conftest import Cluster, Flow


async def test_the_dispatch_example_runs(cluster: Cluster) -> None:
    replica = await cluster.replica()
    flow = Flow(replica)
    operator, partner, supplier = (
        await flow.org(Role.OPERATOR),
        await flow.org(Role.PARTNER),
        await flow.org(Role.SUPPLIER),
    )
    # A subprocess that this loop does not block on: the server runs on this loop.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO_ROOT / "examples" / "dispatch_flow.py"),
        "--address",
        f"127.0.0.1:{replica.service.port}",
        "--token",
        operator.token,
        "--partner-token",
        partner.token,
        "--supplier-token",
        supplier.token,
        "--signing-secret",
        await flow.secret(partner),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        output, _ = await process.communicate()
    text = output.decode()
    assert process.returncode == 0, text
    assert "SETPOINT_STATE_ACCEPTED, 3.0 kW" in text
    assert "cancelled after acceptance; cancellation delivered" in text
    assert "every signature verified" in text


async def test_the_example_receiver_refuses_another_secret(cluster: Cluster) -> None:
    """Signed with the partner's secret, checked against another: the flow must fail."""
    replica = await cluster.replica(dispatch_max_attempts=1)
    flow = Flow(replica)
    operator, partner, other, supplier = (
        await flow.org(Role.OPERATOR),
        await flow.org(Role.PARTNER),
        await flow.org(Role.PARTNER),
        await flow.org(Role.SUPPLIER),
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO_ROOT / "examples" / "dispatch_flow.py"),
        "--address",
        f"127.0.0.1:{replica.service.port}",
        "--token",
        operator.token,
        "--partner-token",
        partner.token,
        "--supplier-token",
        supplier.token,
        "--signing-secret",
        await flow.secret(other),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        output, _ = await process.communicate()
    text = output.decode()
    assert process.returncode == 1, text
    assert "not accepted" in text
