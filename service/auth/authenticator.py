"""Resolves bearer tokens to principals, with a short cache that revocations clear at once,
and tells the calls still running on a token when it is revoked."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from service.auth.principal import Principal
from service.auth.store import IdentityStore
from service.auth.tokens import token_hash
from service.common.backoff import doubling_delay

log = logging.getLogger(__name__)

MAX_CACHED_TOKENS = 10_000
# Pauses between checks of the open streams' tokens while the database does not answer.
RECHECK_FIRST_PAUSE_SECONDS = 1.0
RECHECK_MAX_PAUSE_SECONDS = 30.0


class Authenticator:
    """``cache_allowed`` says whether revocations can currently reach us (the listening
    connection is up); while it is false nothing is cached, so no revoked token outlives
    its revocation by more than one lookup."""

    def __init__(
        self,
        store: IdentityStore,
        cache_seconds: float,
        cache_allowed: Callable[[], bool] = lambda: True,
    ) -> None:
        self._store = store
        self._cache_seconds = cache_seconds
        self._cache_allowed = cache_allowed
        self._cache: dict[bytes, tuple[float, Principal]] = {}
        # Bumped by every invalidation: a lookup that raced with one must not be cached.
        self._generation = 0
        # Token hash -> what to call when it is revoked: the long calls running on it.
        self._watchers: dict[bytes, set[Callable[[], None]]] = {}
        self._recheck: asyncio.Task[None] | None = None
        self._recheck_again = False

    async def authenticate(self, token: str) -> Principal | None:
        digest = token_hash(token)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        generation = self._generation
        principal = await self._store.principal_for_hash(digest)
        if (
            principal is not None
            and self._cache_seconds > 0
            and generation == self._generation
            and self._cache_allowed()
        ):
            if len(self._cache) >= MAX_CACHED_TOKENS:
                self._cache.clear()
            self._cache[digest] = (now + self._cache_seconds, principal)
        return principal

    def on_revoked(self, token: str, revoked: Callable[[], None]) -> Callable[[], None]:
        """Calls ``revoked`` once the token is revoked (by any replica or the CLI) while the
        returned function has not been called. For streams, which are admitted once and may
        run for days: the check at admission does not reach them."""
        digest = token_hash(token)
        self._watchers.setdefault(digest, set()).add(revoked)

        def unwatch() -> None:
            watchers = self._watchers.get(digest)
            if watchers is not None:
                watchers.discard(revoked)
                if not watchers:
                    del self._watchers[digest]

        return unwatch

    def forget(self, token_hash_hex: str) -> None:
        """A token was revoked (by any replica or the CLI)."""
        self._generation += 1
        try:
            digest = bytes.fromhex(token_hash_hex)
        except ValueError:
            self.forget_all()
            return
        self._cache.pop(digest, None)
        self._tell_revoked(digest)

    def forget_all(self) -> None:
        """Revocations may have been missed (the listening connection was lost): nothing
        cached is trusted, and the tokens of running streams are looked up again."""
        self._generation += 1
        self._cache.clear()
        if not self._watchers:
            return
        # A reset during a check counts too: the check running may have read before the
        # revocations the new reset stands for, or be stuck on the lost connection.
        self._recheck_again = True
        if self._recheck is None or self._recheck.done():
            self._recheck = asyncio.get_running_loop().create_task(
                self._recheck_watched(), name="token-recheck"
            )

    async def close(self) -> None:
        if self._recheck is not None:
            self._recheck.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._recheck

    def _tell_revoked(self, digest: bytes) -> None:
        for revoked in list(self._watchers.pop(digest, ())):
            revoked()

    async def _recheck_watched(self) -> None:
        """Until a check has read after the latest reset: the streams' tokens looked up,
        retried with a growing pause while the database does not answer."""
        failures = 0
        while self._recheck_again and self._watchers:
            self._recheck_again = False
            digests = list(self._watchers)
            try:
                live = await self._store.active_token_hashes(digests)
            except Exception as error:
                failures += 1
                pause = doubling_delay(
                    failures, RECHECK_FIRST_PAUSE_SECONDS, RECHECK_MAX_PAUSE_SECONDS
                )
                log.warning(
                    "checking the tokens of %d open streams failed (retrying in %.0f s): %s",
                    len(digests),
                    pause,
                    error,
                )
                self._recheck_again = True
                await asyncio.sleep(pause)
                continue
            for digest in digests:
                if digest not in live:
                    self._tell_revoked(digest)
