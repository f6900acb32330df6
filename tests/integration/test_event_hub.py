"""The event hub's LISTEN connection against a real PostgreSQL: what a subscriber that goes
away, a silent network and a reconnect leave behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from service.events.hub import EventHub, EventsInterrupted, Subscription
from tests.helpers import eventually
from tests.pg_proxy import FlakyNetwork

CHANNEL = "test_hub_channel"
OTHER_CHANNEL = "test_hub_other_channel"


async def notify(database_url: str, channel: str, payload: dict[str, Any]) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT pg_notify($1, $2)", channel, json.dumps(payload))
    finally:
        await conn.close()


@asynccontextmanager
async def running_hub(database_url: str, probe_interval_seconds: float) -> AsyncIterator[EventHub]:
    hub = EventHub(database_url, probe_interval_seconds=probe_interval_seconds)
    await hub.start()
    try:
        yield hub
    finally:
        await hub.close()


async def next_event(subscription: Subscription, within: float = 5.0) -> dict[str, Any]:
    return await asyncio.wait_for(subscription.__anext__(), within)


async def test_a_subscriber_cancelled_during_the_first_listen_leaves_the_channel_listened(
    database_url: str,
) -> None:
    async with running_hub(database_url, probe_interval_seconds=30) as hub:
        # The first subscriber of a channel (a client that goes away, a deadline) is
        # cancelled while the hub's LISTEN for it is under way.
        first = asyncio.create_task(hub.subscribe(CHANNEL, "org", 10))
        await asyncio.sleep(0)
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        later = await hub.subscribe(CHANNEL, "org", 10)
        await notify(database_url, CHANNEL, {"key": "org", "n": 1})
        assert (await next_event(later))["n"] == 1


async def test_a_listen_on_a_silent_connection_ends_the_subscribers_and_reconnects(
    database_url: str,
) -> None:
    async with (
        FlakyNetwork(database_url) as network,
        running_hub(network.url, probe_interval_seconds=0.3) as hub,
    ):
        listened = await hub.subscribe(OTHER_CHANNEL, "org", 10)
        network.go_silent()  # no reset, no error: the connection only goes quiet
        # The first subscriber of a new channel, during the partition: its LISTEN never
        # gets an answer.
        with pytest.raises(EventsInterrupted):
            await asyncio.wait_for(hub.subscribe(CHANNEL, "org", 10), 10)
        with pytest.raises(EventsInterrupted):
            await next_event(listened, within=3)
        assert not hub.connected


async def test_a_subscriber_of_a_listened_channel_does_not_wait_for_another_listen(
    database_url: str,
) -> None:
    async with (
        FlakyNetwork(database_url) as network,
        running_hub(network.url, probe_interval_seconds=5) as hub,
    ):
        await hub.subscribe(OTHER_CHANNEL, "org", 10)
        network.go_silent()
        stuck = asyncio.create_task(hub.subscribe(CHANNEL, "org", 10))
        await eventually(hub._lock.locked, "the unanswered LISTEN holds the hub's lock")
        # Already listened to: nothing to wait for.
        await asyncio.wait_for(hub.subscribe(OTHER_CHANNEL, "org", 10), 1)
        stuck.cancel()
        with contextlib.suppress(asyncio.CancelledError, EventsInterrupted):
            await stuck


async def test_listeners_are_reset_once_the_reconnected_listen_is_back(
    database_url: str,
) -> None:
    async with (
        FlakyNetwork(database_url) as network,
        running_hub(network.url, probe_interval_seconds=0.2) as hub,
    ):
        seen: list[str] = []
        await hub.listen(CHANNEL, lambda payload: seen.append("notified"))
        hub.on_reset(lambda: seen.append("reset"))
        network.hold_new_connections()
        conn = await asyncpg.connect(database_url)
        try:
            assert hub._conn is not None
            await conn.execute("SELECT pg_terminate_backend($1)", hub._conn.get_server_pid())
        finally:
            await conn.close()
        # The hub has seen the loss (and reset its listeners) and is reconnecting. A cache
        # refilled now, and a change committed before the LISTEN is back: nothing notifies
        # it, so a reset must come after the reconnect.
        await asyncio.wait_for(network.connection_held.wait(), 10)
        seen.append("refilled")
        await notify(database_url, CHANNEL, {"key": "k"})
        network.let_connections_through()
        await eventually(lambda: hub.connected, "the hub reconnects")
        assert "reset" in seen[seen.index("refilled") :]


async def test_a_reconnect_that_gets_no_answer_does_not_hold_up_new_subscribers(
    database_url: str,
) -> None:
    async with (
        FlakyNetwork(database_url) as network,
        running_hub(network.url, probe_interval_seconds=0.2) as hub,
    ):
        network.hold_new_connections()  # the database is unreachable for new connections
        assert hub._conn is not None
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("SELECT pg_terminate_backend($1)", hub._conn.get_server_pid())
        finally:
            await conn.close()
        await asyncio.wait_for(network.connection_held.wait(), 10)
        # The reconnect waits for an answer; a first subscriber of a channel is told at
        # once that events are interrupted once the attempt gives up, not after asyncpg's
        # 60 s connect timeout.
        with pytest.raises(EventsInterrupted):
            await asyncio.wait_for(hub.subscribe(CHANNEL, "org", 10), 10)
        network.let_connections_through()
        await eventually(lambda: hub.connected, "the hub reconnects", within=15)


async def test_a_failing_reset_callback_does_not_stop_the_reconnects(database_url: str) -> None:
    async with running_hub(database_url, probe_interval_seconds=0.2) as hub:
        resets: list[str] = []

        def broken() -> None:
            resets.append("broken")
            raise RuntimeError("a bug in a cache's reset")

        hub.on_reset(broken)
        hub.on_reset(lambda: resets.append("next"))
        for _ in range(2):
            # Lost twice: the second loss is only noticed if the first reconnect survived.
            assert hub._conn is not None
            pid = hub._conn.get_server_pid()
            conn = await asyncpg.connect(database_url)
            try:
                await conn.execute("SELECT pg_terminate_backend($1)", pid)
            finally:
                await conn.close()

            def reconnected(old: int = pid) -> bool:
                return hub.connected and hub._conn is not None and hub._conn.get_server_pid() != old

            await eventually(reconnected, "the hub reconnects")
        # Every reset ran the callback after the broken one too.
        assert resets.count("next") == resets.count("broken") >= 2
        subscription = await hub.subscribe(CHANNEL, "k", 10)
        await notify(database_url, CHANNEL, {"key": "k", "n": 1})
        assert (await next_event(subscription))["n"] == 1
    # Closed without raising, above.
