"""Organizations and tokens in PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from service.auth.principal import Principal, Role
from service.auth.tokens import new_token, token_hash
from service.events.channels import TOKEN_REVOKED_CHANNEL


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


class IdentityStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create_org(self, name: str, role: Role) -> Organization:
        row = await self._pool.fetchrow(
            "INSERT INTO organizations (name, role) VALUES ($1, $2) RETURNING *", name, role.value
        )
        return _org(row)

    async def list_orgs(self) -> list[Organization]:
        rows = await self._pool.fetch("SELECT * FROM organizations ORDER BY created_at, id")
        return [_org(row) for row in rows]

    async def get_org(self, org_id: UUID) -> Organization | None:
        row = await self._pool.fetchrow("SELECT * FROM organizations WHERE id = $1", org_id)
        return _org(row) if row else None

    async def create_token(self, org_id: UUID) -> IssuedToken:
        token = new_token()
        token_id = await self._pool.fetchval(
            "INSERT INTO api_tokens (org_id, token_hash) VALUES ($1, $2) RETURNING id",
            org_id,
            token_hash(token),
        )
        return IssuedToken(token_id, org_id, token)

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
            await conn.execute(
                "SELECT pg_notify($1, $2)", TOKEN_REVOKED_CHANNEL, bytes(revoked_hash).hex()
            )
            return True

    async def principal_for(self, token: str) -> Principal | None:
        return await self.principal_for_hash(token_hash(token))

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
