"""Partner and supplier writes on one identifier at the same time: no stale status, no
deadlock (both sides take the identifier's lock before any partner site row)."""

from __future__ import annotations

import asyncio

from google.protobuf import field_mask_pb2
from openvpp.v1 import site_registry_pb2 as site_pb

from tests.conftest import Org
from tests.helpers import random_identifier
from tests.upstream.conftest import Api, days


async def test_partner_create_racing_supplier_writes_never_leaves_a_stale_status(
    api: Api, partner: Org, supplier: Org
) -> None:
    for _ in range(15):
        identifier = random_identifier()
        upstream_site = await api.upstream_site(supplier, identifier)
        site, _contract = await asyncio.gather(
            api.partner_site(partner, identifier),
            api.contract(supplier, upstream_site.id, days(-1)),
        )
        assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE

    for _ in range(15):
        identifier = random_identifier()
        site, _upstream_site = await asyncio.gather(
            api.partner_site(partner, identifier),
            api.upstream_site(supplier, identifier),
        )
        assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_NO_CONTRACT


async def test_partner_updates_racing_supplier_writes_do_not_deadlock(
    api: Api, partner: Org, supplier: Org
) -> None:
    identifier = random_identifier()
    site = await api.partner_site(partner, identifier)
    upstream_site = await api.upstream_site(supplier, identifier)

    async def partner_updates() -> None:
        for zone in ["Europe/Brussels", "UTC", "Asia/Tokyo", "Europe/Paris"] * 3:
            await api.sites.UpdateSite(
                site_pb.UpdateSiteRequest(
                    site=site_pb.Site(id=site.id, timezone=zone),
                    update_mask=field_mask_pb2.FieldMask(paths=["timezone"]),
                ),
                metadata=partner.auth,
            )

    async def supplier_writes() -> None:
        for i in range(6):
            contract = await api.contract(
                supplier, upstream_site.id, days(10 * i), days(10 * i + 5)
            )
            await api.terminate(supplier, contract.id, days(10 * i + 1))

    # Errors (a deadlock surfaces as ABORTED) fail the gather.
    await asyncio.gather(partner_updates(), supplier_writes(), partner_updates())
    # Today (days(0)) lies in the first contract, terminated from days(1): active.
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE
