"""The outbox: eligibility at creation and before each attempt, retries, cancellation, expiry,
watching, and replicas sharing one outbox."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from openvpp.v1 import dispatch_pb2 as pb
from openvpp.v1 import site_registry_pb2 as site_pb
from openvpp.v1 import upstream_registry_pb2 as up_pb

from service.auth.principal import Role
from service.auth.store import IdentityStore
from service.common.clock import SYSTEM_CLOCK, ManualClock
from service.dispatch import store as dispatch_store
from service.dispatch.delivery import DeliverySettings, WebhookSender
from service.dispatch.outbox import OutboxDeliverer, OutboxSettings
from service.dispatch.store import CHANGES_PER_NOTIFICATION
from tests.conftest import Org
from tests.dispatch.conftest import UPSTREAM_CASES, Cluster, Flow, Replica
from tests.dispatch.setpoint_receiver import (
    Answer,
    Received,
    SetpointReceiver,
    running_receiver,
)
from tests.helpers import eventually, wait_until_blocked
from tests.metrics_reader import RecordedMetrics
from tests.pg_proxy import (
    CommitAnswerCutter,
    outbox_check_that_settled_rows,
    outbox_claim_that_took_rows,
)
from tests.upstream.conftest import day

BATTERY = site_pb.RESOURCE_TYPE_STATIC_BATTERY
METER = site_pb.RESOURCE_TYPE_METER
ACCEPTED = pb.SETPOINT_STATE_ACCEPTED


async def test_only_onboarded_contract_active_sites_get_setpoints(cluster: Cluster) -> None:
    replica = await cluster.replica(dispatch_delivery_enabled=False)
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    url = "http://127.0.0.1:9/x"
    kinds = {
        "onboarded": {"resources": [(BATTERY, -5, 5)]},
        "paused": {"resources": [(BATTERY, -5, 5)], "paused": True},
        "no_resources": {"resources": [(METER, 0, 0)]},
    }
    sites: dict[tuple[str, str], str] = {}
    for (status, extra), upstream in itertools.product(kinds.items(), UPSTREAM_CASES):
        site, _ = await flow.site(partner, supplier, url, upstream=upstream, **extra)  # type: ignore[arg-type]
        assert site_pb.SiteStatus.Name(site.status) == "SITE_STATUS_" + status.upper()
        assert site_pb.UpstreamStatus.Name(site.upstream_status) == (
            "UPSTREAM_STATUS_" + upstream.upper()
        )
        sites[(status, upstream)] = site.id
    response = await flow.dispatch(
        operator, selection=pb.DispatchSelection(site_ids=list(sites.values()))
    )
    setpoints = await flow.setpoints(operator, response.dispatch.id)
    assert {s.site_id for s in setpoints} == {sites[("onboarded", "contract_active")]}
    assert response.dispatch.eligible_site_count == 1
    assert response.dispatch.ineligible_site_count == len(sites) - 1
    # A partner's organization as the selection.
    by_org = await flow.dispatch(
        operator, selection=pb.DispatchSelection(organization_id=str(partner.id)), dry_run=True
    )
    assert {s.site_id for s in by_org.setpoints} == {sites[("onboarded", "contract_active")]}


async def test_a_site_paused_after_the_dispatch_is_not_delivered_to(cluster: Cluster) -> None:
    api = await cluster.replica(dispatch_delivery_enabled=False)
    flow = Flow(api)
    operator, partner, supplier = await flow.parties()
    async with running_receiver() as receiver:
        receiver.trust(await flow.secret(partner))
        paused_site, _ = await flow.site(partner, supplier, receiver.url())
        deleted_site, _ = await flow.site(partner, supplier, receiver.url())
        kept_site, _ = await flow.site(partner, supplier, receiver.url())
        ended_site, _ = await flow.site(
            partner, supplier, receiver.url(), upstream="no_upstream_registered"
        )
        contract_id = await flow.set_upstream(
            supplier, ended_site.grid_identifier, "contract_active"
        )
        dispatch = (await flow.dispatch(operator)).dispatch
        assert dispatch.pending_count == 4
        await api.upstream.TerminateContract(
            up_pb.TerminateContractRequest(
                contract_id=contract_id, effective_date=day(datetime.now(UTC).date())
            ),
            metadata=supplier.auth,
        )
        await api.registry.PauseSite(
            site_pb.PauseSiteRequest(site_id=paused_site.id), metadata=partner.auth
        )
        await api.registry.DeleteSite(
            site_pb.DeleteSiteRequest(site_id=deleted_site.id), metadata=partner.auth
        )
        await cluster.replica()  # a delivering replica starts only now
        settled = {s.site_id: s for s in await flow.settle(operator, dispatch.id)}
        assert settled[paused_site.id].state == pb.SETPOINT_STATE_NOT_ELIGIBLE
        assert settled[paused_site.id].reason == "site status paused"
        assert settled[paused_site.id].attempts == []
        assert settled[deleted_site.id].state == pb.SETPOINT_STATE_NOT_ELIGIBLE
        assert settled[deleted_site.id].reason == "site deleted"
        assert settled[ended_site.id].state == pb.SETPOINT_STATE_NOT_ELIGIBLE
        assert settled[ended_site.id].reason == "upstream_status contract_inactive"
        assert settled[kept_site.id].state == ACCEPTED
        assert [r.body["site_id"] for r in receiver.received] == [kept_site.id]


async def test_a_deleted_sites_setpoints_stay_listed_and_watched_by_its_id(
    cluster: Cluster,
) -> None:
    """Setpoints outlive their site: its id stays a valid ListSetpoints and WatchSetpoints
    filter for both scopes, and a watch of it opened before the deletion sees its setpoint
    settled after it (NOT_ELIGIBLE). An id of no site and no setpoint is still NOT_FOUND."""
    api = await cluster.replica(dispatch_delivery_enabled=False)
    flow = Flow(api)
    operator, partner, supplier = await flow.parties()
    async with running_receiver() as receiver:
        receiver.trust(await flow.secret(partner))
        site, _ = await flow.site(partner, supplier, receiver.url())
        dispatch = (await flow.dispatch(operator)).dispatch
        watches = [
            api.dispatch.WatchSetpoints(
                pb.WatchSetpointsRequest(site_id=site.id), metadata=party.auth
            )
            for party in (operator, partner)
        ]
        for watch in watches:
            await watch.initial_metadata()
        await api.registry.DeleteSite(
            site_pb.DeleteSiteRequest(site_id=site.id), metadata=partner.auth
        )
        for party in (operator, partner):
            (listed,) = await flow.setpoints(party, site_id=site.id)
            assert (listed.dispatch_id, listed.site_id) == (dispatch.id, site.id)
            # A watch opened now is accepted too.
            late = api.dispatch.WatchSetpoints(
                pb.WatchSetpointsRequest(site_id=site.id), metadata=party.auth
            )
            await asyncio.wait_for(late.initial_metadata(), 10)
            late.cancel()
        await cluster.replica()  # a delivering replica settles it
        async with asyncio.timeout(20):
            for watch in watches:
                async for event in watch:
                    assert event.setpoint.site_id == site.id
                    if event.setpoint.state == pb.SETPOINT_STATE_NOT_ELIGIBLE:
                        assert event.setpoint.reason == "site deleted"
                        break
                watch.cancel()
        assert receiver.received == []
        unknown = str(uuid.uuid4())
        for party in (operator, partner):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await flow.setpoints(party, site_id=unknown)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_transport_bug_fails_attempts_with_one_trace_a_minute_not_one_each(
    cluster: Cluster, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in sending fails every attempt alike: at 512 in flight and 10 attempts each, a
    trace per attempt would be thousands. The setpoints still end FAILED, attempt by
    attempt."""

    async def broken(*_args: object) -> None:
        raise RuntimeError("a bug in the transport")

    monkeypatch.setattr(WebhookSender, "send_unless_withdrawn", broken)
    replica = await cluster.replica(dispatch_max_attempts=3)
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    await flow.site(partner, supplier, "http://127.0.0.1:9/", resources=[(BATTERY, -5, 5)] * 5)
    with caplog.at_level(logging.ERROR, logger="service.dispatch.outbox"):
        dispatch = (await flow.dispatch(operator)).dispatch
        settled = await flow.settle(operator, dispatch.id)
    assert [s.state for s in settled] == [pb.SETPOINT_STATE_FAILED] * 5
    assert all(len(s.attempts) == 3 for s in settled)
    assert all(a.error == "internal error: RuntimeError" for s in settled for a in s.attempts)
    traces = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert len(traces) == 1, [r.getMessage() for r in traces]
    assert traces[0].exc_info is not None


async def test_delivery_attempts_are_counted_by_outcome(cluster: Cluster) -> None:
    recorded = RecordedMetrics()
    replica = await cluster.replica(meter_provider=recorded.provider)
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    answered: list[int] = []

    async def first_unavailable(_received: Received) -> int:
        answered.append(503 if not answered else 200)
        return answered[-1]

    async with running_receiver(first_unavailable) as receiver:
        receiver.trust(await flow.secret(partner))
        await flow.site(partner, supplier, receiver.url(), resources=[(BATTERY, -5, 5)] * 3)
        dispatch = (await flow.dispatch(operator)).dispatch
        settled = await flow.settle(operator, dispatch.id, frozenset({ACCEPTED}))
    assert len(settled) == 3
    attempts = "openvpp.dispatch.delivery.attempts"
    assert recorded.value(attempts, outcome="accepted") == 3
    assert recorded.value(attempts, outcome="retryable") == 1
    await eventually(
        lambda: recorded.value("openvpp.dispatch.in_flight") == 0, "nothing left in flight"
    )


async def set_power_bounds(
    replica: Replica, partner: Org, resource_id: str, low: float, high: float
) -> None:
    await replica.registry.UpdateResource(
        site_pb.UpdateResourceRequest(
            resource=site_pb.Resource(id=resource_id, power_kw=site_pb.Bounds(min=low, max=high)),
            update_mask=field_mask_pb2.FieldMask(paths=["power_kw"]),
        ),
        metadata=partner.auth,
    )


