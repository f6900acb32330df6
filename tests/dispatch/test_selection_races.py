"""DispatchFlexibility checks that the selected sites exist, then reads the candidates in a
later statement: a DeleteSite committing in between left a selected site counted neither
eligible nor ineligible. The sites are held (FOR KEY SHARE) from the check on now, and the
deletion waits for the dispatch."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from openvpp.v1 import dispatch_pb2 as pb
from openvpp.v1 import site_registry_pb2 as site_pb

from service.dispatch import store as dispatch_store
from tests.dispatch.conftest import Cluster, Flow


async def test_a_selected_site_deleted_during_dispatch_is_still_counted(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    replica = await cluster.replica()
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    site, _ = await flow.site(partner, supplier, "https://partner.example/setpoints")
    original = dispatch_store.DispatchStore._check_selection

    deletions: list[asyncio.Future[Any]] = []

    async def checked_then_deleted(self: Any, conn: Any, selection: Any) -> None:
        await original(self, conn, selection)
        deleting = asyncio.ensure_future(
            replica.registry.DeleteSite(
                site_pb.DeleteSiteRequest(site_id=site.id), metadata=partner.auth
            )
        )
        deletions.append(deleting)
        # Until the deletion waits for the dispatch (or, as before, has committed).
        while not deleting.done():
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            if await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
            ):
                return
            await asyncio.sleep(0.01)

    monkeypatch.setattr(dispatch_store.DispatchStore, "_check_selection", checked_then_deleted)
    response = await flow.dispatch(
        operator, power_kw=3.0, selection=pb.DispatchSelection(site_ids=[site.id])
    )
    await deletions[0]
    counted = response.dispatch.eligible_site_count + response.dispatch.ineligible_site_count
    assert counted == 1, response.dispatch
