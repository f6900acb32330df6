"""Small builders and assertions shared by the registry tests."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import grpc
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from openvpp.v1 import site_registry_pb2 as pb

from tests.conftest import Org
from tests.helpers import rpc_error, wait_until_blocked

if TYPE_CHECKING:
    from openvpp.v1.site_registry_pb2_grpc import SiteRegistryAsyncStub

    Stub: TypeAlias = SiteRegistryAsyncStub
else:
    Stub = object  # the async stub type exists only in the generated .pyi

BID = pb.SUPPLY_POINT_DIRECTION_BIDIRECTIONAL
OFFTAKE = pb.SUPPLY_POINT_DIRECTION_OFFTAKE
INJECTION = pb.SUPPLY_POINT_DIRECTION_INJECTION


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def point(identifier: str, direction: int = BID) -> pb.SupplyPoint:
    return pb.SupplyPoint(grid_identifier=identifier, direction=direction)  # type: ignore[arg-type]


def resource_request(site_id: str, kind: int, **fields: Any) -> pb.CreateResourceRequest:
    """A valid resource of ``kind`` (power bounds that fit it), overridable field by field."""
    values: dict[str, Any] = {"site_id": site_id, "type": kind, "name": "r"}
    if kind == pb.RESOURCE_TYPE_STATIC_BATTERY:
        values["power_kw"] = pb.Bounds(min=-5, max=5)
        values["capacity_kwh"] = pb.Bounds(min=0, max=10)
    elif kind in (pb.RESOURCE_TYPE_PHOTOVOLTAIC, pb.RESOURCE_TYPE_WIND):
        values["power_kw"] = pb.Bounds(min=-8, max=0)
    elif kind != pb.RESOURCE_TYPE_METER:
        values["power_kw"] = pb.Bounds(min=0, max=11)
    values.update(fields)
    return pb.CreateResourceRequest(**values)


async def not_found(call: Any) -> tuple[grpc.StatusCode, str, list[str]]:
    """The NOT_FOUND answer with the id it names blanked out, to compare two answers."""
    error = await rpc_error(call)
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    status = rpc_status.from_call(error)
    assert status is not None
    kinds = []
    for detail in status.details:
        info = error_details_pb2.ResourceInfo()
        assert detail.Unpack(info)
        kinds.append(info.resource_type)
    details = error.details() or ""
    return error.code(), _blank_uuids(details), kinds


def _blank_uuids(text: str) -> str:
    words = []
    for word in text.split(" "):
        try:
            uuid.UUID(word.strip("'"))
            words.append("<id>")
        except ValueError:
            words.append(word)
    return " ".join(words)


def random_id() -> str:
    return str(uuid.uuid4())


async def count_rows(conn: asyncpg.Connection, table: str, org: Org) -> int:
    value = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE org_id = $1", org.id)
    assert isinstance(value, int)
    return value


async def wait_until_blocked_on_lock(conn: asyncpg.Connection, call: asyncio.Future[Any]) -> None:
    """Until ``call`` waits for the row lock that ``conn`` holds."""
    await wait_until_blocked(conn, 1, call)
