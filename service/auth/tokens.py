"""API tokens: high-entropy random strings; only their SHA-256 is ever stored."""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "ovpp_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    # A plain hash suffices: tokens carry 256 random bits, so there is nothing to brute-force.
    return hashlib.sha256(token.encode()).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token in an ``authorization: Bearer <token>`` header value, if well-formed."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