async def test_a_setpoint_its_resources_new_bounds_no_longer_hold_is_not_sent(
    cluster: Cluster,
) -> None:
    api = await cluster.replica(dispatch_delivery_enabled=False)
    flow = Flow(api)
    operator, partner, supplier = await flow.parties()
    async with running_receiver() as receiver:
        receiver.trust(await flow.secret(partner))
        _site, resources = await flow.site(
            partner, supplier, receiver.url(), resources=[(BATTERY, -5, 5)] * 4
        )
        dispatch = (await flow.dispatch(operator, power_kw=8.0)).dispatch
        made = {s.resource_id: s for s in await flow.setpoints(operator, dispatch.id)}
        assert {s.power_kw for s in made.values()} == {2.0}
        narrowed, still_wide, at_the_bound, now_above = (r.id for r in resources)
        await set_power_bounds(api, partner, narrowed, -1.5, 1.5)
        await set_power_bounds(api, partner, still_wide, -3, 3)
        await set_power_bounds(api, partner, at_the_bound, 0, 2)
        await set_power_bounds(api, partner, now_above, 2.5, 10)  # a minimum consumption
        await cluster.replica()  # a delivering replica starts only now
        settled = {s.resource_id: s for s in await flow.settle(operator, dispatch.id)}
    assert {r: (s.state, s.reason) for r, s in settled.items() if s.state != ACCEPTED} == {
        narrowed: (
            pb.SETPOINT_STATE_NOT_ELIGIBLE,
            "power_kw 2.000 outside the resource's bounds now [-1.500, 1.500]",
        ),
        now_above: (
            pb.SETPOINT_STATE_NOT_ELIGIBLE,
            "power_kw 2.000 outside the resource's bounds now [2.500, 10.000]",
        ),
    }
    assert settled[narrowed].attempts == []
    assert sorted(r.body["resource_id"] for r in receiver.received) == sorted(
        [still_wide, at_the_bound]
    )


async def test_retries_until_accepted_and_rejections_are_final(cluster: Cluster) -> None:
    replica = await cluster.replica()
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    answers: Counter[str] = Counter()

    async def flaky(received: Received) -> int:
        answers[received.webhook_id] += 1
        if received.body["resource_external_id"].startswith("reject"):
            return 422
        return 503 if answers[received.webhook_id] <= 2 else 200

    async with running_receiver(flaky) as receiver:
        receiver.trust(await flow.secret(partner))
        site, resources = await flow.site(partner, supplier, receiver.url("/flaky"))
        await replica.registry.UpdateResource(
            site_pb.UpdateResourceRequest(
                resource=site_pb.Resource(id=resources[0].id, external_id="plain"),
                update_mask=field_mask_pb2.FieldMask(paths=["external_id"]),
            ),
            metadata=partner.auth,
        )
        other, _ = await flow.site(partner, supplier, receiver.url("/other"))
        rejecting = await replica.registry.ListResources(
            site_pb.ListResourcesRequest(site_id=other.id), metadata=partner.auth
        )
        await replica.registry.UpdateResource(
            site_pb.UpdateResourceRequest(
                resource=site_pb.Resource(id=rejecting.resources[0].id, external_id="reject-me"),
                update_mask=field_mask_pb2.FieldMask(paths=["external_id"]),
            ),
            metadata=partner.auth,
        )
        dispatch = (await flow.dispatch(operator)).dispatch
        settled = {s.site_id: s for s in await flow.settle(operator, dispatch.id)}
        retried = settled[site.id]
        assert retried.state == ACCEPTED
        assert [a.http_status for a in retried.attempts] == [503, 503, 200]
        assert len(receiver.for_setpoint(retried.id)) == 3
        # The webhook-id stays on every retry; each attempt was signed (and verified).
        deliveries = receiver.for_setpoint(retried.id)
        assert {d.webhook_id for d in deliveries} == {retried.id}
        assert receiver.bad_signatures == 0
        rejected = settled[other.id]
        assert rejected.state == pb.SETPOINT_STATE_REJECTED
        assert rejected.reason == "HTTP 422"
        assert [a.http_status for a in rejected.attempts] == [422]


async def test_an_attempts_time_is_when_it_was_sent_not_when_it_was_queued(
    cluster: Cluster,
) -> None:
    """One request at a time towards the endpoint and a slow receiver: the second setpoint
    waits for the first's slot, and its attempt's time is when its request went out."""
    replica = await cluster.replica(dispatch_max_concurrency_per_host=1)
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    arrived: dict[str, datetime] = {}

    async def slow(received: Received) -> int:
        arrived[received.body["setpoint_id"]] = datetime.now(UTC)
        await asyncio.sleep(0.4)
        return 200

    async with running_receiver(slow) as receiver:
        receiver.trust(await flow.secret(partner))
        await flow.site(
            partner, supplier, receiver.url(), resources=[(BATTERY, -5, 5), (BATTERY, -5, 5)]
        )
        dispatch = (await flow.dispatch(operator)).dispatch
        settled = await flow.settle(operator, dispatch.id)
    assert [s.state for s in settled] == [ACCEPTED, ACCEPTED]
    sent = sorted((s.attempts[0].attempt_time.ToDatetime(UTC), arrived[s.id]) for s in settled)
    for attempt_time, arrival in sent:
        assert timedelta(0) <= arrival - attempt_time < timedelta(seconds=0.2)
    assert sent[1][0] - sent[0][0] >= timedelta(seconds=0.35)


async def test_the_attempt_limit_fails_a_setpoint(cluster: Cluster) -> None:
    replica = await cluster.replica(dispatch_max_attempts=3, dispatch_breaker_failure_threshold=100)
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()

    async def down(_received: Received) -> int:
        return 500

    async with running_receiver(down) as receiver:
        receiver.trust(await flow.secret(partner))
        await flow.site(partner, supplier, receiver.url())
        dispatch = (await flow.dispatch(operator)).dispatch
        (setpoint,) = await flow.settle(operator, dispatch.id)
        assert setpoint.state == pb.SETPOINT_STATE_FAILED
        assert [a.http_status for a in setpoint.attempts] == [500, 500, 500]
        assert "3 attempts" in setpoint.reason


async def test_cancel_before_delivery_sends_nothing(cluster: Cluster) -> None:
    api = await cluster.replica(dispatch_delivery_enabled=False)
    flow = Flow(api)
    operator, partner, supplier = await flow.parties()
    async with running_receiver() as receiver:
        await flow.site(partner, supplier, receiver.url(), resources=[(BATTERY, -5, 5)] * 2)
        dispatch = (await flow.dispatch(operator)).dispatch
        cancelled = await api.dispatch.CancelDispatch(
            pb.CancelDispatchRequest(dispatch_id=dispatch.id), metadata=operator.auth
        )
        assert cancelled.dispatch.cancelled_count == 2
        assert cancelled.dispatch.HasField("cancel_time")
        again = await api.dispatch.CancelDispatch(
            pb.CancelDispatchRequest(dispatch_id=dispatch.id), metadata=operator.auth
        )
        assert again.dispatch.cancel_time == cancelled.dispatch.cancel_time
        await cluster.replica()
        await asyncio.sleep(0.5)
        settled = await flow.settle(operator, dispatch.id)
        assert {s.state for s in settled} == {pb.SETPOINT_STATE_CANCELLED}
        assert {s.reason for s in settled} == {"cancelled before delivery"}
        assert receiver.received == []


async def test_cancel_after_acceptance_delivers_a_cancellation(cluster: Cluster) -> None:
    replica = await cluster.replica()
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    async with running_receiver() as receiver:
        receiver.trust(await flow.secret(partner))
        await flow.site(partner, supplier, receiver.url())
        dispatch = (await flow.dispatch(operator)).dispatch
        (accepted,) = await flow.settle(operator, dispatch.id, frozenset({ACCEPTED}))
        await replica.dispatch.CancelDispatch(
            pb.CancelDispatchRequest(dispatch_id=dispatch.id), metadata=operator.auth
        )
        (cancelled,) = await flow.settle(
            operator, dispatch.id, frozenset({pb.SETPOINT_STATE_CANCELLED})
        )
        assert cancelled.reason == "cancelled after acceptance; cancellation delivered"
        assert [a.cancellation for a in cancelled.attempts] == [False, True]
        first, withdrawal = receiver.for_setpoint(accepted.id)
        assert first.body["power_kw"] == "4.000"
        assert withdrawal.body["type"] == "setpoint.cancelled"
        assert withdrawal.body["power_kw"] is None
        assert withdrawal.body["valid_until"] == first.body["valid_until"]
        assert withdrawal.webhook_id != first.webhook_id
        assert receiver.bad_signatures == 0


