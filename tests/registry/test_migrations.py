"""Migrations from replicas starting together: each file runs exactly once."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from service.app import Service
from service.db import database as database_module
from service.db.migrate import MIGRATION_LOCK_KEY, load_migrations, migrate
from tests.conftest import test_settings as settings_for_tests


async def test_concurrent_migrations_apply_each_file_once(database_url: str) -> None:
    name = f"openvpp_migrate_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(database_url)
    scratch = urlunsplit(parts._replace(path="/" + name))
    try:
        connections = [await asyncpg.connect(scratch) for _ in range(4)]
        try:
            applied = await asyncio.gather(*(migrate(conn) for conn in connections))
            versions = [m.version for m in load_migrations()]
            assert sorted(applied, key=len) == [[], [], [], versions]
            recorded = await connections[0].fetch(
                "SELECT version FROM schema_migrations ORDER BY version"
            )
            assert [row["version"] for row in recorded] == versions
            assert await migrate(connections[0]) == []
            # History is append-only: an applied file that changed stops the service.
            await connections[0].execute(
                "UPDATE schema_migrations SET checksum = 'edited' WHERE version = $1",
                versions[0],
            )
            try:
                await migrate(connections[1])
            except RuntimeError as error:
                message = str(error)
            else:
                message = ""
            assert "changed after it was applied" in message
        finally:
            for conn in connections:
                await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def test_a_replica_waits_for_another_ones_migrations_past_the_command_timeout(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serve migrated on a pool connection: waiting for the lock longer than the pool's
    command timeout (30 s) while another replica migrated, it died with a TimeoutError."""
    monkeypatch.setattr(database_module, "COMMAND_TIMEOUT_SECONDS", 0.5)
    service = Service(settings_for_tests(), database_url)
    holder = await asyncpg.connect(database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        starting = asyncio.ensure_future(service.start())
        await asyncio.sleep(1.5)  # three command timeouts
        assert not starting.done()
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        assert await asyncio.wait_for(starting, 30) == service.port > 0
    finally:
        await holder.close()
        await service.stop(grace=0)
