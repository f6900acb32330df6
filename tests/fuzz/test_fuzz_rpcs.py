"""Every RPC the running server offers, fed hostile bytes with every kind of caller.

The RPCs are those the server lists over reflection (so one added later is fuzzed without
editing this test); each gets random bytes, truncated and corrupted encodings and
hypothesis-built messages (see ``messages.py``), sent with a token of a role allowed to call
it, a token of another role and no token. Asserted for every call: never UNKNOWN or
INTERNAL; without a token UNAUTHENTICATED and with another role's PERMISSION_DENIED (the
request is decoded only after authentication), except that a unary request above the
server's message size limit is RESOURCE_EXHAUSTED for everyone, as gRPC refuses it before
any handler runs; after all of it the server is SERVING and
the log holds no stack trace, no ERROR and a bounded number of lines.

``OPENVPP_FUZZ_CASES`` sets the number of calls (default 3,000, the fast profile of
``./scripts/test``); the long profile is ``OPENVPP_FUZZ_CASES=100000 .venv/bin/pytest
tests/fuzz``. ``OPENVPP_FUZZ_SEED`` makes a run repeatable; without it the fast profile
is derandomized (the same cases every run) and longer ones draw new cases each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from google.type import date_pb2
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2
from hypothesis import HealthCheck, Phase, assume, given, seed, settings
from hypothesis import strategies as st
from openvpp.v1 import balancing_pb2 as bpb
from openvpp.v1 import (
    balancing_pb2_grpc,
    meter_registry_pb2_grpc,
    site_registry_pb2_grpc,
    upstream_registry_pb2_grpc,
)
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import site_registry_pb2 as spb
from openvpp.v1 import upstream_registry_pb2 as upb

from service.app import GRPC_OPTIONS, Service
from service.auth.principal import Role
from service.edge.reflection import V1_SERVICE_NAME
from tests.conftest import MakeOrg, Org
from tests.fuzz.messages import World, draw_request_bytes, draw_stream
from tests.helpers import battery_request, random_ean18, site_request
from tests.telemetry.conftest import METER_START, stamp

CASES = int(os.environ.get("OPENVPP_FUZZ_CASES", "3000"))
SEED = os.environ.get("OPENVPP_FUZZ_SEED")
PUBLIC_SERVICES = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME, V1_SERVICE_NAME})
# A Watch stream is ended after its first response or this long.
STREAM_SECONDS = 0.25
CLIENT_STREAM_SECONDS = 5.0
NEVER = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
# gRPC refuses a request message above the server's limit with RESOURCE_EXHAUSTED before any
# handler (so before authentication) runs. Larger ones still reach the server up to the
# client's own limit; examples beyond it are not drawn (they would test the client).
SERVER_MAX_MESSAGE_BYTES = dict(GRPC_OPTIONS)["grpc.max_receive_message_length"]
CLIENT_MAX_MESSAGE_BYTES = 4 * SERVER_MAX_MESSAGE_BYTES


def fuzz_settings(max_examples: int, **more: Any) -> settings:
    """Both fuzzers' hypothesis settings: no deadline and no example database, the fast
    profile derandomized (the same cases every run), longer ones drawing anew."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=SEED is None and CASES < 20_000,
        suppress_health_check=list(HealthCheck),
        **more,
    )


def run_seeded(case: Callable[[], None]) -> None:
    """Runs a @given test, with OPENVPP_FUZZ_SEED when it is set."""
    (seed(int(SEED))(case) if SEED is not None else case)()


@dataclass
class Tally:
    calls: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


class LogRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
async def world(service: Service, make_org: MakeOrg, channel: grpc.aio.Channel) -> World:
    partner = await make_org(Role.PARTNER)
    supplier = await make_org(Role.SUPPLIER)
    registry = site_registry_pb2_grpc.SiteRegistryStub(channel)
    meters = meter_registry_pb2_grpc.MeterRegistryStub(channel)
    upstream = upstream_registry_pb2_grpc.UpstreamRegistryStub(channel)
    identifier = random_ean18()
    site = (
        await registry.CreateSite(
            site_request(identifier, country="BE", timezone="UTC"), metadata=partner.auth
        )
    ).site
    resource = (
        await registry.CreateResource(battery_request(site.id), metadata=partner.auth)
    ).resource
    meter = (
        await meters.CreateMeter(
            mpb.CreateMeterRequest(
                site_id=site.id,
                identifier="FUZZ-1",
                direction=mpb.METER_DIRECTION_CONSUMER,
                measuring=mpb.MEASURING_READINGS_ACCURATE,
                start_date=stamp(METER_START),
            ),
            metadata=partner.auth,
        )
    ).meter
    upstream_site = (
        await upstream.CreateUpstreamSite(
            upb.CreateUpstreamSiteRequest(grid_identifier=identifier, country="BE"),
            metadata=supplier.auth,
        )
    ).upstream_site
    # A balanced site whose load-profile meters take part: interval values reach ingest's
    # bounds and RunBalancing has something to balance.
    community, profiles = await balanced_community(
        channel,
        partner,
        "FUZZ",
        [
            (2, mpb.METER_DIRECTION_CONSUMER, mpb.MEASURING_LOAD_PROFILE_ACCURATE),
            (3, mpb.METER_DIRECTION_PRODUCER, mpb.MEASURING_LOAD_PROFILE_ACCURATE),
        ],
    )
    return World(
        ids=[site.id, resource.id, meter.id, upstream_site.id, community, *profiles],
        grid_identifiers=[identifier],
        tokens={Role.PARTNER: partner, Role.SUPPLIER: supplier},
        register_meters=[meter.id],
        profile_meters=profiles,
    )


