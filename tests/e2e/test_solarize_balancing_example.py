"""examples/solarize_balancing.py runs as a reader would run it, against a real server."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from service.app import Service
from service.auth.principal import Role
from tests.conftest import MakeOrg

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "solarize_balancing.py"


async def test_solarize_balancing_example(service: Service, make_org: MakeOrg) -> None:
    partner = await make_org(Role.PARTNER)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--quarters",
        "96",
        env={
            **os.environ,
            "OPENVPP_ADDRESS": f"127.0.0.1:{service.port}",
            "OPENVPP_TOKEN": partner.token,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output_bytes, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    output = output_bytes.decode()
    assert process.returncode == 0, output
    assert "Businesspark, SITE_TYPE_BALANCED_ACCURATE" in output
    assert "readings: 193 accepted, 0 rejected" in output
    assert "RunBalancing: 96 balanced, 0 incomplete" in output
    # The day's 96 quarter-hours, each with a row from the PV and one from GRID; the rest of
    # January has no balances yet. 250 Wh a quarter-hour = 24,000 Wh, shared + grid.
    line = next(line for line in output.splitlines() if line.startswith("4. "))
    assert "192 rows (192 complete)" in line
    shared = int(line.split(" Wh from PV0001")[0].rsplit(" ", 1)[1])
    grid = int(line.split(" Wh from GRID")[0].rsplit(" ", 1)[1])
    assert shared + grid == 96 * 250
    assert 0 < shared < 96 * 250
    assert "96/96 intervals complete" in output
    assert "deleted site" in output
