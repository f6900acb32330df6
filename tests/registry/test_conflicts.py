"""A transaction PostgreSQL aborts to break a deadlock reaches the client as ABORTED."""

from __future__ import annotations

import asyncio

import grpc
from openvpp.v1 import meter_registry_pb2_grpc, telemetry_pb2_grpc
from openvpp.v1 import site_registry_pb2 as pb

from service.app import Service
from service.upstream.status import identifier_lock_key
from tests.conftest import Org
from tests.helpers import random_identifier, rpc_error, site_request, wait_until_blocked
from tests.registry.support import Stub, mask, point, wait_until_blocked_on_lock
from tests.telemetry.conftest import make_setup, quarter, register


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


async def test_a_site_created_with_the_identifier_another_site_is_moving_to_already_exists(
    registry: Stub,
    meters: meter_registry_pb2_grpc.MeterRegistryAsyncStub,
    telemetry: telemetry_pb2_grpc.TelemetryAsyncStub,
    partner: Org,
    service: Service,
) -> None:
    assert service.pool is not None
    # A site with readings: moving it to another grid (a new time zone) queues them for
    # balancing, where the test holds the move, after its UPDATE.
    moved_site = await make_setup(partner, registry, meters, telemetry)
    meter = await moved_site.meter()
    await moved_site.ingest([register(meter, quarter(0), 1.0)])
    identifier = random_identifier()
    async with service.pool.acquire() as blocker:
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute("LOCK TABLE balancing_queue IN SHARE ROW EXCLUSIVE MODE")
        moving = asyncio.ensure_future(
            registry.UpdateSite(
                pb.UpdateSiteRequest(
                    site=pb.Site(
                        id=moved_site.site.id,
                        timezone="Asia/Tokyo",
                        supply_points=[point(identifier)],
                    ),
                    update_mask=mask("timezone", "supply_points"),
                ),
                metadata=partner.auth,
            )
        )
        await wait_until_blocked(blocker, 1, moving)
        # The new identifier is written, not yet committed.
        creating = asyncio.ensure_future(
            registry.CreateSite(site_request(identifier), metadata=partner.auth)
        )
        await wait_until_blocked(blocker, 2, moving, creating)
        await holding.rollback()
    moved = (await asyncio.wait_for(moving, 10)).site
    error = await rpc_error(asyncio.wait_for(creating, 10))
    assert moved.grid_identifier == identifier
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS, error.details()
