"""The README's walkthrough, pasted in order into a shell against a fresh ``openvpp serve``.

Blocks fenced as ```` ```sh walkthrough ```` run in one bash session (shared variables, as a
reader's terminal), from the root of the clone, with ``TOKEN`` taken from serve's first-start
banner; the only changes are the server's address (a free port instead of 50051) and the
path of the venv. A command that fails fails the test, and every ``# → text`` line must
appear in its block's output.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.app import Service
from service.auth.principal import Role
from service.identifiers.grid import InvalidGridIdentifier, parse_grid_identifier
from tests.conftest import MakeOrg
from tests.e2e.conftest import Serve, environment

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
WALKTHROUGH_BLOCK = re.compile(r"^```sh walkthrough\n(.*?)^```$", re.MULTILINE | re.DOTALL)
EXPECTED = re.compile(r"^# → (.*)$", re.MULTILINE)
README_ADDRESS = "127.0.0.1:50051"
VENV_BIN = f"{Path(sys.executable).parent}/"


def walkthrough_blocks() -> list[str]:
    return WALKTHROUGH_BLOCK.findall(README)


def test_the_walkthrough_runs_as_written(data_dir: Path) -> None:
    blocks = walkthrough_blocks()
    assert len(blocks) >= 8, "the README lost its walkthrough blocks"
    text = "\n".join(blocks)
    for call in (
        "SiteRegistry/CreateSite",
        "SiteRegistry/CreateResource",
        "UpstreamRegistry/CreateUpstreamSite",
        "UpstreamRegistry/CreateContract",
        "UpstreamRegistry/AgreeContract",
        "MeterRegistry/CreateMeter",
        "Telemetry/IngestReadings",
        "Telemetry/ListReadings",
    ):
        assert call in text, f"the walkthrough no longer calls {call}"

    server = Serve(data_dir)
    try:
        token = server.bootstrap_token
        assert token is not None
        address = f"127.0.0.1:{server.port}"
        script = ["set -euo pipefail", "exec 2>&1"]
        for index, block in enumerate(blocks):
            # The venv running the tests stands in for the clone's .venv (the same one under
            # ./scripts/test).
            pasted = block.replace(README_ADDRESS, address).replace(".venv/bin/", VENV_BIN)
            script += [f"echo '@@ block {index}'", pasted]
        env = environment(data_dir, TOKEN=token)
        result = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        server.kill()
    outputs = re.split(r"^@@ block \d+$", result.stdout, flags=re.MULTILINE)[1:]
    assert result.returncode == 0, f"block {len(outputs) - 1} failed:\n{outputs[-1:]}"
    assert len(outputs) == len(blocks)
    for index, (block, output) in enumerate(zip(blocks, outputs, strict=True)):
        for expected in EXPECTED.findall(block):
            assert expected in output, f"block {index} promised {expected!r}, printed:\n{output}"


def sample_identifiers() -> list[tuple[str, str]]:
    start = README.index("### Sample grid identifiers")
    section = README[start : README.index("\n## ", start)]
    rows = re.findall(r"^\| (\S[^|]*?) \| [^|]+ \| (`[^|]+`) \|$", section, re.MULTILINE)
    return [
        (country, sample)
        for country, samples in rows
        if country != "Country"
        for sample in re.findall(r"`([^`]+)`", samples)
    ]


def test_the_sample_table_covers_every_scheme() -> None:
    countries = {country for country, _ in sample_identifiers()}
    assert {"BE", "NL", "LU", "FR", "GB", "IE", "IT", "ES", "DE", "other or none"} <= countries


@pytest.mark.parametrize(("country", "sample"), sample_identifiers())
def test_each_sample_identifier_is_valid(country: str, sample: str) -> None:
    scheme_country = None if country == "other or none" else country
    assert parse_grid_identifier(sample, scheme_country) == sample
    # And it is a real check: one digit off breaks every scheme that has a check digit.
    if country in {"BE", "NL", "LU", "GB", "ES", "DE"}:
        last_digit = max(i for i, char in enumerate(sample) if char.isdigit())
        broken = (
            sample[:last_digit] + str((int(sample[last_digit]) + 1) % 10) + sample[last_digit + 1 :]
        )
        with pytest.raises(InvalidGridIdentifier):
            parse_grid_identifier(broken, scheme_country)


async def test_the_client_helper_example_runs(service: Service, make_org: MakeOrg) -> None:
    start = README.index("## Client helper")
    section = README[start : README.index("\n## ", start)]
    (example,) = re.findall(r"^```python\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    org = await make_org(Role.PARTNER)
    program = f"token = {org.token!r}\n" + example.replace(
        README_ADDRESS, f"127.0.0.1:{service.port}"
    )
    # A separate process: the blocking client must not stall this loop, which serves it.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        program,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, output.decode()
    assert output.decode() == "0\n"  # a new partner has no sites
