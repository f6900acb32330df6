"""Reflection answers both ``grpc.reflection.v1`` (current clients) and ``v1alpha`` (older ones)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc

from service.app import Service
from service.edge.reflection import (
    V1_SERVICE_NAME,
    _definitions,
    documented_files,
    v1_file_descriptor,
)

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


# grpc/reflection/v1/reflection.proto as published by gRPC (field numbers of every message),
# written out here so the derived descriptor is checked against the real v1, not itself.
OFFICIAL_V1_FIELDS = {
    "ServerReflectionRequest": {
        "host": 1,
        "file_by_filename": 3,
        "file_containing_symbol": 4,
        "file_containing_extension": 5,
        "all_extension_numbers_of_type": 6,
        "list_services": 7,
    },
    "ExtensionRequest": {"containing_type": 1, "extension_number": 2},
    "ServerReflectionResponse": {
        "valid_host": 1,
        "original_request": 2,
        "file_descriptor_response": 4,
        "all_extension_numbers_response": 5,
        "list_services_response": 6,
        "error_response": 7,
    },
    "FileDescriptorResponse": {"file_descriptor_proto": 1},
    "ExtensionNumberResponse": {"base_type_name": 1, "extension_number": 2},
    "ListServiceResponse": {"service": 1},
    "ServiceResponse": {"name": 1},
    "ErrorResponse": {"error_code": 1, "error_message": 2},
}


def test_the_v1_descriptor_is_grpcs_v1() -> None:
    proto = v1_file_descriptor()
    assert (proto.name, proto.package) == (
        "grpc/reflection/v1/reflection.proto",
        "grpc.reflection.v1",
    )
    fields = {m.name: {f.name: f.number for f in m.field} for m in proto.message_type}
    assert fields == OFFICIAL_V1_FIELDS
    referenced = {f.type_name for m in proto.message_type for f in m.field if f.type_name}
    assert all(name.startswith(".grpc.reflection.v1.") for name in referenced)
    (service,) = proto.service
    (method,) = service.method
    assert (service.name, method.name) == ("ServerReflection", "ServerReflectionInfo")
    assert method.client_streaming
    assert method.server_streaming


async def test_grpcurl_calls_v1_reflection(service: Service) -> None:
    """A third-party client (grpcurl) builds and sends a v1 request from what it reflected."""
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "grpcurl"),
        "-plaintext",
        "-d",
        '{"list_services": ""}',
        f"127.0.0.1:{service.port}",
        f"{V1_SERVICE_NAME}/ServerReflectionInfo",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, output.decode()
    answer = json.loads(output)
    names = {entry["name"] for entry in answer["list_services_response"]["service"]}
    assert {"openvpp.v1.Telemetry", "grpc.reflection.v1.ServerReflection"} <= names


async def test_our_files_are_described_with_their_comments(channel: grpc.aio.Channel) -> None:
    files = files_of(await ask_v1(channel, file_containing_symbol="openvpp.v1.SiteRegistry"))
    site_registry = files["openvpp/v1/site_registry.proto"]
    comments = {
        location.leading_comments.strip() for location in site_registry.source_code_info.location
    }
    assert "IANA time zone; defaults to the country's main zone, else UTC." in comments
    # Files that are not ours come as compiled (their comments are not in our tree).
    assert not files["google/protobuf/timestamp.proto"].HasField("source_code_info")

    stub = v1alpha_grpc.ServerReflectionStub(channel)

    async def requests() -> AsyncIterator[v1alpha_pb2.ServerReflectionRequest]:
        yield v1alpha_pb2.ServerReflectionRequest(file_by_filename="openvpp/v1/telemetry.proto")

    async for response in stub.ServerReflectionInfo(requests()):
        (raw,) = response.file_descriptor_response.file_descriptor_proto[:1]
        telemetry = descriptor_pb2.FileDescriptorProto.FromString(raw)
        assert telemetry.name == "openvpp/v1/telemetry.proto"
        assert telemetry.source_code_info.location
        break


def test_every_proto_has_a_current_documented_descriptor() -> None:
    pool = descriptor_pool.Default()
    documented = documented_files(pool)
    protos = {
        f"openvpp/v1/{path.name}"
        for path in (Path(__file__).resolve().parents[2] / "protos/openvpp/v1").glob("*.proto")
    }
    assert set(documented) == protos


def test_a_stale_documented_descriptor_would_be_told_apart() -> None:
    from openvpp.v1 import site_registry_pb2

    compiled = descriptor_pb2.FileDescriptorProto()
    site_registry_pb2.DESCRIPTOR.CopyToProto(compiled)
    documented = descriptor_pb2.FileDescriptorProto.FromString(
        documented_files(descriptor_pool.Default())["openvpp/v1/site_registry.proto"]
    )
    assert _definitions(documented) == _definitions(compiled)
    documented.message_type[0].field[0].name = "renamed"
    assert _definitions(documented) != _definitions(compiled)
