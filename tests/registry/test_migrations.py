"""Migrations: each file runs exactly once, also from replicas starting together, in one
order everywhere, and what stops them says why in one line."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from service.app import Service
from service.db import database as database_module
from service.db import migrate as migrate_module
from service.db.migrate import (
    MIGRATION_LOCK_KEY,
    Migration,
    MigrationError,
    load_migrations,
    migrate,
)
from tests.conftest import test_settings as settings_for_tests
from tests.helpers import eventually


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


def with_extra(*extra: Migration) -> Callable[[], list[Migration]]:
    shipped = load_migrations()
    return lambda: sorted([*shipped, *extra], key=lambda migration: migration.version)


async def test_a_new_file_numbered_before_an_applied_one_is_refused(
    fresh_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Applied after the later ones here, but in number order on a fresh database: the two
    would then have different histories."""
    latest = load_migrations()[-1].version
    late = Migration("0008_added_late", "CREATE TABLE added_late (id int)")
    monkeypatch.setattr(migrate_module, "load_migrations", with_extra(late))
    conn = await asyncpg.connect(fresh_database)
    try:
        with pytest.raises(MigrationError) as refused:
            await migrate(conn)
        assert str(refused.value) == (
            f"migration 0008_added_late is not applied, but {latest} after it is; number a"
            " new migration after the latest applied one"
        )
        assert await conn.fetchval("SELECT to_regclass('added_late')") is None
        # The lock went back: another session (advisory locks are re-entrant in their own)
        # can take it.
        other = await asyncpg.connect(fresh_database)
        try:
            assert await other.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_KEY)
        finally:
            await other.close()
    finally:
        await conn.close()


async def test_a_failing_migration_is_named_and_leaves_nothing(
    fresh_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = Migration("0099_broken", "CREATE TABLE half_done (id int); SELECT 1 / 0")
    monkeypatch.setattr(migrate_module, "load_migrations", with_extra(broken))
    conn = await asyncpg.connect(fresh_database)
    try:
        with pytest.raises(MigrationError) as failed:
            await migrate(conn)
        assert str(failed.value) == (
            "migration 0099_broken failed, nothing of it was applied: DivisionByZeroError:"
            " division by zero"
        )
        assert await conn.fetchval("SELECT to_regclass('half_done')") is None
        assert not await conn.fetchval(
            "SELECT count(*) FROM schema_migrations WHERE version = '0099_broken'"
        )
    finally:
        await conn.close()


async def test_a_database_of_a_newer_release_is_used_with_a_warning(
    fresh_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """During a rolling upgrade the newer replicas migrate first; the older ones, starting
    again meanwhile, must still run."""
    conn = await asyncpg.connect(fresh_database)
    try:
        await conn.execute(
            "INSERT INTO schema_migrations (version, checksum) VALUES ('0099_newer', 'x')"
        )
        with caplog.at_level(logging.WARNING, logger="service.db.migrate"):
            assert await migrate(conn) == []
        [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert "migrations this release does not know (0099_newer)" in warning
    finally:
        await conn.close()


async def test_a_replica_waiting_for_anothers_migrations_says_so(
    fresh_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    holder = await asyncpg.connect(fresh_database)
    waiter = await asyncpg.connect(fresh_database)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        with caplog.at_level(logging.INFO, logger="service.db.migrate"):
            waiting = asyncio.ensure_future(migrate(waiter))
            await eventually(
                lambda: any(
                    "waiting for another replica" in r.getMessage() for r in caplog.records
                ),
                "the waiting line",
            )
            assert not waiting.done()
            await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
            assert await asyncio.wait_for(waiting, 10) == []
    finally:
        await holder.close()
        await waiter.close()
