"""Reflection answers both ``grpc.reflection.v1`` (current clients) and ``v1alpha`` (older ones)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc

from service.common.reflection import V1_SERVICE_NAME, v1_file_descriptor

V1_METHOD = f"/{V1_SERVICE_NAME}/ServerReflectionInfo"


def v1_messages() -> tuple[Any, Any]:
    """v1 request/response classes in a pool of their own (not the server's default pool)."""
    pool = descriptor_pool.DescriptorPool()
    pool.Add(v1_file_descriptor())
    request = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")
    )
    response = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
    )
    return request, response


async def ask_v1(channel: grpc.aio.Channel, **request_fields: Any) -> Any:
    request_type, response_type = v1_messages()
    call = channel.stream_stream(
        V1_METHOD,
        request_serializer=request_type.SerializeToString,
        response_deserializer=response_type.FromString,
    )

    async def requests() -> AsyncIterator[Any]:
        yield request_type(**request_fields)

    async for response in call(requests()):
        return response
    raise AssertionError("no reflection response")


def files_of(response: Any) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    files = {}
    for raw in response.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        files[proto.name] = proto
    return files


async def test_v1_lists_every_service(channel: grpc.aio.Channel) -> None:
    response = await ask_v1(channel, list_services="")
    assert response.DESCRIPTOR.full_name == "grpc.reflection.v1.ServerReflectionResponse"
    names = {service.name for service in response.list_services_response.service}
    assert {
        "openvpp.v1.SiteRegistry",
        "openvpp.v1.UpstreamRegistry",
        "openvpp.v1.MeterRegistry",
        "openvpp.v1.Telemetry",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


async def test_v1_resolves_a_service_with_its_dependencies(channel: grpc.aio.Channel) -> None:
    response = await ask_v1(channel, file_containing_symbol="openvpp.v1.UpstreamRegistry")
    files = files_of(response)
    assert "openvpp/v1/upstream_registry.proto" in files
    assert "google/type/date.proto" in files
    # A client builds its own pool from the answer alone, as grpcurl does.
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    while len(added) < len(files):
        for name, proto in files.items():
            if name not in added and set(proto.dependency) <= added:
                pool.Add(proto)
                added.add(name)
    methods = pool.FindServiceByName("openvpp.v1.UpstreamRegistry").methods_by_name
    assert "CreateContract" in methods


async def test_v1_describes_itself_and_reports_unknown_symbols(channel: grpc.aio.Channel) -> None:
    own = files_of(await ask_v1(channel, file_containing_symbol=V1_SERVICE_NAME))
    v1_file = own["grpc/reflection/v1/reflection.proto"]
    assert v1_file.package == "grpc.reflection.v1"
    assert [m.input_type for m in v1_file.service[0].method] == [
        ".grpc.reflection.v1.ServerReflectionRequest"
    ]
    missing = await ask_v1(channel, file_containing_symbol="no.such.Service")
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert missing.original_request.file_containing_symbol == "no.such.Service"


async def test_v1alpha_still_answers(channel: grpc.aio.Channel) -> None:
    stub = v1alpha_grpc.ServerReflectionStub(channel)

    async def requests() -> AsyncIterator[v1alpha_pb2.ServerReflectionRequest]:
        yield v1alpha_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(requests()):
        names = {service.name for service in response.list_services_response.service}
        assert {"openvpp.v1.SiteRegistry", "grpc.reflection.v1.ServerReflection"} <= names
        break
