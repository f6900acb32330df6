"""End to end: ``openvpp serve``, ``migrate``, ``orgs`` and ``tokens`` as separate processes
on one data directory with embedded PostgreSQL, as an operator would run them."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from openvpp.v1 import site_registry_pb2 as pb
from openvpp.v1 import site_registry_pb2_grpc
from standardwebhooks import Webhook

from tests.e2e.conftest import Serve, cli, postgres_processes, refusal
from tests.helpers import site_request


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def eventually(condition: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def ok(result: Any) -> str:
    assert result.returncode == 0, result.stderr
    return str(result.stdout)


def test_serve_cli_restart_and_shutdown(data_dir: Path) -> None:
    server = Serve(data_dir)
    try:
        token = server.bootstrap_token
        assert token is not None
        assert token.startswith("ovpp_")
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert (
                health.Check(health_pb2.HealthCheckRequest()).status
                == health_pb2.HealthCheckResponse.SERVING
            )
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            answer = next(
                reflection.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                )
            )
            names = {s.name for s in answer.list_services_response.service}
            assert {"openvpp.v1.SiteRegistry", "grpc.health.v1.Health"} <= names

            registry = site_registry_pb2_grpc.SiteRegistryStub(channel)
            site = registry.CreateSite(site_request("EAN1234567890"), metadata=bearer(token)).site

            # The CLI works beside the running server, on the same embedded database.
            assert "applied 0 migration(s)" in ok(cli(data_dir, "migrate"))
            org_line = ok(cli(data_dir, "orgs", "create", "acme", "--role", "partner"))
            org_id = org_line.split("\t")[0]
            assert org_line.strip().endswith("acme\tpartner")
            assert org_id in ok(cli(data_dir, "orgs", "list"))
            # Signing secrets beside the running server: shown, stable, rotated.
            secret = ok(cli(data_dir, "orgs", "signing-secret", org_id)).strip()
            assert secret.startswith("whsec_")
            Webhook(secret)
            assert ok(cli(data_dir, "orgs", "signing-secret", org_id)).strip() == secret
            rotated = ok(cli(data_dir, "orgs", "rotate-signing-secret", org_id)).strip()
            assert rotated.startswith("whsec_")
            assert rotated != secret
            assert ok(cli(data_dir, "orgs", "signing-secret", org_id)).strip() == rotated
            assert not [line for line in server.lines if secret in line or rotated in line]
            created = cli(data_dir, "tokens", "create", "--org", org_id)
            acme_token = ok(created).strip()
            acme_token_id = created.stderr.strip().rsplit(" ", 1)[1]
            listed = registry.ListSites(pb.ListSitesRequest(), metadata=bearer(acme_token))
            assert listed.total_size == 0  # a new partner sees none of the other's sites
            assert ok(cli(data_dir, "tokens", "revoke", acme_token_id)).startswith("revoked")
            assert eventually(
                lambda: (
                    code_of(
                        lambda: registry.ListSites(
                            pb.ListSitesRequest(), metadata=bearer(acme_token)
                        )
                    )
                    == grpc.StatusCode.UNAUTHENTICATED
                )
            )
            assert cli(data_dir, "tokens", "revoke", acme_token_id).returncode == 1
            # Listed with its state, never the token itself.
            [token_line] = ok(cli(data_dir, "tokens", "list", "--org", org_id)).splitlines()
            token_fields = token_line.split("\t")
            assert (token_fields[0], token_fields[2]) == (acme_token_id, "revoked")
            assert acme_token not in token_line
            assert cli(data_dir, "tokens", "list", "--org", site.id).returncode == 1
            assert cli(data_dir, "tokens", "create", "--org", site.id).returncode != 0
            supplier = ok(cli(data_dir, "orgs", "create", "s", "--role", "supplier"))
            supplier_token = ok(cli(data_dir, "tokens", "create", "--org", supplier.split()[0]))
            assert (
                code_of(
                    lambda: registry.ListSites(
                        pb.ListSitesRequest(), metadata=bearer(supplier_token.strip())
                    )
                )
                == grpc.StatusCode.PERMISSION_DENIED
            )
        assert postgres_processes(data_dir)
        assert server.stop(signal.SIGTERM) == 0
        assert "shutting down" in server.lines
    finally:
        server.kill()
    assert not postgres_processes(data_dir), "the embedded database must be stopped"

    # Without a server running, the CLI starts and stops the embedded database itself.
    offline_token = ok(cli(data_dir, "tokens", "create", "--org", org_id)).strip()
    assert ok(cli(data_dir, "orgs", "signing-secret", org_id)).strip() == rotated
    rotated_offline = ok(cli(data_dir, "orgs", "rotate-signing-secret", org_id)).strip()
    assert rotated_offline not in (secret, rotated)
    missing = cli(data_dir, "orgs", "rotate-signing-secret", str(uuid.uuid4()))
    assert missing.returncode == 1
    assert "no organization" in missing.stderr
    assert missing.stdout == ""
    assert cli(data_dir, "orgs", "signing-secret", str(uuid.uuid4())).returncode == 1
    assert not postgres_processes(data_dir)

    restarted = Serve(data_dir)
    try:
        assert restarted.bootstrap_token is None  # only on the first start
        with grpc.insecure_channel(f"127.0.0.1:{restarted.port}") as channel:
            registry = site_registry_pb2_grpc.SiteRegistryStub(channel)
            again = registry.GetSite(pb.GetSiteRequest(site_id=site.id), metadata=bearer(token))
            assert again.site == site
            listed = registry.ListSites(pb.ListSitesRequest(), metadata=bearer(offline_token))
            assert listed.total_size == 0
            assert (
                code_of(
                    lambda: registry.ListSites(pb.ListSitesRequest(), metadata=bearer(acme_token))
                )
                == grpc.StatusCode.UNAUTHENTICATED
            )
        assert restarted.stop(signal.SIGINT) == 0
    finally:
        restarted.kill()
    assert not postgres_processes(data_dir)


def test_migrate_on_a_fresh_data_dir(data_dir: Path) -> None:
    first = ok(cli(data_dir, "migrate"))
    assert "0001_identity" in first
    assert "0002_registry" in first
    assert ok(cli(data_dir, "migrate")).strip() == "applied 0 migration(s)"
    assert "default-partner" not in ok(
        cli(data_dir, "orgs", "list")
    )  # serve bootstraps, not migrate
    assert not postgres_processes(data_dir)


@pytest.mark.parametrize("name", ["", "   ", "x" * 201])
def test_org_name_is_checked_before_touching_the_database(name: str) -> None:
    from service.cli import main

    nowhere = "/nonexistent/never-created"
    args = ["--data-dir", nowhere, "orgs", "create", name, "--role", "partner"]
    with pytest.raises(SystemExit, match="1 to 200 characters"):
        main(args)
    assert not Path(nowhere).exists()


def test_serve_refuses_settings_that_would_stall_delivery_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.cli import main

    monkeypatch.setenv("OPENVPP_DISPATCH_POLL_INTERVAL_SECONDS", "0")
    monkeypatch.setenv("OPENVPP_DISPATCH_MAX_IN_FLIGHT", "0")
    monkeypatch.setenv("OPENVPP_DISPATCH_TIMEOUT_SECONDS", "0")
    nowhere = "/nonexistent/never-created"
    with pytest.raises(SystemExit) as stopped:
        main(["--data-dir", nowhere, "serve"])
    message = str(stopped.value)
    for named in (
        "OPENVPP_DISPATCH_POLL_INTERVAL_SECONDS must be > 0",
        "OPENVPP_DISPATCH_MAX_IN_FLIGHT must be >= 1",
        "OPENVPP_DISPATCH_TIMEOUT_SECONDS must be > 0",
    ):
        assert named in message
    assert "Traceback" not in message
    assert not Path(nowhere).exists()


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["migrate"], {"OPENVPP_LOG_LEVEL": "verbose"}),
        (["--log-level", "verbose", "orgs", "list"], {}),
        (["serve"], {"OPENVPP_LOG_LEVEL": "verbose"}),
    ],
)
def test_an_unknown_log_level_stops_any_command_with_one_line(
    data_dir: Path, args: list[str], env: dict[str, str]
) -> None:
    never_created = data_dir / "db"
    line = refusal(cli(never_created, *args, env=env))
    assert "OPENVPP_LOG_LEVEL" in line
    assert "--log-level" in line
    assert "DEBUG, INFO, WARNING, ERROR" in line
    assert "'verbose'" in line
    assert not never_created.exists()


@pytest.mark.parametrize("command", [["migrate"], ["orgs", "list"], ["serve"]])
def test_a_setting_serve_would_refuse_stops_every_command_with_one_line(
    data_dir: Path, command: list[str]
) -> None:
    never_created = data_dir / "db"
    broken = {"OPENVPP_DB_POOL_MAX_SIZE": "0", "OPENVPP_WATCH_BUFFER_SIZE": "0"}
    line = refusal(cli(never_created, *command, env=broken))
    assert "OPENVPP_DB_POOL_MAX_SIZE must be >= 1" in line
    assert "OPENVPP_WATCH_BUFFER_SIZE must be >= 1" in line
    assert not never_created.exists()


def test_serve_refuses_a_pool_minimum_above_its_maximum_before_starting_anything(
    data_dir: Path,
) -> None:
    never_created = data_dir / "db"
    sizes = {"OPENVPP_DB_POOL_MIN_SIZE": "5", "OPENVPP_DB_POOL_MAX_SIZE": "2"}
    line = refusal(cli(never_created, "serve", env=sizes))
    assert "OPENVPP_DB_POOL_MIN_SIZE must be <= OPENVPP_DB_POOL_MAX_SIZE (5 > 2)" in line
    assert not never_created.exists()


def test_serve_refuses_a_port_beyond_65535_before_starting_anything(data_dir: Path) -> None:
    never_created = data_dir / "db"
    line = refusal(cli(never_created, "serve", "--grpc-address", "127.0.0.1:99999"))
    assert "OPENVPP_GRPC_ADDRESS (serve --grpc-address)" in line
    assert "99999" in line
    assert not never_created.exists()


def test_serve_on_an_address_it_cannot_bind_stops_with_one_line_and_creates_nothing(
    data_dir: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for address in (f"127.0.0.1:{port}", "no-such-host.invalid:50051"):
            result = cli(data_dir, "serve", "--grpc-address", address)
            assert result.returncode == 1, result.stderr
            assert "Traceback" not in result.stderr
            # gRPC core may log its own reason (one E line) before ours, which ends stderr.
            last = result.stderr.splitlines()[-1]
            assert f"cannot listen on {address!r}" in last
            assert "--grpc-address" in last
            assert "OPENVPP_GRPC_ADDRESS" in last
            assert not postgres_processes(data_dir), "the embedded database must be stopped"

    # The failed starts created no bootstrap partner: the first start that serves does.
    server = Serve(data_dir)
    try:
        assert server.bootstrap_token is not None
        assert server.stop(signal.SIGTERM) == 0
    finally:
        server.kill()


def test_an_org_name_of_bytes_that_are_not_utf8_is_refused_before_the_database(
    data_dir: Path,
) -> None:
    never_created = data_dir / "db"
    # What the shell passes for $'Soci\xe9t\xe9' (Latin-1): Python decodes it to surrogates.
    latin1 = os.fsdecode(b"Soci\xe9t\xe9")
    line = refusal(cli(never_created, "orgs", "create", latin1, "--role", "partner"))
    assert line.startswith("organization name must be valid UTF-8")
    assert not never_created.exists()


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("Volt\tSupply", "must not contain tab, line feed, carriage return"),
        ("Volt\nSupply", "must not contain tab, line feed, carriage return"),
        ("Volt\rSupply", "must not contain tab, line feed, carriage return"),
        ("Volt\x00Supply", "must not contain NUL"),
        ("Volt\x1bSupply", "must not contain control characters"),
        ("Soci\udce9t\udce9", "must be valid UTF-8"),
    ],
)
def test_org_names_that_would_break_orgs_list_are_refused_before_the_database(
    data_dir: Path, name: str, rule: str
) -> None:
    from service.cli import main

    never_created = data_dir / "db"
    args = ["--data-dir", str(never_created), "orgs", "create", name, "--role", "partner"]
    with pytest.raises(SystemExit, match=f"^organization name {re.escape(rule)}"):
        main(args)
    assert not never_created.exists()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("command", [["migrate"], ["orgs", "list"], ["serve"]])
@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("foo", "OPENVPP_DATABASE_URL (--database-url) is not a URL"),
        ("postgresql://nobody:s3cret@127.0.0.1:{port}/openvpp", "nobody:***@127.0.0.1"),
        ("postgresql://nobody@127.0.0.1:{port}/openvpp?password=s3cret", "?password=***"),
    ],
)
def test_a_database_a_command_cannot_use_is_one_line_naming_it(
    data_dir: Path, command: list[str], url: str, shown: str
) -> None:
    """An unreadable URL or nothing listening: asyncpg's traceback, and the URL's password
    in it, was all the operator got."""
    url = url.format(port=closed_port())
    line = refusal(cli(data_dir, "--database-url", url, *command))
    assert line.startswith("cannot use the database at " if "://" in url else shown)
    assert "s3cret" not in line
    assert shown in line


def test_an_empty_database_url_flag_is_refused_not_taken_for_none(data_dir: Path) -> None:
    """It overrode OPENVPP_DATABASE_URL with nothing and started an embedded database."""
    url = f"postgresql://nobody@127.0.0.1:{closed_port()}/openvpp"
    result = cli(data_dir, "--database-url", "", "orgs", "list", env={"OPENVPP_DATABASE_URL": url})
    assert result.returncode == 2, result.stderr
    assert "--database-url: must be a PostgreSQL URL" in result.stderr
    assert list(data_dir.iterdir()) == []  # no embedded database was made


def test_a_data_directory_that_is_a_file_is_one_line_naming_it(data_dir: Path) -> None:
    not_a_directory = data_dir / "not-a-directory"
    not_a_directory.write_text("")
    line = refusal(cli(not_a_directory, "orgs", "list"))
    assert line.startswith(f"cannot use the embedded PostgreSQL under {not_a_directory}: ")


def test_a_changed_applied_migration_stops_migrate_with_one_line_naming_it(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.cli import main
    from service.db import migrate as migrate_module

    assert main(["--database-url", database_url, "migrate"]) == 0
    applied = migrate_module.load_migrations()
    edited = migrate_module.Migration(applied[0].version, applied[0].sql + "\n-- edited\n")
    monkeypatch.setattr(migrate_module, "load_migrations", lambda: [edited, *applied[1:]])
    with pytest.raises(SystemExit) as stopped:
        main(["--database-url", database_url, "migrate"])
    assert str(stopped.value.code) == (
        f"migration {applied[0].version} changed after it was applied; add a new migration"
        " instead of editing an applied one"
    )


@pytest.mark.parametrize("command", [["migrate"], ["orgs", "list"]])
@pytest.mark.parametrize(
    "url", ["postgresql://u:s3cret@host:abc/db", "postgresql://u:s3cret@[::1/db"]
)
def test_a_database_url_that_cannot_be_read_is_one_line_before_anything_starts(
    data_dir: Path, command: list[str], url: str
) -> None:
    never_created = data_dir / "db"
    line = refusal(cli(never_created, "--database-url", url, *command))
    assert line.startswith("OPENVPP_DATABASE_URL (--database-url) is not a URL")
    assert "s3cret" not in line
    assert not never_created.exists()


def test_an_empty_data_dir_flag_is_refused_rather_than_taken_for_the_current_directory(
    data_dir: Path,
) -> None:
    result = cli(data_dir, "--data-dir", "", "migrate")
    assert result.returncode == 2
    assert "argument --data-dir: must name a directory" in result.stderr
    assert "Traceback" not in result.stderr
