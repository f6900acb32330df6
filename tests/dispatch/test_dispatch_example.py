"""examples/dispatch_flow.py runs against a real server and its receiver verifies signatures."""

from __future__ import annotations

import asyncio
import sys

from service.auth.principal import Role
from tests.conftest import REPO_ROOT, Org
from tests.dispatch.conftest import Cluster, Flow


async def run_example(
    flow: Flow, operator: Org, partner: Org, supplier: Org, signing_secret: str
) -> tuple[int | None, str]:
    """examples/dispatch_flow.py against the replica: its exit code and output."""
    # A subprocess that this loop does not block on: the server runs on this loop.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO_ROOT / "examples" / "dispatch_flow.py"),
        "--address",
        f"127.0.0.1:{flow.replica.service.port}",
        "--token",
        operator.token,
        "--partner-token",
        partner.token,
        "--supplier-token",
        supplier.token,
        "--signing-secret",
        signing_secret,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        output, _ = await process.communicate()
    return process.returncode, output.decode()


async def test_the_dispatch_example_runs(cluster: Cluster) -> None:
    flow = Flow(await cluster.replica())
    operator, partner, supplier = await flow.parties()
    returncode, text = await run_example(
        flow, operator, partner, supplier, await flow.secret(partner)
    )
    assert returncode == 0, text
    assert "SETPOINT_STATE_ACCEPTED, 3.0 kW" in text
    assert "cancelled after acceptance; cancellation delivered" in text
    assert "every signature verified" in text


async def test_the_example_receiver_refuses_another_secret(cluster: Cluster) -> None:
    """Signed with the partner's secret, checked against another: the flow must fail."""
    flow = Flow(await cluster.replica(dispatch_max_attempts=1))
    operator, partner, supplier = await flow.parties()
    other = await flow.org(Role.PARTNER)
    returncode, text = await run_example(
        flow, operator, partner, supplier, await flow.secret(other)
    )
    assert returncode == 1, text
    assert "not accepted" in text
