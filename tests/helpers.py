"""Assertions on gRPC errors and small request builders shared by the tests."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import site_registry_pb2 as pb

T = TypeVar("T")


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ``google.rpc.ErrorInfo`` reason of a failed call ("" without one)."""
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def resource_info(error: grpc.aio.AioRpcError) -> tuple[str, str]:
    """(resource_type, resource_name) of the error's ``google.rpc.ResourceInfo``."""
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            info = error_details_pb2.ResourceInfo()
            detail.Unpack(info)
            return str(info.resource_type), str(info.resource_name)
    raise AssertionError(f"no ResourceInfo in {error.code()}: {error.details()}")


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """field -> rule from the error's google.rpc.BadRequest detail."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no rich status in {error.code()}: {error.details()}"
    violations: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            for violation in bad_request.field_violations:
                violations[violation.field] = violation.description
    return violations


async def expect_invalid(call: Awaitable[Any], field: str) -> str:
    """Awaits a call that must fail INVALID_ARGUMENT with a violation on ``field``; its rule."""
    error = await rpc_error(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    violations = field_violations(error)
    assert field in violations, f"expected a violation on {field}, got {violations}"
    assert violations[field], "the rule must be described"
    return violations[field]


def gs1_check_digit(data: str) -> str:
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(data)))
    return str((10 - total % 10) % 10)


def random_ean18(prefix: str = "5414") -> str:
    """A valid EAN-18 (GS1 check digit), unique per call."""
    body = prefix + "".join(secrets.choice("0123456789") for _ in range(17 - len(prefix)))
    return body + gs1_check_digit(body)


def random_identifier() -> str:
    """A unique identifier valid for sites without a country."""
    return "T" + secrets.token_hex(8).upper()


def site_request(
    grid_identifier: str | None = None, country: str = "", **fields: Any
) -> pb.CreateSiteRequest:
    request = pb.CreateSiteRequest(
        location=pb.Location(address="Dok Noord, Gent, Belgium", country=country),
        supply_points=[
            pb.SupplyPoint(
                grid_identifier=grid_identifier or random_identifier(),
                direction=pb.SUPPLY_POINT_DIRECTION_BIDIRECTIONAL,
            )
        ],
        **fields,
    )
    return request


def meter_request(site_id: str, identifier: str = "M1", **fields: Any) -> mpb.CreateMeterRequest:
    """A consumer's accurate register meter of the site, from the last hour of 2024 (UTC)."""
    start = timestamp_pb2.Timestamp(seconds=1735686000)  # 2024-12-31T23:00:00Z
    values: dict[str, Any] = {
        "site_id": site_id,
        "identifier": identifier,
        "serial": "S",
        "mpo": "MPO-1",
        "direction": mpb.METER_DIRECTION_CONSUMER,
        "measuring": mpb.MEASURING_READINGS_ACCURATE,
        "start_date": start,
    }
    values.update(fields)
    return mpb.CreateMeterRequest(**values)


def battery_request(site_id: str, **fields: Any) -> pb.CreateResourceRequest:
    values: dict[str, Any] = {
        "site_id": site_id,
        "type": pb.RESOURCE_TYPE_STATIC_BATTERY,
        "name": "home battery",
        "power_kw": pb.Bounds(min=-5, max=5),
        "capacity_kwh": pb.Bounds(min=0, max=10),
        "webhook_url": "https://partner.example/setpoints",
    }
    values.update(fields)
    return pb.CreateResourceRequest(**values)


async def wait_until_blocked(
    holder: asyncpg.Connection, count: int, *calls: asyncio.Future[Any], within: float = 30
) -> None:
    """Until ``count`` backends wait, directly or in line, for a lock ``holder`` holds.

    The state a concurrency test needs, read from PostgreSQL (``pg_blocking_pids``), rather
    than a sleep that hopes the calls got there. Fails early if one of ``calls`` ends.
    """
    deadline = asyncio.get_running_loop().time() + within
    while True:
        for call in calls:
            if call.done():
                raise AssertionError(f"a call ended instead of waiting: {call.result()}")
        # The holder is usually inside its transaction, where pg_stat_activity is read once
        # and then served from a snapshot: a backend that connected after the first look
        # (the pool opened a new connection for the call) would never appear.
        await holder.execute("SELECT pg_stat_clear_snapshot()")
        # Waiting for the holder, or for one who waits for it (a second waiter on a row
        # queues behind the first).
        blocked = await holder.fetchval(
            """
            WITH RECURSIVE blocked(pid) AS (
                SELECT pid FROM pg_stat_activity
                WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))
                UNION
                SELECT a.pid FROM pg_stat_activity a
                JOIN blocked b ON b.pid = ANY(pg_blocking_pids(a.pid))
            )
            SELECT count(*) FROM blocked
            """
        )
        if blocked >= count:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{blocked} of {count} calls waited for the lock")
        await asyncio.sleep(0.01)


async def eventually(
    condition: Callable[[], Awaitable[bool] | bool], what: str, within: float = 10
) -> None:
    """Until ``condition()`` holds (polled every 10 ms); fails naming ``what`` after
    ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


def raw_method(channel: grpc.aio.Channel, path: str, kind: str) -> Any:
    """A callable of ``path`` sending and receiving bytes as they are; ``kind`` is
    unary_unary, unary_stream, stream_unary or stream_stream."""
    factory = getattr(channel, kind)
    return factory(path, request_serializer=None, response_deserializer=None)