class HeldFirst:
    """A receiver's answer that holds the first request until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.first: Received | None = None

    async def __call__(self, received: Received) -> int:
        if self.first is None:
            self.first = received
            await self.release.wait()
        return 200


# One request at a time towards the receiver: the other claimed setpoints wait in the queue.
ONE_SLOT: dict[str, Any] = {
    "dispatch_max_concurrency_per_host": 1,
    "dispatch_recheck_after_seconds": 0.1,
}


@dataclass
class HeldScene:
    """A dispatch whose first request the receiver holds, with one slot towards it: the
    rest of its claimed setpoints wait in the queue behind that request."""

    replica: Replica
    flow: Flow
    operator: Org
    partner: Org
    supplier: Org
    sites: list[site_pb.Site]
    receiver: SetpointReceiver
    answer: HeldFirst
    dispatch: pb.FlexibilityDispatch
    first: Received


@asynccontextmanager
async def held_first(
    cluster: Cluster, sites: int, resources: int, url: str | None = None, **settings: Any
) -> AsyncIterator[HeldScene]:
    replica = await cluster.replica(url=url, **{**ONE_SLOT, **settings})
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    answer = HeldFirst()
    async with running_receiver(answer) as receiver:
        receiver.trust(await flow.secret(partner))
        made = []
        for _ in range(sites):
            site, _resources = await flow.site(
                partner, supplier, receiver.url(), resources=[(BATTERY, -5, 5)] * resources
            )
            made.append(site)
        dispatch = (await flow.dispatch(operator)).dispatch
        await receiver.wait_for(1)
        assert answer.first is not None
        yield HeldScene(
            replica,
            flow,
            operator,
            partner,
            supplier,
            made,
            receiver,
            answer,
            dispatch,
            answer.first,
        )


async def pause(scene: HeldScene, site: site_pb.Site) -> None:
    await scene.replica.registry.PauseSite(
        site_pb.PauseSiteRequest(site_id=site.id), metadata=scene.partner.auth
    )


async def narrow_bounds(scene: HeldScene, site: site_pb.Site) -> None:
    listed = await scene.replica.registry.ListResources(
        site_pb.ListResourcesRequest(site_id=site.id), metadata=scene.partner.auth
    )
    for resource in listed.resources:
        await set_power_bounds(scene.replica, scene.partner, resource.id, -0.5, 0.5)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (pause, "site status paused"),
        (narrow_bounds, "power_kw 1.000 outside the resource's bounds now [-0.500, 0.500]"),
    ],
    ids=["site paused", "bounds narrowed"],
)
async def test_a_change_while_setpoints_wait_for_a_slot_stops_them(
    cluster: Cluster, change: Callable[[HeldScene, site_pb.Site], Awaitable[None]], reason: str
) -> None:
    async with held_first(cluster, sites=2, resources=2) as scene:
        # All four were claimed together; one is in flight, three are queued behind it.
        in_flight_site = scene.first.body["site_id"]
        (changed,) = [site for site in scene.sites if site.id != in_flight_site]
        await change(scene, changed)
        await asyncio.sleep(0.2)  # the queued ones are now due for a check
        scene.answer.release.set()
        settled = await scene.flow.settle(scene.operator, scene.dispatch.id)
    by_site = defaultdict(list)
    for setpoint in settled:
        by_site[setpoint.site_id].append(setpoint)
    assert {s.state for s in by_site[in_flight_site]} == {ACCEPTED}
    assert {(s.state, s.reason) for s in by_site[changed.id]} == {
        (pb.SETPOINT_STATE_NOT_ELIGIBLE, reason)
    }
    assert all(s.attempts == [] for s in by_site[changed.id])
    assert {r.body["site_id"] for r in scene.receiver.received} == {in_flight_site}
    assert len(scene.receiver.received) == 2


async def test_a_site_paused_while_its_setpoints_wait_for_a_global_slot_is_not_sent_to(
    cluster: Cluster,
) -> None:
    # Four slots towards the receiver but one in all: three sends have left the queue and
    # wait for the global slot that the held request has.
    async with held_first(
        cluster,
        sites=2,
        resources=2,
        dispatch_max_concurrency=1,
        dispatch_max_concurrency_per_host=4,
    ) as scene:
        in_flight_site = scene.first.body["site_id"]
        (paused,) = [site for site in scene.sites if site.id != in_flight_site]
        await scene.replica.registry.PauseSite(
            site_pb.PauseSiteRequest(site_id=paused.id), metadata=scene.partner.auth
        )
        await asyncio.sleep(0.2)
        scene.answer.release.set()
        settled = await scene.flow.settle(scene.operator, scene.dispatch.id)
    states = {(s.site_id, s.state, s.reason) for s in settled}
    assert states == {
        (in_flight_site, ACCEPTED, ""),
        (paused.id, pb.SETPOINT_STATE_NOT_ELIGIBLE, "site status paused"),
    }
    assert [r.body["site_id"] for r in scene.receiver.received] == [in_flight_site] * 2


async def test_a_re_check_waiting_for_the_database_holds_no_slot(cluster: Cluster) -> None:
    # One slot in all: while a queued setpoint's check waits for a row lock (as behind a
    # large CancelDispatch), another endpoint's setpoints must still go out.
    async with (
        held_first(cluster, sites=1, resources=2, dispatch_max_concurrency=1) as scene,
        running_receiver() as other,
    ):
        other.trust(await scene.flow.secret(scene.partner))
        queued = [
            uuid.UUID(s.id)
            for s in await scene.flow.setpoints(scene.operator, scene.dispatch.id)
            if s.id != scene.first.body["setpoint_id"]
        ]
        elsewhere, _ = await scene.flow.site(scene.partner, scene.supplier, other.url())
        await asyncio.sleep(0.2)  # the queued one is due for a check
        async with scene.replica.pool.acquire() as holder, holder.transaction():
            await holder.execute(
                "SELECT 1 FROM setpoints WHERE id = ANY($1::uuid[]) FOR UPDATE", queued
            )
            scene.answer.release.set()
            await wait_until_blocked(holder, 1)
            later = await scene.flow.dispatch(
                scene.operator, selection=pb.DispatchSelection(site_ids=[elsewhere.id])
            )
            await other.wait_for(1, within=5)
        settled = await scene.flow.settle(scene.operator, scene.dispatch.id)
        assert {s.state for s in settled} == {ACCEPTED}
        assert {s.state for s in await scene.flow.settle(scene.operator, later.dispatch.id)} == {
            ACCEPTED
        }


async def test_a_dispatch_cancelled_while_its_setpoints_wait_for_a_slot_sends_no_more(
    cluster: Cluster,
) -> None:
    async with held_first(cluster, sites=1, resources=3) as scene:
        await scene.replica.dispatch.CancelDispatch(
            pb.CancelDispatchRequest(dispatch_id=scene.dispatch.id), metadata=scene.operator.auth
        )
        await asyncio.sleep(0.2)
        scene.answer.release.set()
        settled = await scene.flow.settle(
            scene.operator, scene.dispatch.id, frozenset({pb.SETPOINT_STATE_CANCELLED}), within=15
        )
    first_id = scene.first.body["setpoint_id"]
    reasons = {s.id: s.reason for s in settled}
    # The one in flight was accepted, then withdrawn; the queued ones were never sent.
    assert reasons.pop(first_id) == "cancelled after acceptance; cancellation delivered"
    assert set(reasons.values()) == {"cancelled before delivery"}
    assert [(r.body["setpoint_id"], r.body["type"]) for r in scene.receiver.received] == [
        (first_id, "setpoint"),
        (first_id, "setpoint.cancelled"),
    ]


class Slow:
    """A receiver's answer that takes ``seconds``; records how many requests were in
    progress when each one arrived."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.active = 0
        self.seen_active: list[int] = []

    async def __call__(self, _received: Received) -> int:
        self.active += 1
        self.seen_active.append(self.active)
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.active -= 1
        return 200


async def deliver_to_one_site(
    cluster: Cluster, answer: Slow, resources: int, **settings: Any
) -> tuple[list[pb.Setpoint], SetpointReceiver]:
    """A dispatch to one site of ``resources`` batteries, on a replica with ``settings``,
    towards a receiver answering ``answer``: its setpoints once settled, and the receiver."""
    flow = Flow(await cluster.replica(**settings))
    operator, partner, supplier = await flow.parties()
    async with running_receiver(answer) as receiver:
        receiver.trust(await flow.secret(partner))
        await flow.site(partner, supplier, receiver.url(), resources=[(BATTERY, -5, 5)] * resources)
        dispatch = (await flow.dispatch(operator)).dispatch
        settled = await flow.settle(operator, dispatch.id, within=30)
    return settled, receiver


async def test_after_a_re_check_every_slot_towards_the_endpoint_is_used_again(
    cluster: Cluster,
) -> None:
    answer = Slow(0.3)
    settled, _receiver = await deliver_to_one_site(
        cluster, answer, 16, dispatch_max_concurrency_per_host=4, dispatch_recheck_after_seconds=0.1
    )
    assert {s.state for s in settled} == {ACCEPTED}
    # The first four went out at once; the twelve behind them waited longer than 0.1 s, were
    # checked again, and still went out four at a time.
    assert answer.seen_active[:4] == [1, 2, 3, 4]
    assert max(answer.seen_active[4:]) == 4


async def test_a_re_check_slower_than_its_threshold_still_lets_every_setpoint_go(
    cluster: Cluster,
) -> None:
    # 0: a check before every send, which always takes longer than the threshold.
    settled, receiver = await deliver_to_one_site(
        cluster,
        Slow(0.02),
        8,
        dispatch_max_concurrency_per_host=2,
        dispatch_recheck_after_seconds=0,
    )
    assert {s.state for s in settled} == {ACCEPTED}
    assert sorted(receiver.answered.values()) == [1] * 8


async def test_a_worker_never_claims_again_what_it_holds_when_its_leases_lapsed(
    cluster: Cluster,
) -> None:
    async with held_first(cluster, sites=1, resources=3) as scene:
        # What a database outage longer than the lease leaves: the worker still holds the
        # rows (one in flight, two queued), but their leases have expired.
        await scene.replica.pool.execute(
            "UPDATE setpoints SET lease_expires_at = now() - interval '1 second'"
            " WHERE dispatch_id = $1",
            uuid.UUID(scene.dispatch.id),
        )
        worker = scene.replica.service.dispatch_worker
        assert worker is not None
        passes = worker.passes
        worker.wake()
        await eventually(lambda: worker.passes > passes, "a claim after the leases lapsed")
        scene.answer.release.set()
        settled = await scene.flow.settle(scene.operator, scene.dispatch.id)
    assert {s.state for s in settled} == {ACCEPTED}
    assert sorted(scene.receiver.answered.values()) == [1, 1, 1]
    assert scene.receiver.overlaps == 0


