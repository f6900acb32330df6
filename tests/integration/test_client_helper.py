"""openvpp_client: the token reaches every call, UNAVAILABLE/ABORTED are retried by gRPC itself.

A tiny real server on 127.0.0.1 fails the first attempts of a call with a chosen code and
records every attempt's metadata, so the retries are counted where they arrive.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from openvpp.v1 import site_registry_pb2 as pb
from openvpp.v1 import site_registry_pb2_grpc

import openvpp_client
from service.auth.principal import Role
from tests.conftest import MakeOrg

SERVICE = "test.Flaky"
Context = grpc.aio.ServicerContext[bytes, bytes]
FAST = openvpp_client.RetryPolicy(initial_backoff_seconds=0.01, max_backoff_seconds=0.05)


def flaky_call(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary(f"/{SERVICE}/Unary")


@dataclass
class Flaky:
    """Fails the next ``failures`` attempts with ``code``, then answers with the request."""

    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    failures: int = 0
    attempts: list[dict[str, str]] = field(default_factory=list)

    async def unary(self, request: bytes, context: Context) -> bytes:
        self.attempts.append({k: str(v) for k, v in context.invocation_metadata() or ()})
        if self.failures > 0:
            self.failures -= 1
            await context.abort(self.code, "try again")
        return request

    async def stream(
        self, requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        received = [request async for request in requests]
        self.attempts.append({k: str(v) for k, v in context.invocation_metadata() or ()})
        if self.failures > 0:
            self.failures -= 1
            await context.abort(self.code, "try again")
        for request in received:
            yield request


@pytest.fixture(scope="module")
async def flaky() -> AsyncIterator[tuple[Flaky, str]]:
    behaviour = Flaky()

    async def unary(request: bytes, context: Context) -> bytes:
        return await behaviour.unary(request, context)

    async def stream(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        async for answer in behaviour.stream(requests, context):
            yield answer

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "Stream": grpc.stream_stream_rpc_method_handler(stream),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield behaviour, f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.fixture
def server(flaky: tuple[Flaky, str]) -> tuple[Flaky, str]:
    behaviour, target = flaky
    behaviour.failures, behaviour.code = 0, grpc.StatusCode.UNAVAILABLE
    behaviour.attempts.clear()
    return behaviour, target


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED])
async def test_a_retryable_failure_is_retried_with_the_token(
    server: tuple[Flaky, str], code: grpc.StatusCode
) -> None:
    behaviour, target = server
    behaviour.code, behaviour.failures = code, 1
    async with openvpp_client.aio_channel(target, "ovpp_secret", retry=FAST) as channel:
        answer = await flaky_call(channel)(b"hello")
    assert answer == b"hello"
    assert len(behaviour.attempts) == 2
    assert all(a["authorization"] == "Bearer ovpp_secret" for a in behaviour.attempts)


async def test_without_a_policy_the_failure_reaches_the_caller(server: tuple[Flaky, str]) -> None:
    behaviour, target = server
    behaviour.failures = 1
    async with openvpp_client.aio_channel(target, "t", retry=None) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await flaky_call(channel)(b"hello")
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(behaviour.attempts) == 1


async def test_a_client_error_is_not_retried(server: tuple[Flaky, str]) -> None:
    behaviour, target = server
    behaviour.code, behaviour.failures = grpc.StatusCode.INVALID_ARGUMENT, 1
    async with openvpp_client.aio_channel(target, "t", retry=FAST) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await flaky_call(channel)(b"hello")
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(behaviour.attempts) == 1


async def test_attempts_are_bounded_and_backed_off(server: tuple[Flaky, str]) -> None:
    behaviour, target = server
    behaviour.failures = 100
    policy = openvpp_client.RetryPolicy(
        max_attempts=3, initial_backoff_seconds=0.2, max_backoff_seconds=0.2
    )
    loop = asyncio.get_running_loop()
    async with openvpp_client.aio_channel(target, "t", retry=policy) as channel:
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError):
            await flaky_call(channel)(b"hello")
        elapsed = loop.time() - started
    assert len(behaviour.attempts) == 3
    # Two backoffs, each drawn uniformly from (0, 0.2 s]: some wait, never a tight loop
    # of three attempts, and well under the 5 s a stuck call would take.
    assert 0 < elapsed < 5


async def test_the_blocking_channel_retries_streams_too(server: tuple[Flaky, str]) -> None:
    behaviour, target = server
    behaviour.failures = 2

    def call_blocking() -> list[bytes]:
        with openvpp_client.channel(target, "ovpp_sync", retry=FAST) as channel:
            call: Any = channel.stream_stream(f"/{SERVICE}/Stream")
            return list(call(iter([b"a", b"b"])))

    # In a thread: the server answers on this test's event loop.
    answers = await asyncio.to_thread(call_blocking)
    assert answers == [b"a", b"b"]
    assert [a["authorization"] for a in behaviour.attempts] == ["Bearer ovpp_sync"] * 3


async def test_a_token_travels_as_call_credentials_on_a_secure_channel() -> None:
    # Local credentials are secure enough for gRPC to send call credentials over them.
    seen: list[str] = []

    async def unary(request: bytes, context: Context) -> bytes:
        seen.extend(str(v) for k, v in context.invocation_metadata() or () if k == "authorization")
        return request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
            ),
        )
    )
    local = grpc.LocalConnectionType.LOCAL_TCP
    port = server.add_secure_port("127.0.0.1:0", grpc.local_server_credentials(local))
    await server.start()
    try:
        credentials = grpc.local_channel_credentials(local)
        async with openvpp_client.aio_channel(
            f"127.0.0.1:{port}", "ovpp_tls", credentials=credentials
        ) as channel:
            assert await flaky_call(channel)(b"x") == b"x"
    finally:
        await server.stop(0)
    assert seen == ["Bearer ovpp_tls"]


async def test_the_helper_calls_the_real_service(service: Any, make_org: MakeOrg) -> None:
    org = await make_org(Role.PARTNER)
    async with openvpp_client.aio_channel(f"127.0.0.1:{service.port}", org.token) as channel:
        registry = site_registry_pb2_grpc.SiteRegistryStub(channel)
        listed = await registry.ListSites(pb.ListSitesRequest())
    assert listed.total_size == 0
    async with openvpp_client.aio_channel(f"127.0.0.1:{service.port}", "ovpp_wrong") as channel:
        registry = site_registry_pb2_grpc.SiteRegistryStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await registry.ListSites(pb.ListSitesRequest())
    assert failed.value.code() == grpc.StatusCode.UNAUTHENTICATED
