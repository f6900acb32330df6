"""gRPC transport of the meter registry."""

from __future__ import annotations

from typing import Any

import asyncpg
from openvpp.v1 import meter_registry_pb2 as pb
from openvpp.v1 import meter_registry_pb2_grpc as pb_grpc

from service.auth.principal import Role, current_principal
from service.common.field_mask import merge_masked, require_mask
from service.common.protoconv import from_timestamp, parse_uuid
from service.db.pagination import fetch_page, page_size_or_default
from service.identifiers.ids import MeterId, SiteId
from service.telemetry import convert
from service.telemetry.domain import MeterFields, normalized_meter
from service.telemetry.meter_store import MeterStore

DESCRIPTOR = pb.DESCRIPTOR.services_by_name["MeterRegistry"]
SERVICE = DESCRIPTOR.full_name
METHOD_ROLES: dict[str, frozenset[Role]] = {
    f"/{SERVICE}/{method}": frozenset({Role.PARTNER}) for method in DESCRIPTOR.methods_by_name
}

METER_UPDATABLE = frozenset(
    {"identifier", "serial", "mpo", "start_date", "end_date", "transformer_factor"}
)


class MeterRegistryServicer(pb_grpc.MeterRegistryServicer):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    def _store(self) -> MeterStore:
        return MeterStore(self._pool, current_principal().org_id)

    async def CreateMeter(
        self, request: pb.CreateMeterRequest, context: Any
    ) -> pb.CreateMeterResponse:
        site_id = SiteId(parse_uuid(request.site_id, "site_id"))
        fields = normalized_meter(convert.meter_fields_from_create(request))
        meter = await self._store().create(site_id, fields)
        return pb.CreateMeterResponse(meter=convert.meter_to_proto(meter))

    async def GetMeter(self, request: pb.GetMeterRequest, context: Any) -> pb.GetMeterResponse:
        meter = await self._store().get(MeterId(parse_uuid(request.meter_id, "meter_id")))
        return pb.GetMeterResponse(meter=convert.meter_to_proto(meter))

    async def ListMeters(
        self, request: pb.ListMetersRequest, context: Any
    ) -> pb.ListMetersResponse:
        site_id = SiteId(parse_uuid(request.site_id, "site_id"))
        limit = page_size_or_default(request.page_size)
        store = self._store()
        page = await fetch_page(
            "ListMeters",
            lambda after, n: store.list(site_id, after, n),
            limit,
            request.page_token,
            site_id,
        )
        return pb.ListMetersResponse(
            meters=[convert.meter_to_proto(m) for m in page.rows],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    async def UpdateMeter(
        self, request: pb.UpdateMeterRequest, context: Any
    ) -> pb.UpdateMeterResponse:
        meter_id = MeterId(parse_uuid(request.meter.id, "meter.id"))
        paths = require_mask(list(request.update_mask.paths), METER_UPDATABLE)
        given = request.meter
        start = (
            from_timestamp(given.start_date, "meter.start_date")
            if given.HasField("start_date")
            else None
        )
        end = (
            from_timestamp(given.end_date, "meter.end_date") if given.HasField("end_date") else None
        )

        given_fields = {
            "identifier": given.identifier,
            "serial": given.serial,
            "mpo": given.mpo,
            "start_date": start,
            "end_date": end,
            # proto3 cannot tell 0 from unset here: 0 is refused, like a negative.
            "transformer_factor": given.transformer_factor,
        }

        def change(current: MeterFields) -> MeterFields:
            return normalized_meter(merge_masked(current, paths, given_fields))

        meter = await self._store().update(meter_id, change)
        return pb.UpdateMeterResponse(meter=convert.meter_to_proto(meter))

    async def DeleteMeter(
        self, request: pb.DeleteMeterRequest, context: Any
    ) -> pb.DeleteMeterResponse:
        await self._store().delete(MeterId(parse_uuid(request.meter_id, "meter_id")))
        return pb.DeleteMeterResponse()
