"""Webhook signing secrets: ``whsec_`` + base64 of 32 random bytes, as Standard Webhooks defines.

Each organization has one (made with it, see migration 0015); rotating keeps the previous one
signing for a grace period so receivers can roll over. Secrets are never logged.
"""

from __future__ import annotations

import base64
import secrets

SIGNING_SECRET_PREFIX = "whsec_"
SIGNING_SECRET_BYTES = 32


def new_signing_secret() -> str:
    return (
        SIGNING_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SIGNING_SECRET_BYTES)).decode()
    )


def signing_key(secret: str) -> bytes:
    """The HMAC key a secret stands for: the bytes its base64 after ``whsec_`` encodes.

    Decoded here, where the format is made, rather than read from the ``standardwebhooks``
    package's private attribute: the spec defines it, and a package update may rename it."""
    try:
        key = base64.b64decode(secret.removeprefix(SIGNING_SECRET_PREFIX), validate=True)
    except ValueError:  # binascii.Error: one message for every malformed form
        raise ValueError("a signing secret must be whsec_ + base64") from None
    if not key:
        raise ValueError("a signing secret must not be empty")
    return key
