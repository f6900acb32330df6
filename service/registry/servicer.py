"""gRPC transport of the site registry: requests in, domain and store calls, messages out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg
from openvpp.v1 import site_registry_pb2 as pb
from openvpp.v1 import site_registry_pb2_grpc as pb_grpc

from service.auth.principal import Role, current_principal
from service.common.clock import SYSTEM_CLOCK, Clock
from service.common.field_mask import merge_masked, require_mask
from service.common.protoconv import enum_from_proto, parse_uuid, to_timestamp
from service.db.pagination import fetch_page, page_size_or_default
from service.db.reads import Reads
from service.events.channels import SITE_EVENTS_CHANNEL
from service.events.hub import EventHub
from service.identifiers import normalize_grid_identifier
from service.identifiers.ids import ResourceId, SiteId
from service.registry import convert
from service.registry.domain import (
    ResourceFields,
    SiteFields,
    SiteStatus,
    validate_resource,
    validate_site,
)
from service.registry.store import RegistryStore, SiteFilter, SiteRecord
from service.upstream.domain import UpstreamStatus

DESCRIPTOR = pb.DESCRIPTOR.services_by_name["SiteRegistry"]
SERVICE = DESCRIPTOR.full_name
METHOD_ROLES: dict[str, frozenset[Role]] = {
    f"/{SERVICE}/{method}": frozenset({Role.PARTNER}) for method in DESCRIPTOR.methods_by_name
}

SITE_UPDATABLE = frozenset(
    {"name", "external_id", "location", "timezone", "supply_points", "type", "balance_resolution"}
)
RESOURCE_UPDATABLE = frozenset({"name", "external_id", "power_kw", "capacity_kwh", "webhook_url"})


class SiteRegistryServicer(pb_grpc.SiteRegistryServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        hub: EventHub,
        watch_buffer_size: int,
        clock: Clock = SYSTEM_CLOCK,
        reads: Reads | None = None,
        *,
        webhook_allow_private_networks: bool = False,
    ) -> None:
        self._pool = pool
        self._webhook_allow_private_networks = webhook_allow_private_networks
        self._hub = hub
        self._watch_buffer_size = watch_buffer_size
        self._clock = clock
        self._reads = reads

    def _store(self) -> RegistryStore:
        return RegistryStore(self._pool, current_principal().org_id, self._clock, self._reads)

    async def CreateSite(
        self, request: pb.CreateSiteRequest, context: Any
    ) -> pb.CreateSiteResponse:
        fields = validate_site(convert.site_fields_from_create(request))
        site = await self._store().create_site(fields)
        return pb.CreateSiteResponse(site=convert.site_to_proto(site))

    async def GetSite(self, request: pb.GetSiteRequest, context: Any) -> pb.GetSiteResponse:
        site = await self._store().get_site(SiteId(parse_uuid(request.site_id, "site_id")))
        return pb.GetSiteResponse(site=convert.site_to_proto(site))

    async def ListSites(self, request: pb.ListSitesRequest, context: Any) -> pb.ListSitesResponse:
        limit = page_size_or_default(request.page_size)
        site_filter = SiteFilter(
            status=enum_from_proto(
                pb.SiteStatus, "SITE_STATUS_", request.status, SiteStatus, "status"
            ),
            upstream_status=enum_from_proto(
                pb.UpstreamStatus,
                "UPSTREAM_STATUS_",
                request.upstream_status,
                UpstreamStatus,
                "upstream_status",
            ),
            grid_identifier=normalize_grid_identifier(request.grid_identifier) or None,
        )
        store = self._store()
        page = await fetch_page(
            "ListSites",
            lambda after, n: store.list_sites(site_filter, after, n),
            limit,
            request.page_token,
            site_filter,
        )
        return pb.ListSitesResponse(
            sites=[convert.site_to_proto(site) for site in page.rows],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    async def UpdateSite(
        self, request: pb.UpdateSiteRequest, context: Any
    ) -> pb.UpdateSiteResponse:
        site_id = SiteId(parse_uuid(request.site.id, "site.id"))
        paths = require_mask(list(request.update_mask.paths), SITE_UPDATABLE)
        given = request.site
        # Parse the request before taking the row lock, so bad enums fail fast; only the
        # masked fields, since the others are ignored.
        new_points = (
            convert.supply_points_from_proto(given.supply_points, "site.")
            if "supply_points" in paths
            else ()
        )
        new_type = (
            convert.site_type_from_proto(given.type, "site.type") if "type" in paths else None
        )
        new_location = convert.location_from_proto(given.location)

        given_fields = {
            "name": given.name,
            "external_id": given.external_id,
            "location": new_location,
            "timezone": given.timezone,
            "supply_points": new_points,
            "type": new_type,
            "balance_resolution": given.balance_resolution,
        }

        def change(current: SiteFields) -> SiteFields:
            updated = merge_masked(current, paths, given_fields, {"type": "site_type"})
            return validate_site(updated, prefix="site.")

        site = await self._store().update_site(site_id, change)
        return pb.UpdateSiteResponse(site=convert.site_to_proto(site))

    async def DeleteSite(
        self, request: pb.DeleteSiteRequest, context: Any
    ) -> pb.DeleteSiteResponse:
        await self._store().delete_site(SiteId(parse_uuid(request.site_id, "site_id")))
        return pb.DeleteSiteResponse()

    async def PauseSite(self, request: pb.PauseSiteRequest, context: Any) -> pb.PauseSiteResponse:
        site = await self._store().set_paused(SiteId(parse_uuid(request.site_id, "site_id")), True)
        return pb.PauseSiteResponse(site=convert.site_to_proto(site))

    async def ResumeSite(
        self, request: pb.ResumeSiteRequest, context: Any
    ) -> pb.ResumeSiteResponse:
        site = await self._store().set_paused(SiteId(parse_uuid(request.site_id, "site_id")), False)
        return pb.ResumeSiteResponse(site=convert.site_to_proto(site))

    async def WatchSites(
        self, request: pb.WatchSitesRequest, context: Any
    ) -> AsyncIterator[pb.WatchSitesResponse]:
        org_id = str(current_principal().org_id)
        subscription = await self._hub.subscribe(
            SITE_EVENTS_CHANNEL, org_id, self._watch_buffer_size
        )
        try:
            # Headers out first, so a client knows it is subscribed before any event exists.
            await context.send_initial_metadata(())
            async for event in subscription:
                site = SiteRecord.from_row(event["site"])
                yield pb.WatchSitesResponse(
                    event_type=pb.SiteEventType.Value(
                        "SITE_EVENT_TYPE_" + str(event["event_type"]).upper()
                    ),
                    site=convert.site_to_proto(site),
                    event_time=to_timestamp(datetime.fromisoformat(event["at"])),
                )
        finally:
            subscription.close()

    async def CreateResource(
        self, request: pb.CreateResourceRequest, context: Any
    ) -> pb.CreateResourceResponse:
        site_id = SiteId(parse_uuid(request.site_id, "site_id"))
        fields = validate_resource(
            convert.resource_fields_from_create(request),
            allow_private_networks=self._webhook_allow_private_networks,
        )
        resource = await self._store().create_resource(site_id, fields)
        return pb.CreateResourceResponse(resource=convert.resource_to_proto(resource))

    async def GetResource(
        self, request: pb.GetResourceRequest, context: Any
    ) -> pb.GetResourceResponse:
        resource = await self._store().get_resource(
            ResourceId(parse_uuid(request.resource_id, "resource_id"))
        )
        return pb.GetResourceResponse(resource=convert.resource_to_proto(resource))

    async def ListResources(
        self, request: pb.ListResourcesRequest, context: Any
    ) -> pb.ListResourcesResponse:
        site_id = SiteId(parse_uuid(request.site_id, "site_id"))
        limit = page_size_or_default(request.page_size)
        store = self._store()
        page = await fetch_page(
            "ListResources",
            lambda after, n: store.list_resources(site_id, after, n),
            limit,
            request.page_token,
            site_id,
        )
        return pb.ListResourcesResponse(
            resources=[convert.resource_to_proto(r) for r in page.rows],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    async def UpdateResource(
        self, request: pb.UpdateResourceRequest, context: Any
    ) -> pb.UpdateResourceResponse:
        resource_id = ResourceId(parse_uuid(request.resource.id, "resource.id"))
        paths = require_mask(list(request.update_mask.paths), RESOURCE_UPDATABLE)
        given = request.resource
        power = convert.bounds_from_proto(given.power_kw, given.HasField("power_kw"))
        capacity = convert.bounds_from_proto(given.capacity_kwh, given.HasField("capacity_kwh"))

        given_fields = {
            "name": given.name,
            "external_id": given.external_id,
            "power_kw": power,
            "capacity_kwh": capacity,
            "webhook_url": given.webhook_url,
        }

        def change(current: ResourceFields) -> ResourceFields:
            # A stored URL is judged again only when it is changed: one accepted under an
            # earlier setting must not block renaming the resource (delivery still checks).
            return validate_resource(
                merge_masked(current, paths, given_fields),
                prefix="resource.",
                allow_private_networks=self._webhook_allow_private_networks
                or "webhook_url" not in paths,
            )

        resource = await self._store().update_resource(resource_id, change)
        return pb.UpdateResourceResponse(resource=convert.resource_to_proto(resource))

    async def DeleteResource(
        self, request: pb.DeleteResourceRequest, context: Any
    ) -> pb.DeleteResourceResponse:
        await self._store().delete_resource(
            ResourceId(parse_uuid(request.resource_id, "resource_id"))
        )
        return pb.DeleteResourceResponse()
