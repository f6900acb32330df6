"""Every script in examples/ runs, as a reader would run it, against a real server.

The scripts are separate processes (the address and the token from their arguments or the
environment) calling the session's service; each test uses organizations of its own.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from service.app import Service
from service.auth.principal import Role
from tests.conftest import MakeOrg

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def run_example(name: str, *args: str, **env: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / name),
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, output.decode()


def test_every_example_is_tested() -> None:
    scripts = {path.name for path in EXAMPLES.glob("*.py") if not path.name.startswith("_")}
    # dispatch_flow.py: tests/dispatch/test_dispatch_example.py (a database of its own, so
    # its receiver counts exactly this flow's deliveries).
    tested = {"powernaut_sites.py", "solarize_metering.py", "dispatch_flow.py"}
    assert scripts == tested, "a new example needs its test here"


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("powernaut_sites.py", ()),
        ("solarize_metering.py", ()),
        (
            "dispatch_flow.py",
            ("--partner-token", "p", "--supplier-token", "s", "--signing-secret", "whsec_AA=="),
        ),
    ],
)
async def test_an_example_with_no_server_at_its_address_says_what_to_check(
    name: str, args: tuple[str, ...]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before the example runs: nobody listens
    code, output = await run_example(name, "--address", f"127.0.0.1:{port}", "--token", "t", *args)
    assert code == 1, output
    assert output.startswith("UNAVAILABLE: "), output
    assert "is the service running there? Start it with ./scripts/serve" in output
    assert "Traceback" not in output


async def test_powernaut_sites_with_the_supplier_side(service: Service, make_org: MakeOrg) -> None:
    partner, supplier = await make_org(Role.PARTNER), await make_org(Role.SUPPLIER)
    address = f"127.0.0.1:{service.port}"
    code, output = await run_example(
        "powernaut_sites.py",
        "--address",
        address,
        "--supplier-token",
        supplier.token,
        OPENVPP_TOKEN=partner.token,
    )
    assert code == 0, output
    statuses = [line.split(": ", 1)[1] for line in output.splitlines() if ": status " in line]
    assert statuses == [
        "status SITE_STATUS_NO_RESOURCES, upstream_status UPSTREAM_STATUS_NO_UPSTREAM_REGISTERED",
        "status SITE_STATUS_ONBOARDED, upstream_status UPSTREAM_STATUS_NO_UPSTREAM_REGISTERED",
        "status SITE_STATUS_ONBOARDED, upstream_status UPSTREAM_STATUS_NO_CONTRACT",
        "status SITE_STATUS_ONBOARDED, upstream_status UPSTREAM_STATUS_CONTRACT_NEEDS_AGREEMENT",
        "status SITE_STATUS_ONBOARDED, upstream_status UPSTREAM_STATUS_CONTRACT_ACTIVE",
    ]
    assert "listed 1 of 1 site(s)" in output
    # It cleaned up, so it runs again (same EAN) without ALREADY_EXISTS.
    again, output = await run_example(
        "powernaut_sites.py", "--address", address, "--token", partner.token
    )
    assert again == 0, output
    assert "listed 1 of 1 site(s)" in output


async def test_solarize_metering(service: Service, make_org: MakeOrg) -> None:
    partner = await make_org(Role.PARTNER)
    code, output = await run_example(
        "solarize_metering.py",
        "--quarters",
        "8",
        OPENVPP_ADDRESS=f"127.0.0.1:{service.port}",
        OPENVPP_TOKEN=partner.token,
    )
    assert code == 0, output
    assert "Businesspark, SITE_TYPE_BALANCED_ACCURATE" in output
    assert "readings: 9 accepted, 0 duplicate, 0 rejected" in output
    # Eight quarter-hours of 250 Wh each, computed by the server from the registers.
    assert "ListReadings: 8 readings, 8 quarter-hours, 2000 Wh" in output
    assert "BALANCING_ROLE_PARTICIPANT from 2025-01-01, priority 1" in output
    assert "RunBalancing: 8 balanced, 0 incomplete" in output
    # The day's block: 8 balanced quarter-hours, the other 88 of the day incomplete.
    assert "as debitor: 96 rows (8 complete), 2000 Wh from GRID, 0 Wh shared" in output
    again, output = await run_example(
        "solarize_metering.py",
        "--quarters",
        "8",
        OPENVPP_ADDRESS=f"127.0.0.1:{service.port}",
        OPENVPP_TOKEN=partner.token,
    )
    assert again == 0, output
    assert "readings: 9 accepted" in output


async def test_an_example_without_a_token_says_so(service: Service) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENVPP_TOKEN"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "solarize_metering.py"),
        "--address",
        f"127.0.0.1:{service.port}",
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    _, errors = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 2
    assert "a token is needed: --token or OPENVPP_TOKEN" in errors.decode()
