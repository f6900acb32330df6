"""Authentication and roles on every SiteRegistry RPC."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openvpp.v1 import site_registry_pb2 as pb

from service.app import Service
from service.auth.principal import Role
from service.auth.store import IdentityStore
from tests.conftest import MakeOrg, Org
from tests.helpers import error_reason, rpc_error, site_request
from tests.registry.support import Stub

METHODS = sorted(pb.DESCRIPTOR.services_by_name["SiteRegistry"].methods_by_name)


def empty_request(method: str) -> Any:
    descriptor = pb.DESCRIPTOR.services_by_name["SiteRegistry"].methods_by_name[method]
    return getattr(pb, descriptor.input_type.name)()


async def call_error(registry: Stub, method: str, metadata: Any) -> grpc.aio.AioRpcError:
    """The error of one call; a server stream's error comes with its first read."""
    call = getattr(registry, method)(empty_request(method), metadata=metadata)
    if method == "WatchSites":
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        return caught.value
    return await rpc_error(call)


def test_every_method_is_covered() -> None:
    assert len(METHODS) == 13


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token ovpp_x",
        "Bearer ovpp_unknown-token",
        "ovpp_no-scheme",
    ],
)
async def test_missing_malformed_or_unknown_token_is_unauthenticated(
    registry: Stub, method: str, header: str | None
) -> None:
    metadata = None if header is None else (("authorization", header),)
    error = await call_error(registry, method, metadata)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(error) == "INVALID_TOKEN"


@pytest.mark.parametrize("role", [Role.SUPPLIER, Role.OPERATOR])
async def test_other_roles_are_permission_denied_on_every_method(
    registry: Stub, make_org: MakeOrg, role: Role
) -> None:
    org = await make_org(role)
    for method in METHODS:
        error = await call_error(registry, method, org.auth)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, method
        assert error_reason(error) == "ROLE_NOT_ALLOWED"
        assert "partner" in (error.details() or "")


async def test_scheme_is_case_insensitive(registry: Stub, partner: Org) -> None:
    await registry.ListSites(
        pb.ListSitesRequest(), metadata=(("authorization", f"bearer  {partner.token} "),)
    )


async def test_permission_denied_writes_nothing(
    registry: Stub, make_org: MakeOrg, service: Service
) -> None:
    supplier = await make_org(Role.SUPPLIER)
    error = await rpc_error(registry.CreateSite(site_request(), metadata=supplier.auth))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert service.pool is not None
    count = await service.pool.fetchval("SELECT count(*) FROM sites WHERE org_id = $1", supplier.id)
    assert count == 0


async def eventually_unauthenticated(registry: Stub, org: Org) -> None:
    """Revocation reaches every replica's token cache through NOTIFY, long before the cache
    entry would expire (30 s); polling only absorbs the notification's delivery."""
    for _ in range(100):
        try:
            await registry.ListSites(pb.ListSitesRequest(), metadata=org.auth)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("a revoked token still works after 2 s")
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_revoked_token_stops_working_on_every_replica(
    registry: Stub, replica_registry: Stub, partner: Org, service: Service
) -> None:
    # Both replicas have the token cached now.
    await registry.ListSites(pb.ListSitesRequest(), metadata=partner.auth)
    await replica_registry.ListSites(pb.ListSitesRequest(), metadata=partner.auth)
    assert service.settings.token_cache_seconds >= 30
    assert service.pool is not None
    assert await IdentityStore(service.pool).revoke_token(partner.token_id)
    await eventually_unauthenticated(registry, partner)
    await eventually_unauthenticated(replica_registry, partner)
    # Revoking twice reports that nothing was active.
    assert not await IdentityStore(service.pool).revoke_token(partner.token_id)


async def test_two_authorization_entries_are_refused_whichever_is_valid(
    registry: Stub, partner: Org, make_org: MakeOrg
) -> None:
    other = await make_org(Role.PARTNER)
    valid = f"Bearer {partner.token}"
    for pair in (
        (valid, "Bearer nonsense"),
        ("Bearer nonsense", valid),
        (valid, valid),
        (valid, f"Bearer {other.token}"),
    ):
        metadata = tuple(("authorization", value) for value in pair)
        error = await call_error(registry, "ListSites", metadata)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_reason(error) == "INVALID_TOKEN"


async def test_other_tokens_of_the_org_keep_working(
    registry: Stub, partner: Org, service: Service
) -> None:
    assert service.pool is not None
    store = IdentityStore(service.pool)
    second = await store.create_token(partner.id)
    await registry.ListSites(pb.ListSitesRequest(), metadata=partner.auth)
    await store.revoke_token(partner.token_id)
    await eventually_unauthenticated(registry, partner)
    listed = await registry.ListSites(
        pb.ListSitesRequest(), metadata=(("authorization", f"Bearer {second.token}"),)
    )
    assert listed.total_size == 0


async def test_health_and_reflection_need_no_token(
    channel: grpc.aio.Channel,
) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "openvpp.v1.SiteRegistry"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> Any:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(requests()):
        names = {s.name for s in response.list_services_response.service}
        assert {"openvpp.v1.SiteRegistry", "grpc.health.v1.Health"} <= names
        break