async def balanced_community(
    channel: grpc.aio.Channel,
    org: Org,
    prefix: str,
    meters: Sequence[tuple[int, mpb.MeterDirection.ValueType, mpb.Measuring.ValueType]],
) -> tuple[str, list[str]]:
    """A balanced PT15M site (UTC) of ``org`` and its meters (``prefix-number``, direction,
    measuring), each taking part: the site id and the meter ids, in order."""
    registry = site_registry_pb2_grpc.SiteRegistryStub(channel)
    meter_registry = meter_registry_pb2_grpc.MeterRegistryStub(channel)
    balancing = balancing_pb2_grpc.BalancingStub(channel)
    site = (
        await registry.CreateSite(
            spb.CreateSiteRequest(
                name=f"{prefix.lower()} community",
                type=spb.SITE_TYPE_BALANCED_ACCURATE,
                location=spb.Location(address="Gent", country="BE"),
                timezone="UTC",
            ),
            metadata=org.auth,
        )
    ).site
    made = []
    for number, direction, measuring in meters:
        meter = (
            await meter_registry.CreateMeter(
                mpb.CreateMeterRequest(
                    site_id=site.id,
                    identifier=f"{prefix}-{number}",
                    direction=direction,
                    measuring=measuring,
                    start_date=stamp(METER_START),
                ),
                metadata=org.auth,
            )
        ).meter
        await balancing.CreateMeterBalancingSetting(
            bpb.CreateMeterBalancingSettingRequest(
                site_id=site.id,
                meter_id=meter.id,
                balancing=bpb.BALANCING_ROLE_PARTICIPANT,
                start_date=date_pb2.Date(year=2025, month=1, day=1),
            ),
            metadata=org.auth,
        )
        made.append(meter.id)
    return site.id, made


