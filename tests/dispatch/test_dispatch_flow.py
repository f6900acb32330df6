"""DispatchFlexibility end to end: real PostgreSQL, real gRPC, a real receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import grpc
from google.protobuf import timestamp_pb2
from openvpp.v1 import dispatch_pb2 as pb
from openvpp.v1 import site_registry_pb2 as site_pb

from service.auth.principal import Role
from service.common.clock import ManualClock
from service.common.protoconv import from_timestamp, to_timestamp
from tests.conftest import Org
from tests.dispatch.conftest import Cluster, Flow, window
from tests.dispatch.setpoint_receiver import Received, running_receiver
from tests.helpers import expect_invalid, field_violations, rpc_error

BATTERY = site_pb.RESOURCE_TYPE_STATIC_BATTERY
HEAT_PUMP = site_pb.RESOURCE_TYPE_HEAT_PUMP
PV = site_pb.RESOURCE_TYPE_PHOTOVOLTAIC
METER = site_pb.RESOURCE_TYPE_METER


async def test_setpoints_are_delivered_signed_and_accepted(cluster: Cluster) -> None:
    replica = await cluster.replica()
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    async with running_receiver() as receiver:
        receiver.trust(await flow.secret(partner))
        site, resources = await flow.site(
            partner,
            supplier,
            receiver.url(),
            resources=[(BATTERY, -5, 5), (HEAT_PUMP, 0, 10), (METER, 0, 0)],
        )
        assert site.status == site_pb.SITE_STATUS_ONBOARDED
        assert site.upstream_status == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE
        response = await flow.dispatch(operator, power_kw=6.0)
        dispatch = response.dispatch
        assert dispatch.id
        assert dispatch.allocated_power_kw == 6.0
        assert dispatch.shortfall_power_kw == 0.0
        assert dispatch.eligible_site_count == 1
        assert dispatch.pending_count == 2  # the meter is not controllable
        assert not response.setpoints  # read them with ListSetpoints

        settled = await flow.settle(operator, dispatch.id)
        assert {s.state for s in settled} == {pb.SETPOINT_STATE_ACCEPTED}
        by_resource = {s.resource_id: s for s in settled}
        assert by_resource[resources[0].id].power_kw == 2.0
        assert by_resource[resources[1].id].power_kw == 4.0
        for setpoint in settled:
            assert len(setpoint.attempts) == 1
            assert setpoint.attempts[0].http_status == 200
            assert setpoint.attempts[0].latency_ms > 0

        assert receiver.bad_signatures == 0
        assert len(receiver.received) == 2
        battery_setpoint = by_resource[resources[0].id]
        (delivered,) = receiver.for_setpoint(battery_setpoint.id)
        body = delivered.body
        assert delivered.webhook_id == battery_setpoint.id
        assert body["type"] == "setpoint"
        assert body["dispatch_id"] == dispatch.id
        assert body["site_id"] == site.id
        assert body["site_external_id"] == site.external_id
        assert body["resource_id"] == resources[0].id
        assert body["resource_external_id"] == resources[0].external_id
        assert body["power_kw"] == "2.000"
        assert Decimal(body["power_kw"]) == Decimal("2")
        end = from_timestamp(dispatch.end_time)
        assert body["valid_until"] == body["end"] == end.isoformat().replace("+00:00", "Z")
        assert delivered.headers["traceparent"].startswith("00-")

        got = await replica.dispatch.GetDispatch(
            pb.GetDispatchRequest(dispatch_id=dispatch.id), metadata=operator.auth
        )
        assert got.dispatch.accepted_count == 2
        assert got.dispatch.pending_count == 0


async def test_a_tampered_body_is_refused_by_the_receiver(cluster: Cluster) -> None:
    """The receiver's check is real: the same signature over another body does not verify."""
    replica = await cluster.replica()
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    async with running_receiver() as receiver:
        receiver.trust(await flow.secret(partner))
        await flow.site(partner, supplier, receiver.url())
        dispatch = (await flow.dispatch(operator)).dispatch
        await flow.settle(operator, dispatch.id)
        (delivered,) = receiver.received
        tampered = delivered.raw.replace(b'"power_kw":"4.000"', b'"power_kw":"9.000"')
        assert tampered != delivered.raw
        assert receiver.verify(delivered.raw, delivered.headers)
        assert not receiver.verify(tampered, delivered.headers)


