"""Shows what every asyncio task awaits when a test is about to time out.

pytest-timeout prints the threads' stacks, and in an asyncio test they say only that the loop
is waiting in ``select``. A test or teardown still running a few seconds before its timeout
has this plugin print each task of the running event loops and the chain of awaits it is
stuck in (a shutdown that hung in CI was found so). Read from a timer thread while the loop
runs: good enough for a failure report, which is the only time it prints.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
from collections.abc import Generator
from typing import Any

import pytest

# Printed this long before pytest-timeout ends the test.
AHEAD_OF_TIMEOUT_SECONDS = 5.0


def _awaits(task: asyncio.Task[Any]) -> list[str]:
    chain: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is not None:
            chain.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return chain


def dump_tasks(heading: str) -> None:
    out = sys.__stderr__
    if out is None:
        return
    loops = [
        found
        for found in gc.get_objects()
        if isinstance(found, asyncio.AbstractEventLoop) and found.is_running()
    ]
    for loop in loops:
        tasks = asyncio.all_tasks(loop)
        print(f"==== {heading}: {len(tasks)} asyncio tasks", file=out)
        for task in tasks:
            print(f"--- {task!r}", file=out)
            for line in _awaits(task):
                print(f"    {line}", file=out)
    out.flush()


def _timeout_seconds(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    # pytest-timeout's own order: the marker, then --timeout, then the ini file.
    configured = item.config.getoption("timeout", None) or item.config.getini("timeout")
    return float(configured or 0)


def _watched(item: pytest.Item, phase: str) -> Generator[None, None, None]:
    # pytest-timeout gives each phase (setup, call, teardown) the whole timeout.
    timeout = _timeout_seconds(item)
    timer = None
    if timeout > 0:
        timer = threading.Timer(
            max(timeout - AHEAD_OF_TIMEOUT_SECONDS, 1.0),
            dump_tasks,
            args=(f"{item.nodeid} ({phase}) about to time out",),
        )
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    yield from _watched(item, "setup")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    yield from _watched(item, "call")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    yield from _watched(item, "teardown")
