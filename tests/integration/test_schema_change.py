"""A migration by a newer replica during a rolling upgrade changes tables under statements
this replica prepared before: a call that meets one inside a transaction is ABORTED (retry),
not INTERNAL, writes nothing, and the same call again succeeds."""

from __future__ import annotations

import asyncpg
import grpc
from google.protobuf import field_mask_pb2
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import meter_registry_pb2_grpc, site_registry_pb2_grpc

from service.auth.principal import Role
from service.auth.store import IdentityStore
from tests.conftest import running_service
from tests.helpers import meter_request, rpc_error, site_request


async def test_a_statement_prepared_before_a_migration_is_aborted_then_succeeds(
    fresh_database: str,
) -> None:
    # One connection, so that the second call runs on the one that prepared the first's.
    async with running_service(
        fresh_database, db_pool_min_size=1, db_pool_max_size=1, db_read_connections=0
    ) as server:
        assert server.pool is not None
        identity = IdentityStore(server.pool)
        org = await identity.create_org("rolling-upgrade", Role.PARTNER)
        auth = (("authorization", f"Bearer {(await identity.create_token(org.id)).token}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            sites = site_registry_pb2_grpc.SiteRegistryStub(channel)
            meters = meter_registry_pb2_grpc.MeterRegistryStub(channel)
            site = (await sites.CreateSite(site_request(), metadata=auth)).site
            meter = (await meters.CreateMeter(meter_request(site.id), metadata=auth)).meter

            def update(serial: str) -> mpb.UpdateMeterRequest:
                return mpb.UpdateMeterRequest(
                    meter=mpb.Meter(id=meter.id, serial=serial),
                    update_mask=field_mask_pb2.FieldMask(paths=["serial"]),
                )

            await meters.UpdateMeter(update("S1"), metadata=auth)
            # The newer replica's migration: a column added, as most migrations do.
            migration = await asyncpg.connect(fresh_database)
            try:
                await migration.execute("ALTER TABLE meters ADD COLUMN added_later text")
            finally:
                await migration.close()

            error = await rpc_error(meters.UpdateMeter(update("S2"), metadata=auth))
            assert error.code() == grpc.StatusCode.ABORTED, error.details()
            assert "schema changed" in (error.details() or "")
            got = await meters.GetMeter(mpb.GetMeterRequest(meter_id=meter.id), metadata=auth)
            assert got.meter.serial == "S1"  # nothing of the aborted call was written
            again = await meters.UpdateMeter(update("S2"), metadata=auth)
            assert again.meter.serial == "S2"
