"""Typed ids make mypy refuse a site id where a meter id belongs (and the like)."""

from __future__ import annotations

import uuid
from pathlib import Path

from mypy import api

from service.identifiers.ids import MeterId, SiteId

ROOT = Path(__file__).resolve().parents[2]

MIXED_UP = """
from uuid import uuid4

from service.identifiers.ids import MeterId, SiteId
from service.registry.store import RegistryStore
from service.telemetry.meter_store import MeterStore


async def mixed_up(meters: MeterStore, sites: RegistryStore) -> None:
    site = SiteId(uuid4())
    meter = MeterId(uuid4())
    await meters.get(site)
    await sites.get_site(meter)
    await meters.get(meter)
    await sites.get_site(site)
"""


def test_mypy_refuses_one_id_for_another(tmp_path: Path) -> None:
    snippet = tmp_path / "mixed_up.py"
    snippet.write_text(MIXED_UP)
    out, err, status = api.run(
        [
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            str(snippet),
        ]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1, out + err
    assert len(errors) == 2, out
    assert 'Argument 1 to "get" of "MeterStore" has incompatible type "SiteId"' in errors[0]
    assert (
        'Argument 1 to "get_site" of "RegistryStore" has incompatible type "MeterId"' in (errors[1])
    )


def test_ids_are_plain_uuids_at_run_time() -> None:
    value = uuid.uuid4()
    assert SiteId(value) == MeterId(value) == value
    assert type(SiteId(value)) is uuid.UUID