async def test_a_worker_cut_off_from_the_database_sends_nothing_once_its_leases_may_have_lapsed(
    cluster: Cluster,
) -> None:
    # One in flight (held), two queued, leases of 1 s; then the worker loses the database
    # (its pool is gone: renewals, re-checks and records all fail) while the other replicas
    # still reach it. Once the leases lapse, another replica takes the setpoints over.
    async with held_first(cluster, sites=1, resources=3, dispatch_lease_seconds=1.0) as scene:
        queued = {
            s.id
            for s in await scene.flow.setpoints(scene.operator, scene.dispatch.id)
            if s.id != scene.first.body["setpoint_id"]
        }
        scene.replica.pool.terminate()
        await asyncio.sleep(1.5)
        takeover = await cluster.replica()
        await scene.receiver.wait_for(4)  # the held one, then the other replica's three
        scene.answer.release.set()
        # The cut-off worker's lane goes on with its queue now, until nothing is left there.
        cut_off = scene.replica.service.dispatch_deliverer
        assert cut_off is not None
        await eventually(lambda: cut_off.in_flight == 0, "the cut-off worker's queue done")
        settled = await Flow(takeover).settle(scene.operator, scene.dispatch.id)
    assert {s.state for s in settled} == {ACCEPTED}
    # The held request was the cut-off worker's, and the other replica sent it again (its
    # attempt was never recorded: at least once). The queued ones went out once, not twice.
    assert {
        webhook_id: scene.receiver.answered[webhook_id] for webhook_id in queued
    } == dict.fromkeys(queued, 1)


async def test_a_send_whose_re_check_outlasted_its_lease_is_not_made(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    # One global slot, leases of 1 s. The second endpoint's setpoint waits for the slot;
    # once it has it, its re-check waits on a row lock (renewals skip the row meanwhile)
    # past the lease, then fails (the database gone for it). Another replica may own the
    # setpoint by then: this one must not send it as claimed.
    settings: dict[str, Any] = {
        "dispatch_max_concurrency": 1,
        "dispatch_max_concurrency_per_host": 1,
        "dispatch_recheck_after_seconds": 0.1,
        "dispatch_lease_seconds": 1.0,
    }
    first = await cluster.replica(**settings)
    flow = Flow(first)
    operator, partner, supplier = await flow.parties()
    hold_one, hold_two = HeldFirst(), HeldFirst()
    async with running_receiver(hold_one) as one, running_receiver(hold_two) as two:
        secret = await flow.secret(partner)
        one.trust(secret)
        two.trust(secret)
        site_one, _ = await flow.site(partner, supplier, one.url())
        site_two, _ = await flow.site(partner, supplier, two.url())
        await flow.dispatch(operator, selection=pb.DispatchSelection(site_ids=[site_one.id]))
        await one.wait_for(1)  # holds the only global slot
        second = (
            await flow.dispatch(operator, selection=pb.DispatchSelection(site_ids=[site_two.id]))
        ).dispatch
        (setpoint,) = await flow.setpoints(operator, second.id)
        setpoint_id = uuid.UUID(setpoint.id)

        async def claimed() -> bool:
            owner = await first.pool.fetchval(
                "SELECT lease_owner FROM setpoints WHERE id = $1", setpoint_id
            )
            return owner is not None

        await eventually(claimed, "the second setpoint claimed")
        holder = await asyncpg.connect(cluster.url)
        try:
            async with holder.transaction():
                await holder.execute(
                    "SELECT 1 FROM setpoints WHERE id = $1 FOR UPDATE", setpoint_id
                )
                locked_at = time.monotonic()
                await asyncio.sleep(0.2)  # stale for a re-check, the lease still fresh
                hold_one.release.set()  # the slot frees: the re-check waits on the lock
                await wait_until_blocked(holder, 1)
                await asyncio.sleep(locked_at + 1.5 - time.monotonic())  # the lease lapsed
                terminated = await holder.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
                )
                assert terminated == 1
                deliverer = first.service.dispatch_deliverer
                assert deliverer is not None
                await eventually(lambda: deliverer.in_flight == 0, "the re-check failed")
        finally:
            await holder.close()
        hold_two.release.set()
        # Another replica would take the lapsed lease over; the first one hands the setpoint
        # back and either of them sends it, once.
        await cluster.replica(**settings)
        settled = await Flow(cluster.replicas[-1]).settle(operator, second.id)
    assert any("not sending setpoint" in record.getMessage() for record in caplog.records)
    assert [s.state for s in settled] == [ACCEPTED]
    assert len(two.for_setpoint(setpoint.id)) == 1
    assert two.overlaps == 0


@pytest.mark.parametrize(
    ("lengths", "held_off"),
    [
        # Renewals held off for longer than the lease: it may have lapsed.
        ({"dispatch_lease_seconds": 1.0}, 1.5),
        # Leases of 8 s, requests of up to 6 s: a request may begin at most 4 s (half the
        # lease, as it is shorter than two timeouts) after its lease was last set. Held off
        # for 4.5 s, within the lease, a request begun then could outlast it and overlap
        # another worker's send of the same setpoint.
        ({"dispatch_lease_seconds": 8.0, "dispatch_timeout_seconds": 6.0}, 4.5),
    ],
    ids=["lapsed", "would lapse during the request"],
)
async def test_setpoints_let_go_while_their_leases_may_lapse_are_sent_later(
    cluster: Cluster, caplog: pytest.LogCaptureFixture, lengths: dict[str, float], held_off: float
) -> None:
    # The only replica: the queued setpoints' renewals are held off (their rows locked), so
    # it lets them go unsent. Its own claims never take rows leased to it, so they would stay
    # stuck unless it releases them once the database answers.
    settings: dict[str, Any] = lengths
    async with held_first(cluster, sites=1, resources=3, **settings) as scene:
        queued = [
            uuid.UUID(s.id)
            for s in await scene.flow.setpoints(scene.operator, scene.dispatch.id)
            if s.id != scene.first.body["setpoint_id"]
        ]
        async with scene.replica.pool.acquire() as holder, holder.transaction():
            await holder.execute(
                "SELECT 1 FROM setpoints WHERE id = ANY($1::uuid[]) FOR UPDATE", queued
            )
            await asyncio.sleep(held_off)
            # The next one's re-check now waits for the lock; when it has it, the lease was
            # last renewed that long ago.
            scene.answer.release.set()
            await wait_until_blocked(holder, 1)
        settled = await scene.flow.settle(scene.operator, scene.dispatch.id, within=15)
    assert any("not sending setpoint" in record.getMessage() for record in caplog.records)
    assert {s.state for s in settled} == {ACCEPTED}
    assert sorted(scene.receiver.answered.values()) == [1, 1, 1]
    # Never sent before being let go: released clean, no attempt counted beyond the one.
    assert all(len(s.attempts) == 1 for s in settled)


@pytest.mark.parametrize("left", ["let go unsent", "held, its renewals failing"])
async def test_a_worker_does_not_claim_again_what_it_still_has_of_a_lapsed_claim(
    cluster: Cluster, left: str
) -> None:
    # A worker's lease on a setpoint lapsed (it lost the database); another worker took the
    # setpoint over and let it go again, due. Until the first worker has settled what it
    # still has of its old claim (a hand-back of what it let go, the record of what it
    # held), its claims leave the setpoint alone: a hand-back would otherwise clear its new
    # lease, and the old state act on the new claim.
    api = await cluster.replica(dispatch_delivery_enabled=False)
    flow = Flow(api)
    operator, partner, supplier = await flow.parties()
    async with running_receiver() as receiver:
        receiver.trust(await flow.secret(partner))
        await flow.site(partner, supplier, receiver.url())
        dispatch = (await flow.dispatch(operator)).dispatch
        (setpoint,) = await flow.setpoints(operator, dispatch.id)
        setpoint_id = uuid.UUID(setpoint.id)
        settings = api.service.settings
        deliverer = OutboxDeliverer(
            api.pool,
            IdentityStore(api.pool),
            SYSTEM_CLOCK,
            OutboxSettings.from_settings(settings),
            DeliverySettings.from_settings(settings),
        )
        try:
            if left == "let go unsent":
                deliverer._abandoned[setpoint_id] = False
            else:
                deliverer._held[setpoint_id] = time.monotonic() - settings.dispatch_lease_seconds
            await deliverer.step()
            owner = await api.pool.fetchval(
                "SELECT lease_owner FROM setpoints WHERE id = $1", setpoint_id
            )
            assert owner is None
            assert deliverer.in_flight == 0
            if left == "let go unsent":
                await deliverer._release_abandoned()
            else:
                del deliverer._held[setpoint_id]  # its attempt recorded
            await deliverer.step()
            await receiver.wait_for(1)
            settled = await flow.settle(operator, dispatch.id)
        finally:
            await deliverer.stop()
    assert [s.state for s in settled] == [ACCEPTED]
    assert receiver.answered == {str(setpoint_id): 1}


async def test_a_replica_whose_clock_runs_ahead_does_not_take_live_leases(
    cluster: Cluster,
) -> None:
    async with held_first(cluster, sites=1, resources=3) as scene:
        # One in flight and two queued on the first replica, leased for 5 s. To a replica a
        # minute ahead they would have looked expired long ago, had it judged by its clock.
        ahead = await cluster.replica(clock=ManualClock(datetime.now(UTC) + timedelta(minutes=1)))
        worker, deliverer = ahead.service.dispatch_worker, ahead.service.dispatch_deliverer
        assert worker is not None
        assert deliverer is not None
        passes = worker.passes
        worker.wake()
        await eventually(lambda: worker.passes > passes, "a claim by the replica ahead")
        assert deliverer.in_flight == 0
        scene.answer.release.set()
        settled = await scene.flow.settle(scene.operator, scene.dispatch.id)
    assert {s.state for s in settled} == {ACCEPTED}
    assert sorted(scene.receiver.answered.values()) == [1, 1, 1]
    assert deliverer.attempts_sent == 0


async def test_a_setpoint_cut_off_by_a_stopping_worker_is_withdrawn_when_cancelled(
    cluster: Cluster,
) -> None:
    async with held_first(cluster, sites=1, resources=3) as scene:
        # The first request has reached the receiver; its worker stops before the answer,
        # the other two still queued.
        await cluster.stop(scene.replica)
        api = await cluster.replica(dispatch_delivery_enabled=False)
        await api.dispatch.CancelDispatch(
            pb.CancelDispatchRequest(dispatch_id=scene.dispatch.id), metadata=scene.operator.auth
        )
        scene.answer.release.set()
        await cluster.replica()
        settled = await _all_cancelled_and_withdrawn(Flow(api), scene.operator, scene.dispatch.id)
    first_id = scene.first.body["setpoint_id"]
    by_id = {s.id: s for s in settled}
    cut_off = by_id.pop(first_id)
    assert (
        cut_off.reason == "cancelled after an attempt that may have arrived; cancellation delivered"
    )
    assert [a.error for a in cut_off.attempts if not a.cancellation] == [
        "interrupted: the delivery worker stopped during the request"
    ]
    assert {s.reason for s in by_id.values()} == {"cancelled before delivery"}
    assert [(r.body["setpoint_id"], r.body["type"]) for r in scene.receiver.received] == [
        (first_id, "setpoint"),
        (first_id, "setpoint.cancelled"),
    ]


