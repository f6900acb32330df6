"""The call guard on a real gRPC server: one span per call when tracing, and errors mapped."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from openvpp.v1 import site_registry_pb2 as pb

from service.app import Service
from service.auth.authenticator import Authenticator
from service.auth.principal import Role, current_principal
from service.auth.store import IdentityStore
from service.common.errors import ConcurrentChangeError, NotFoundError
from service.edge.call_guard import CallGuard
from service.observability import outgoing_traceparent
from tests.conftest import MakeOrg
from tests.helpers import rpc_error

SERVICE = "openvpp.test.Guarded"
ROLES = {
    f"/{SERVICE}/{name}": frozenset({Role.PARTNER})
    for name in ("Ok", "Missing", "Broken", "Crowded", "Misencoded", "Changing", "HandsOn")
}


async def _ok(request: pb.GetSiteRequest, _context: Any) -> pb.GetSiteRequest:
    return pb.GetSiteRequest(site_id=str(current_principal().org_id))


async def _hands_on(request: pb.GetSiteRequest, context: Any) -> pb.GetSiteRequest:
    # What a dispatch gives its webhooks as their traceparent.
    return pb.GetSiteRequest(site_id=outgoing_traceparent(context.invocation_metadata()))


async def _missing(request: pb.GetSiteRequest, _context: Any) -> pb.GetSiteRequest:
    raise NotFoundError("site", request.site_id)


async def _broken(request: pb.GetSiteRequest, _context: Any) -> pb.GetSiteRequest:
    raise RuntimeError("secret detail")


async def _crowded(request: pb.GetSiteRequest, _context: Any) -> pb.GetSiteRequest:
    # What asyncpg raises when PostgreSQL is at max_connections (SQLSTATE 53300).
    raise asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already")


async def _changing(request: pb.GetSiteRequest, _context: Any) -> pb.GetSiteRequest:
    # What a readings batch raises when its meters changed under it round after round.
    raise ConcurrentChangeError("3 meters of the batch changed since they were cached")


@pytest.fixture
async def traced(service: Service) -> AsyncIterator[tuple[grpc.aio.Channel, InMemorySpanExporter]]:
    assert service.pool is not None
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    guard = CallGuard(Authenticator(IdentityStore(service.pool), 30), provider.get_tracer("test"))
    pool = service.pool

    async def misencoded(request: pb.GetSiteRequest, _context: Any) -> pb.GetSiteRequest:
        # Our bug, not an outage: an argument asyncpg cannot encode for its parameter's type.
        await pool.fetchval("SELECT $1::int", request.site_id)
        raise AssertionError("the query must fail")

    handlers = {
        name: guard.guarded(
            f"/{SERVICE}/{name}",
            grpc.unary_unary_rpc_method_handler(
                behaviour,
                request_deserializer=pb.GetSiteRequest.FromString,
                response_serializer=pb.GetSiteRequest.SerializeToString,
            ),
            ROLES,
        )
        for name, behaviour in (
            ("Ok", _ok),
            ("Missing", _missing),
            ("Broken", _broken),
            ("Crowded", _crowded),
            ("Misencoded", misencoded),
            ("Changing", _changing),
            ("HandsOn", _hands_on),
        )
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, exporter
    await server.stop(0)


@pytest.fixture
async def untraced(service: Service) -> AsyncIterator[grpc.aio.Channel]:
    assert service.pool is not None
    guard = CallGuard(Authenticator(IdentityStore(service.pool), 30), None)
    handler = guard.guarded(
        f"/{SERVICE}/HandsOn",
        grpc.unary_unary_rpc_method_handler(
            _hands_on,
            request_deserializer=pb.GetSiteRequest.FromString,
            response_serializer=pb.GetSiteRequest.SerializeToString,
        ),
        ROLES,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"HandsOn": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(0)


def _method(channel: grpc.aio.Channel, name: str) -> Any:
    return channel.unary_unary(
        f"/{SERVICE}/{name}",
        request_serializer=pb.GetSiteRequest.SerializeToString,
        response_deserializer=pb.GetSiteRequest.FromString,
    )


async def test_each_call_is_one_server_span_and_the_handler_sees_the_caller(
    traced: tuple[grpc.aio.Channel, InMemorySpanExporter], make_org: MakeOrg
) -> None:
    channel, exporter = traced
    org = await make_org(Role.PARTNER)
    response = await _method(channel, "Ok")(pb.GetSiteRequest(), metadata=org.auth)
    assert response.site_id == str(org.id)
    [span] = exporter.get_finished_spans()
    assert span.name == f"/{SERVICE}/Ok"
    assert span.kind is SpanKind.SERVER
    assert span.parent is None  # the caller sent no trace context
    assert span.status.status_code is StatusCode.UNSET


async def test_the_span_continues_the_callers_trace(
    traced: tuple[grpc.aio.Channel, InMemorySpanExporter], make_org: MakeOrg
) -> None:
    channel, exporter = traced
    org = await make_org(Role.PARTNER)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    traceparent = ("traceparent", f"00-{trace_id}-{parent_id}-01")
    await _method(channel, "Ok")(pb.GetSiteRequest(), metadata=(*org.auth, traceparent))
    [span] = exporter.get_finished_spans()
    assert span.context is not None
    assert span.parent is not None
    assert format(span.context.trace_id, "032x") == trace_id
    assert format(span.parent.span_id, "016x") == parent_id
    assert span.parent.is_remote


async def test_domain_and_unexpected_errors_are_mapped_and_marked_on_the_span(
    traced: tuple[grpc.aio.Channel, InMemorySpanExporter], make_org: MakeOrg
) -> None:
    channel, exporter = traced
    org = await make_org(Role.PARTNER)
    missing = await rpc_error(
        _method(channel, "Missing")(pb.GetSiteRequest(site_id="x"), metadata=org.auth)
    )
    assert missing.code() is grpc.StatusCode.NOT_FOUND
    broken = await rpc_error(_method(channel, "Broken")(pb.GetSiteRequest(), metadata=org.auth))
    assert broken.code() is grpc.StatusCode.INTERNAL
    assert broken.details() == "internal error"
    spans = {span.name: span for span in exporter.get_finished_spans()}
    marked = spans[f"/{SERVICE}/Missing"].attributes
    assert marked is not None
    assert marked["rpc.grpc.error"] == "NotFoundError"
    assert marked["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert spans[f"/{SERVICE}/Broken"].status.status_code is StatusCode.ERROR


async def test_refused_calls_are_spans_too(
    traced: tuple[grpc.aio.Channel, InMemorySpanExporter], make_org: MakeOrg
) -> None:
    channel, exporter = traced
    supplier = await make_org(Role.SUPPLIER)
    denied = await rpc_error(_method(channel, "Ok")(pb.GetSiteRequest(), metadata=supplier.auth))
    assert denied.code() is grpc.StatusCode.PERMISSION_DENIED
    anonymous = await rpc_error(_method(channel, "Ok")(pb.GetSiteRequest()))
    assert anonymous.code() is grpc.StatusCode.UNAUTHENTICATED
    assert [span.name for span in exporter.get_finished_spans()] == [f"/{SERVICE}/Ok"] * 2


async def test_a_bug_logs_its_trace_once_and_rejections_one_line(
    traced: tuple[grpc.aio.Channel, InMemorySpanExporter],
    make_org: MakeOrg,
    caplog: pytest.LogCaptureFixture,
) -> None:
    channel, _ = traced
    org = await make_org(Role.PARTNER)
    caplog.set_level(logging.INFO, "service.edge.call_guard")
    for _ in range(30):
        broken = await rpc_error(_method(channel, "Broken")(pb.GetSiteRequest(), metadata=org.auth))
        assert broken.code() is grpc.StatusCode.INTERNAL
        missing = await rpc_error(
            _method(channel, "Missing")(pb.GetSiteRequest(site_id="x"), metadata=org.auth)
        )
        assert missing.code() is grpc.StatusCode.NOT_FOUND
        anonymous = await rpc_error(_method(channel, "Ok")(pb.GetSiteRequest()))
        assert anonymous.code() is grpc.StatusCode.UNAUTHENTICATED
    records = [r for r in caplog.records if r.name == "service.edge.call_guard"]
    traces = [r for r in records if r.exc_info]
    assert len(traces) == 1
    assert traces[0].getMessage() == f"unexpected error in /{SERVICE}/Broken"
    lines = sorted(r.getMessage() for r in records if not r.exc_info)
    assert lines == [
        f"rejected /{SERVICE}/Missing: NOT_FOUND site 'x' not found",
        f"rejected /{SERVICE}/Ok: UNAUTHENTICATED no valid token",
    ]
    assert org.token not in caplog.text


@pytest.mark.parametrize(
    ("method", "code", "details"),
    [
        # PostgreSQL at max_connections (SQLSTATE 53300): an outage to wait out.
        ("Crowded", grpc.StatusCode.UNAVAILABLE, "database unavailable; retry later"),
        # What a call read kept changing under it: the same call again normally succeeds.
        ("Changing", grpc.StatusCode.ABORTED, "conflicting concurrent change; retry the call"),
    ],
)
async def test_a_retryable_failure_is_its_status_not_a_bug(
    traced: tuple[grpc.aio.Channel, InMemorySpanExporter],
    make_org: MakeOrg,
    caplog: pytest.LogCaptureFixture,
    method: str,
    code: grpc.StatusCode,
    details: str,
) -> None:
    channel, _ = traced
    org = await make_org(Role.PARTNER)
    caplog.set_level(logging.INFO, "service.edge.call_guard")
    error = await rpc_error(_method(channel, method)(pb.GetSiteRequest(), metadata=org.auth))
    assert error.code() is code
    assert error.details() == details
    assert not [r for r in caplog.records if r.name == "service.edge.call_guard" and r.exc_info]


async def test_an_argument_the_driver_cannot_encode_is_a_bug_not_an_outage(
    traced: tuple[grpc.aio.Channel, InMemorySpanExporter],
    make_org: MakeOrg,
    caplog: pytest.LogCaptureFixture,
) -> None:
    channel, _ = traced
    org = await make_org(Role.PARTNER)
    caplog.set_level(logging.INFO, "service.edge.call_guard")
    error = await rpc_error(
        _method(channel, "Misencoded")(pb.GetSiteRequest(site_id="x"), metadata=org.auth)
    )
    assert error.code() is grpc.StatusCode.INTERNAL
    assert error.details() == "internal error"
    guard_records = [r for r in caplog.records if r.name == "service.edge.call_guard"]
    # asyncpg raises its DataError (a PostgresError, not one of the InterfaceErrors the
    # guard counts as the database being away).
    assert [r.exc_info[0] for r in guard_records if r.exc_info] == [asyncpg.DataError]
    assert not [r for r in guard_records if "unavailable" in r.getMessage()]


TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


async def test_what_a_call_hands_on_continues_its_server_span(
    traced: tuple[grpc.aio.Channel, InMemorySpanExporter], make_org: MakeOrg
) -> None:
    """A dispatch's webhooks carry a traceparent whose parent is the DispatchFlexibility
    span: before, a random span id that no exporter ever saw, in a trace of its own when
    the caller sent none."""
    channel, exporter = traced
    org = await make_org(Role.PARTNER)
    hands_on = _method(channel, "HandsOn")
    for sent in ((), (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)):
        exporter.clear()
        answer = await hands_on(pb.GetSiteRequest(), metadata=(*org.auth, *sent))
        [span] = exporter.get_finished_spans()
        assert span.context is not None
        ours = span.context
        flags = int(ours.trace_flags)
        assert flags & 1  # sampled
        assert answer.site_id == f"00-{ours.trace_id:032x}-{ours.span_id:016x}-{flags:02x}"
        if sent:
            assert f"{span.context.trace_id:032x}" == TRACE_ID
        assert span.attributes is not None
        assert dict(span.attributes) == {
            "rpc.system": "grpc",
            "rpc.service": SERVICE,
            "rpc.method": "HandsOn",
            "rpc.grpc.status_code": 0,
        }
    # A caller that did not sample: nothing recorded, and the webhooks say so too.
    exporter.clear()
    answer = await hands_on(
        pb.GetSiteRequest(),
        metadata=(*org.auth, ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-00")),
    )
    assert exporter.get_finished_spans() == ()
    assert answer.site_id.startswith(f"00-{TRACE_ID}-")
    assert not int(answer.site_id.rpartition("-")[2], 16) & 1


async def test_without_tracing_a_call_hands_on_its_callers_trace_context(
    untraced: grpc.aio.Channel, make_org: MakeOrg
) -> None:
    """This hop records nothing, so the receiver's spans hang off the caller's span, with
    the caller's sampling decision; a call without one starts a trace."""
    org = await make_org(Role.PARTNER)
    hands_on = _method(untraced, "HandsOn")
    for flags in ("00", "01"):
        sent = f"00-{TRACE_ID}-{PARENT_ID}-{flags}"
        answer = await hands_on(pb.GetSiteRequest(), metadata=(*org.auth, ("traceparent", sent)))
        assert answer.site_id == sent
    fresh = (await hands_on(pb.GetSiteRequest(), metadata=org.auth)).site_id
    version, trace_id, parent_id, flags = fresh.split("-")
    assert (version, len(trace_id), len(parent_id), flags) == ("00", 32, 16, "01")
    # A later version is read as far as version 00 defines it, and handed on as 00.
    later = f"01-{TRACE_ID}-{PARENT_ID}-01-what-01-adds"
    answer = await hands_on(pb.GetSiteRequest(), metadata=(*org.auth, ("traceparent", later)))
    assert answer.site_id == f"00-{TRACE_ID}-{PARENT_ID}-01"
    # Not a valid W3C context (an all-zero trace id, version ff, 00 with more fields): a new
    # trace.
    for bad in (
        "00-" + "0" * 32 + f"-{PARENT_ID}-01",
        "garbage",
        f"ff-{TRACE_ID}-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{PARENT_ID}-01-more",
    ):
        answer = await hands_on(pb.GetSiteRequest(), metadata=(*org.auth, ("traceparent", bad)))
        assert TRACE_ID not in answer.site_id, bad
