"""Balancing writes and re-balancing racing the deletion of their meter or site: the
deletion waits for them (they hold what they read), and nothing ends INTERNAL from a
foreign-key violation or NOT_FOUND from a row gone between two statements."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import date, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from openvpp.v1 import balancing_pb2 as bpb
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import site_registry_pb2 as spb

from service.app import Service
from service.balancing import rebalance as rebalance_module
from service.balancing.store import MeterRow, lock_site_settings, site_meters
from tests.balancing.conftest import BERLIN_NEW_YEAR, Community, stamp
from tests.conftest import Org
from tests.helpers import rpc_error, wait_until_blocked


async def deleted_while_waiting(
    service: Service,
    community: Community,
    write: Callable[[], Awaitable[Any]],
    delete: Callable[[], Awaitable[Any]],
) -> Any:
    """``write`` waits for the site's settings lock (another writer of its settings holds
    it) when ``delete`` comes in, which takes no settings lock. Before, the deletion
    committed during the wait and the write's INSERT broke its foreign key (INTERNAL); now
    the deletion waits for the write, which succeeds, and then deletes what it wrote."""
    assert service.pool is not None
    async with service.pool.acquire() as holder:
        transaction = holder.transaction()
        await transaction.start()
        await lock_site_settings(holder, UUID(community.site.id))
        writing = asyncio.ensure_future(write())
        await wait_until_blocked(holder, 1, writing)
        deleting = asyncio.ensure_future(delete())
        # In line behind the write (which waits for the holder), rather than done.
        await wait_until_blocked(holder, 2, writing, deleting)
        await transaction.rollback()
    written = await writing
    await deleting
    return written


async def test_a_setting_created_as_its_meter_is_deleted_goes_with_it(
    community: Community, service: Service
) -> None:
    meter = await community.meter()
    await deleted_while_waiting(
        service,
        community,
        lambda: community.participate(meter),
        lambda: community.meters.DeleteMeter(
            mpb.DeleteMeterRequest(meter_id=meter.id), metadata=community.org.auth
        ),
    )
    listed = await community.balancing.ListMeterBalancingSettings(
        bpb.ListMeterBalancingSettingsRequest(site_id=community.site.id),
        metadata=community.org.auth,
    )
    assert list(listed.settings) == []


async def test_a_policy_created_as_its_site_is_deleted_goes_with_it(
    community: Community, service: Service
) -> None:
    await deleted_while_waiting(
        service,
        community,
        lambda: community.policy(bpb.ALLOCATION_METHOD_PRO_RATA, date(2025, 1, 1)),
        lambda: community.registry.DeleteSite(
            spb.DeleteSiteRequest(site_id=community.site.id), metadata=community.org.auth
        ),
    )
    error = await rpc_error(
        community.balancing.ListSiteBalancingPolicies(
            bpb.ListSiteBalancingPoliciesRequest(site_id=community.site.id),
            metadata=community.org.auth,
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_a_setting_updated_as_its_meter_is_deleted_is_not_found(
    community: Community, service: Service
) -> None:
    """The meter's deletion (its statements here, uncommitted) holds the setting's row,
    which it deletes with the meter; the update waits for it, and found no row to return
    (a TypeError: INTERNAL)."""
    meter = await community.meter()
    setting = await community.participate(meter)
    assert service.pool is not None
    async with service.pool.acquire() as deleter:
        transaction = deleter.transaction()
        await transaction.start()
        await deleter.execute("SELECT FROM meters WHERE id = $1 FOR UPDATE", UUID(meter.id))
        await deleter.execute("DELETE FROM readings WHERE meter_id = $1", UUID(meter.id))
        await deleter.execute("DELETE FROM meters WHERE id = $1", UUID(meter.id))
        update = asyncio.ensure_future(
            community.balancing.UpdateMeterBalancingSetting(
                bpb.UpdateMeterBalancingSettingRequest(
                    setting=bpb.MeterBalancingSetting(id=setting.id, priority=2),
                    update_mask=field_mask_pb2.FieldMask(paths=["priority"]),
                ),
                metadata=community.org.auth,
            )
        )
        await wait_until_blocked(deleter, 1, update)
        await transaction.commit()
    error = await rpc_error(update)
    assert error.code() == grpc.StatusCode.NOT_FOUND, (error.code(), error.details())


async def test_a_participant_deleted_during_run_balancing_waits_for_it(
    community: Community, service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RunBalancing read the site's meters, then in a later statement their energy: a
    participant deleted in between made it answer NOT_FOUND for an existing site (and a
    worker's pass fail). Now the meters are held from the first read on."""
    pv = await community.meter(direction=mpb.METER_DIRECTION_PRODUCER)
    home, gone = await community.meter(), await community.meter()
    for meter in (pv, home, gone):
        await community.participate(meter)
        await community.profile(meter, BERLIN_NEW_YEAR, [100.0] * 4)
    deletions: list[asyncio.Future[Any]] = []

    async def meters_then_a_deletion(
        conn: asyncpg.Connection, org_id: UUID, site_id: UUID
    ) -> dict[UUID, MeterRow]:
        found = await site_meters(conn, org_id, site_id)
        deletion = asyncio.ensure_future(
            community.meters.DeleteMeter(
                mpb.DeleteMeterRequest(meter_id=gone.id), metadata=community.org.auth
            )
        )
        deletions.append(deletion)
        await wait_until_blocked(conn, 1, deletion)
        return found

    monkeypatch.setattr(rebalance_module, "site_meters", meters_then_a_deletion)
    response = await community.balancing.RunBalancing(
        bpb.RunBalancingRequest(
            site_id=community.site.id,
            start_time=stamp(BERLIN_NEW_YEAR),
            end_time=stamp(BERLIN_NEW_YEAR + timedelta(hours=1)),
        ),
        metadata=community.org.auth,
    )
    assert response.balanced_intervals == 4
    await deletions[0]  # once RunBalancing committed


async def test_listing_settings_of_another_organizations_meter_is_not_found(
    community: Community, other_partner: Org
) -> None:
    """As every other call answers for another organization's id (it was an empty page)."""
    their_meter = await (await community.another_site(other_partner)).meter()
    error = await rpc_error(
        community.balancing.ListMeterBalancingSettings(
            bpb.ListMeterBalancingSettingsRequest(
                site_id=community.site.id, meter_id=their_meter.id
            ),
            metadata=community.org.auth,
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
