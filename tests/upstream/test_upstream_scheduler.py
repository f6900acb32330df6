"""Date-driven upstream_status changes: applied by the scheduler at local midnight, once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from openvpp.v1 import site_registry_pb2 as site_pb
from openvpp.v1 import upstream_registry_pb2 as pb

from service.app import Service
from service.upstream.scheduler import UpstreamScheduler
from tests import conftest as shared
from tests.conftest import Org
from tests.helpers import random_identifier
from tests.upstream.conftest import (
    BASE,
    Api,
    FakeClock,
    WatcherFactory,
    days,
    upstream_changes,
)


@pytest.fixture
def scheduler(upstream_service: Service) -> UpstreamScheduler:
    assert upstream_service.upstream_scheduler is not None
    return upstream_service.upstream_scheduler


def midnight(day_offset: int, timezone: str) -> datetime:
    return datetime.combine(days(day_offset), datetime.min.time(), tzinfo=ZoneInfo(timezone))


async def test_pending_becomes_active_exactly_at_local_midnight(
    api: Api, partner: Org, supplier: Org, clock: FakeClock, scheduler: UpstreamScheduler
) -> None:
    identifier = random_identifier()
    site = await api.partner_site(partner, identifier, timezone="Europe/Brussels")
    upstream_site = await api.upstream_site(supplier, identifier)
    await api.contract(supplier, upstream_site.id, days(3))
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_PENDING

    clock.set(midnight(3, "Europe/Brussels") - timedelta(microseconds=1))
    await scheduler.run_once()
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_PENDING

    clock.set(midnight(3, "Europe/Brussels"))
    await scheduler.run_once()
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE


async def test_each_partner_site_turns_at_its_own_midnight(
    api: Api,
    partner: Org,
    other_partner: Org,
    supplier: Org,
    clock: FakeClock,
    scheduler: UpstreamScheduler,
) -> None:
    identifier = random_identifier()
    auckland = await api.partner_site(partner, identifier, timezone="Pacific/Auckland")
    los_angeles = await api.partner_site(other_partner, identifier, timezone="America/Los_Angeles")
    upstream_site = await api.upstream_site(supplier, identifier)
    await api.contract(supplier, upstream_site.id, days(2), days(4))

    clock.set(midnight(2, "Pacific/Auckland"))
    await scheduler.run_once()
    assert await api.status(partner, auckland.id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE
    assert (
        await api.status(other_partner, los_angeles.id) == site_pb.UPSTREAM_STATUS_CONTRACT_PENDING
    )

    clock.set(midnight(2, "America/Los_Angeles"))
    await scheduler.run_once()
    assert (
        await api.status(other_partner, los_angeles.id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE
    )

    clock.set(midnight(4, "Pacific/Auckland"))
    await scheduler.run_once()
    assert await api.status(partner, auckland.id) == site_pb.UPSTREAM_STATUS_CONTRACT_INACTIVE
    assert (
        await api.status(other_partner, los_angeles.id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE
    )


async def test_active_becomes_inactive_at_end_and_watchers_see_it(
    api: Api,
    partner: Org,
    supplier: Org,
    clock: FakeClock,
    scheduler: UpstreamScheduler,
    watch: WatcherFactory,
) -> None:
    identifier = random_identifier()
    site = await api.partner_site(partner, identifier)
    upstream_site = await api.upstream_site(supplier, identifier)
    await api.contract(supplier, upstream_site.id, days(-3), days(1))
    async with watch(partner) as watcher:
        clock.set(midnight(1, "UTC"))
        await scheduler.run_once()
        events = await watcher.events_until_sentinel(site.id)
    assert upstream_changes(events, site.id) == [site_pb.UPSTREAM_STATUS_CONTRACT_INACTIVE]


async def test_scheduled_termination_takes_effect_on_its_date(
    api: Api, partner: Org, supplier: Org, clock: FakeClock, scheduler: UpstreamScheduler
) -> None:
    identifier = random_identifier()
    site = await api.partner_site(partner, identifier)
    upstream_site = await api.upstream_site(supplier, identifier)
    contract = await api.contract(supplier, upstream_site.id, days(-30))
    terminated = await api.terminate(supplier, contract.id, days(5))
    assert terminated.state == pb.CONTRACT_STATE_ACTIVE
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE

    clock.set(midnight(5, "UTC"))
    await scheduler.run_once()
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_INACTIVE


async def test_after_downtime_one_tick_catches_up(
    api: Api,
    partner: Org,
    supplier: Org,
    clock: FakeClock,
    scheduler: UpstreamScheduler,
    watch: WatcherFactory,
) -> None:
    """Start and end both passed while no replica ran: the site is still due, and lands
    directly on the status of today."""
    identifier = random_identifier()
    site = await api.partner_site(partner, identifier)
    upstream_site = await api.upstream_site(supplier, identifier)
    await api.contract(supplier, upstream_site.id, days(2), days(5))
    async with watch(partner) as watcher:
        clock.set(BASE + timedelta(days=60))
        await scheduler.run_once()
        events = await watcher.events_until_sentinel(site.id)
    assert upstream_changes(events, site.id) == [site_pb.UPSTREAM_STATUS_CONTRACT_INACTIVE]


async def test_supplier_switch_keeps_site_active(
    api: Api,
    partner: Org,
    supplier: Org,
    other_supplier: Org,
    clock: FakeClock,
    scheduler: UpstreamScheduler,
    watch: WatcherFactory,
) -> None:
    """Old supplier's contract ends on the switch date, the new one's starts on it: the
    site is CONTRACT_ACTIVE throughout, without a gap or an event at the switch."""
    identifier = random_identifier()
    site = await api.partner_site(partner, identifier)
    old_site = await api.upstream_site(supplier, identifier)
    old = await api.contract(supplier, old_site.id, days(-100), days(10))
    new_site = await api.upstream_site(other_supplier, identifier)
    new = await api.contract(other_supplier, new_site.id, days(10), requires_agreement=True)
    await api.agree(other_supplier, new.id)
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE

    async with watch(partner) as watcher:
        clock.set(midnight(10, "UTC"))
        await scheduler.run_once()
        events = await watcher.events_until_sentinel(site.id)
    assert upstream_changes(events, site.id) == []
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE
    old_contracts = await api.upstream.ListContracts(
        pb.ListContractsRequest(upstream_site_id=old_site.id), metadata=supplier.auth
    )
    assert [(c.id, c.state) for c in old_contracts.contracts] == [
        (old.id, pb.CONTRACT_STATE_INACTIVE)
    ]
    new_contracts = await api.upstream.ListContracts(
        pb.ListContractsRequest(upstream_site_id=new_site.id), metadata=other_supplier.auth
    )
    assert [(c.id, c.state) for c in new_contracts.contracts] == [
        (new.id, pb.CONTRACT_STATE_ACTIVE)
    ]


async def test_supplier_switch_without_agreement_shows_it_at_the_switch(
    api: Api,
    partner: Org,
    supplier: Org,
    other_supplier: Org,
    clock: FakeClock,
    scheduler: UpstreamScheduler,
) -> None:
    """Precedence ACTIVE > PENDING > NEEDS_AGREEMENT > INACTIVE: the old contract in force
    hides the new one awaiting agreement until the switch date; then the new one shows."""
    identifier = random_identifier()
    site = await api.partner_site(partner, identifier)
    old_site = await api.upstream_site(supplier, identifier)
    await api.contract(supplier, old_site.id, days(-100), days(10))
    new_site = await api.upstream_site(other_supplier, identifier)
    new = await api.contract(other_supplier, new_site.id, days(10), requires_agreement=True)
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE

    clock.set(midnight(10, "UTC"))
    await scheduler.run_once()
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_NEEDS_AGREEMENT

    await api.agree(other_supplier, new.id)
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE


@pytest.fixture
async def replicas(database_url: str) -> AsyncIterator[list[Service]]:
    """Two more replicas on the same database, their clocks 6 days after BASE."""
    started = [
        Service(shared.test_settings(), database_url, clock=FakeClock(BASE + timedelta(days=6)))
        for _ in range(2)
    ]
    for replica in started:
        await replica.start()
    yield started
    for replica in started:
        await replica.stop(grace=1)


async def test_two_replicas_racing_apply_each_transition_once(
    api: Api,
    partner: Org,
    supplier: Org,
    replicas: list[Service],
    watch: WatcherFactory,
    clock: FakeClock,
) -> None:
    site_ids = []
    for _ in range(12):
        identifier = random_identifier()
        site = await api.partner_site(partner, identifier)
        upstream_site = await api.upstream_site(supplier, identifier)
        await api.contract(supplier, upstream_site.id, days(5))
        site_ids.append(site.id)

    # Every replica's clock past the start (the sentinel write recomputes on this one).
    clock.set(BASE + timedelta(days=6))
    async with watch(partner) as watcher:
        schedulers = [replica.upstream_scheduler for replica in replicas]
        await asyncio.gather(*(s.run_once() for s in schedulers if s is not None))
        events = await watcher.events_until_sentinel(site_ids[0])
    for site_id in site_ids:
        assert upstream_changes(events, site_id) == [site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE]
        assert await api.status(partner, site_id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE


async def test_service_runs_the_scheduler_by_itself(
    api: Api,
    partner: Org,
    supplier: Org,
    database_url: str,
    clock: FakeClock,
    watch: WatcherFactory,
) -> None:
    identifier = random_identifier()
    site = await api.partner_site(partner, identifier)
    upstream_site = await api.upstream_site(supplier, identifier)
    await api.contract(supplier, upstream_site.id, days(1))

    later = BASE + timedelta(days=2)
    clock.set(later)
    replica = Service(
        shared.test_settings(upstream_scheduler_interval_seconds=0.05),
        database_url,
        clock=FakeClock(later),
    )
    async with watch(partner) as watcher:
        await replica.start()
        try:
            # The bound only keeps a broken timer loop from hanging the suite.
            async with asyncio.timeout(20):
                event = await watcher.next_upstream_change(site.id)
        finally:
            await replica.stop(grace=1)
    assert event.site.upstream_status == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE


async def test_nothing_due_before_the_date(
    api: Api, partner: Org, supplier: Org, clock: FakeClock, scheduler: UpstreamScheduler
) -> None:
    identifier = random_identifier()
    site = await api.partner_site(partner, identifier)
    upstream_site = await api.upstream_site(supplier, identifier)
    await api.contract(supplier, upstream_site.id, days(1), requires_agreement=True)
    # A contract awaiting agreement changes nothing on its start date: no check is planned.
    clock.set(BASE + timedelta(days=3))
    await scheduler.run_once()
    assert await api.status(partner, site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_NEEDS_AGREEMENT


async def test_one_identifier_failing_holds_back_no_other(
    api: Api,
    partner: Org,
    other_partner: Org,
    supplier: Org,
    clock: FakeClock,
    scheduler: UpstreamScheduler,
    upstream_service: Service,
) -> None:
    # The tick walks the due identifiers in order; the first one's recomputation fails (a
    # trigger stands in for whatever its data or a bug would do). The other organization's
    # site, after it in the walk, still turns active; the failing one stays due.
    failing, fine = sorted([random_identifier(), random_identifier()])
    broken = await api.partner_site(partner, failing, timezone="UTC")
    other = await api.partner_site(other_partner, fine, timezone="UTC")
    for identifier in (failing, fine):
        upstream_site = await api.upstream_site(supplier, identifier)
        await api.contract(supplier, upstream_site.id, days(2))
    pool = upstream_service.pool
    assert pool is not None
    await pool.execute(
        f"""
        CREATE FUNCTION refuse_{failing.lower()}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'refused for the test'; END $$;
        CREATE TRIGGER refuse_{failing.lower()} BEFORE UPDATE ON sites FOR EACH ROW
            WHEN (NEW.grid_identifier = '{failing}') EXECUTE FUNCTION refuse_{failing.lower()}();
        """
    )
    try:
        clock.set(midnight(2, "UTC"))
        failures = scheduler.failed_identifiers
        await scheduler.run_once()
        assert scheduler.failed_identifiers == failures + 1
        assert await api.status(other_partner, other.id) == (
            site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE
        )
        assert await api.status(partner, broken.id) == site_pb.UPSTREAM_STATUS_CONTRACT_PENDING
    finally:
        await pool.execute(
            f"DROP TRIGGER refuse_{failing.lower()} ON sites;"
            f" DROP FUNCTION refuse_{failing.lower()}()"
        )
    await scheduler.run_once()
    assert await api.status(partner, broken.id) == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE
