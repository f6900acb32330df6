"""Registry records <-> protobuf messages."""

from __future__ import annotations

from collections.abc import Iterable

from openvpp.v1 import site_registry_pb2 as pb

from service.common.protoconv import enum_from_proto, enum_to_proto, to_timestamp
from service.grid import SiteType
from service.registry.domain import (
    Bounds,
    Location,
    ResourceFields,
    ResourceType,
    SiteFields,
    SupplyPoint,
    SupplyPointDirection,
)
from service.registry.store import ResourceRecord, SiteRecord


def site_to_proto(site: SiteRecord) -> pb.Site:
    fields = site.fields
    primary = fields.primary
    location = pb.Location(address=fields.location.address, country=fields.location.country)
    if fields.location.latitude is not None and fields.location.longitude is not None:
        location.latitude = fields.location.latitude
        location.longitude = fields.location.longitude
    return pb.Site(
        id=str(site.id),
        name=fields.name,
        external_id=fields.external_id,
        location=location,
        timezone=fields.timezone,
        supply_points=[
            pb.SupplyPoint(
                grid_identifier=point.grid_identifier,
                direction=enum_to_proto(
                    pb.SupplyPointDirection, "SUPPLY_POINT_DIRECTION_", str(point.direction)
                ),
                primary=point is primary,
            )
            for point in fields.supply_points
        ],
        status=enum_to_proto(pb.SiteStatus, "SITE_STATUS_", site.status),
        upstream_status=enum_to_proto(pb.UpstreamStatus, "UPSTREAM_STATUS_", site.upstream_status),
        grid_identifier=primary.grid_identifier,
        type=enum_to_proto(pb.SiteType, "SITE_TYPE_", fields.site_type)
        if fields.site_type
        else pb.SITE_TYPE_UNSPECIFIED,
        balance_resolution=fields.balance_resolution,
        create_time=to_timestamp(site.created_at),
        update_time=to_timestamp(site.updated_at),
    )


def location_from_proto(location: pb.Location) -> Location:
    return Location(
        address=location.address,
        latitude=location.latitude if location.HasField("latitude") else None,
        longitude=location.longitude if location.HasField("longitude") else None,
        country=location.country,
    )


def supply_points_from_proto(
    points: Iterable[pb.SupplyPoint], prefix: str
) -> tuple[SupplyPoint, ...]:
    result = []
    for index, point in enumerate(points):
        direction = enum_from_proto(
            pb.SupplyPointDirection,
            "SUPPLY_POINT_DIRECTION_",
            point.direction,
            SupplyPointDirection,
            f"{prefix}supply_points[{index}].direction",
        )
        result.append(SupplyPoint(point.grid_identifier, direction))
    return tuple(result)


def site_type_from_proto(number: int, field: str) -> SiteType | None:
    return enum_from_proto(pb.SiteType, "SITE_TYPE_", number, SiteType, field)


def site_fields_from_create(request: pb.CreateSiteRequest) -> SiteFields:
    return SiteFields(
        name=request.name,
        external_id=request.external_id,
        location=location_from_proto(request.location),
        timezone=request.timezone,
        supply_points=supply_points_from_proto(request.supply_points, ""),
        site_type=site_type_from_proto(request.type, "type"),
        balance_resolution=request.balance_resolution,
    )


def bounds_from_proto(message: pb.Bounds, present: bool) -> Bounds | None:
    return Bounds(message.min, message.max) if present else None


def resource_type_from_proto(number: int, field: str) -> ResourceType | None:
    return enum_from_proto(pb.ResourceType, "RESOURCE_TYPE_", number, ResourceType, field)


def resource_fields_from_create(request: pb.CreateResourceRequest) -> ResourceFields:
    return ResourceFields(
        resource_type=resource_type_from_proto(request.type, "type"),
        name=request.name,
        external_id=request.external_id,
        power_kw=bounds_from_proto(request.power_kw, request.HasField("power_kw")),
        capacity_kwh=bounds_from_proto(request.capacity_kwh, request.HasField("capacity_kwh")),
        webhook_url=request.webhook_url,
    )


def resource_to_proto(resource: ResourceRecord) -> pb.Resource:
    fields = resource.fields
    assert fields.resource_type is not None
    message = pb.Resource(
        id=str(resource.id),
        site_id=str(resource.site_id),
        type=enum_to_proto(pb.ResourceType, "RESOURCE_TYPE_", fields.resource_type),
        name=fields.name,
        external_id=fields.external_id,
        webhook_url=fields.webhook_url,
        create_time=to_timestamp(resource.created_at),
        update_time=to_timestamp(resource.updated_at),
    )
    if fields.power_kw is not None:
        message.power_kw.CopyFrom(pb.Bounds(min=fields.power_kw.min, max=fields.power_kw.max))
    if fields.capacity_kwh is not None:
        message.capacity_kwh.CopyFrom(
            pb.Bounds(min=fields.capacity_kwh.min, max=fields.capacity_kwh.max)
        )
    return message