@pytest.mark.parametrize("cancelled_by", ["a replica", "a replica whose clock is an hour ahead"])
async def test_a_setpoint_a_dead_worker_held_is_withdrawn_when_cancelled(
    cluster: Cluster, cancelled_by: str
) -> None:
    api = await cluster.replica(dispatch_delivery_enabled=False)
    canceller = api
    if cancelled_by.endswith("ahead"):
        # Its clock must not postpone what has long been due by the workers' clocks.
        ahead = ManualClock(datetime.now(UTC) + timedelta(hours=1))
        canceller = await cluster.replica(clock=ahead, dispatch_delivery_enabled=False)
    flow = Flow(api)
    operator, partner, supplier = await flow.parties()
    async with running_receiver() as receiver:
        receiver.trust(await flow.secret(partner))
        await flow.site(partner, supplier, receiver.url(), resources=[(BATTERY, -5, 5)] * 2)
        dispatch = (await flow.dispatch(operator)).dispatch
        # What a worker killed right after its claim leaves (its request may have gone out):
        # one setpoint claimed under a lease that has since expired.
        held_id = await api.pool.fetchval(
            "UPDATE setpoints SET state = 'delivering', lease_owner = gen_random_uuid(),"
            " lease_expires_at = now() - interval '1 second'"
            " WHERE id = (SELECT id FROM setpoints WHERE dispatch_id = $1 ORDER BY id LIMIT 1)"
            " RETURNING id",
            uuid.UUID(dispatch.id),
        )
        await canceller.dispatch.CancelDispatch(
            pb.CancelDispatchRequest(dispatch_id=dispatch.id), metadata=operator.auth
        )
        await cluster.replica()
        settled = await _all_cancelled_and_withdrawn(flow, operator, dispatch.id)
    reasons = {s.id: s.reason for s in settled}
    assert reasons.pop(str(held_id)) == (
        "cancelled after an attempt that may have arrived; cancellation delivered"
    )
    assert set(reasons.values()) == {"cancelled before delivery"}
    assert [(r.body["setpoint_id"], r.body["type"]) for r in receiver.received] == [
        (str(held_id), "setpoint.cancelled")
    ]


async def _all_cancelled_and_withdrawn(
    flow: Flow, operator: Org, dispatch_id: str
) -> list[pb.Setpoint]:
    """A dispatch's setpoints once all are CANCELLED and no withdrawal is still pending (a
    setpoint that may have arrived is CANCELLED before its withdrawal is delivered)."""
    await flow.settle(operator, dispatch_id, frozenset({pb.SETPOINT_STATE_CANCELLED}), within=15)
    found: list[pb.Setpoint] = []

    async def withdrawn() -> bool:
        found[:] = await flow.setpoints(operator, dispatch_id)
        return not any(s.reason.endswith("cancellation pending") for s in found)

    await eventually(withdrawn, "the withdrawals are delivered")
    return found


async def test_a_stopping_worker_keeps_the_leases_of_setpoints_a_dead_worker_held(
    cluster: Cluster,
) -> None:
    api = await cluster.replica(dispatch_delivery_enabled=False)
    flow = Flow(api)
    operator, partner, supplier = await flow.parties()
    answer = HeldFirst()
    async with running_receiver(answer) as receiver:
        receiver.trust(await flow.secret(partner))
        await flow.site(partner, supplier, receiver.url(), resources=[(BATTERY, -5, 5)] * 3)
        dispatch = (await flow.dispatch(operator)).dispatch
        # All three left by a worker killed after its claim: any of them may have gone out.
        await api.pool.execute(
            "UPDATE setpoints SET state = 'delivering', lease_owner = gen_random_uuid(),"
            " lease_expires_at = now() - interval '1 second' WHERE dispatch_id = $1",
            uuid.UUID(dispatch.id),
        )
        # A worker claims them again, sends one (held), queues two, and is stopped.
        worker = await cluster.replica(**ONE_SLOT)
        await receiver.wait_for(1)
        assert worker.service.dispatch_deliverer is not None
        owner = worker.service.dispatch_deliverer.owner
        await cluster.stop(worker)
        leases = await api.pool.fetch(
            "SELECT lease_owner FROM setpoints WHERE dispatch_id = $1", uuid.UUID(dispatch.id)
        )
        # The cut-off one was recorded as an attempt; the queued ones are not let go as if
        # never sent, their leases run out instead.
        assert sorted(str(row["lease_owner"]) for row in leases) == sorted(
            ["None", str(owner), str(owner)]
        )
        await api.dispatch.CancelDispatch(
            pb.CancelDispatchRequest(dispatch_id=dispatch.id), metadata=operator.auth
        )
        answer.release.set()
        await cluster.replica()
        settled = await _all_cancelled_and_withdrawn(flow, operator, dispatch.id)
    assert {s.reason for s in settled} == {
        "cancelled after an attempt that may have arrived; cancellation delivered"
    }
    assert Counter(r.body["type"] for r in receiver.received) == {
        "setpoint": 1,
        "setpoint.cancelled": 3,
    }


async def test_a_result_for_a_deleted_setpoint_does_not_stop_the_recording(
    cluster: Cluster,
) -> None:
    async with held_first(cluster, sites=1, resources=1) as scene:
        # Deleted during its attempt (as when its operator organization is deleted): the
        # attempt's result refers to a setpoint that no longer exists.
        await scene.replica.pool.execute(
            "DELETE FROM dispatches WHERE id = $1", uuid.UUID(scene.dispatch.id)
        )
        scene.answer.release.set()
        later = (await scene.flow.dispatch(scene.operator)).dispatch
        settled = await scene.flow.settle(scene.operator, later.id)
    assert {s.state for s in settled} == {ACCEPTED}
    assert [len(s.attempts) for s in settled] == [1]


async def test_a_recording_whose_commit_went_unanswered_stores_its_attempts_once(
    cluster: Cluster,
) -> None:
    async with (
        CommitAnswerCutter(cluster.url) as proxy,
        held_first(cluster, sites=1, resources=1, url=proxy.url) as scene,
    ):
        proxy.arm()
        scene.answer.release.set()
        await asyncio.wait_for(proxy.cut_done.wait(), timeout=10)
        # The recording is retried on a new connection; a later dispatch's recording comes
        # after it.
        later = (await scene.flow.dispatch(scene.operator)).dispatch
        await scene.flow.settle(scene.operator, later.id)
        settled = await scene.flow.settle(scene.operator, scene.dispatch.id)
    assert proxy.cuts == 1
    assert [s.state for s in settled] == [ACCEPTED]
    assert [[a.http_status for a in s.attempts] for s in settled] == [[200]]


async def test_a_recording_cut_off_by_a_stop_during_its_commit_stores_its_attempts_once(
    cluster: Cluster,
) -> None:
    async with CommitAnswerCutter(cluster.url) as proxy:
        async with held_first(cluster, sites=1, resources=1, url=proxy.url) as scene:
            proxy.arm(hold=True)
            scene.answer.release.set()
            await asyncio.wait_for(proxy.answer_held.wait(), timeout=10)
            # The recording's commit is done; the replica stops while it waits for the answer.
            stopping = asyncio.create_task(cluster.stop(scene.replica))
            await asyncio.wait_for(proxy.cancel_requested.wait(), timeout=10)
            proxy.let_go()
            await asyncio.wait_for(stopping, timeout=10)
            setpoint_id = uuid.UUID(scene.first.body["setpoint_id"])
        attempts = await _stored_attempts(cluster.url, setpoint_id)
    assert proxy.cuts == 1
    assert attempts == [200]


async def test_a_claim_whose_commit_went_unanswered_is_delivered_all_the_same(
    cluster: Cluster,
) -> None:
    # One replica: no other worker would ever take the rows the lost claim leased to it.
    async with CommitAnswerCutter(cluster.url) as proxy:
        replica = await cluster.replica(url=proxy.url)
        flow = Flow(replica)
        operator, partner, supplier = await flow.parties()
        async with running_receiver() as receiver:
            receiver.trust(await flow.secret(partner))
            await flow.site(partner, supplier, receiver.url(), resources=[(BATTERY, -5, 5)] * 2)
            proxy.arm(when=outbox_claim_that_took_rows)
            dispatch = (await flow.dispatch(operator)).dispatch
            await asyncio.wait_for(proxy.cut_done.wait(), timeout=10)
            settled = await flow.settle(operator, dispatch.id)
    assert proxy.cuts == 1
    assert [s.state for s in settled] == [ACCEPTED, ACCEPTED]
    # Nothing was sent by the lost claim: no attempt is counted for it.
    assert [len(s.attempts) for s in settled] == [1, 1]
    assert sorted(r.body["setpoint_id"] for r in receiver.received) == sorted(s.id for s in settled)


async def test_a_re_check_whose_commit_went_unanswered_sends_nothing_it_settled(
    cluster: Cluster,
) -> None:
    async with (
        CommitAnswerCutter(cluster.url) as proxy,
        held_first(cluster, sites=2, resources=2, url=proxy.url) as scene,
    ):
        in_flight_site = scene.first.body["site_id"]
        (paused,) = [site for site in scene.sites if site.id != in_flight_site]
        await pause(scene, paused)
        await asyncio.sleep(0.2)  # the queued ones are now due for a check
        # The first check to settle one of the paused site's setpoints commits it NOT_ELIGIBLE
        # and never hears so.
        proxy.arm(when=outbox_check_that_settled_rows)
        scene.answer.release.set()
        await asyncio.wait_for(proxy.cut_done.wait(), timeout=10)
        settled = await scene.flow.settle(scene.operator, scene.dispatch.id)
    assert proxy.cuts == 1
    states = sorted((s.site_id == paused.id, s.state, s.reason, len(s.attempts)) for s in settled)
    assert states == [
        (False, ACCEPTED, "", 1),
        (False, ACCEPTED, "", 1),
        (True, pb.SETPOINT_STATE_NOT_ELIGIBLE, "site status paused", 0),
        (True, pb.SETPOINT_STATE_NOT_ELIGIBLE, "site status paused", 0),
    ]
    assert {r.body["site_id"] for r in scene.receiver.received} == {in_flight_site}


