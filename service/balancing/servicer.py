"""gRPC transport of Balancing: converts, checks tenancy through the store, delegates."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
from google.protobuf import timestamp_pb2
from openvpp.v1 import balancing_pb2 as pb
from openvpp.v1 import balancing_pb2_grpc as pb_grpc

from service.auth.principal import Role, current_principal
from service.balancing import convert
from service.balancing.aggregate import GRID
from service.balancing.calendar import OUTPUT_INTERVALS, parse_output_interval
from service.balancing.domain import validate_policy_period, validate_setting
from service.balancing.reads import balances_page, balances_page_size, summaries_page
from service.balancing.store import BalancingStore, SiteInfo, site_info
from service.balancing.worker import rebalance_now
from service.common.errors import (
    FailedPreconditionError,
    NotFoundError,
    ValidationError,
    ViolationCollector,
)
from service.common.field_mask import require_mask
from service.common.protoconv import (
    date_from_proto,
    end_time_rule,
    from_timestamp,
    optional_uuid,
    parse_uuid,
    to_timestamp,
)
from service.db.pagination import fetch_page, page_size_or_default
from service.events.channels import BALANCES_CHANNEL
from service.events.hub import EventHub

DESCRIPTOR = pb.DESCRIPTOR.services_by_name["Balancing"]
SERVICE = DESCRIPTOR.full_name
METHOD_ROLES: dict[str, frozenset[Role]] = {
    f"/{SERVICE}/{method}": frozenset({Role.PARTNER}) for method in DESCRIPTOR.methods_by_name
}

SETTING_UPDATABLE = frozenset({"end_date", "priority", "share"})
# One RunBalancing call re-balances at most this much (a site-year fits with margin).
MAX_RUN_RANGE = timedelta(days=400)
# About ten years: the list RPCs read what is stored, RunBalancing recomputes it.
MAX_LIST_RANGE = timedelta(days=3660)


def _time_range(request: Any, longest: timedelta = MAX_LIST_RANGE) -> tuple[datetime, datetime]:
    errors = ViolationCollector()
    if not request.HasField("start_time"):
        errors.add("start_time", "is required")
    if not request.HasField("end_time"):
        errors.add("end_time", "is required")
    errors.raise_if_any()
    start = from_timestamp(request.start_time, "start_time")
    end = from_timestamp(request.end_time, "end_time")
    # The README's bound on a request's range (a page's work is bounded by the page,
    # whatever the range).
    rule = end_time_rule(request.start_time, request.end_time, longest)
    if rule is not None:
        raise ValidationError.single("end_time", rule)
    return start, end


def _balanced(site: SiteInfo) -> None:
    if not site.balanced:
        raise FailedPreconditionError(
            f"site {site.id} is not of type SITE_TYPE_BALANCED_*: it has no balances",
            subject=f"sites/{site.id}",
            precondition_type="SITE_TYPE",
        )


def _meter_or_grid(value: str, field: str) -> str | None:
    if not value:
        return None
    if value == GRID:
        return GRID
    return str(parse_uuid(value, field))


class BalancingServicer(pb_grpc.BalancingServicer):
    def __init__(self, pool: asyncpg.Pool, hub: EventHub, watch_buffer_size: int) -> None:
        self._pool = pool
        self._hub = hub
        self._watch_buffer_size = watch_buffer_size

    def _store(self) -> BalancingStore:
        return BalancingStore(self._pool, current_principal().org_id)

    # -- settings and policies ------------------------------------------------------------

    async def CreateMeterBalancingSetting(
        self, request: pb.CreateMeterBalancingSettingRequest, context: Any
    ) -> pb.CreateMeterBalancingSettingResponse:
        meter_id = parse_uuid(request.meter_id, "meter_id")
        site_id = optional_uuid(request.site_id, "site_id")
        fields = convert.setting_fields_from_create(request)
        period = validate_setting(fields)
        setting = await self._store().create_setting(site_id, meter_id, fields, period)
        return pb.CreateMeterBalancingSettingResponse(setting=convert.setting_to_proto(setting))

    async def ListMeterBalancingSettings(
        self, request: pb.ListMeterBalancingSettingsRequest, context: Any
    ) -> pb.ListMeterBalancingSettingsResponse:
        site_id = parse_uuid(request.site_id, "site_id")
        meter_id = optional_uuid(request.meter_id, "meter_id")
        limit = page_size_or_default(request.page_size)
        store = self._store()
        page = await fetch_page(
            "ListMeterBalancingSettings",
            lambda after, n: store.list_settings(site_id, meter_id, after, n),
            limit,
            request.page_token,
            site_id,
            meter_id,
        )
        return pb.ListMeterBalancingSettingsResponse(
            settings=[convert.setting_to_proto(s) for s in page.rows],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    async def UpdateMeterBalancingSetting(
        self, request: pb.UpdateMeterBalancingSettingRequest, context: Any
    ) -> pb.UpdateMeterBalancingSettingResponse:
        setting_id = parse_uuid(request.setting.id, "setting.id")
        paths = frozenset(require_mask(list(request.update_mask.paths), SETTING_UPDATABLE))
        given = request.setting
        errors = ViolationCollector()
        end = date_from_proto(
            errors, "setting.end_date", given.end_date, given.HasField("end_date")
        )
        errors.raise_if_any()
        setting = await self._store().update_setting(
            setting_id,
            end,
            given.priority if given.HasField("priority") else None,
            given.share if given.HasField("share") else None,
            paths,
        )
        return pb.UpdateMeterBalancingSettingResponse(setting=convert.setting_to_proto(setting))

    async def DeleteMeterBalancingSetting(
        self, request: pb.DeleteMeterBalancingSettingRequest, context: Any
    ) -> pb.DeleteMeterBalancingSettingResponse:
        await self._store().delete_setting(parse_uuid(request.setting_id, "setting_id"))
        return pb.DeleteMeterBalancingSettingResponse()

    async def CreateSiteBalancingPolicy(
        self, request: pb.CreateSiteBalancingPolicyRequest, context: Any
    ) -> pb.CreateSiteBalancingPolicyResponse:
        site_id = parse_uuid(request.site_id, "site_id")
        errors = ViolationCollector()
        method = convert.method_from_proto(errors, request.allocation_method, "allocation_method")
        start = date_from_proto(
            errors, "start_date", request.start_date, request.HasField("start_date")
        )
        end = date_from_proto(errors, "end_date", request.end_date, request.HasField("end_date"))
        errors.raise_if_any()
        assert method is not None
        period = validate_policy_period(start, end)
        policy = await self._store().create_policy(site_id, method, period)
        return pb.CreateSiteBalancingPolicyResponse(policy=convert.policy_to_proto(policy))

    async def ListSiteBalancingPolicies(
        self, request: pb.ListSiteBalancingPoliciesRequest, context: Any
    ) -> pb.ListSiteBalancingPoliciesResponse:
        site_id = parse_uuid(request.site_id, "site_id")
        limit = page_size_or_default(request.page_size)
        store = self._store()
        page = await fetch_page(
            "ListSiteBalancingPolicies",
            lambda after, n: store.list_policies(site_id, after, n),
            limit,
            request.page_token,
            site_id,
        )
        return pb.ListSiteBalancingPoliciesResponse(
            policies=[convert.policy_to_proto(p) for p in page.rows],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    # -- balancing and results ------------------------------------------------------------

    async def RunBalancing(
        self, request: pb.RunBalancingRequest, context: Any
    ) -> pb.RunBalancingResponse:
        site_id = parse_uuid(request.site_id, "site_id")
        start, end = _time_range(request, MAX_RUN_RANGE)
        org_id = current_principal().org_id
        _balanced(await site_info(self._pool, org_id, site_id))
        result = await rebalance_now(self._pool, org_id, site_id, [(start, end)])
        return pb.RunBalancingResponse(
            balanced_intervals=result.balanced,
            incomplete_intervals=result.incomplete,
            out_of_range_intervals=result.out_of_range,
        )

    async def _meter_site(self, org_id: UUID, meter_id: str) -> UUID:
        site_id: UUID | None = await self._pool.fetchval(
            "SELECT site_id FROM meters WHERE id = $1 AND org_id = $2", UUID(meter_id), org_id
        )
        if site_id is None:
            raise NotFoundError("meter", meter_id)
        return site_id

    def _interval(self, text: str, site: SiteInfo, field: str = "interval") -> str:
        interval = parse_output_interval(text, site.resolution)
        if interval is None:
            raise ValidationError.single(
                field,
                f"must be one of {', '.join(OUTPUT_INTERVALS)}, not finer than the site's "
                f"balance_resolution {site.resolution.iso}",
            )
        return interval

    async def ListAggregatedBalances(
        self, request: pb.ListAggregatedBalancesRequest, context: Any
    ) -> pb.ListAggregatedBalancesResponse:
        org_id = current_principal().org_id
        debitor = _meter_or_grid(request.debitor_meter_id, "debitor_meter_id")
        creditor = _meter_or_grid(request.creditor_meter_id, "creditor_meter_id")
        site_id = optional_uuid(request.site_id, "site_id")
        if site_id is None and debitor is None and creditor is None:
            raise ValidationError.single(
                "site_id", "site_id, debitor_meter_id or creditor_meter_id is required"
            )
        start, end = _time_range(request)
        limit = balances_page_size(request.page_size)
        if site_id is not None:
            # Another organization's site is NOT_FOUND before any meter is compared with it.
            await site_info(self._pool, org_id, site_id)
        for meter, field in ((debitor, "debitor_meter_id"), (creditor, "creditor_meter_id")):
            if meter is None or meter == GRID:
                continue
            meter_site = await self._meter_site(org_id, meter)
            if site_id is None:
                site_id = meter_site
            elif meter_site != site_id:
                raise ValidationError.single(field, "must be a meter of the same site")
        if site_id is None:
            raise ValidationError.single(
                "site_id", "is required when the meters given are only GRID"
            )
        site = await site_info(self._pool, org_id, site_id)
        interval = self._interval(request.interval, site)
        if not site.balanced:
            return pb.ListAggregatedBalancesResponse()
        rows, token = await balances_page(
            self._pool, site, start, end, interval, creditor, debitor, limit, request.page_token
        )
        response = pb.ListAggregatedBalancesResponse(next_page_token=token)
        add = response.balances.add
        for window in rows:
            stamps = [
                timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=us % 1_000_000 * 1000)
                for us in window.bounds_us
            ]
            creditors, debitors = window.creditors, window.debitors
            for i, k, energy, complete in zip(
                window.intervals, window.pairs, window.energy_wh, window.complete, strict=True
            ):
                add(
                    interval_start=stamps[i],
                    interval_end=stamps[i + 1],
                    creditor_meter_id=creditors[k],
                    debitor_meter_id=debitors[k],
                    energy_wh=energy,
                    complete=complete,
                )
        return response

    async def ListBalanceSummaries(
        self, request: pb.ListBalanceSummariesRequest, context: Any
    ) -> pb.ListBalanceSummariesResponse:
        org_id = current_principal().org_id
        site_id = parse_uuid(request.site_id, "site_id")
        start, end = _time_range(request)
        limit = balances_page_size(request.page_size)
        site = await site_info(self._pool, org_id, site_id)
        interval = self._interval(request.interval, site)
        if not site.balanced:
            return pb.ListBalanceSummariesResponse()
        rows, token = await summaries_page(
            self._pool, site, start, end, interval, limit, request.page_token
        )
        response = pb.ListBalanceSummariesResponse(next_page_token=token)
        for row in rows:
            response.summaries.add(
                interval_start=to_timestamp(row.interval_start),
                interval_end=to_timestamp(row.interval_end),
                production_wh=row.production_wh,
                demand_wh=row.demand_wh,
                shared_wh=row.shared_wh,
                feed_in_wh=row.feed_in_wh,
                grid_supply_wh=row.grid_supply_wh,
                balance_intervals=row.balance_intervals,
                complete_intervals=row.complete_intervals,
            )
        return response

    async def WatchBalances(
        self, request: pb.WatchBalancesRequest, context: Any
    ) -> AsyncIterator[pb.WatchBalancesResponse]:
        org_id = current_principal().org_id
        site_id = parse_uuid(request.site_id, "site_id")
        site_text = str(site_id)
        subscription = await self._hub.subscribe(
            BALANCES_CHANNEL,
            str(org_id),
            self._watch_buffer_size,
            lambda event: event.get("site") == site_text,
            site_id=site_text,
        )
        try:
            # After subscribing: a deletion from now on ends the subscription.
            await site_info(self._pool, org_id, site_id)
            # Headers first: a client knows it is subscribed before anything is re-balanced.
            await context.send_initial_metadata(())
            async for event in subscription:
                message = pb.WatchBalancesResponse(
                    site_id=site_text,
                    start_time=to_timestamp(datetime.fromisoformat(event["from"])),
                    end_time=to_timestamp(datetime.fromisoformat(event["to"])),
                    balanced_intervals=int(event["balanced"]),
                    incomplete_intervals=int(event["incomplete"]),
                    commit_time=to_timestamp(datetime.fromisoformat(event["at"])),
                    # Absent from the events of a replica that predates it (a rolling upgrade).
                    out_of_range_intervals=int(event.get("out_of_range", 0)),
                )
                yield message
        finally:
            subscription.close()
