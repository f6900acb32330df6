"""An ingest batch locks its register meters, then its load-profile meters (each in id
order); DeleteSite locked all the site's meters in id order. A batch holding a register
meter and waiting for a profile meter of lower id that DeleteSite held, while DeleteSite
waited for the register meter, was a deadlock: PostgreSQL aborted one (DeleteSite ABORTED
to its client, or the batch retried). Both lock in service.db.lock_order's order now."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import site_registry_pb2 as spb

from service.app import Service
from tests.helpers import wait_until_blocked
from tests.telemetry.conftest import Setup, interval, quarter, register


async def test_an_ingest_batch_and_delete_site_do_not_deadlock(
    setup: Setup, service: Service
) -> None:
    assert service.pool is not None
    reg = await setup.meter()
    # A load-profile meter whose id sorts before the register meter's.
    while True:
        profile = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
        if uuid.UUID(profile.id) < uuid.UUID(reg.id):
            break
    await setup.ingest([register(reg, quarter(0), 1.0)])  # cached
    deadlocks = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    before = await service.pool.fetchval(deadlocks)
    async with service.pool.acquire() as holder:
        transaction = holder.transaction()
        await transaction.start()
        # Another writer of the register meter holds the batch up at its first lock.
        await holder.execute("SELECT FROM meters WHERE id = $1 FOR UPDATE", uuid.UUID(reg.id))
        ingesting = asyncio.ensure_future(
            setup.ingest([register(reg, quarter(1), 2.0), interval(profile, quarter(1), 5.0)])
        )
        await wait_until_blocked(holder, 1, ingesting)
        deleting = asyncio.ensure_future(
            setup.registry.DeleteSite(
                spb.DeleteSiteRequest(site_id=setup.site.id), metadata=setup.org.auth
            )
        )
        # DeleteSite holds the profile meter (lower id) and lines up for the register meter.
        await wait_until_blocked(holder, 2, ingesting, deleting)
        await transaction.rollback()
    outcomes: tuple[Any, ...] = await asyncio.gather(ingesting, deleting, return_exceptions=True)
    assert not any(isinstance(o, BaseException) for o in outcomes), outcomes
    await asyncio.sleep(0.6)  # statistics are flushed at most every 500 ms
    await service.pool.execute("SELECT pg_stat_clear_snapshot()")
    assert await service.pool.fetchval(deadlocks) == before, "PostgreSQL detected a deadlock"


async def test_delete_site_is_not_aborted_by_an_ingest_batch(
    setup: Setup, service: Service
) -> None:
    """The same cycle with DeleteSite waiting first, so that it is the transaction
    PostgreSQL aborts: the client's DeleteSite fails ABORTED. The register meter is held FOR
    KEY SHARE (as a CreateMeterBalancingSetting waiting for the settings lock holds it):
    DeleteSite, holding the profile meter, waits for it; the batch's NO KEY UPDATE does not
    conflict with KEY SHARE and takes it, then waits for the profile meter."""
    assert service.pool is not None
    reg = await setup.meter()
    while True:
        profile = await setup.meter(measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE)
        if uuid.UUID(profile.id) < uuid.UUID(reg.id):
            break
    await setup.ingest([register(reg, quarter(0), 1.0)])  # cached
    async with service.pool.acquire() as holder:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT FROM meters WHERE id = $1 FOR KEY SHARE", uuid.UUID(reg.id))
        deleting = asyncio.ensure_future(
            setup.registry.DeleteSite(
                spb.DeleteSiteRequest(site_id=setup.site.id), metadata=setup.org.auth
            )
        )
        await wait_until_blocked(holder, 1, deleting)
        ingesting = asyncio.ensure_future(
            setup.ingest([register(reg, quarter(1), 2.0), interval(profile, quarter(1), 5.0)])
        )
        # Within PostgreSQL's deadlock_timeout (1 s), DeleteSite's own check finds the cycle.
        await asyncio.wait({deleting}, timeout=3)
        await transaction.rollback()
    outcomes: tuple[Any, ...] = await asyncio.gather(deleting, ingesting, return_exceptions=True)
    assert not any(isinstance(o, BaseException) for o in outcomes), outcomes
