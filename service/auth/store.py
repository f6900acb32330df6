"""Organizations and tokens in PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

import asyncpg

from service.auth.principal import Principal, Role
from service.auth.signing import new_signing_secret
from service.auth.tokens import new_token, token_hash
from service.common.text import NAME_LENGTH, text_rule
from service.events.payloads import notify_token_revoked

DEFAULT_SIGNING_SECRET_GRACE = timedelta(hours=24)
# Never SELECT * from organizations: the signing secrets stay where they are asked for.
_ORG_COLUMNS = "id, name, role, created_at"
# The bounds of the organizations table's CHECK (migration 0001).
ORG_NAME_LENGTH = NAME_LENGTH
# What argv bytes that are not UTF-8 decode to (surrogateescape); PostgreSQL cannot store
# them. Names from protobuf never hold them.
_UNPAIRED_SURROGATE = re.compile("[\ud800-\udfff]")
# `orgs list` prints one line per organization, its fields separated by tabs (the README
# pipes it into `cut -f1`): a name holding one of these would break the line apart.
# Also the line breaks of Unicode (NEL, LINE and PARAGRAPH SEPARATOR): str.splitlines(),
# and any reader that follows Unicode, breaks `orgs list`'s line there.
_FIELD_OR_LINE_BREAK = re.compile("[\t\n\r\x85\u2028\u2029]")


def org_name_rule(name: str) -> str | None:
    """The rule an organization name (as it is to be stored) breaks, or None."""
    if not 1 <= len(name) <= ORG_NAME_LENGTH or not name.strip():
        return f"must be 1 to {ORG_NAME_LENGTH} characters"
    if _UNPAIRED_SURROGATE.search(name):
        return "must be valid UTF-8 text (it holds bytes that are not UTF-8)"
    if _FIELD_OR_LINE_BREAK.search(name):
        return (
            "must not contain tab, line feed, carriage return or another line break"
            " (`orgs list` prints one tab-separated line per organization)"
        )
    return text_rule(name, ORG_NAME_LENGTH)


@dataclass(frozen=True)
class Organization:
    id: UUID
    name: str
    role: Role
    created_at: datetime


@dataclass(frozen=True)
class IssuedToken:
    id: UUID
    org_id: UUID
    token: str


@dataclass(frozen=True)
class TokenInfo:
    id: UUID
    created_at: datetime
    revoked_at: datetime | None


class IdentityStore:
    def __init__(
        self, pool: asyncpg.Pool, *, signing_secret_grace: timedelta = DEFAULT_SIGNING_SECRET_GRACE
    ) -> None:
        # signing_secret_grace: how long a rotated-out secret still signs
        # (OPENVPP_DISPATCH_SIGNING_SECRET_GRACE_SECONDS).
        self._pool = pool
        self._grace = signing_secret_grace

    async def create_org(self, name: str, role: Role) -> Organization:
        """Raises ValueError if the name breaks org_name_rule (callers check it first)."""
        rule = org_name_rule(name)
        if rule is not None:
            raise ValueError(f"organization name {rule}")
        # Its signing secret comes from the column default (migration 0015).
        row = await self._pool.fetchrow(
            f"INSERT INTO organizations (name, role) VALUES ($1, $2) RETURNING {_ORG_COLUMNS}",
            name,
            role.value,
        )
        return _org(row)

    async def list_orgs(self) -> list[Organization]:
        rows = await self._pool.fetch(
            f"SELECT {_ORG_COLUMNS} FROM organizations ORDER BY created_at, id"
        )
        return [_org(row) for row in rows]

    async def get_org(self, org_id: UUID) -> Organization | None:
        row = await self._pool.fetchrow(
            f"SELECT {_ORG_COLUMNS} FROM organizations WHERE id = $1", org_id
        )
        return _org(row) if row else None

    async def signing_secret(self, org_id: UUID) -> str | None:
        """The organization's current webhook signing secret; None if there is no such org."""
        secret: str | None = await self._pool.fetchval(
            "SELECT signing_secret FROM organizations WHERE id = $1", org_id
        )
        return secret

    async def rotate_signing_secret(self, org_id: UUID, now: datetime | None = None) -> str | None:
        """Makes a new current secret; the old one keeps signing for the grace period.

        Only one previous secret is kept: rotating again within the grace period drops the
        one before. ``now`` (default: the database's) starts the grace period. None if there
        is no such organization.
        """
        secret: str | None = await self._pool.fetchval(
            "UPDATE organizations SET previous_signing_secret = signing_secret, "
            "signing_secret = $2, signing_secret_rotated_at = COALESCE($3, now()) "
            "WHERE id = $1 RETURNING signing_secret",
            org_id,
            new_signing_secret(),
            now,
        )
        return secret

    async def signing_secrets(self, org_id: UUID, now: datetime) -> list[str]:
        """Every secret that signs at ``now``: the current one, then the previous one while
        within the grace period after its rotation. Empty if there is no such org."""
        return (await self.signing_secrets_for([org_id], now)).get(org_id, [])

    async def signing_secrets_for(
        self,
        org_ids: Iterable[UUID],
        now: datetime,
        conn: asyncpg.Connection | None = None,
    ) -> dict[UUID, list[str]]:
        """``signing_secrets`` of many organizations in one query (a delivery batch's), on
        ``conn`` when given (a caller inside a transaction need not take a second
        connection from the pool while it holds the first)."""
        executor: asyncpg.Connection | asyncpg.Pool = conn if conn is not None else self._pool
        rows = await executor.fetch(
            "SELECT id, signing_secret, previous_signing_secret, signing_secret_rotated_at "
            "FROM organizations WHERE id = ANY($1::uuid[])",
            list(set(org_ids)),
        )
        found: dict[UUID, list[str]] = {}
        for row in rows:
            secrets = [row["signing_secret"]]
            rotated_at = row["signing_secret_rotated_at"]
            if (
                row["previous_signing_secret"]
                and rotated_at is not None
                and now < rotated_at + self._grace
            ):
                secrets.append(row["previous_signing_secret"])
            found[row["id"]] = secrets
        return found

    async def create_token(self, org_id: UUID) -> IssuedToken:
        token = new_token()
        token_id = await self._pool.fetchval(
            "INSERT INTO api_tokens (org_id, token_hash) VALUES ($1, $2) RETURNING id",
            org_id,
            token_hash(token),
        )
        return IssuedToken(token_id, org_id, token)

    async def list_tokens(self, org_id: UUID) -> list[TokenInfo]:
        """The organization's tokens, oldest first (what is known of them: not the token)."""
        rows = await self._pool.fetch(
            "SELECT id, created_at, revoked_at FROM api_tokens WHERE org_id = $1"
            " ORDER BY created_at, id",
            org_id,
        )
        return [TokenInfo(row["id"], row["created_at"], row["revoked_at"]) for row in rows]

    async def revoke_token(self, token_id: UUID) -> bool:
        """Revokes and tells every replica to drop it from its cache at once."""
        async with self._pool.acquire() as conn, conn.transaction():
            revoked_hash = await conn.fetchval(
                "UPDATE api_tokens SET revoked_at = now() "
                "WHERE id = $1 AND revoked_at IS NULL RETURNING token_hash",
                token_id,
            )
            if revoked_hash is None:
                return False
            await notify_token_revoked(conn, bytes(revoked_hash))
            return True

    async def principal_for(self, token: str) -> Principal | None:
        return await self.principal_for_hash(token_hash(token))

    async def active_token_hashes(self, digests: list[bytes]) -> set[bytes]:
        """Which of ``digests`` are hashes of tokens that are not revoked."""
        rows = await self._pool.fetch(
            "SELECT token_hash FROM api_tokens WHERE token_hash = ANY($1::bytea[])"
            " AND revoked_at IS NULL",
            digests,
        )
        return {bytes(row["token_hash"]) for row in rows}

    async def principal_for_hash(self, digest: bytes) -> Principal | None:
        row = await self._pool.fetchrow(
            "SELECT t.id AS token_id, o.id AS org_id, o.role FROM api_tokens t "
            "JOIN organizations o ON o.id = t.org_id "
            "WHERE t.token_hash = $1 AND t.revoked_at IS NULL",
            digest,
        )
        if row is None:
            return None
        return Principal(org_id=row["org_id"], role=Role(row["role"]), token_id=row["token_id"])

    async def bootstrap_partner(self, name: str) -> IssuedToken | None:
        """On an empty database, one partner org with a token so a quick start needs no setup.

        Serialized by an advisory lock so two replicas starting together create only one.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('openvpp_bootstrap'))")
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM organizations)"):
                return None
            org_id = await conn.fetchval(
                "INSERT INTO organizations (name, role) VALUES ($1, 'partner') RETURNING id", name
            )
            token = new_token()
            token_id = await conn.fetchval(
                "INSERT INTO api_tokens (org_id, token_hash) VALUES ($1, $2) RETURNING id",
                org_id,
                token_hash(token),
            )
            return IssuedToken(token_id, org_id, token)


def _org(row: asyncpg.Record) -> Organization:
    return Organization(row["id"], row["name"], Role(row["role"]), row["created_at"])
