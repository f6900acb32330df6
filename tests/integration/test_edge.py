"""The server's edge: requests are decoded after authentication, for every service."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from service.app import GRPC_OPTIONS
from tests.conftest import Org
from tests.helpers import error_reason, raw_method, rpc_error

GARBAGE = b"\xff\xff\xff\xff\x0f"  # a field tag with an invalid wire type


def _raw(channel: grpc.aio.Channel, method: str) -> Any:
    return raw_method(channel, method, "unary_unary")


async def test_an_undecodable_request_without_a_token_is_unauthenticated(
    channel: grpc.aio.Channel,
) -> None:
    error = await rpc_error(_raw(channel, "/openvpp.v1.SiteRegistry/CreateSite")(GARBAGE))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_an_undecodable_request_with_a_token_names_the_message(
    channel: grpc.aio.Channel, partner: Org
) -> None:
    error = await rpc_error(
        _raw(channel, "/openvpp.v1.SiteRegistry/CreateSite")(GARBAGE, metadata=partner.auth)
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "request is not a valid `openvpp.v1.CreateSiteRequest`"
    assert error_reason(error) == "MALFORMED_REQUEST"


@pytest.mark.parametrize("with_token", [False, True])
async def test_a_request_above_the_message_limit_is_resource_exhausted_for_everyone(
    channel: grpc.aio.Channel, partner: Org, with_token: bool
) -> None:
    # gRPC refuses it on arrival, before the guard: neither decoded nor authenticated.
    limit = dict(GRPC_OPTIONS)["grpc.max_receive_message_length"]
    call = _raw(channel, "/openvpp.v1.SiteRegistry/CreateSite")
    error = await rpc_error(
        call(b"\x00" * (limit + 1), metadata=partner.auth if with_token else None)
    )
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    # The connection and the server are still fine for the next call.
    error = await rpc_error(call(GARBAGE))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("method", ["Check", "Watch"])
async def test_health_answers_an_undecodable_request_invalid_argument(
    channel: grpc.aio.Channel, method: str
) -> None:
    path = f"/grpc.health.v1.Health/{method}"
    if method == "Check":
        error = await rpc_error(_raw(channel, path)(GARBAGE))
    else:
        call = raw_method(channel, path, "unary_stream")
        error = await rpc_error(call(GARBAGE).read())
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "request is not a valid `grpc.health.v1.HealthCheckRequest`"
    # Health needs no token and still answers a good request.
    good = _raw(channel, "/grpc.health.v1.Health/Check")
    answer = health_pb2.HealthCheckResponse.FromString(
        await good(health_pb2.HealthCheckRequest().SerializeToString())
    )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
async def test_reflection_ends_its_stream_on_an_undecodable_request(
    channel: grpc.aio.Channel, version: str
) -> None:
    path = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    call = raw_method(channel, path, "stream_stream")(iter([GARBAGE]))
    error = await rpc_error(call.read())
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
