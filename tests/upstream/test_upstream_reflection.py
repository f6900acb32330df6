"""Clients without our .proto files (grpcurl) resolve the service, google.type.Date included."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from service.app import Service


def resolve(port: int) -> tuple[list[str], str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = DescriptorPool(database)
        service = pool.FindServiceByName("openvpp.v1.UpstreamRegistry")
        request = pool.FindMessageTypeByName("openvpp.v1.CreateContractRequest")
        date_type = request.fields_by_name["start_date"].message_type
        assert date_type is not None
        return [m.name for m in service.methods], date_type.full_name


async def test_reflection_serves_upstream_registry(upstream_service: Service) -> None:
    methods, date_type = await asyncio.to_thread(resolve, upstream_service.port)
    assert "CreateContract" in methods
    assert date_type == "google.type.Date"