def _methods(target: str) -> list[MethodDescriptor]:
    """Every method of every service the server lists over reflection."""
    with grpc.insecure_channel(target) as channel:
        info = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        [answer] = list(info(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    pool = descriptor_pool.Default()
    names = [service.name for service in answer.list_services_response.service]
    return [method for name in sorted(names) for method in pool.FindServiceByName(name).methods]


def _roles_of(service: Service) -> dict[str, frozenset[Role]]:
    roles: dict[str, frozenset[Role]] = {}
    for capability in service._capability_list:
        roles.update(capability.method_roles)
    return roles


def _call(
    channel: grpc.Channel,
    method: MethodDescriptor,
    payload: Any,
    token: str | None,
    stream_seconds: float = STREAM_SECONDS,
) -> grpc.StatusCode:
    """Sends raw ``payload`` (bytes, or a list of them on a client stream); the status.
    A Watch is given ``stream_seconds`` to answer."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    kind = (
        ("stream" if method.client_streaming else "unary")
        + "_"
        + ("stream" if method.server_streaming else "unary")
    )
    callable_ = getattr(channel, kind)(path, request_serializer=None, response_deserializer=None)
    try:
        if kind == "unary_unary":
            callable_(payload, metadata=metadata, timeout=CLIENT_STREAM_SECONDS)
            return grpc.StatusCode.OK
        if kind == "unary_stream":
            call = callable_(payload, metadata=metadata, timeout=stream_seconds)
            with contextlib.suppress(StopIteration):
                next(call)
            # The first answer came (or the stream ended): that is what is checked.
            code: grpc.StatusCode = call.code() if call.done() else grpc.StatusCode.OK
            call.cancel()
            return code
        if kind == "stream_unary":
            callable_(iter(payload), metadata=metadata, timeout=CLIENT_STREAM_SECONDS)
            return grpc.StatusCode.OK
        responses = callable_(iter(payload), metadata=metadata, timeout=CLIENT_STREAM_SECONDS)
        for _ in responses:
            pass
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
        # A Watch that is subscribed and waiting: ended by our deadline, not by the server.
        return code


def _fuzz_method(
    target: str,
    method: MethodDescriptor,
    allowed: frozenset[Role],
    world: World,
    orgs: dict[Role, Org],
    examples: int,
    tally: Tally,
) -> None:
    public = method.containing_service.full_name in PUBLIC_SERVICES
    others = [role for role in Role if role not in allowed]
    input_type = method.input_type

    with grpc.insecure_channel(
        target, options=[("grpc.max_send_message_length", CLIENT_MAX_MESSAGE_BYTES)]
    ) as channel:

        def check(payload: Any, token: str | None, expected: grpc.StatusCode | None) -> None:
            if method.client_streaming:
                if any(len(m) > SERVER_MAX_MESSAGE_BYTES for m in payload):
                    # The handler, and its authentication, may answer before it arrives.
                    expected = None
            elif len(payload) > SERVER_MAX_MESSAGE_BYTES:
                # Refused on arrival, before the handler: whoever sends it.
                expected = grpc.StatusCode.RESOURCE_EXHAUSTED
            code = _call(channel, method, payload, token)
            if (
                code is grpc.StatusCode.DEADLINE_EXCEEDED
                and method.server_streaming
                and expected in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
            ):
                # The refusal did not come within a Watch's short window (the two cores
                # busy): asked again with time for it, it must still be the refusal.
                code = _call(channel, method, payload, token, CLIENT_STREAM_SECONDS)
            tally.calls += 1
            tally.codes[code.name] += 1
            name = f"/{method.containing_service.full_name}/{method.name}"
            if code in NEVER:
                raise AssertionError(f"{name} answered {code.name}")
            if expected is not None and code is not expected:
                raise AssertionError(f"{name} answered {code.name}, expected {expected.name}")

        @fuzz_settings(
            examples, phases=[Phase.explicit, Phase.generate, Phase.shrink], print_blob=True
        )
        @given(st.data())
        def case(data: st.DataObject) -> None:
            if method.client_streaming:
                payload: Any = draw_stream(data, input_type, world)
            else:
                payload = draw_request_bytes(data, input_type, world)
            messages = payload if method.client_streaming else [payload]
            assume(all(len(m) <= CLIENT_MAX_MESSAGE_BYTES for m in messages))
            if public:
                check(payload, None, None)
                return
            role = data.draw(st.sampled_from(sorted(allowed))) if allowed else None
            if role is not None:
                check(payload, orgs[role].token, None)
            if others:
                other = data.draw(st.sampled_from(others))
                check(payload, orgs[other].token, grpc.StatusCode.PERMISSION_DENIED)
            check(payload, None, grpc.StatusCode.UNAUTHENTICATED)

        run_seeded(case)


# About 5 ms a call on the development VM; the suite's 120 s per test is for the fast profile.
@pytest.mark.timeout(max(120, CASES // 50))
async def test_no_input_breaks_the_error_contract(
    service: Service, world: World, make_org: MakeOrg
) -> None:
    target = f"127.0.0.1:{service.port}"
    orgs: dict[Role, Org] = dict(world.tokens)
    orgs[Role.OPERATOR] = await make_org(Role.OPERATOR)
    methods = await asyncio.to_thread(_methods, target)
    roles = _roles_of(service)
    # Every service of ours and health/reflection are listed: nothing escapes the fuzzing.
    listed = {method.containing_service.full_name for method in methods}
    ours = {c.descriptor.full_name for c in service._capability_list if c.descriptor is not None}
    assert listed >= ours | PUBLIC_SERVICES
    # Calls per example: one for public methods, else right role + other role + none.
    calls_per_example = sum(
        1 if m.containing_service.full_name in PUBLIC_SERVICES else 3 for m in methods
    )
    examples = max(5, CASES // calls_per_example)

    recorder = LogRecorder()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(recorder)
    root.setLevel(logging.INFO)
    tally = Tally()
    started = time.monotonic()
    try:
        for method in methods:
            allowed = roles.get(
                f"/{method.containing_service.full_name}/{method.name}", frozenset()
            )
            await asyncio.to_thread(
                _fuzz_method, target, method, allowed, world, orgs, examples, tally
            )
    finally:
        root.removeHandler(recorder)
        root.setLevel(old_level)
    minutes = (time.monotonic() - started) / 60
    print(
        f"\nfuzzed {len(methods)} RPCs with {tally.calls} calls in {minutes * 60:.0f} s; "
        f"statuses {dict(tally.codes)}; {len(recorder.records)} log lines"
    )

    assert tally.calls >= min(CASES, 5 * calls_per_example) * 0.9
    traces = [r for r in recorder.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not traces, [r.getMessage() for r in traces[:5]]
    assert not [r for r in recorder.records if "Traceback" in r.getMessage()]
    secrets = [org.token for org in orgs.values()]
    assert not [r for r in recorder.records if any(t in r.getMessage() for t in secrets)]
    # Rejections log one line per method and status a minute, not one per call.
    assert len(recorder.records) <= (int(minutes) + 1) * len(methods) * 10 + 50
    async with grpc.aio.insecure_channel(target) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        answer = await check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
