"""gRPC transport of flexibility dispatch: requests in, domain and store calls, messages out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
from openvpp.v1 import dispatch_pb2 as pb
from openvpp.v1 import dispatch_pb2_grpc as pb_grpc

from service.auth.principal import Role, current_principal
from service.common.clock import Clock
from service.common.protoconv import enum_from_proto, optional_uuid, parse_uuid, to_timestamp
from service.db.pagination import fetch_page, page_size_or_default
from service.dispatch import convert
from service.dispatch.domain import SetpointState, validate_request
from service.dispatch.store import DispatchStore, SetpointFilter
from service.events.channels import SETPOINT_EVENTS_CHANNEL
from service.events.hub import Event, EventHub
from service.observability import outgoing_traceparent

DESCRIPTOR = pb.DESCRIPTOR.services_by_name["Dispatch"]
SERVICE = DESCRIPTOR.full_name
_PARTNER_READS = frozenset({"GetSetpoint", "ListSetpoints", "WatchSetpoints"})
METHOD_ROLES: dict[str, frozenset[Role]] = {
    f"/{SERVICE}/{method}": frozenset({Role.OPERATOR, Role.PARTNER})
    if method in _PARTNER_READS
    else frozenset({Role.OPERATOR})
    for method in DESCRIPTOR.methods_by_name
}


class DispatchServicer(pb_grpc.DispatchServicer):
    def __init__(
        self, pool: asyncpg.Pool, hub: EventHub, clock: Clock, watch_buffer_size: int
    ) -> None:
        self._pool = pool
        self._hub = hub
        self._clock = clock
        self._watch_buffer_size = watch_buffer_size

    def _store(self) -> DispatchStore:
        principal = current_principal()
        return DispatchStore(self._pool, principal.org_id, principal.role, self._clock)

    async def DispatchFlexibility(
        self, request: pb.DispatchFlexibilityRequest, context: Any
    ) -> pb.DispatchFlexibilityResponse:
        # The window's end is checked by the store, after a retry was recognised.
        parsed, malformed = convert.request_from_proto(request)
        dispatch_request = validate_request(parsed, now=None, malformed=malformed)
        result = await self._store().dispatch(
            dispatch_request, outgoing_traceparent(context.invocation_metadata())
        )
        return pb.DispatchFlexibilityResponse(
            dispatch=convert.dispatch_to_proto(result.dispatch),
            setpoints=[convert.setpoint_to_proto(s) for s in result.setpoints],
        )

    async def GetDispatch(
        self, request: pb.GetDispatchRequest, context: Any
    ) -> pb.GetDispatchResponse:
        record = await self._store().get_dispatch(parse_uuid(request.dispatch_id, "dispatch_id"))
        return pb.GetDispatchResponse(dispatch=convert.dispatch_to_proto(record))

    async def ListDispatches(
        self, request: pb.ListDispatchesRequest, context: Any
    ) -> pb.ListDispatchesResponse:
        limit = page_size_or_default(request.page_size)
        store = self._store()
        page = await fetch_page("ListDispatches", store.list_dispatches, limit, request.page_token)
        return pb.ListDispatchesResponse(
            dispatches=[convert.dispatch_to_proto(d) for d in page.rows],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    async def GetSetpoint(
        self, request: pb.GetSetpointRequest, context: Any
    ) -> pb.GetSetpointResponse:
        record = await self._store().get_setpoint(parse_uuid(request.setpoint_id, "setpoint_id"))
        return pb.GetSetpointResponse(setpoint=convert.setpoint_to_proto(record))

    async def ListSetpoints(
        self, request: pb.ListSetpointsRequest, context: Any
    ) -> pb.ListSetpointsResponse:
        limit = page_size_or_default(request.page_size)
        setpoint_filter = SetpointFilter(
            dispatch_id=optional_uuid(request.dispatch_id, "dispatch_id"),
            site_id=optional_uuid(request.site_id, "site_id"),
            state=enum_from_proto(
                pb.SetpointState,
                convert.SETPOINT_STATE_PREFIX,
                request.state,
                SetpointState,
                "state",
            ),
        )
        store = self._store()
        await store.check_filter(setpoint_filter.dispatch_id, setpoint_filter.site_id)
        page = await fetch_page(
            "ListSetpoints",
            lambda after, n: store.list_setpoints(setpoint_filter, after, n),
            limit,
            request.page_token,
            setpoint_filter,
        )
        return pb.ListSetpointsResponse(
            setpoints=[convert.setpoint_to_proto(s) for s in page.rows],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    async def CancelDispatch(
        self, request: pb.CancelDispatchRequest, context: Any
    ) -> pb.CancelDispatchResponse:
        record = await self._store().cancel(parse_uuid(request.dispatch_id, "dispatch_id"))
        return pb.CancelDispatchResponse(dispatch=convert.dispatch_to_proto(record))

    async def WatchSetpoints(
        self, request: pb.WatchSetpointsRequest, context: Any
    ) -> AsyncIterator[pb.WatchSetpointsResponse]:
        dispatch_id = optional_uuid(request.dispatch_id, "dispatch_id")
        site_id = optional_uuid(request.site_id, "site_id")
        wanted_dispatch = str(dispatch_id) if dispatch_id else None
        wanted_site = str(site_id) if site_id else None

        def wanted(change: list[Any]) -> bool:
            # A change is [setpoint id, dispatch id, site id, state].
            return (wanted_dispatch is None or change[1] == wanted_dispatch) and (
                wanted_site is None or change[2] == wanted_site
            )

        def matches(event: Event) -> bool:
            # A new dispatch, or many of one dispatch's setpoints changed at once: the
            # watcher reads that dispatch's setpoints (of its site, if filtered).
            whole = event.get("created") or event.get("changed")
            if whole is not None:
                return wanted_dispatch is None or whole == wanted_dispatch
            return any(wanted(change) for change in event.get("changes", ()))

        store = self._store()
        await store.check_filter(dispatch_id, site_id)
        # Not ended when the site is deleted: its setpoints outlive it, and those still open
        # are settled after it (NOT_ELIGIBLE, "site deleted").
        subscription = await self._hub.subscribe(
            SETPOINT_EVENTS_CHANNEL,
            str(current_principal().org_id),
            self._watch_buffer_size,
            matches,
        )
        try:
            # Headers out first, so a client knows it is subscribed before any event exists.
            await context.send_initial_metadata(())
            async for event in subscription:
                event_time = to_timestamp(datetime.fromisoformat(event["at"]))
                if "created" in event:
                    # A new dispatch: its setpoints (the caller's, of the site if filtered).
                    for created in await store.setpoints_of_dispatch(
                        UUID(event["created"]), site_id
                    ):
                        message = convert.setpoint_to_proto(created)
                        message.state = convert.state_to_proto(SetpointState.PENDING)
                        yield pb.WatchSetpointsResponse(setpoint=message, event_time=event_time)
                    continue
                if "changed" in event:
                    # Too many changes of one dispatch to send one by one: its setpoints as
                    # they are now (also those the transaction did not change).
                    for current in await store.setpoints_of_dispatch(
                        UUID(event["changed"]), site_id
                    ):
                        yield pb.WatchSetpointsResponse(
                            setpoint=convert.setpoint_to_proto(current), event_time=event_time
                        )
                    continue
                changes = [change for change in event["changes"] if wanted(change)]
                records = {
                    str(r.id): r
                    for r in await store.setpoints_by_id([UUID(change[0]) for change in changes])
                }
                for change in changes:
                    record = records.get(change[0])
                    if record is None:
                        continue
                    message = convert.setpoint_to_proto(record)
                    # The state of this change, which may be older than the row read now.
                    message.state = convert.state_to_proto(SetpointState(change[3]))
                    yield pb.WatchSetpointsResponse(setpoint=message, event_time=event_time)
        finally:
            subscription.close()
