"""Server reflection as ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``, with comments.

grpcio-reflection ships only v1alpha, while current clients (grpcurl 1.9+, Postman, grpcui)
ask for v1 first. The two protos are the same messages under another package name, field
for field, so they are the same bytes on the wire: v1 is served by the library's own
servicer, under the v1 method name, with the v1 file descriptor (derived from v1alpha's)
in the descriptor pool so a client can also describe the v1 service itself.

Our own files are answered with their comments: the generated modules' descriptors carry
none, so ``scripts/gen_protos.py`` writes each file's full descriptor beside its module
(``gen/openvpp/v1/*.descriptor.binpb``) and those bytes replace the bare ones, for a file
whose definitions are exactly the compiled ones (a stale copy is ignored, never served).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

from service.edge.call_guard import CallGuard

V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
V1ALPHA_DESCRIPTOR = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
DOCUMENTED_PACKAGE = "openvpp.v1"
DOCUMENTED_SUFFIX = ".descriptor.binpb"

log = logging.getLogger(__name__)


def v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """v1alpha's reflection.proto renamed to v1 (what grpc's own v1 proto declares)."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old_prefix = f".{proto.package}."
    proto.name = V1_FILE
    proto.package = V1_PACKAGE
    proto.ClearField("options")
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    for message in proto.message_type:
        for message_field in message.field:
            if message_field.type_name.startswith(old_prefix):
                suffix = message_field.type_name.removeprefix(old_prefix)
                message_field.type_name = f".{V1_PACKAGE}.{suffix}"
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old_prefix, f".{V1_PACKAGE}.")
            method.output_type = method.output_type.replace(old_prefix, f".{V1_PACKAGE}.")
    return proto


def _register_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(V1_FILE)
    except KeyError:
        pool.Add(v1_file_descriptor())


def _definitions(proto: descriptor_pb2.FileDescriptorProto) -> bytes:
    """What a file defines: all of it but the comments."""
    bare = descriptor_pb2.FileDescriptorProto()
    bare.CopyFrom(proto)
    bare.ClearField("source_code_info")
    return bare.SerializeToString(deterministic=True)


def documented_files(pool: descriptor_pool.DescriptorPool) -> dict[str, bytes]:
    """Serialized descriptors with comments of our files, by file name, as far as current."""
    found: dict[str, bytes] = {}
    for entry in resources.files(DOCUMENTED_PACKAGE).iterdir():
        if not entry.name.endswith(DOCUMENTED_SUFFIX):
            continue
        documented = descriptor_pb2.FileDescriptorProto.FromString(entry.read_bytes())
        compiled = descriptor_pb2.FileDescriptorProto()
        try:
            pool.FindFileByName(documented.name).CopyToProto(compiled)
        except KeyError:
            continue  # not imported by the service: nothing to describe
        if _definitions(documented) != _definitions(compiled):
            log.warning("%s is stale (run scripts/gen_protos.py); served without comments", entry)
            continue
        found[documented.name] = documented.SerializeToString()
    return found


class _DocumentedReflection(reflection.aio.ReflectionServicer):  # type: ignore[misc]
    """The library's servicer; file answers carry our files' comments."""

    def __init__(
        self, names: list[str], pool: descriptor_pool.DescriptorPool, documented: dict[str, bytes]
    ) -> None:
        super().__init__(names, pool=pool)
        self._documented = documented

    async def ServerReflectionInfo(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        async for response in super().ServerReflectionInfo(request_iterator, context):
            if response.HasField("file_descriptor_response"):
                files = response.file_descriptor_response.file_descriptor_proto
                for index, raw in enumerate(files):
                    name = descriptor_pb2.FileDescriptorProto.FromString(raw).name
                    files[index] = self._documented.get(name, raw)
            yield response


def enable_server_reflection(
    service_names: Iterable[str], server: grpc.aio.Server, guard: CallGuard
) -> None:
    """Serves reflection of ``service_names`` (plus both reflection services) on ``server``,
    through ``guard`` as a public (tokenless) service, so its requests are decoded and its
    errors mapped like every other call's."""
    pool = descriptor_pool.Default()
    _register_v1_descriptor(pool)
    names = [*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME]
    servicer = _DocumentedReflection(names, pool, documented_files(pool))
    guard.register(server, V1ALPHA_DESCRIPTOR, servicer, {}, public=True)
    # The v1 method is the v1alpha servicer under v1's name (same bytes on the wire).
    v1_method = guard.guarded(
        f"/{V1_SERVICE_NAME}/ServerReflectionInfo",
        grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        ),
        {},
        public=True,
    )
    v1_handler = grpc.method_handlers_generic_handler(
        V1_SERVICE_NAME, {"ServerReflectionInfo": v1_method}
    )
    server.add_generic_rpc_handlers((v1_handler,))
