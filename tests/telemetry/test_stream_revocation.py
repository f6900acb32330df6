"""A token revoked while its streams run: they end UNAUTHENTICATED (TOKEN_REVOKED), on every
replica, while the organization's other tokens and other organizations' streams go on."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import grpc
import pytest
from openvpp.v1 import site_registry_pb2 as spb
from openvpp.v1 import site_registry_pb2_grpc, telemetry_pb2_grpc
from openvpp.v1 import telemetry_pb2 as tpb

from service.app import Service
from service.auth.authenticator import Authenticator
from service.auth.principal import Role
from service.auth.store import IdentityStore
from service.auth.tokens import token_hash
from service.events.hub import Subscription
from tests.conftest import MakeOrg
from tests.helpers import error_reason, eventually, site_request
from tests.telemetry.conftest import Setup, quarter, register

ENDED_WITHIN = 10.0


async def _ended(read: object) -> grpc.aio.AioRpcError:
    try:
        while True:
            await asyncio.wait_for(read(), ENDED_WITHIN)  # type: ignore[operator]
    except grpc.aio.AioRpcError as error:
        return error


async def test_a_revoked_tokens_streams_end_on_every_replica(
    setup: Setup,
    service: Service,
    replica: Service,
    replica_channel: grpc.aio.Channel,
    make_org: MakeOrg,
) -> None:
    assert service.pool is not None
    store = IdentityStore(service.pool)
    meter = await setup.meter()
    second = await store.create_token(setup.org.id)
    second_auth = (("authorization", f"Bearer {second.token}"),)
    other = await make_org(setup.org.role)

    replica_telemetry = telemetry_pb2_grpc.TelemetryStub(replica_channel)
    replica_sites = site_registry_pb2_grpc.SiteRegistryStub(replica_channel)
    # On the replica: a watch of each kind of stream, one waiting for its client's next
    # request (StreamReadings), one for events (WatchSites, WatchReadings).
    ingest = replica_telemetry.StreamReadings(metadata=setup.org.auth)
    await ingest.write(
        tpb.StreamReadingsRequest(
            batch=tpb.ReadingBatch(batch_id="before", readings=[register(meter, quarter(0), 1.0)])
        )
    )
    acked = await ingest.read()
    assert isinstance(acked, tpb.StreamReadingsResponse)
    assert acked.ack.accepted_count == 1
    sites = replica_sites.WatchSites(spb.WatchSitesRequest(), metadata=setup.org.auth)
    readings = replica_telemetry.WatchReadings(
        tpb.WatchReadingsRequest(site_id=setup.site.id), metadata=setup.org.auth
    )
    kept = replica_sites.WatchSites(spb.WatchSitesRequest(), metadata=second_auth)
    others = replica_sites.WatchSites(spb.WatchSitesRequest(), metadata=other.auth)
    for watch in (sites, readings, kept, others):
        await watch.initial_metadata()

    # Revoked through the other server: the replica hears of it by NOTIFY.
    assert await store.revoke_token(setup.org.token_id)
    for ended in (ingest, sites, readings):
        error = await _ended(ended.read)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
        assert error_reason(error) == "TOKEN_REVOKED"
    # The organization's other token and the other organization watch on.
    created = await replica_sites.CreateSite(site_request(name="after"), metadata=second_auth)
    for watch, site in (
        (kept, created.site),
        (others, (await replica_sites.CreateSite(site_request(), metadata=other.auth)).site),
    ):
        event = await asyncio.wait_for(watch.read(), ENDED_WITHIN)
        assert isinstance(event, spb.WatchSitesResponse)
        assert event.site.id == site.id
    kept.cancel()
    others.cancel()


async def test_after_a_lost_listener_the_tokens_of_open_streams_are_looked_up_again(
    service: Service, make_org: MakeOrg
) -> None:
    """Revocations may have been missed while the listening connection was away: on its
    reset every token a stream runs on is checked, and the revoked ones' streams told."""
    assert service.pool is not None
    store = IdentityStore(service.pool)
    org = await make_org(Role.PARTNER)
    live = await store.create_token(org.id)
    authenticator = Authenticator(store, cache_seconds=30)
    told: list[str] = []
    authenticator.on_revoked(org.token, lambda: told.append("revoked"))
    authenticator.on_revoked(live.token, lambda: told.append("live"))
    # Revoked without the notification, as if it was sent while nobody listened.
    await service.pool.execute(
        "UPDATE api_tokens SET revoked_at = now() WHERE token_hash = $1", token_hash(org.token)
    )
    authenticator.forget_all()
    await eventually(lambda: bool(told), "the revoked token's stream to be told")
    await authenticator.close()
    assert told == ["revoked"]


async def test_a_recheck_that_fails_is_retried_until_it_has_read(
    service: Service, make_org: MakeOrg, database_url: str
) -> None:
    """The lookup after a reset often meets the same lost connection: given up after one
    failure, a token revoked during the outage kept its streams open for good."""
    assert service.pool is not None
    org = await make_org(Role.PARTNER)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        authenticator = Authenticator(IdentityStore(pool), cache_seconds=30)
        told: list[str] = []
        authenticator.on_revoked(org.token, lambda: told.append("revoked"))
        await service.pool.execute(
            "UPDATE api_tokens SET revoked_at = now() WHERE token_hash = $1", token_hash(org.token)
        )
        # The check's connection is lost under it, as the listener's was.
        backend = await pool.fetchval("SELECT pg_backend_pid()")
        await service.pool.execute("SELECT pg_terminate_backend($1)", backend)
        authenticator.forget_all()
        await eventually(lambda: bool(told), "the revoked token's stream to be told")
        await authenticator.close()
        assert told == ["revoked"]
    finally:
        await pool.close()


async def test_a_revocation_while_the_headers_are_sent_still_ends_the_call(
    service: Service, make_org: MakeOrg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled inside gRPC's header send, the call could never send its status: the
    client waited for good. The revocation is made to arrive exactly then (the NOTIFY's
    callback, run at the handler's next await after it subscribed)."""
    assert service.hub is not None
    assert service._authenticator is not None
    org = await make_org(Role.PARTNER)
    hub, authenticator = service.hub, service._authenticator
    subscribe = hub.subscribe

    async def subscribe_then_revoke(*args: Any, **kwargs: Any) -> Subscription:
        subscription = await subscribe(*args, **kwargs)
        asyncio.get_running_loop().call_soon(authenticator.forget, token_hash(org.token).hex())
        return subscription

    monkeypatch.setattr(hub, "subscribe", subscribe_then_revoke)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        call = site_registry_pb2_grpc.SiteRegistryStub(channel).WatchSites(
            spb.WatchSitesRequest(), metadata=org.auth
        )
        error = await _ended(call.read)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
    assert error_reason(error) == "TOKEN_REVOKED"
