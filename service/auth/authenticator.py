"""Resolves bearer tokens to principals, with a short cache that revocations clear at once."""

from __future__ import annotations

import time

from service.auth.principal import Principal
from service.auth.store import IdentityStore
from service.auth.tokens import token_hash


class Authenticator:
    def __init__(self, store: IdentityStore, cache_seconds: float) -> None:
        self._store = store
        self._cache_seconds = cache_seconds
        self._cache: dict[bytes, tuple[float, Principal]] = {}

    async def authenticate(self, token: str) -> Principal | None:
        digest = token_hash(token)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        principal = await self._store.principal_for(token)
        if principal is not None and self._cache_seconds > 0:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now + self._cache_seconds, principal)
        return principal

    def forget(self, token_hash_hex: str) -> None:
        """A token was revoked (by any replica or the CLI)."""
        try:
            self._cache.pop(bytes.fromhex(token_hash_hex), None)
        except ValueError:
            self._cache.clear()

    def forget_all(self) -> None:
        self._cache.clear()