@pytest.mark.parametrize(
    ("lease_seconds", "warned"), [(3.9, True), (4.0, False)], ids=["short", "twice the timeout"]
)
async def test_a_lease_shorter_than_twice_the_request_timeout_is_warned_of_at_start(
    cluster: Cluster, caplog: pytest.LogCaptureFixture, lease_seconds: float, warned: bool
) -> None:
    with caplog.at_level(logging.WARNING, logger="service.dispatch.outbox"):
        await cluster.replica(dispatch_lease_seconds=lease_seconds, dispatch_timeout_seconds=2.0)
    warnings = [r.getMessage() for r in caplog.records if "less than twice" in r.getMessage()]
    assert len(warnings) == warned
    if warned:
        assert "OPENVPP_DISPATCH_LEASE_SECONDS (3.9)" in warnings[0]
        assert "OPENVPP_DISPATCH_TIMEOUT_SECONDS (2)" in warnings[0]


async def _stored_attempts(database_url: str, setpoint_id: uuid.UUID) -> list[int | None]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT http_status FROM setpoint_attempts WHERE setpoint_id = $1", setpoint_id
        )
    finally:
        await conn.close()
    return [row["http_status"] for row in rows]


def busy_for_setpoints(retry_after_seconds: int) -> Answer:
    """A partner answering every setpoint 503 (retry after so long) and every withdrawal 204."""

    async def answer(received: Received) -> int | tuple[int, dict[str, str]]:
        if received.body["type"] == "setpoint":
            return 503, {"Retry-After": str(retry_after_seconds)}
        return 204

    return answer


async def test_a_cancelled_setpoint_whose_attempt_may_have_arrived_is_withdrawn(
    cluster: Cluster,
) -> None:
    replica = await cluster.replica()
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()

    # The partner may have acted on a request it answered 503; the retry is far off.
    async with running_receiver(busy_for_setpoints(retry_after_seconds=600)) as receiver:
        receiver.trust(await flow.secret(partner))
        await flow.site(partner, supplier, receiver.url())
        dispatch = (await flow.dispatch(operator)).dispatch
        await eventually(
            lambda: _waits_for_retry(flow, operator, dispatch.id), "the setpoint waits to retry"
        )
        await replica.dispatch.CancelDispatch(
            pb.CancelDispatchRequest(dispatch_id=dispatch.id), metadata=operator.auth
        )
        (cancelled,) = await _all_cancelled_and_withdrawn(flow, operator, dispatch.id)
    assert cancelled.reason == (
        "cancelled after an attempt that may have arrived; cancellation delivered"
    )
    assert [a.cancellation for a in cancelled.attempts] == [False, True]
    first, withdrawal = receiver.for_setpoint(cancelled.id)
    assert first.body["type"] == "setpoint"
    assert withdrawal.body["type"] == "setpoint.cancelled"
    assert withdrawal.body["power_kw"] is None
    assert withdrawal.webhook_id == f"{cancelled.id}.cancel"


@pytest.mark.parametrize("answer", [503, "timeout"])
async def test_a_failed_setpoint_whose_attempts_may_have_arrived_is_withdrawn_when_cancelled(
    cluster: Cluster, answer: int | str
) -> None:
    replica = await cluster.replica(dispatch_max_attempts=2, dispatch_timeout_seconds=0.3)
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()

    async def failing_then_fine(received: Received) -> int:
        # The partner may have acted on a request it answered 503, or too late.
        if received.body["type"] == "setpoint":
            if answer == "timeout":
                await asyncio.sleep(1.0)
                return 204
            return int(answer)
        return 204

    async with running_receiver(failing_then_fine) as receiver:
        receiver.trust(await flow.secret(partner))
        await flow.site(partner, supplier, receiver.url())
        dispatch = (await flow.dispatch(operator)).dispatch
        (failed,) = await flow.settle(operator, dispatch.id)
        assert failed.state == pb.SETPOINT_STATE_FAILED
        for _ in range(2):  # the second call changes nothing more
            await replica.dispatch.CancelDispatch(
                pb.CancelDispatchRequest(dispatch_id=dispatch.id), metadata=operator.auth
            )
        (cancelled,) = await _all_cancelled_and_withdrawn(flow, operator, dispatch.id)
        await asyncio.sleep(0.3)  # a second withdrawal would go out now
    assert cancelled.reason == (
        "cancelled after an attempt that may have arrived; cancellation delivered"
    )
    assert [a.cancellation for a in cancelled.attempts] == [False, False, True]
    assert [r.body["type"] for r in receiver.for_setpoint(cancelled.id)] == [
        "setpoint",
        "setpoint",
        "setpoint.cancelled",
    ]
    got = await replica.dispatch.GetDispatch(
        pb.GetDispatchRequest(dispatch_id=dispatch.id), metadata=operator.auth
    )
    assert (got.dispatch.failed_count, got.dispatch.cancelled_count) == (0, 1)


async def test_a_failed_setpoint_refused_at_its_only_attempt_stays_failed_when_cancelled(
    cluster: Cluster,
) -> None:
    # One replica registers the loopback receiver (local networks allowed) and delivers
    # nothing; the one that delivers refuses loopback addresses.
    replica = await cluster.replica(dispatch_delivery_enabled=False)
    await cluster.replica(webhook_allow_private_networks=False)
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    async with running_receiver() as receiver:
        receiver.trust(await flow.secret(partner))
        await flow.site(partner, supplier, receiver.url())
        dispatch = (await flow.dispatch(operator)).dispatch
        (failed,) = await flow.settle(operator, dispatch.id)
        await replica.dispatch.CancelDispatch(
            pb.CancelDispatchRequest(dispatch_id=dispatch.id), metadata=operator.auth
        )
        setpoint_id = uuid.UUID(failed.id)

        async def settled_again() -> bool:
            # Marked by the cancellation, claimed and left FAILED: nothing is due.
            due = await replica.pool.fetchval(
                "SELECT next_attempt_at FROM setpoints WHERE id = $1", setpoint_id
            )
            return due is None

        await eventually(settled_again, "the worker settles the failed setpoint")
        await asyncio.sleep(0.3)  # a withdrawal would go out now
        (after,) = await flow.setpoints(operator, dispatch.id)
    assert failed.state == pb.SETPOINT_STATE_FAILED
    assert failed.reason.startswith("endpoint refused: ")
    assert (after.state, after.reason, len(after.attempts)) == (failed.state, failed.reason, 1)
    assert receiver.received == []


@pytest.mark.parametrize("first_answer", [503, 204], ids=["failed", "accepted"])
async def test_a_withdrawal_for_a_deleted_resource_is_not_delivered_and_stops_nothing(
    cluster: Cluster, first_answer: int
) -> None:
    replica = await cluster.replica(dispatch_max_attempts=1)
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()

    async def answer(received: Received) -> int:
        return first_answer if received.body["type"] == "setpoint" else 204

    async with running_receiver(answer) as receiver:
        receiver.trust(await flow.secret(partner))
        _site, (resource,) = await flow.site(partner, supplier, receiver.url())
        dispatch = (await flow.dispatch(operator)).dispatch
        await flow.settle(operator, dispatch.id)
        await replica.registry.DeleteResource(
            site_pb.DeleteResourceRequest(resource_id=resource.id), metadata=partner.auth
        )
        await replica.dispatch.CancelDispatch(
            pb.CancelDispatchRequest(dispatch_id=dispatch.id), metadata=operator.auth
        )
        await eventually(
            lambda: _nothing_pending(flow, operator, dispatch.id), "the withdrawal is settled"
        )
        (setpoint,) = await flow.setpoints(operator, dispatch.id)
        # The worker goes on delivering.
        _other_site, _ = await flow.site(partner, supplier, receiver.url())
        later = (await flow.dispatch(operator)).dispatch
        (delivered,) = await flow.settle(operator, later.id)
    assert setpoint.reason == "cancellation not delivered: resource deleted"
    assert [r.body["type"] for r in receiver.for_setpoint(setpoint.id)] == ["setpoint"]
    assert delivered.state == (ACCEPTED if first_answer == 204 else pb.SETPOINT_STATE_FAILED)


async def _nothing_pending(flow: Flow, operator: Org, dispatch_id: str) -> bool:
    (setpoint,) = await flow.setpoints(operator, dispatch_id)
    return setpoint.reason.startswith("cancellation not delivered")


async def test_a_setpoint_whose_last_recording_went_unanswered_is_not_claimed_again_meanwhile(
    cluster: Cluster,
) -> None:
    release = asyncio.Event()

    async def answer(received: Received) -> int:
        if received.body["type"] == "setpoint":
            await release.wait()
            return 503
        await asyncio.sleep(1.5)  # a withdrawal slow to answer, still in flight at the retry
        return 204

    async with CommitAnswerCutter(cluster.url) as proxy:
        replica = await cluster.replica(url=proxy.url, dispatch_max_attempts=1)
        flow = Flow(replica)
        operator, partner, supplier = await flow.parties()
        async with running_receiver(answer) as receiver:
            receiver.trust(await flow.secret(partner))
            await flow.site(partner, supplier, receiver.url())
            dispatch = (await flow.dispatch(operator)).dispatch
            await receiver.wait_for(1)
            proxy.arm()
            release.set()
            # The FAILED recording commits, its answer is lost: it is recorded again in 1 s.
            await asyncio.wait_for(proxy.cut_done.wait(), timeout=10)
            await replica.dispatch.CancelDispatch(
                pb.CancelDispatchRequest(dispatch_id=dispatch.id), metadata=operator.auth
            )
            (setpoint,) = await _all_cancelled_and_withdrawn(flow, operator, dispatch.id)
    assert setpoint.reason == (
        "cancelled after an attempt that may have arrived; cancellation delivered"
    )
    assert [(a.http_status, a.cancellation) for a in setpoint.attempts] == [
        (503, False),
        (204, True),
    ]
    assert [r.body["type"] for r in receiver.received] == ["setpoint", "setpoint.cancelled"]


