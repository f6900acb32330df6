"""A transaction PostgreSQL aborts to break a deadlock reaches the client as ABORTED."""

from __future__ import annotations

import asyncio

import grpc
from openvpp.v1 import site_registry_pb2 as pb

from service.app import Service
from service.upstream.status import identifier_lock_key
from tests.conftest import Org
from tests.helpers import rpc_error
from tests.registry.support import Stub, mask, wait_until_blocked_on_lock


async def test_deadlock_victim_gets_aborted_and_nothing_is_written(
    registry: Stub, partner: Org, site: pb.Site, service: Service
) -> None:
    assert service.pool is not None
    async with service.pool.acquire() as blocker:
        # Make the server's transaction the one PostgreSQL picks as the victim: it checks
        # for deadlocks after deadlock_timeout, and ours waits far longer before checking.
        await blocker.execute("SET deadlock_timeout = '30s'")
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM sites WHERE id = $1 FOR UPDATE", site.id)
            update = asyncio.ensure_future(
                registry.UpdateSite(
                    pb.UpdateSiteRequest(
                        site=pb.Site(id=site.id, name="renamed"), update_mask=mask("name")
                    ),
                    metadata=partner.auth,
                )
            )
            # UpdateSite takes the identifier lock, then waits for the row lock we hold...
            await wait_until_blocked_on_lock(blocker, update)
            # ...and we now wait for its identifier lock: a cycle.
            lock_wait = asyncio.ensure_future(
                blocker.execute(
                    "SELECT pg_advisory_xact_lock($1)", identifier_lock_key(site.grid_identifier)
                )
            )
            error = await rpc_error(update)
            await lock_wait
    assert error.code() == grpc.StatusCode.ABORTED, error.details()
    assert "retry" in (error.details() or "")
    fetched = await registry.GetSite(pb.GetSiteRequest(site_id=site.id), metadata=partner.auth)
    assert fetched.site.name == site.name