async def test_dispatch_roles(cluster: Cluster) -> None:
    replica = await cluster.replica()
    flow = Flow(replica)
    for role in (Role.PARTNER, Role.SUPPLIER):
        caller = await flow.org(role)
        error = await rpc_error(flow.dispatch(caller))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        error = await rpc_error(
            replica.dispatch.ListDispatches(pb.ListDispatchesRequest(), metadata=caller.auth)
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    supplier = await flow.org(Role.SUPPLIER)
    error = await rpc_error(
        replica.dispatch.ListSetpoints(pb.ListSetpointsRequest(), metadata=supplier.auth)
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_dry_run_stores_and_sends_nothing(cluster: Cluster) -> None:
    replica = await cluster.replica()
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    async with running_receiver() as receiver:
        await flow.site(partner, supplier, receiver.url(), resources=[(BATTERY, -5, 5)])
        response = await flow.dispatch(operator, power_kw=3.0, dry_run=True, request_id="dry")
        assert response.dispatch.id == ""
        assert response.dispatch.allocated_power_kw == 3.0
        assert [s.power_kw for s in response.setpoints] == [3.0]
        assert response.setpoints[0].id == ""
        await asyncio.sleep(0.5)  # a worker that was woken would have sent by now
        assert receiver.received == []
        assert await replica.pool.fetchval("SELECT count(*) FROM dispatches") == 0
        assert await replica.pool.fetchval("SELECT count(*) FROM setpoints") == 0
        # The request_id was not taken by the dry run, and a dry run never answers from one.
        real = await flow.dispatch(operator, power_kw=5.0, request_id="dry")
        assert real.dispatch.id
        again = await flow.dispatch(operator, power_kw=5.0, request_id="dry", dry_run=True)
        assert again.dispatch.id == ""
        assert [s.power_kw for s in again.setpoints] == [5.0]


async def test_allocation_with_bounds_and_shortfall_per_type(cluster: Cluster) -> None:
    replica = await cluster.replica(dispatch_delivery_enabled=False)
    flow = Flow(replica)
    operator, partner, supplier = await flow.parties()
    url = "http://127.0.0.1:9/never"
    site, _ = await flow.site(
        partner, supplier, url, resources=[(BATTERY, -5, 5), (HEAT_PUMP, 2, 10), (PV, -8, 0)]
    )
    selection = pb.DispatchSelection(site_ids=[site.id])

    async def dry(power: float, kind: int) -> pb.DispatchFlexibilityResponse:
        return await flow.dispatch(
            operator, power_kw=power, dispatch_type=kind, selection=selection, dry_run=True
        )

    # EXACT upwards: shares of +5 and +10 headroom; the PV stays at 0.
    exact_up = await dry(6.0, pb.DISPATCH_TYPE_EXACT)
    assert [s.power_kw for s in exact_up.setpoints] == [2.0, 4.0, 0.0]
    assert (exact_up.dispatch.allocated_power_kw, exact_up.dispatch.shortfall_power_kw) == (6, 0)
    # EXACT downwards: shares of -5 and -8; the heat pump keeps its 2 kW minimum, and the
    # other two make up for it in proportion to the room they have left.
    exact_down = await dry(-6.5, pb.DISPATCH_TYPE_EXACT)
    assert [s.power_kw for s in exact_down.setpoints] == [-3.269, 2.0, -5.231]
    assert (exact_down.dispatch.allocated_power_kw, exact_down.dispatch.shortfall_power_kw) == (
        -6.5,
        0,
    )
    # Beyond the headroom: everything at its bound, the rest is shortfall.
    beyond = await dry(-30.0, pb.DISPATCH_TYPE_EXACT)
    assert [s.power_kw for s in beyond.setpoints] == [-5.0, 2.0, -8.0]
    assert beyond.dispatch.allocated_power_kw == -11.0
    assert beyond.dispatch.shortfall_power_kw == -19.0
    up = await dry(20.0, pb.DISPATCH_TYPE_MAXIMISE_UPWARDS)
    assert [s.power_kw for s in up.setpoints] == [5.0, 10.0, 0.0]
    assert (up.dispatch.allocated_power_kw, up.dispatch.shortfall_power_kw) == (15.0, 5.0)
    down = await dry(0.0, pb.DISPATCH_TYPE_MAXIMISE_DOWNWARDS)
    assert [s.power_kw for s in down.setpoints] == [-5.0, 2.0, -8.0]
    assert down.dispatch.shortfall_power_kw == 0.0
    # -0.0 is the same target as 0.0, and is echoed as 0, not "-0".
    negative_zero = await dry(-0.0, pb.DISPATCH_TYPE_MAXIMISE_DOWNWARDS)
    assert [s.power_kw for s in negative_zero.setpoints] == [-5.0, 2.0, -8.0]
    assert math.copysign(1.0, negative_zero.dispatch.power_kw) == 1.0
    assert math.copysign(1.0, negative_zero.dispatch.shortfall_power_kw) == 1.0
    # The selection narrows by resource type.
    only_pv = await flow.dispatch(
        operator,
        power_kw=-3,
        selection=pb.DispatchSelection(site_ids=[site.id], resource_types=[PV]),
        dry_run=True,
    )
    assert [s.power_kw for s in only_pv.setpoints] == [-3.0]


async def test_bad_requests_are_field_violations_and_store_nothing(cluster: Cluster) -> None:
    replica = await cluster.replica(dispatch_delivery_enabled=False)
    flow = Flow(replica)
    operator = await flow.org(Role.OPERATOR)
    from tests.helpers import expect_invalid

    await expect_invalid(flow.dispatch(operator, request_id=""), "request_id")
    await expect_invalid(flow.dispatch(operator, power_kw=float("nan")), "power_kw")
    # Finite, but beyond a float in watts: it was INTERNAL, with a traceback in the log.
    await expect_invalid(flow.dispatch(operator, power_kw=1e306), "power_kw")
    await expect_invalid(flow.dispatch(operator, power_kw=-1e306, dry_run=True), "power_kw")
    await expect_invalid(flow.dispatch(operator, dispatch_type=0), "type")
    await expect_invalid(flow.dispatch(operator, dispatch_type=99), "type")
    await expect_invalid(flow.dispatch(operator, minutes=24 * 60 + 15), "end_time")
    await expect_invalid(
        flow.dispatch(operator, selection=pb.DispatchSelection(site_ids=["nope"])),
        "selection.site_ids[0]",
    )
    await expect_invalid(
        flow.dispatch(operator, selection=pb.DispatchSelection(resource_types=[METER])),
        "selection.resource_types[0]",
    )
    request = pb.DispatchFlexibilityRequest(request_id="x", power_kw=1, type=pb.DISPATCH_TYPE_EXACT)
    await expect_invalid(
        replica.dispatch.DispatchFlexibility(request, metadata=operator.auth), "start_time"
    )
    unknown_site = "00000000-0000-4000-8000-000000000001"
    error = await rpc_error(
        flow.dispatch(operator, selection=pb.DispatchSelection(site_ids=[unknown_site]))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert await replica.pool.fetchval("SELECT count(*) FROM dispatches") == 0


async def test_every_broken_rule_of_a_dispatch_request_is_reported_at_once(
    cluster: Cluster,
) -> None:
    replica = await cluster.replica(dispatch_delivery_enabled=False)
    flow = Flow(replica)
    operator = await flow.org(Role.OPERATOR)
    _start, end = window(None, 60)
    # Unreadable fields (an unknown enum, a malformed id, a missing instant) and broken
    # rules of the readable ones, in one request.
    request = pb.DispatchFlexibilityRequest(
        request_id="",
        power_kw=float("nan"),
        end_time=to_timestamp(end + timedelta(minutes=7)),
        type=77,  # type: ignore[arg-type]
        selection=pb.DispatchSelection(site_ids=["nope"]),
    )
    error = await rpc_error(replica.dispatch.DispatchFlexibility(request, metadata=operator.auth))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(error)
    assert set(violations) == {
        "request_id",
        "power_kw",
        "type",
        "start_time",
        "end_time",
        "selection.site_ids[0]",
    }
    assert violations["start_time"] == "is required"
    # Not "must be after start_time": there is no start to measure the window from.
    assert violations["end_time"] == "must be on a quarter-hour (hh:00, :15, :30 or :45, 0 s)"


async def test_an_instant_nanoseconds_past_a_quarter_hour_is_not_on_it(cluster: Cluster) -> None:
    replica = await cluster.replica(dispatch_delivery_enabled=False)
    flow = Flow(replica)
    operator = await flow.org(Role.OPERATOR)
    start, end = window(None, 60)
    for nanos in (1, 999, 999_999_999):
        request = pb.DispatchFlexibilityRequest(
            request_id=uuid.uuid4().hex,
            power_kw=1.0,
            start_time=timestamp_pb2.Timestamp(seconds=int(start.timestamp()), nanos=nanos),
            end_time=to_timestamp(end),
            type=pb.DISPATCH_TYPE_EXACT,
        )
        await expect_invalid(
            replica.dispatch.DispatchFlexibility(request, metadata=operator.auth), "start_time"
        )
    assert await replica.pool.fetchval("SELECT count(*) FROM dispatches") == 0


async def test_request_id_retries(cluster: Cluster) -> None:
    replica = await cluster.replica(dispatch_delivery_enabled=False)
    flow = Flow(replica)
    operator, other_operator, partner, supplier = (
        await flow.org(Role.OPERATOR),
        await flow.org(Role.OPERATOR),
        await flow.org(Role.PARTNER),
        await flow.org(Role.SUPPLIER),
    )
    await flow.site(partner, supplier, "http://127.0.0.1:9/x", resources=[(BATTERY, -5, 5)] * 3)
    # Concurrent retries of one request: one dispatch, one set of setpoints.
    first, *others = await asyncio.gather(
        *(flow.dispatch(operator, power_kw=3.0, request_id="retry-1") for _ in range(5))
    )
    assert {o.dispatch.id for o in others} == {first.dispatch.id}
    again = await flow.dispatch(operator, power_kw=3.0, request_id="retry-1")
    assert again.dispatch.id == first.dispatch.id
    assert again.dispatch.create_time == first.dispatch.create_time
    assert await replica.pool.fetchval("SELECT count(*) FROM setpoints") == 3
    error = await rpc_error(flow.dispatch(operator, power_kw=4.0, request_id="retry-1"))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    # request_ids are per operator.
    theirs = await flow.dispatch(other_operator, power_kw=4.0, request_id="retry-1")
    assert theirs.dispatch.id != first.dispatch.id
    assert await replica.pool.fetchval("SELECT count(*) FROM dispatches") == 2


async def test_a_partner_reads_only_its_own_setpoints(cluster: Cluster) -> None:
    replica = await cluster.replica(dispatch_delivery_enabled=False)
    flow = Flow(replica)
    operator, other_operator, alice, bob, supplier = (
        await flow.org(Role.OPERATOR),
        await flow.org(Role.OPERATOR),
        await flow.org(Role.PARTNER),
        await flow.org(Role.PARTNER),
        await flow.org(Role.SUPPLIER),
    )
    alice_site, _ = await flow.site(alice, supplier, "http://127.0.0.1:9/a")
    bob_site, _ = await flow.site(bob, supplier, "http://127.0.0.1:9/b")
    dispatch = (await flow.dispatch(operator)).dispatch
    everything = await flow.setpoints(operator, dispatch.id)
    assert {s.site_id for s in everything} == {alice_site.id, bob_site.id}
    alices = await flow.setpoints(alice)
    assert [s.site_id for s in alices] == [alice_site.id]
    bobs_setpoint = next(s for s in everything if s.site_id == bob_site.id)
    for caller in (alice, other_operator):
        error = await rpc_error(
            replica.dispatch.GetSetpoint(
                pb.GetSetpointRequest(setpoint_id=bobs_setpoint.id), metadata=caller.auth
            )
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND
    # A filter naming another organization's site or dispatch is NOT_FOUND, like an id that
    # does not exist, for the list and for the watch (which otherwise stayed silent).
    foreign_filters: list[tuple[Org, str, str]] = [
        (alice, "", bob_site.id),
        (alice, str(uuid.uuid4()), ""),
        (other_operator, dispatch.id, ""),
    ]
    for caller, dispatch_id, site_id in foreign_filters:
        error = await rpc_error(
            replica.dispatch.ListSetpoints(
                pb.ListSetpointsRequest(dispatch_id=dispatch_id, site_id=site_id),
                metadata=caller.auth,
            )
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND, (dispatch_id, site_id)
        watch = replica.dispatch.WatchSetpoints(
            pb.WatchSetpointsRequest(dispatch_id=dispatch_id, site_id=site_id),
            metadata=caller.auth,
        )
        error = await rpc_error(asyncio.wait_for(watch.read(), 10))
        assert error.code() == grpc.StatusCode.NOT_FOUND, (dispatch_id, site_id)
    # A partner's own filters still work: the dispatch that gave it setpoints, its site.
    assert [s.site_id for s in await flow.setpoints(alice, dispatch.id)] == [alice_site.id]
    assert [s.site_id for s in await flow.setpoints(alice, site_id=alice_site.id)] == [
        alice_site.id
    ]
    got = await replica.dispatch.GetSetpoint(
        pb.GetSetpointRequest(setpoint_id=bobs_setpoint.id), metadata=bob.auth
    )
    assert got.setpoint.power_kw == bobs_setpoint.power_kw
    error = await rpc_error(
        replica.dispatch.GetDispatch(
            pb.GetDispatchRequest(dispatch_id=dispatch.id), metadata=other_operator.auth
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await rpc_error(
        replica.dispatch.CancelDispatch(
            pb.CancelDispatchRequest(dispatch_id=dispatch.id), metadata=other_operator.auth
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    listed = await replica.dispatch.ListDispatches(
        pb.ListDispatchesRequest(), metadata=other_operator.auth
    )
    assert list(listed.dispatches) == []


def _bodies(received: list[Received]) -> list[dict[str, object]]:
    return [json.loads(r.raw) for r in received]


async def test_a_retry_after_the_window_ended_returns_the_first_dispatch(cluster: Cluster) -> None:
    clock = ManualClock(datetime.now(UTC))
    replica = await cluster.replica(clock=clock, dispatch_delivery_enabled=False)
    flow = Flow(replica, clock)
    operator, partner, supplier = await flow.parties()
    await flow.site(partner, supplier, "http://127.0.0.1:9/x", resources=[(BATTERY, -5, 5)])
    start, end = window(clock.now(), 30)
    request = pb.DispatchFlexibilityRequest(
        request_id="late-retry",
        power_kw=2.0,
        start_time=to_timestamp(start),
        end_time=to_timestamp(end),
        type=pb.DISPATCH_TYPE_EXACT,
    )
    first = await replica.dispatch.DispatchFlexibility(request, metadata=operator.auth)
    clock.set(end + timedelta(minutes=5))
    # The client's answer was lost and it retries after the window: the same dispatch.
    again = await replica.dispatch.DispatchFlexibility(request, metadata=operator.auth)
    assert again.dispatch.id == first.dispatch.id
    # A new request for that past window is still refused, naming the field.
    request.request_id = "late-new"
    await expect_invalid(
        replica.dispatch.DispatchFlexibility(request, metadata=operator.auth), "end_time"
    )
    assert await replica.pool.fetchval("SELECT count(*) FROM dispatches") == 1
