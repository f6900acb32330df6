"""Organizations' webhook signing secrets in PostgreSQL: made with the org (and for orgs that
existed before migration 0015), rotated with a grace period for the previous one."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from standardwebhooks import Webhook

from service.app import Service
from service.auth.principal import Role
from service.auth.store import IdentityStore
from service.db.migrate import load_migrations, migrate
from tests.conftest import MakeOrg

GRACE = timedelta(hours=2)


def assert_well_formed(secret: str) -> None:
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
    Webhook(secret)  # the package accepts it as a secret


def store_of(service: Service) -> IdentityStore:
    assert service.pool is not None
    return IdentityStore(service.pool, signing_secret_grace=GRACE)


async def test_every_new_organization_has_its_own_secret(
    service: Service, make_org: MakeOrg
) -> None:
    store = store_of(service)
    first, second = await make_org(Role.PARTNER), await make_org(Role.OPERATOR)
    secrets = [await store.signing_secret(first.id), await store.signing_secret(second.id)]
    for secret in secrets:
        assert secret is not None
        assert_well_formed(secret)
    assert secrets[0] != secrets[1]
    # Reading it does not change it.
    assert await store.signing_secret(first.id) == secrets[0]
    assert await store.signing_secret(uuid.uuid4()) is None
    # Listing organizations does not carry it.
    assert str(secrets[0]) not in repr(await store.list_orgs())


async def test_rotation_keeps_the_previous_secret_for_the_grace_period(
    service: Service, make_org: MakeOrg
) -> None:
    store = store_of(service)
    org = (await make_org(Role.PARTNER)).id
    now = datetime.now(UTC)
    original = await store.signing_secret(org)
    assert original is not None
    assert await store.signing_secrets(org, now) == [original]

    rotated = await store.rotate_signing_secret(org, now)
    assert rotated is not None
    assert_well_formed(rotated)
    assert rotated != original
    assert await store.signing_secret(org) == rotated
    assert await store.signing_secrets(org, now) == [rotated, original]
    assert await store.signing_secrets(org, now + GRACE - timedelta(seconds=1)) == [
        rotated,
        original,
    ]
    assert await store.signing_secrets(org, now + GRACE) == [rotated]

    # A second rotation within the grace period: only the one just replaced still signs.
    later = now + timedelta(minutes=5)
    again = await store.rotate_signing_secret(org, later)
    assert again not in (None, rotated, original)
    assert await store.signing_secrets(org, later) == [again, rotated]

    assert await store.rotate_signing_secret(uuid.uuid4()) is None
    assert await store.signing_secrets(uuid.uuid4(), now) == []


async def test_secrets_of_many_organizations_at_once(service: Service, make_org: MakeOrg) -> None:
    store = store_of(service)
    now = datetime.now(UTC)
    orgs = [(await make_org(Role.PARTNER)).id for _ in range(3)]
    await store.rotate_signing_secret(orgs[1], now)
    found = await store.signing_secrets_for([*orgs, orgs[0], uuid.uuid4()], now)
    assert set(found) == set(orgs)
    assert [len(found[org]) for org in orgs] == [1, 2, 1]
    for org in orgs:
        assert found[org] == await store.signing_secrets(org, now)
    # On the caller's connection, inside its transaction: the same answer.
    assert service.pool is not None
    async with service.pool.acquire() as conn, conn.transaction():
        assert await store.signing_secrets_for(orgs, now, conn) == found


async def test_migration_gives_existing_organizations_distinct_secrets(database_url: str) -> None:
    name = f"openvpp_secrets_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    scratch = urlunsplit(urlsplit(database_url)._replace(path="/" + name))
    try:
        conn = await asyncpg.connect(scratch)
        try:
            # The schema as it was before 0015, with organizations in it.
            await conn.execute(
                "CREATE TABLE schema_migrations (version text PRIMARY KEY, "
                "checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for migration in load_migrations():
                if migration.version >= "0015":
                    break
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                    migration.version,
                    migration.checksum,
                )
            await conn.execute(
                "INSERT INTO organizations (name, role) "
                "SELECT 'org ' || n, 'partner' FROM generate_series(1, 50) AS n"
            )
            applied = await migrate(conn)
            assert applied[0].startswith("0015")
            secrets = [
                row["signing_secret"]
                for row in await conn.fetch("SELECT signing_secret FROM organizations")
            ]
            assert len(secrets) == len(set(secrets)) == 50
            for secret in secrets:
                assert_well_formed(secret)
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def test_the_service_store_uses_the_configured_grace(
    service: Service, make_org: MakeOrg
) -> None:
    assert service.identity is not None
    grace = timedelta(seconds=service.settings.dispatch_signing_secret_grace_seconds)
    assert grace == timedelta(hours=24)  # the default
    org = (await make_org(Role.PARTNER)).id
    now = datetime.now(UTC)
    await service.identity.rotate_signing_secret(org, now)
    assert len(await service.identity.signing_secrets(org, now + grace - timedelta(seconds=1))) == 2
    assert len(await service.identity.signing_secrets(org, now + grace)) == 1
