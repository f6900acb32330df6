"""The real ``openvpp`` command in subprocesses, on a fresh data dir with embedded PostgreSQL."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

OPENVPP = str(Path(sys.executable).parent / "openvpp")
START_TIMEOUT = 60


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under pytest's tmp dir: see tests/conftest.py (mode 0700 resets).
    home = Path(tempfile.mkdtemp(prefix="openvpp-e2e-"))
    try:
        yield home
    finally:
        for process in postgres_processes(home):
            process.kill()
        shutil.rmtree(home, ignore_errors=True)


def environment(data_dir: Path, **overrides: str) -> dict[str, str]:
    # GRPC_*: the test process set gRPC core's (service/__init__.py); the command must itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENVPP_", "GRPC_"))}
    env.update(
        OPENVPP_DATA_DIR=str(data_dir),
        OPENVPP_GRPC_ADDRESS="127.0.0.1:0",
        OPENVPP_SHUTDOWN_GRACE_SECONDS="3",
        OPENVPP_HEALTH_INTERVAL_SECONDS="0.5",
        OPENVPP_LOG_LEVEL="WARNING",
    )
    env.update(overrides)
    return env


def cli(
    data_dir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``openvpp *args``; ``env`` adds to (or replaces) the harness's OPENVPP_* variables."""
    return subprocess.run(
        [OPENVPP, *args],
        env=environment(data_dir, **(env or {})),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a command stopped with: exit code 1, no traceback, nothing on stdout."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    return line


def postgres_processes(data_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.info["name"] == "postgres" and any(str(data_dir) in part for part in cmdline):
            found.append(process)
    return found


@dataclass
class Serve:
    """``openvpp serve`` in a subprocess; its stdout is collected line by line."""

    data_dir: Path
    # Extra environment of the command, e.g. OPENVPP_LOG_LEVEL="INFO".
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[str] = field(init=False)
    lines: list[str] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self.process = subprocess.Popen(
            [OPENVPP, "serve"],
            env=environment(self.data_dir, **self.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        match = self.wait_for(r"serving gRPC on .* \(port (\d+)\)")
        self.port = int(match.group(1))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.lines))

    @property
    def bootstrap_token(self) -> str | None:
        for line in self.lines:
            if "API token" in line:
                return line.rsplit(" ", 1)[1]
        return None

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        code = self.process.wait(timeout=START_TIMEOUT)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
