"""Fixtures of the registry tests: a site per test, a second replica on the same database."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from openvpp.v1 import site_registry_pb2 as pb
from openvpp.v1 import site_registry_pb2_grpc

from service.app import Service
from tests.conftest import Org, test_settings
from tests.helpers import site_request
from tests.registry.support import Stub


@pytest.fixture
async def site(registry: Stub, partner: Org) -> pb.Site:
    response = await registry.CreateSite(site_request(name="site"), metadata=partner.auth)
    return response.site


@pytest.fixture(scope="module")
async def replica(database_url: str) -> AsyncIterator[Service]:
    """A second service instance on the same database, as another replica would be."""
    second = Service(test_settings(), database_url)
    await second.start()
    yield second
    await second.stop(grace=1)


@pytest.fixture(scope="module")
async def replica_registry(replica: Service) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
        yield site_registry_pb2_grpc.SiteRegistryStub(channel)