async def test_a_not_eligible_setpoint_attempted_before_is_withdrawn_when_cancelled(
    cluster: Cluster,
) -> None:
    replica = await cluster.replica()
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()

    async with running_receiver(busy_for_setpoints(retry_after_seconds=1)) as receiver:
        receiver.trust(await flow.secret(partner))
        site, _ = await flow.site(partner, supplier, receiver.url())
        dispatch = (await flow.dispatch(operator)).dispatch
        await receiver.wait_for(1)
        # Paused before the retry: the partner may be acting on the first request.
        await replica.registry.PauseSite(
            site_pb.PauseSiteRequest(site_id=site.id), metadata=partner.auth
        )
        (not_eligible,) = await flow.settle(operator, dispatch.id)
        await replica.dispatch.CancelDispatch(
            pb.CancelDispatchRequest(dispatch_id=dispatch.id), metadata=operator.auth
        )
        (cancelled,) = await _all_cancelled_and_withdrawn(flow, operator, dispatch.id)
    assert (not_eligible.state, not_eligible.reason) == (
        pb.SETPOINT_STATE_NOT_ELIGIBLE,
        "site status paused",
    )
    assert cancelled.reason == (
        "cancelled after an attempt that may have arrived; cancellation delivered"
    )
    assert [r.body["type"] for r in receiver.for_setpoint(cancelled.id)] == [
        "setpoint",
        "setpoint.cancelled",
    ]


async def _waits_for_retry(flow: Flow, operator: Org, dispatch_id: str) -> bool:
    (setpoint,) = await flow.setpoints(operator, dispatch_id)
    return setpoint.state == pb.SETPOINT_STATE_DELIVERING and len(setpoint.attempts) == 1


async def test_a_setpoint_never_delivered_in_its_window_expires(cluster: Cluster) -> None:
    clock = ManualClock(datetime.now(UTC))
    replica = await cluster.replica(clock=clock, dispatch_breaker_failure_threshold=1000)
    flow = Flow(replica, clock)
    operator, partner, supplier = await flow.parties()

    async def unavailable(_received: Received) -> int:
        return 503

    async with running_receiver(unavailable) as receiver:
        receiver.trust(await flow.secret(partner))
        await flow.site(partner, supplier, receiver.url())
        dispatch = (await flow.dispatch(operator, minutes=30)).dispatch
        await receiver.wait_for(1)
        async with asyncio.timeout(10):
            # The first attempt is recorded and the worker waits for its next tick.
            while True:
                (setpoint,) = await flow.setpoints(operator, dispatch.id)
                if setpoint.reason.startswith("retrying") and clock.sleeping:
                    break
                await asyncio.sleep(0.02)
        assert setpoint.state == pb.SETPOINT_STATE_DELIVERING
        # Past the window's end: the next pass finds it due and expires it, sending nothing.
        clock.advance(timedelta(minutes=31))
        (setpoint,) = await flow.settle(operator, dispatch.id)
        assert setpoint.state == pb.SETPOINT_STATE_EXPIRED
        assert setpoint.reason.startswith("window ended before delivery")
        assert all(a.http_status == 503 for a in setpoint.attempts)
        assert len(setpoint.attempts) == len(receiver.received)


async def test_watch_setpoints_streams_state_changes(cluster: Cluster) -> None:
    replica = await cluster.replica()
    flow = Flow(replica)
    operator, partner, other_partner, supplier = (
        await flow.org(Role.OPERATOR),
        await flow.org(Role.PARTNER),
        await flow.org(Role.PARTNER),
        await flow.org(Role.SUPPLIER),
    )
    async with running_receiver() as receiver:
        receiver.trust(await flow.secret(partner))
        receiver.trust(await flow.secret(other_partner))
        site, _ = await flow.site(partner, supplier, receiver.url())
        await flow.site(other_partner, supplier, receiver.url())
        watch = replica.dispatch.WatchSetpoints(pb.WatchSetpointsRequest(), metadata=partner.auth)
        await watch.initial_metadata()
        dispatch = (await flow.dispatch(operator)).dispatch
        seen: list[int] = []
        async with asyncio.timeout(10):
            async for event in watch:
                assert event.setpoint.site_id == site.id  # never the other partner's
                assert event.setpoint.dispatch_id == dispatch.id
                seen.append(event.setpoint.state)
                if event.setpoint.state == ACCEPTED:
                    break
        watch.cancel()
        assert seen == [pb.SETPOINT_STATE_PENDING, pb.SETPOINT_STATE_DELIVERING, ACCEPTED]


async def test_watchers_of_both_scopes_see_every_change_of_a_dispatch_larger_than_a_payload(
    cluster: Cluster,
) -> None:
    """A cancellation of more setpoints than one notification carries, in one transaction:
    each scope's watcher still sees every setpoint go PENDING, then CANCELLED."""
    replica = await cluster.replica(dispatch_delivery_enabled=False)
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    async with running_receiver() as receiver:
        sites = [
            await flow.site(partner, supplier, receiver.url(), resources=[(BATTERY, -5, 5)] * 10)
            for _ in range(6)
        ]
        site_ids = {site.id for site, _ in sites}
        watches = [
            replica.dispatch.WatchSetpoints(pb.WatchSetpointsRequest(), metadata=party.auth)
            for party in (operator, partner)
        ]
        for watch in watches:
            await watch.initial_metadata()
        dispatch = (await flow.dispatch(operator)).dispatch
        assert dispatch.pending_count == 60 > CHANGES_PER_NOTIFICATION
        cancelled = await replica.dispatch.CancelDispatch(
            pb.CancelDispatchRequest(dispatch_id=dispatch.id), metadata=operator.auth
        )
        assert cancelled.dispatch.cancelled_count == 60

        async def states_seen(watch: Any) -> dict[str, list[int]]:
            seen: dict[str, list[int]] = defaultdict(list)
            settled = 0
            async for event in watch:
                assert event.setpoint.dispatch_id == dispatch.id
                assert event.setpoint.site_id in site_ids
                seen[event.setpoint.id].append(event.setpoint.state)
                settled += event.setpoint.state == pb.SETPOINT_STATE_CANCELLED
                if settled == 60:
                    return seen
            raise AssertionError("the stream ended")

        async with asyncio.timeout(20):
            for watch in watches:
                seen = await states_seen(watch)
                assert len(seen) == 60
                assert all(
                    states == [pb.SETPOINT_STATE_PENDING, pb.SETPOINT_STATE_CANCELLED]
                    for states in seen.values()
                ), seen
        for watch in watches:
            watch.cancel()
        assert receiver.received == []


