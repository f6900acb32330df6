"""Resolves bearer tokens to principals, with a short cache that revocations clear at once."""

from __future__ import annotations

import time
from collections.abc import Callable

from service.auth.principal import Principal
from service.auth.store import IdentityStore
from service.auth.tokens import token_hash

MAX_CACHED_TOKENS = 10_000


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

    def forget(self, token_hash_hex: str) -> None:
        """A token was revoked (by any replica or the CLI)."""
        self._generation += 1
        try:
            self._cache.pop(bytes.fromhex(token_hash_hex), None)
        except ValueError:
            self._cache.clear()

    def forget_all(self) -> None:
        self._generation += 1
        self._cache.clear()
