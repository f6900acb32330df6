"""Fan-out of PostgreSQL NOTIFY events to in-process subscribers.

One dedicated connection per process LISTENs; every replica that commits a change issues
``pg_notify`` in the same transaction, so subscribers on every replica see exactly the
committed changes. Each subscriber has a bounded buffer: one that cannot keep up is ended
(``SubscriberTooSlow``) instead of growing memory. When the listening connection is lost,
every subscriber is ended (``EventsInterrupted``) so clients reconnect and re-read rather
than silently missing events. A subscription that watches one site is also ended when that
site is deleted (``DeletedWhileWatchedError``), so a watch never stays open on nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from service.common.errors import DeletedWhileWatchedError
from service.common.loglimit import LogLimiter, OutageLog, held_back
from service.events.channels import SITE_EVENTS_CHANNEL
from service.events.payloads import SiteEventType

log = logging.getLogger(__name__)

Event = dict[str, Any]

# The least time a LISTEN gets before its connection counts as lost.
LISTEN_TIMEOUT_FLOOR_SECONDS = 5.0


# What a lost or stuck listening connection raises.
_CONNECTION_LOST = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


class SubscriberTooSlow(Exception):
    """The subscriber's buffer overflowed; its stream must end."""


class EventsInterrupted(Exception):
    """The event source was lost; events may have been missed."""


