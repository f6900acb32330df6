"""Fixtures of the dispatch tests: each test gets a database of its own.

The setpoints table is one outbox for every replica on a database, so a delivery worker
delivers whatever is due there. Each test therefore runs its replicas (``Cluster``) on a
fresh database, made from a migrated template, so no other test's workers (or clocks) touch
its setpoints and counts of deliveries are exact.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from opentelemetry.metrics import MeterProvider
from openvpp.v1 import dispatch_pb2 as pb
from openvpp.v1 import dispatch_pb2_grpc, site_registry_pb2_grpc, upstream_registry_pb2_grpc
from openvpp.v1 import site_registry_pb2 as site_pb
from openvpp.v1 import upstream_registry_pb2 as up_pb

from service.app import Service
from service.auth.principal import Role
from service.auth.store import IdentityStore
from service.common.clock import SYSTEM_CLOCK, Clock
from service.common.protoconv import to_timestamp
from service.dispatch.domain import QUARTER_HOUR_SECONDS
from tests.conftest import Org, test_settings
from tests.helpers import random_identifier, site_request
from tests.upstream.conftest import day


def dispatch_settings(**overrides: Any) -> Any:
    values: dict[str, Any] = {
        "webhook_allow_private_networks": True,
        "dispatch_delivery_enabled": True,
        "dispatch_poll_interval_seconds": 0.1,
        "dispatch_backoff_initial_seconds": 0.05,
        "dispatch_backoff_max_seconds": 0.2,
        "dispatch_lease_seconds": 5.0,
        "dispatch_timeout_seconds": 2.0,
        "db_pool_max_size": 8,
    }
    values.update(overrides)
    return test_settings(**values)


class Replica:
    """One running Service with stubs on its own channel."""

    def __init__(self, service: Service, channel: grpc.aio.Channel) -> None:
        self.service = service
        self.channel = channel
        self.registry = site_registry_pb2_grpc.SiteRegistryStub(channel)
        self.upstream = upstream_registry_pb2_grpc.UpstreamRegistryStub(channel)
        self.dispatch = dispatch_pb2_grpc.DispatchStub(channel)

    @property
    def pool(self) -> asyncpg.Pool:
        assert self.service.pool is not None
        return self.service.pool


class Cluster:
    """Replicas on one database; the first one also serves the test's set-up calls."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.replicas: list[Replica] = []

    async def replica(
        self,
        clock: Clock = SYSTEM_CLOCK,
        url: str | None = None,
        meter_provider: MeterProvider | None = None,
        **overrides: Any,
    ) -> Replica:
        """A replica; ``url`` reaches the cluster's database another way (a proxy);
        ``meter_provider`` records its metrics."""
        service = Service(
            dispatch_settings(**overrides),
            url or self.url,
            clock=clock,
            meter_provider=meter_provider,
        )
        await service.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        replica = Replica(service, channel)
        self.replicas.append(replica)
        return replica

    async def stop(self, replica: Replica) -> None:
        await replica.channel.close()
        await replica.service.stop(grace=0.5)
        self.replicas.remove(replica)

    async def close(self) -> None:
        for replica in list(self.replicas):
            await self.stop(replica)


@pytest.fixture
async def cluster(fresh_database: str) -> AsyncIterator[Cluster]:
    running = Cluster(fresh_database)
    yield running
    await running.close()


def quarter_hour_floor(at: datetime) -> datetime:
    seconds = int(at.timestamp()) // QUARTER_HOUR_SECONDS * QUARTER_HOUR_SECONDS
    return datetime.fromtimestamp(seconds, UTC)


def window(now: datetime | None = None, minutes: int = 60) -> tuple[datetime, datetime]:
    """The current quarter-hour and ``minutes`` on: a window that ends in the future."""
    start = quarter_hour_floor(now or datetime.now(UTC))
    return start, start + timedelta(minutes=minutes)


UPSTREAM_CASES = (
    "no_upstream_registered",
    "no_contract",
    "contract_needs_agreement",
    "contract_pending",
    "contract_active",
    "contract_inactive",
)


