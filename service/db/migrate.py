"""Plain ordered SQL migrations, applied once each and recorded in ``schema_migrations``.

Replicas starting together serialize on an advisory lock, so each file runs exactly once.
A file that changed after it was applied stops the service: history is append-only; so does
a new file numbered before one already applied (fresh and existing databases would then
have applied them in different orders). A database migrated by a newer release is used
with a warning: during a rolling upgrade the older replicas run on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from importlib import resources

import asyncpg

from service.db.database import SESSION_SETTINGS

log = logging.getLogger(__name__)

# Arbitrary constant: the advisory lock key that serializes migrations across replicas.
MIGRATION_LOCK_KEY = 0x0FE7_7A11


class MigrationError(RuntimeError):
    """The database cannot be migrated by this code; the message says why, in one line."""


class MigrationChangedError(MigrationError):
    """An applied migration's file differs from what was applied: history is append-only."""


@dataclass(frozen=True)
class Migration:
    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    folder = resources.files("service.db") / "migrations"
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".sql")),
        key=lambda entry: entry.name,
    )
    return [Migration(entry.name.removesuffix(".sql"), entry.read_text()) for entry in files]


async def migrate_database(dsn: str, *, report: bool = True) -> list[str]:
    """Applies pending migrations on a connection of their own, without a command timeout:
    a replica waits for another's migrations (the lock) however long they take, and a
    migration's statements take what they take. On a pool connection, with the pool's
    command timeout, a replica starting beside a long migration died after that timeout,
    and a migration longer than it could never be applied by ``serve``."""
    conn = await asyncpg.connect(dsn, server_settings=SESSION_SETTINGS)
    try:
        return await migrate(conn, report=report)
    finally:
        await conn.close()


async def migrate(conn: asyncpg.Connection, *, report: bool = True) -> list[str]:
    """Applies pending migrations in order; returns the versions applied now.

    With ``report``, one INFO line names what was applied (nothing when nothing was); the
    ``migrate`` command reports on stdout itself.
    """
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_KEY):
        # A start that waits in silence looks hung.
        log.info("waiting for another replica's migrations to finish")
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    text PRIMARY KEY,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        applied = {
            row["version"]: row["checksum"]
            for row in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        migrations = load_migrations()
        known = {migration.version for migration in migrations}
        newer = sorted(version for version in applied if version not in known)
        if newer:
            log.warning(
                "the database has migrations this release does not know (%s): it was migrated"
                " by a newer release, and is used as it is (as during a rolling upgrade)",
                ", ".join(newer),
            )
        latest = max(applied, default="")
        done: list[str] = []
        for migration in migrations:
            recorded = applied.get(migration.version)
            if recorded is not None:
                if recorded != migration.checksum:
                    raise MigrationChangedError(
                        f"migration {migration.version} changed after it was applied; "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            if migration.version < latest:
                raise MigrationError(
                    f"migration {migration.version} is not applied, but {latest} after it is;"
                    " number a new migration after the latest applied one"
                )
            async with conn.transaction():
                try:
                    await conn.execute(migration.sql)
                except asyncpg.PostgresError as error:
                    raise MigrationError(
                        f"migration {migration.version} failed, nothing of it was applied:"
                        f" {type(error).__name__}: {error}"
                    ) from error
                await conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                    migration.version,
                    migration.checksum,
                )
            log.debug("applied migration %s", migration.version)
            done.append(migration.version)
        if done and report:
            log.info("applied %d migration(s): %s", len(done), ", ".join(done))
        return done
    finally:
        # On a lost connection the lock went with its session: the error that lost it, not
        # the unlock's, is the one to report.
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
