"""Balancing writers and DeleteSite, which locks the site's meters, then the site, then
cascades to the site's queue rows and settings: each writer takes what it needs in that
order, so none deadlocks with it (PostgreSQL aborted one side: ABORTED to a client)."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

from google.protobuf import field_mask_pb2
from openvpp.v1 import balancing_pb2 as bpb
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import site_registry_pb2 as spb

from service.app import Service
from service.balancing.store import lock_site_results
from service.balancing.worker import BalancingQueueConsumer
from tests.balancing.conftest import BERLIN_NEW_YEAR, Community
from tests.helpers import wait_until_blocked

DEADLOCKS = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"


async def balanced_site(community: Community) -> None:
    pv = await community.meter(direction=mpb.METER_DIRECTION_PRODUCER)
    home = await community.meter()
    for meter in (pv, home):
        await community.participate(meter)
        await community.profile(meter, BERLIN_NEW_YEAR, [100.0] * 4)


async def deadlocks(service: Service) -> int:
    assert service.pool is not None
    await asyncio.sleep(0.6)  # statistics are flushed at most every 500 ms
    await service.pool.execute("SELECT pg_stat_clear_snapshot()")
    count: int = await service.pool.fetchval(DEADLOCKS)
    return count


async def test_a_worker_pass_holds_no_queue_row_while_it_waits_for_its_site(
    community: Community, service: Service, consumer: BalancingQueueConsumer
) -> None:
    """The pass claimed the site's head queue row (FOR UPDATE) and then waited, for the
    site's results lock (a RunBalancing's, here held) and then its meters; DeleteSite, with
    the meters and the site locked, waited for that row (its cascade): a deadlock once the
    pass went on. Now the pass locks the meters and the site before any row."""
    await balanced_site(community)  # the ingests queued rows for the site
    assert service.pool is not None
    async with service.pool.acquire() as holder:
        transaction = holder.transaction()
        await transaction.start()
        await lock_site_results(holder, UUID(community.site.id))
        passing = asyncio.ensure_future(consumer.step())
        await wait_until_blocked(holder, 1, passing)
        # Nothing of the site is held by the waiting pass: the deletion goes through.
        await asyncio.wait_for(
            community.registry.DeleteSite(
                spb.DeleteSiteRequest(site_id=community.site.id), metadata=community.org.auth
            ),
            10,
        )
        await transaction.rollback()
    await passing
    assert (
        await service.pool.fetchval(
            "SELECT count(*) FROM balancing_queue WHERE site_id = $1", UUID(community.site.id)
        )
        == 0
    )


async def test_a_setting_updated_as_its_site_is_deleted_does_not_deadlock(
    community: Community, service: Service
) -> None:
    """UpdateMeterBalancingSetting held the setting (FOR UPDATE) and then queued the days
    it changes, whose foreign key takes the site; DeleteSite held the site and, deleting
    it, cascaded to that setting. The update is held up at its queue INSERT here while
    DeleteSite comes in; now the update holds the site from the start and DeleteSite waits."""
    await balanced_site(community)
    listed = await community.balancing.ListMeterBalancingSettings(
        bpb.ListMeterBalancingSettingsRequest(site_id=community.site.id),
        metadata=community.org.auth,
    )
    setting = listed.settings[0]
    assert service.pool is not None
    before = await deadlocks(service)
    async with service.pool.acquire() as holder:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("LOCK TABLE balancing_queue IN SHARE ROW EXCLUSIVE MODE")
        updating = asyncio.ensure_future(
            community.balancing.UpdateMeterBalancingSetting(
                bpb.UpdateMeterBalancingSettingRequest(
                    setting=bpb.MeterBalancingSetting(id=setting.id, priority=2),
                    update_mask=field_mask_pb2.FieldMask(paths=["priority"]),
                ),
                metadata=community.org.auth,
            )
        )
        await wait_until_blocked(holder, 1, updating)
        deleting = asyncio.ensure_future(
            community.registry.DeleteSite(
                spb.DeleteSiteRequest(site_id=community.site.id), metadata=community.org.auth
            )
        )
        await wait_until_blocked(holder, 2, updating, deleting)
        await transaction.rollback()
    outcomes: tuple[Any, ...] = await asyncio.gather(updating, deleting, return_exceptions=True)
    assert not any(isinstance(o, BaseException) for o in outcomes), outcomes
    assert await deadlocks(service) == before, "PostgreSQL detected a deadlock"