class Flow:
    """Terse set-up and calls of the dispatch tests against one replica."""

    def __init__(self, replica: Replica, clock: Clock = SYSTEM_CLOCK) -> None:
        self.replica = replica
        self.clock = clock
        self.identity = IdentityStore(replica.pool)

    async def org(self, role: Role) -> Org:
        org = await self.identity.create_org(f"test-{role}-{uuid.uuid4().hex[:6]}", role)
        issued = await self.identity.create_token(org.id)
        return Org(org.id, role, issued.token, issued.id)

    async def parties(self) -> tuple[Org, Org, Org]:
        """An operator, a partner and a supplier: who a dispatch involves."""
        return (
            await self.org(Role.OPERATOR),
            await self.org(Role.PARTNER),
            await self.org(Role.SUPPLIER),
        )

    async def secret(self, org: Org) -> str:
        secret = await self.identity.signing_secret(org.id)
        assert secret is not None
        return secret

    async def site(
        self,
        partner: Org,
        supplier: Org,
        webhook_url: str,
        resources: Sequence[tuple[int, float, float]] = (
            (site_pb.RESOURCE_TYPE_STATIC_BATTERY, -5, 5),
        ),
        upstream: str = "contract_active",
        paused: bool = False,
    ) -> tuple[site_pb.Site, list[site_pb.Resource]]:
        registry = self.replica.registry
        identifier = random_identifier()
        site = (
            await registry.CreateSite(
                site_request(identifier, timezone="UTC", external_id=f"ext-{identifier}"),
                metadata=partner.auth,
            )
        ).site
        made = []
        for kind, low, high in resources:
            values: dict[str, Any] = {
                "site_id": site.id,
                "type": kind,
                "name": "r",
                "external_id": f"res-{uuid.uuid4().hex[:8]}",
                "webhook_url": webhook_url,
            }
            if kind != site_pb.RESOURCE_TYPE_METER:
                values["power_kw"] = site_pb.Bounds(min=low, max=high)
            if kind == site_pb.RESOURCE_TYPE_STATIC_BATTERY:
                values["capacity_kwh"] = site_pb.Bounds(min=0, max=10)
            made.append(
                (
                    await registry.CreateResource(
                        site_pb.CreateResourceRequest(**values), metadata=partner.auth
                    )
                ).resource
            )
        await self.set_upstream(supplier, identifier, upstream)
        if paused:
            await registry.PauseSite(
                site_pb.PauseSiteRequest(site_id=site.id), metadata=partner.auth
            )
        got = await registry.GetSite(site_pb.GetSiteRequest(site_id=site.id), metadata=partner.auth)
        return got.site, made

    async def set_upstream(self, supplier: Org, identifier: str, upstream: str) -> str:
        """Makes the identifier's upstream side so; the contract's id ("" if none)."""
        if upstream == "no_upstream_registered":
            return ""
        up = self.replica.upstream
        upstream_site = (
            await up.CreateUpstreamSite(
                up_pb.CreateUpstreamSiteRequest(grid_identifier=identifier),
                metadata=supplier.auth,
            )
        ).upstream_site
        today = self.clock.now().date()
        cases: dict[str, dict[str, Any]] = {
            "contract_needs_agreement": {"start": today - timedelta(days=1), "agree": True},
            "contract_pending": {"start": today + timedelta(days=5)},
            "contract_active": {"start": today - timedelta(days=1)},
            "contract_inactive": {
                "start": today - timedelta(days=10),
                "end": today - timedelta(days=2),
            },
        }
        terms = cases.get(upstream)
        if terms is None:
            return ""
        made = await up.CreateContract(
            up_pb.CreateContractRequest(
                upstream_site_id=upstream_site.id,
                start_date=day(terms["start"]),
                end_date=day(terms["end"]) if "end" in terms else None,
                requires_agreement=bool(terms.get("agree")),
            ),
            metadata=supplier.auth,
        )
        contract_id: str = made.contract.id
        return contract_id

    async def dispatch(
        self,
        operator: Org,
        power_kw: float = 4.0,
        dispatch_type: int = pb.DISPATCH_TYPE_EXACT,
        minutes: int = 60,
        **fields: Any,
    ) -> pb.DispatchFlexibilityResponse:
        start, end = window(self.clock.now(), minutes)
        request = pb.DispatchFlexibilityRequest(
            request_id=fields.pop("request_id", uuid.uuid4().hex),
            power_kw=power_kw,
            start_time=to_timestamp(start),
            end_time=to_timestamp(end),
            type=dispatch_type,  # type: ignore[arg-type]
            **fields,
        )
        response: pb.DispatchFlexibilityResponse = await self.replica.dispatch.DispatchFlexibility(
            request, metadata=operator.auth
        )
        return response

    async def setpoints(self, org: Org, dispatch_id: str = "", **filters: Any) -> list[pb.Setpoint]:
        found: list[pb.Setpoint] = []
        token = ""
        while True:
            page = await self.replica.dispatch.ListSetpoints(
                pb.ListSetpointsRequest(
                    dispatch_id=dispatch_id, page_size=1000, page_token=token, **filters
                ),
                metadata=org.auth,
            )
            found.extend(page.setpoints)
            token = page.next_page_token
            if not token:
                return found

    async def settle(
        self,
        operator: Org,
        dispatch_id: str,
        states: frozenset[int] = frozenset(
            {
                pb.SETPOINT_STATE_ACCEPTED,
                pb.SETPOINT_STATE_REJECTED,
                pb.SETPOINT_STATE_FAILED,
                pb.SETPOINT_STATE_CANCELLED,
                pb.SETPOINT_STATE_EXPIRED,
                pb.SETPOINT_STATE_NOT_ELIGIBLE,
            }
        ),
        within: float = 15.0,
    ) -> list[pb.Setpoint]:
        """The dispatch's setpoints once every one is in one of ``states``."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            found = await self.setpoints(operator, dispatch_id)
            if all(s.state in states for s in found):
                return found
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(
                    "setpoints did not settle: "
                    + ", ".join(f"{pb.SetpointState.Name(s.state)} {s.reason}" for s in found)
                )
            await asyncio.sleep(0.05)


TERMINAL = frozenset(
    {
        pb.SETPOINT_STATE_REJECTED,
        pb.SETPOINT_STATE_FAILED,
        pb.SETPOINT_STATE_CANCELLED,
        pb.SETPOINT_STATE_EXPIRED,
        pb.SETPOINT_STATE_NOT_ELIGIBLE,
    }
)
