"""A resource's webhook_url under OPENVPP_WEBHOOK_ALLOW_PRIVATE_NETWORKS=false: refused for
every class of non-public address at CreateResource and UpdateResource, through gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from openvpp.v1 import site_registry_pb2 as pb
from openvpp.v1 import site_registry_pb2_grpc

from service.app import Service
from service.common.errors import FieldViolation, ValidationError
from service.registry.domain import Bounds, ResourceFields, ResourceType, validate_resource
from tests.conftest import Org
from tests.conftest import test_settings as settings_for_tests
from tests.helpers import battery_request, expect_invalid, site_request
from tests.registry.support import Stub

REFUSED = {
    "http://127.0.0.1:8080/hook": "loopback",
    "http://localhost/hook": "loopback",
    "https://[::1]/hook": "loopback",
    "https://10.20.30.40/hook": "private",
    "https://172.16.0.1/hook": "private",
    "https://192.168.0.10/hook": "private",
    "https://169.254.10.10/hook": "link-local",
    "https://[fe80::1]/hook": "link-local",
    "https://100.64.1.1/hook": "shared (CGNAT)",
    "https://[fd00::5]/hook": "unique-local",
    "https://224.0.0.5/hook": "multicast",
    "https://0.0.0.0/hook": "unspecified",
    "https://[::ffff:10.0.0.1]/hook": "private",
}
METADATA = ["http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/"]


@pytest.fixture(scope="module")
async def strict_registry(database_url: str) -> AsyncIterator[Stub]:
    """A replica that does not allow private networks (the production default)."""
    strict = Service(settings_for_tests(webhook_allow_private_networks=False), database_url)
    await strict.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{strict.port}") as channel:
            yield site_registry_pb2_grpc.SiteRegistryStub(channel)
    finally:
        await strict.stop(grace=1)


def fields(url: str) -> ResourceFields:
    return ResourceFields(
        resource_type=ResourceType.OTHER,
        name="r",
        external_id="",
        power_kw=Bounds(min=-1, max=1),
        capacity_kwh=None,
        webhook_url=url,
    )


@pytest.mark.parametrize(("url", "kind"), REFUSED.items())
def test_domain_rule_per_address_class(url: str, kind: str) -> None:
    with pytest.raises(ValidationError) as refused:
        validate_resource(fields(url), allow_private_networks=False)
    [violation] = refused.value.violations
    assert isinstance(violation, FieldViolation)
    assert violation.field == "webhook_url"
    assert f" {kind} address unless" in violation.rule
    assert validate_resource(fields(url), allow_private_networks=True).webhook_url == url


async def test_create_resource_refuses_each_class(
    strict_registry: Stub, registry: Stub, partner: Org
) -> None:
    site = (await strict_registry.CreateSite(site_request(), metadata=partner.auth)).site
    for url, kind in REFUSED.items():
        rule = await expect_invalid(
            strict_registry.CreateResource(
                battery_request(site.id, webhook_url=url), metadata=partner.auth
            ),
            "webhook_url",
        )
        assert rule.startswith("must not be a")
        assert rule.endswith(f" {kind} address unless OPENVPP_WEBHOOK_ALLOW_PRIVATE_NETWORKS=true")
    for url in METADATA:
        for stub in (strict_registry, registry):  # refused even where private ones are allowed
            rule = await expect_invalid(
                stub.CreateResource(
                    battery_request(site.id, webhook_url=url), metadata=partner.auth
                ),
                "webhook_url",
            )
            assert rule == "must not be a cloud metadata address"
    listed = await strict_registry.ListResources(
        pb.ListResourcesRequest(site_id=site.id), metadata=partner.auth
    )
    assert listed.resources == []  # nothing was stored
    public = await strict_registry.CreateResource(
        battery_request(site.id, webhook_url="https://partner.example/hook"), metadata=partner.auth
    )
    assert public.resource.webhook_url == "https://partner.example/hook"


async def test_update_resource_refuses_a_private_url_but_keeps_a_stored_one(
    strict_registry: Stub, registry: Stub, partner: Org
) -> None:
    site = (await registry.CreateSite(site_request(), metadata=partner.auth)).site
    # Stored while private networks were allowed (the permissive replica).
    stored = (
        await registry.CreateResource(
            battery_request(site.id, webhook_url="http://127.0.0.1:9/hook"), metadata=partner.auth
        )
    ).resource
    renamed = await strict_registry.UpdateResource(
        pb.UpdateResourceRequest(
            resource=pb.Resource(id=stored.id, name="renamed"),
            update_mask=FieldMask(paths=["name"]),
        ),
        metadata=partner.auth,
    )
    assert renamed.resource.name == "renamed"
    assert renamed.resource.webhook_url == "http://127.0.0.1:9/hook"
    await expect_invalid(
        strict_registry.UpdateResource(
            pb.UpdateResourceRequest(
                resource=pb.Resource(id=stored.id, webhook_url="https://10.1.1.1/hook"),
                update_mask=FieldMask(paths=["webhook_url"]),
            ),
            metadata=partner.auth,
        ),
        "resource.webhook_url",
    )
    got = await strict_registry.GetResource(
        pb.GetResourceRequest(resource_id=stored.id), metadata=partner.auth
    )
    assert got.resource.webhook_url == "http://127.0.0.1:9/hook"