async def test_a_cancellation_of_more_setpoints_than_a_watcher_buffers_is_one_event(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond BULK_CHANGES_PER_DISPATCH changes of one dispatch in one transaction, each
    scope gets one event and its watchers read the dispatch's setpoints: a notification per
    CHANGES_PER_NOTIFICATION changes would overflow the watchers' buffers, however fast
    they read (here 12 notifications into a buffer of 3; in production 50,000 setpoints)."""
    monkeypatch.setattr(dispatch_store, "CHANGES_PER_NOTIFICATION", 5)
    monkeypatch.setattr(dispatch_store, "BULK_CHANGES_PER_DISPATCH", 20)
    replica = await cluster.replica(dispatch_delivery_enabled=False, watch_buffer_size=3)
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    sites = [
        await flow.site(partner, supplier, "http://127.0.0.1:9/", resources=[(BATTERY, -5, 5)] * 10)
        for _ in range(6)
    ]
    one_site = sites[0][0].id
    watches = {
        "operator": replica.dispatch.WatchSetpoints(
            pb.WatchSetpointsRequest(), metadata=operator.auth
        ),
        "partner": replica.dispatch.WatchSetpoints(
            pb.WatchSetpointsRequest(), metadata=partner.auth
        ),
        "one site": replica.dispatch.WatchSetpoints(
            pb.WatchSetpointsRequest(site_id=one_site), metadata=partner.auth
        ),
    }
    for watch in watches.values():
        await watch.initial_metadata()
    dispatch = (await flow.dispatch(operator)).dispatch
    assert dispatch.pending_count == 60
    cancelled = await replica.dispatch.CancelDispatch(
        pb.CancelDispatchRequest(dispatch_id=dispatch.id), metadata=operator.auth
    )
    assert cancelled.dispatch.cancelled_count == 60

    async def states_seen(watch: Any, count: int) -> dict[str, list[int]]:
        seen: dict[str, list[int]] = defaultdict(list)
        settled = 0
        async for event in watch:
            assert event.setpoint.dispatch_id == dispatch.id
            seen[event.setpoint.id].append(event.setpoint.state)
            settled += event.setpoint.state == pb.SETPOINT_STATE_CANCELLED
            if settled == count:
                return seen
        raise AssertionError("the stream ended")

    async with asyncio.timeout(20):
        for name, watch in watches.items():
            count = 10 if name == "one site" else 60
            seen = await states_seen(watch, count)
            assert len(seen) == count, name
            assert all(
                states == [pb.SETPOINT_STATE_PENDING, pb.SETPOINT_STATE_CANCELLED]
                for states in seen.values()
            ), (name, seen)
            if name == "one site":
                listed = await flow.setpoints(partner, dispatch.id, site_id=one_site)
                assert set(seen) == {setpoint.id for setpoint in listed}
    for watch in watches.values():
        watch.cancel()


@pytest.mark.timeout(120)
async def test_two_replicas_share_one_outbox_and_never_send_one_setpoint_twice(
    cluster: Cluster,
) -> None:
    first = await cluster.replica(dispatch_claim_batch_size=7)
    second = await cluster.replica(dispatch_claim_batch_size=7)
    flow = Flow(first)
    operator, partner, supplier = await flow.parties()

    async def slow(_received: Received) -> int:
        await asyncio.sleep(0.02)
        return 200

    async with running_receiver(slow) as receiver:
        receiver.trust(await flow.secret(partner))
        for _ in range(8):
            await flow.site(partner, supplier, receiver.url(), resources=[(BATTERY, -5, 5)] * 5)
        dispatch = (await flow.dispatch(operator)).dispatch
        assert dispatch.pending_count == 40
        settled = await flow.settle(operator, dispatch.id, frozenset({ACCEPTED}), within=60)
        assert len(settled) == 40
        assert receiver.overlaps == 0
        assert sorted(receiver.answered.values()) == [1] * 40
        assert len(receiver.received) == 40
        # Both replicas took part (each claims at most 7 at a time), and let go of every row.
        shares = [r.service.dispatch_deliverer.attempts_sent for r in (first, second)]  # type: ignore[union-attr]
        assert sum(shares) == 40
        assert min(shares) > 0, shares
        assert await first.pool.fetchval("SELECT count(lease_owner) FROM setpoints") == 0
        assert all(len(s.attempts) == 1 for s in settled)


async def test_retry_after_is_honoured_through_the_outbox(cluster: Cluster) -> None:
    replica = await cluster.replica(dispatch_breaker_failure_threshold=100)
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    calls: list[float] = []

    async def busy_once(_received: Received) -> int | tuple[int, dict[str, str]]:
        calls.append(asyncio.get_running_loop().time())
        return (429, {"Retry-After": "1"}) if len(calls) == 1 else 200

    async with running_receiver(busy_once) as receiver:
        receiver.trust(await flow.secret(partner))
        await flow.site(partner, supplier, receiver.url())
        dispatch = (await flow.dispatch(operator)).dispatch
        (setpoint,) = await flow.settle(operator, dispatch.id)
        assert setpoint.state == ACCEPTED
        assert [a.http_status for a in setpoint.attempts] == [429, 200]
        # The back-off here is at most 0.2 s: only Retry-After explains the wait.
        assert calls[1] - calls[0] >= 0.9


async def test_a_rotated_secret_signs_beside_the_previous_one(cluster: Cluster) -> None:
    replica = await cluster.replica()
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    async with running_receiver() as old_only, running_receiver() as new_only:
        old_only.trust(await flow.secret(partner))
        await flow.site(partner, supplier, old_only.url())
        await flow.site(partner, supplier, new_only.url())
        new_secret = await flow.identity.rotate_signing_secret(partner.id)
        assert new_secret is not None
        new_only.trust(new_secret)
        dispatch = (await flow.dispatch(operator)).dispatch
        settled = await flow.settle(operator, dispatch.id)
        # A receiver still on the old secret and one already on the new both verify.
        assert {s.state for s in settled} == {ACCEPTED}
        assert (old_only.bad_signatures, new_only.bad_signatures) == (0, 0)
        assert len(old_only.received) == len(new_only.received) == 1


async def test_an_open_breaker_reschedules_without_counting_an_attempt(cluster: Cluster) -> None:
    replica = await cluster.replica(
        dispatch_breaker_failure_threshold=1,
        dispatch_breaker_reset_seconds=0.6,
        dispatch_max_attempts=2,
    )
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    calls: list[float] = []

    async def down_once(_received: Received) -> int:
        calls.append(asyncio.get_running_loop().time())
        return 503 if len(calls) == 1 else 200

    async with running_receiver(down_once) as receiver:
        receiver.trust(await flow.secret(partner))
        await flow.site(partner, supplier, receiver.url())
        dispatch = (await flow.dispatch(operator)).dispatch
        (setpoint,) = await flow.settle(operator, dispatch.id)
        # Two attempts of at most two allowed: the passes that met the open breaker (the
        # back-off is at most 0.2 s, the breaker stays open 0.6 s) sent and counted nothing.
        assert setpoint.state == ACCEPTED
        assert [a.http_status for a in setpoint.attempts] == [503, 200]
        assert calls[1] - calls[0] >= 0.5


async def test_list_setpoints_pages_and_filters(cluster: Cluster) -> None:
    replica = await cluster.replica(dispatch_delivery_enabled=False)
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    site, _ = await flow.site(
        partner, supplier, "http://127.0.0.1:9/x", resources=[(BATTERY, -5, 5)] * 3
    )
    other, _ = await flow.site(
        partner, supplier, "http://127.0.0.1:9/x", resources=[(BATTERY, -5, 5)] * 2
    )
    first = (await flow.dispatch(operator)).dispatch
    second = (await flow.dispatch(operator)).dispatch
    await replica.dispatch.CancelDispatch(
        pb.CancelDispatchRequest(dispatch_id=second.id), metadata=operator.auth
    )
    seen: list[str] = []
    token = ""
    while True:
        page = await replica.dispatch.ListSetpoints(
            pb.ListSetpointsRequest(dispatch_id=first.id, page_size=2, page_token=token),
            metadata=operator.auth,
        )
        assert page.total_size == 5
        seen.extend(s.id for s in page.setpoints)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == 5
    by_site = await flow.setpoints(partner, site_id=site.id)
    assert len(by_site) == 6  # three resources, two dispatches
    cancelled = await flow.setpoints(partner, state=pb.SETPOINT_STATE_CANCELLED)
    assert {s.dispatch_id for s in cancelled} == {second.id}
    assert len(cancelled) == 5
    assert {s.site_id for s in cancelled} == {site.id, other.id}
    from tests.helpers import expect_invalid

    await expect_invalid(
        replica.dispatch.ListSetpoints(
            pb.ListSetpointsRequest(dispatch_id=second.id, page_token=page.next_page_token or "x"),
            metadata=operator.auth,
        ),
        "page_token",
    )
    await expect_invalid(
        replica.dispatch.ListSetpoints(
            pb.ListSetpointsRequest(site_id="not-a-uuid"), metadata=operator.auth
        ),
        "site_id",
    )
    listed = await replica.dispatch.ListDispatches(
        pb.ListDispatchesRequest(page_size=1), metadata=operator.auth
    )
    assert listed.total_size == 2
    assert [d.id for d in listed.dispatches] == [first.id]
    assert listed.dispatches[0].pending_count == 5


# Leases of 0.6 s, renewed every 0.2 s, against attempts of 2 s.
SHORT_LEASES: dict[str, Any] = {"dispatch_lease_seconds": 0.6, "dispatch_timeout_seconds": 5.0}


async def attempts_beyond_a_lease(
    cluster: Cluster, first: Replica, second_after_the_sends: bool
) -> tuple[list[pb.Setpoint], SetpointReceiver]:
    """Three setpoints whose attempts take 2 s each, on ``first`` and a second replica (started
    with it, or once all three are in flight from ``first``): settled, and the receiver."""
    if not second_after_the_sends:
        await cluster.replica(**SHORT_LEASES)
    flow = Flow(first)
    operator, partner, supplier = await flow.parties()

    async def slow(_received: Received) -> int:
        await asyncio.sleep(2.0)
        return 200

    async with running_receiver(slow) as receiver:
        receiver.trust(await flow.secret(partner))
        await flow.site(partner, supplier, receiver.url(), resources=[(BATTERY, -5, 5)] * 3)
        dispatch = (await flow.dispatch(operator)).dispatch
        if second_after_the_sends:
            await receiver.wait_for(3)
            await cluster.replica(**SHORT_LEASES)
        settled = await flow.settle(operator, dispatch.id, frozenset({ACCEPTED}), within=20)
    return settled, receiver


async def test_a_live_worker_keeps_a_slow_attempt_beyond_one_lease(cluster: Cluster) -> None:
    """The lease is renewed while its worker lives: another replica does not take over an
    attempt that takes longer than one lease."""
    first = await cluster.replica(**SHORT_LEASES)
    settled, receiver = await attempts_beyond_a_lease(cluster, first, second_after_the_sends=False)
    assert len(settled) == 3
    assert len(receiver.received) == 3
    assert receiver.overlaps == 0
    assert all(len(s.attempts) == 1 for s in settled)


async def test_a_replica_whose_clock_is_behind_keeps_the_leases_it_renews(
    cluster: Cluster,
) -> None:
    # All three in flight from the replica behind, then one on time: by its clock, leases
    # written by the clock behind would have expired a minute ago.
    behind = ManualClock(datetime.now(UTC) - timedelta(minutes=1))
    first = await cluster.replica(clock=behind, **SHORT_LEASES)
    settled, receiver = await attempts_beyond_a_lease(cluster, first, second_after_the_sends=True)
    assert len(receiver.received) == 3
    assert all(len(s.attempts) == 1 for s in settled)


async def test_each_endpoint_gets_its_own_slots_and_no_more(cluster: Cluster) -> None:
    """A replica sends towards one endpoint at most OPENVPP_DISPATCH_MAX_CONCURRENCY_PER_HOST
    at a time, and a slow endpoint's queue does not hold back another endpoint's setpoints."""
    replica = await cluster.replica(dispatch_max_concurrency_per_host=2)
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    active = {"now": 0, "peak": 0}

    async def slow(_received: Received) -> int:
        active["now"] += 1
        active["peak"] = max(active["peak"], active["now"])
        try:
            await asyncio.sleep(0.3)
        finally:
            active["now"] -= 1
        return 200

    async with running_receiver(slow) as slow_end, running_receiver() as fast_end:
        secret = await flow.secret(partner)
        slow_end.trust(secret)
        fast_end.trust(secret)
        await flow.site(partner, supplier, slow_end.url(), resources=[(BATTERY, -5, 5)] * 6)
        await flow.site(partner, supplier, fast_end.url(), resources=[(BATTERY, -5, 5)] * 3)
        dispatch = (await flow.dispatch(operator)).dispatch

        await fast_end.wait_for(3)
        slow_seen = len(slow_end.received)
        settled = await flow.settle(operator, dispatch.id, frozenset({ACCEPTED}), within=20)
    assert len(settled) == 9
    # Two slow attempts take 0.3 s: the fast endpoint's three were all in before a fifth
    # slow one could start.
    assert slow_seen <= 4
    assert active["peak"] == 2
    assert len(slow_end.received) == 6