class Subscription:
    def __init__(
        self,
        hub: EventHub,
        channel: str,
        key: str,
        max_buffered: int,
        matches: Callable[[Event], bool] | None,
        site_id: str | None = None,
    ) -> None:
        self._hub = hub
        self.channel = channel
        self.key = key
        self.site_id = site_id
        self._max_buffered = max_buffered
        self._matches = matches
        self._buffer: collections.deque[Event] = collections.deque()
        self._wakeup = asyncio.Event()
        self._ended: Exception | None = None
        # High-water mark of the buffer, so tests and metrics can show the bound holds.
        self.peak_buffered = 0

    def deliver(self, event: Event) -> None:
        if self._ended is not None or (self._matches is not None and not self._matches(event)):
            return
        if len(self._buffer) >= self._max_buffered:
            self.end(SubscriberTooSlow(f"more than {self._max_buffered} events not yet read"))
            # Out of the fan-out at once: its stream may stay blocked on a client that does
            # not read, but it holds no events and receives none from now on.
            self._hub._remove(self)
            return
        self._buffer.append(event)
        self.peak_buffered = max(self.peak_buffered, len(self._buffer))
        self._wakeup.set()

    def end(self, reason: Exception, *, keep_buffered: bool = False) -> None:
        """Ends the subscription with ``reason``, raised to its reader once it has read
        what ``keep_buffered`` leaves in the buffer (by default: nothing)."""
        if self._ended is None:
            self._ended = reason
            if not keep_buffered:
                self._buffer.clear()
            self._wakeup.set()

    @property
    def ended(self) -> Exception | None:
        """Why the subscription ended, or None while it is live."""
        return self._ended

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def close(self) -> None:
        self._hub._remove(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        await self._ready()
        return self._buffer.popleft()

    async def next_events(self, limit: int) -> list[Event]:
        """Up to ``limit`` buffered events, oldest first, waiting for one if there is none: a
        consumer that does one round trip per handful of events (not per event) keeps up
        with a burst its buffer holds, and bounds what one round trip reads."""
        await self._ready()
        buffer = self._buffer
        return [buffer.popleft() for _ in range(min(limit, len(buffer)))]

    async def _ready(self) -> None:
        while not self._buffer:
            if self._ended is not None:
                raise self._ended
            self._wakeup.clear()
            await self._wakeup.wait()


class EventHub:
    def __init__(
        self,
        dsn: str,
        probe_interval_seconds: float = 2.0,
        server_settings: dict[str, str] | None = None,
    ) -> None:
        self._dsn = dsn
        # Of the listening connection's session (service.db.database.SESSION_SETTINGS).
        self._server_settings = server_settings
        self._probe_interval = probe_interval_seconds
        # A LISTEN, and a reconnect, get this long before the connection counts as lost:
        # bounded, since either holds the lock (and on a silent connection would hold it as
        # long as the kernel keeps the socket), but not as tight as the probe, since the
        # service's start listens too and a busy machine must not fail it.
        self._listen_timeout = max(probe_interval_seconds, LISTEN_TIMEOUT_FLOOR_SECONDS)
        self._conn: asyncpg.Connection | None = None
        self._channels: set[str] = set()
        self._subscriptions: dict[str, dict[str, set[Subscription]]] = collections.defaultdict(
            lambda: collections.defaultdict(set)
        )
        self._listeners: dict[str, list[Callable[[str], None]]] = collections.defaultdict(list)
        # Subscriptions that end when their site is deleted, by site id (any organization's:
        # an operator may watch a partner's site).
        self._site_watchers: dict[str, set[Subscription]] = {}
        self._on_reset: list[Callable[[], None]] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closing = False
        # A lost listening connection is retried every probe: logged as one outage.
        self._outage = OutageLog("event listener", log)
        self._listener_failures = LogLimiter(60.0)

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def start(self) -> None:
        await self._connect()
        self._supervisor = asyncio.create_task(self._supervise(), name="event-hub-supervisor")

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            # Whatever ended it, shutting down goes on to close the pool.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor
            self._supervisor = None
        for per_key in self._subscriptions.values():
            for subs in per_key.values():
                for sub in subs:
                    sub.end(EventsInterrupted("server is shutting down"))
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=5)
            except _CONNECTION_LOST:
                # The database is gone or stuck: shutting down must not wait for it.
                conn.terminate()

    async def listen(self, channel: str, callback: Callable[[str], None]) -> None:
        """Calls ``callback(payload)`` for every notification on ``channel`` (internal use)."""
        self._listeners[channel].append(callback)
        await self._ensure_listening(channel)

    def on_reset(self, callback: Callable[[], None]) -> None:
        """Called when notifications may have been missed (connection lost)."""
        self._on_reset.append(callback)

    async def subscribe(
        self,
        channel: str,
        key: str,
        max_buffered: int,
        matches: Callable[[Event], bool] | None = None,
        *,
        site_id: str | None = None,
    ) -> Subscription:
        """Events on ``channel`` whose JSON payload has ``"key": key`` (the owning org).

        With ``site_id``, the subscription also ends with ``DeletedWhileWatchedError`` once
        that site's deletion commits. Check that the site exists after subscribing, not
        before: a deletion committed in between is then either seen by the check or
        delivered here."""
        if self._closing:
            raise EventsInterrupted("server is shutting down")
        await self._ensure_listening(channel)
        if site_id is not None:
            await self._ensure_listening(SITE_EVENTS_CHANNEL)
        if not self.connected:
            raise EventsInterrupted("event source is not connected")
        subscription = Subscription(self, channel, key, max_buffered, matches, site_id)
        self._subscriptions[channel][key].add(subscription)
        if site_id is not None:
            self._site_watchers.setdefault(site_id, set()).add(subscription)
        return subscription

    def subscriber_count(self, channel: str) -> int:
        return sum(len(subs) for subs in self._subscriptions[channel].values())

    def _remove(self, subscription: Subscription) -> None:
        per_key = self._subscriptions[subscription.channel]
        subs = per_key.get(subscription.key)
        if subs is not None:
            subs.discard(subscription)
            if not subs:
                del per_key[subscription.key]
        site_id = subscription.site_id
        if site_id is not None:
            watchers = self._site_watchers.get(site_id)
            if watchers is not None:
                watchers.discard(subscription)
                if not watchers:
                    del self._site_watchers[site_id]

    async def _ensure_listening(self, channel: str) -> None:
        # Outside the lock first: a LISTEN under way for another channel must not hold up
        # subscribers of one already listened to.
        if channel in self._channels:
            return
        async with self._lock:
            if channel in self._channels:
                return
            conn = self._conn
            if conn is None or conn.is_closed():
                self._channels.add(channel)  # the reconnect listens to every known channel
                return
            try:
                await asyncio.wait_for(
                    conn.add_listener(channel, self._dispatch), self._listen_timeout
                )
            except _CONNECTION_LOST as error:
                # Lost or stuck: the next probe reconnects, listening to this channel too.
                self._channels.add(channel)
                conn.terminate()
                raise EventsInterrupted(
                    "lost the database connection that carries events"
                ) from error
            # Only now: asyncpg keeps a listener only once its LISTEN has returned, so a
            # subscriber cancelled during it must leave the channel to the next one to
            # listen to, not marked as listened with nothing listening.
            self._channels.add(channel)

    async def _connect(self) -> None:
        # Subscribers of a channel not listened to yet wait for the lock held here.
        async with self._lock:
            conn = await asyncpg.connect(
                self._dsn, timeout=self._listen_timeout, server_settings=self._server_settings
            )
            try:
                for channel in self._channels:
                    await asyncio.wait_for(
                        conn.add_listener(channel, self._dispatch), self._listen_timeout
                    )
            except BaseException:
                conn.terminate()  # not left open behind the next attempt
                raise
            conn.add_termination_listener(self._terminated)
            self._conn = conn
        # Again now that notifications arrive: a cache refilled while the connection was
        # coming back may have missed a change committed meanwhile.
        self._reset_listeners()

    def _dispatch(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        for callback in self._listeners.get(channel, ()):
            try:
                callback(payload)
            except Exception:
                # A bug; once a minute per channel, as it would fail on every notification.
                dropped = self._listener_failures.admit(channel)
                if dropped is not None:
                    log.exception("listener for %s failed%s", channel, held_back(dropped))
        per_key = self._subscriptions.get(channel)
        site_deletion = channel == SITE_EVENTS_CHANNEL and bool(self._site_watchers)
        if not per_key and not site_deletion:
            return
        try:
            event = json.loads(payload)
        except ValueError:
            if self._listener_failures.admit(("malformed", channel)) is not None:
                log.warning("dropping malformed notification on %s", channel)
            return
        if per_key:
            for subscription in list(per_key.get(str(event.get("key", "")), ())):
                subscription.deliver(event)
        if site_deletion and event.get("event_type") == SiteEventType.DELETED:
            self._end_site_watchers(event)

    def _end_site_watchers(self, event: Event) -> None:
        site = event.get("site")
        site_id = str(site.get("id", "")) if isinstance(site, dict) else ""
        for subscription in list(self._site_watchers.get(site_id, ())):
            # Events buffered before the deletion are still read: they happened.
            subscription.end(DeletedWhileWatchedError("site", site_id), keep_buffered=True)
            self._remove(subscription)

    def _terminated(self, _conn: object) -> None:
        self._interrupt("lost the database connection that carries events")

    def _interrupt(self, why: str) -> None:
        for per_key in self._subscriptions.values():
            for subs in per_key.values():
                for sub in list(subs):
                    sub.end(EventsInterrupted(why))
        self._reset_listeners()

    def _reset_listeners(self) -> None:
        for callback in self._on_reset:
            try:
                callback()
            except Exception:
                # A bug; it must not stop the other callbacks nor the reconnect that calls it.
                dropped = self._listener_failures.admit("reset")
                if dropped is not None:
                    log.exception("reset callback failed%s", held_back(dropped))

    async def _supervise(self) -> None:
        """Probes the listening connection and reconnects it when it is gone."""
        while not self._closing:
            await asyncio.sleep(self._probe_interval)
            try:
                # Under the lock: a LISTEN for a new channel (_ensure_listening) uses the same
                # connection, and asyncpg refuses a second operation while one is running.
                async with self._lock:
                    conn = self._conn
                    if conn is None or conn.is_closed():
                        raise ConnectionError("not connected")
                    await asyncio.wait_for(conn.execute("SELECT 1"), self._probe_interval)
            except Exception as error:
                if self._closing:
                    return
                if not isinstance(error, _CONNECTION_LOST):
                    # Anything else (an asyncpg protocol error behind a misbehaving proxy)
                    # is treated as a lost connection too: left to end this task, nothing
                    # would reconnect and every watch would be UNAVAILABLE until a restart.
                    log.warning("event listener probe failed unexpectedly: %r", error)
                self._interrupt("lost the database connection that carries events")
                if self._conn is not None:
                    self._conn.terminate()
                self._conn = None
                self._outage.down("lost its database connection; reconnecting")
                try:
                    await self._connect()
                    self._outage.up()
                except Exception as error:
                    if not isinstance(error, _CONNECTION_LOST):
                        log.warning("event listener reconnect failed unexpectedly: %r", error)
                    self._outage.tick()
