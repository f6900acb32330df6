"""gRPC transport of Telemetry: batches in, acks out after commit; list and watch."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from openvpp.v1 import telemetry_pb2 as pb
from openvpp.v1 import telemetry_pb2_grpc as pb_grpc

from service.auth.principal import Role, current_principal
from service.common.errors import NotFoundError, ValidationError
from service.common.protoconv import end_time_rule, from_timestamp, parse_uuid, to_timestamp
from service.config import Settings
from service.events.channels import (
    READINGS_CHANNEL,
)
from service.events.hub import EventHub
from service.identifiers.ids import MeterId, OrgId, SiteId
from service.observability import ServiceMetrics
from service.telemetry.convert import PROTO_FLOW_BY_CODE, ack_to_proto
from service.telemetry.domain import Measuring
from service.telemetry.energy_store import meter_readings
from service.telemetry.ingest import Ingest, WriteOrder, WriteTurn
from service.telemetry.store import IngestedBatch, fetch_ingested, site_exists

log = logging.getLogger(__name__)

DESCRIPTOR = pb.DESCRIPTOR.services_by_name["Telemetry"]
SERVICE = DESCRIPTOR.full_name
METHOD_ROLES: dict[str, frozenset[Role]] = {
    f"/{SERVICE}/{method}": frozenset({Role.PARTNER}) for method in DESCRIPTOR.methods_by_name
}

MAX_LIST_RANGE = timedelta(days=31)
# Committed batches a WatchReadings stream reads back in one statement: a backlog is caught
# up in a few round trips, and one of them holds at most this many batches' rows (each up
# to OPENVPP_MAX_BATCH_READINGS).
WATCH_EVENTS_PER_READ = 16
PARTITION_CHECK_SECONDS = 3600.0


def _readings_response(rows: list[Any]) -> pb.WatchReadingsResponse:
    """One committed batch's rows as one message."""
    response = pb.WatchReadingsResponse()
    for row in rows:
        reading = response.readings.add(
            meter_id=str(row["meter_id"]),
            timestamp=to_timestamp(row["ts"]),
            flow=PROTO_FLOW_BY_CODE[row["flow"]],
        )
        if row["measuring"] == Measuring.LOAD_PROFILE_ACCURATE:
            reading.interval_wh = row["value_wh"]
        else:
            reading.register_wh = row["value_wh"]
    return response


class TelemetryServicer(pb_grpc.TelemetryServicer):
    """Converts messages and delegates: ingest to :class:`Ingest`, reads to the store."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        hub: EventHub,
        settings: Settings,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._pool = pool
        self._hub = hub
        self._settings = settings
        self.ingest = Ingest(pool, hub, settings, metrics)
        # Highest number of events any finished watch subscription had buffered (for tests
        # and diagnostics: it never exceeds readings_watch_buffer_size).
        self.watch_peak_buffered = 0
        # Batches whose stream went away keep running to their commit; held here.
        self._orphans: set[asyncio.Task[pb.ReadingBatchAck]] = set()
        # The acks are sent in order by each stream; this orders the writes of batches that
        # share a meter (also with those of a stream gone before their ack), which would
        # otherwise commit in whatever order their locks allow.
        self._write_order = WriteOrder()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await self.ingest.start()

    async def stop(self) -> None:
        await self.wait_in_flight()

    async def wait_in_flight(self) -> None:
        """Until every batch taken so far has committed or failed (also those whose stream
        went away before its ack)."""
        if self._orphans:
            await asyncio.gather(*self._orphans, return_exceptions=True)

    async def maintain_partitions(self) -> bool:
        """A worker pass: readings partitions exist ahead of time."""
        return await self.ingest.maintain_partitions()

    # -- ingest ---------------------------------------------------------------------------

    def _start(self, org_id: OrgId, batch: pb.ReadingBatch) -> asyncio.Task[pb.ReadingBatchAck]:
        """The batch's ingest as a task with its turn in the server's write order (taken
        now, in arrival order), which ends however the task does."""
        turn = self._write_order.enter(str(org_id), batch.readings)
        task = asyncio.create_task(self._ack(org_id, batch, turn))
        turn.finish_with(task)
        return task

    async def _ack(
        self, org_id: OrgId, batch: pb.ReadingBatch, turn: WriteTurn
    ) -> pb.ReadingBatchAck:
        result = await self.ingest.ingest(org_id, batch.readings, turn)
        return ack_to_proto(batch.batch_id, result)

    async def StreamReadings(
        self, request_iterator: AsyncIterator[pb.StreamReadingsRequest], context: Any
    ) -> AsyncIterator[pb.StreamReadingsResponse]:
        org_id = current_principal().org_id
        depth = max(1, self._settings.stream_pipeline_depth)
        # Bounded: the reader stops taking batches while `depth` are waiting for their ack.
        pending: asyncio.Queue[asyncio.Task[pb.ReadingBatchAck] | BaseException | None] = (
            asyncio.Queue(maxsize=depth)
        )

        # Cleared once the stream is gone: a batch still running then is nobody's to await.
        stream_open = [True]

        def settled(batch_id: str, task: asyncio.Task[pb.ReadingBatchAck]) -> None:
            if task.cancelled():
                return
            # Retrieved here, whoever else awaits it: a task of a gone stream that failed
            # was otherwise logged by asyncio once collected, "Task exception was never
            # retrieved" with its traceback. A live stream's writer raises it to the client.
            error = task.exception()
            if error is not None and not stream_open[0]:
                log.warning(
                    "batch %r of a stream that ended before its ack was not stored: %s: %s",
                    batch_id,
                    type(error).__name__,
                    error,
                )

        async def read() -> None:
            try:
                async for request in request_iterator:
                    self.ingest.check_size(len(request.batch.readings))
                    task = self._start(org_id, request.batch)
                    self._orphans.add(task)
                    task.add_done_callback(self._orphans.discard)
                    task.add_done_callback(functools.partial(settled, request.batch.batch_id))
                    await pending.put(task)
                await pending.put(None)
            except asyncio.CancelledError:
                raise
            except BaseException as error:  # handed to the writer, which raises it in order
                await pending.put(error)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await pending.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                ack = await asyncio.shield(item)
                yield pb.StreamReadingsResponse(ack=ack)
        finally:
            stream_open[0] = False
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def IngestReadings(
        self, request: pb.IngestReadingsRequest, context: Any
    ) -> pb.IngestReadingsResponse:
        self.ingest.check_size(len(request.batch.readings))
        # In the server's write order too: a client whose stream broke may resend here
        # while the stream's batch still runs to its commit. Cancelled with the call (its
        # transaction rolls back), as before.
        task = self._start(current_principal().org_id, request.batch)
        return pb.IngestReadingsResponse(ack=await task)

    # -- reading back ---------------------------------------------------------------------

    async def ListReadings(
        self, request: pb.ListReadingsRequest, context: Any
    ) -> pb.ListReadingsResponse:
        meter_id = MeterId(parse_uuid(request.meter_id, "meter_id"))
        if not request.HasField("start_time"):
            raise ValidationError.single("start_time", "is required")
        if not request.HasField("end_time"):
            raise ValidationError.single("end_time", "is required")
        start = from_timestamp(request.start_time, "start_time")
        end = from_timestamp(request.end_time, "end_time")
        rule = end_time_rule(request.start_time, request.end_time, MAX_LIST_RANGE)
        if rule is not None:
            raise ValidationError.single("end_time", rule)
        info = await self.ingest.meter(current_principal().org_id, meter_id)
        listed = await meter_readings(self._pool, info, start, end)
        response = pb.ListReadingsResponse()
        field = "interval_wh" if info.load_profile else "register_wh"
        for row in listed.readings:
            reading = response.readings.add(
                meter_id=str(meter_id),
                timestamp=to_timestamp(row["ts"]),
                flow=PROTO_FLOW_BY_CODE[row["flow"]],
            )
            setattr(reading, field, row["value_wh"])
        for interval_start, flow, energy_wh in listed.intervals:
            response.intervals.add(
                interval_start=to_timestamp(interval_start),
                energy_wh=energy_wh,
                flow=PROTO_FLOW_BY_CODE[flow],
            )
        return response

    async def WatchReadings(
        self, request: pb.WatchReadingsRequest, context: Any
    ) -> AsyncIterator[pb.WatchReadingsResponse]:
        org_id = current_principal().org_id
        which = request.WhichOneof("filter")
        site_id: SiteId | None = None
        meter_id: MeterId | None = None
        if which == "meter_id":
            meter_id = MeterId(parse_uuid(request.meter_id, "meter_id"))
            site_id = SiteId((await self.ingest.meter(org_id, meter_id)).site_id)
        elif which == "site_id":
            site_id = SiteId(parse_uuid(request.site_id, "site_id"))
        else:
            raise ValidationError.single("site_id", "site_id or meter_id is required")
        site_text = str(site_id)

        def matches(event: dict[str, Any]) -> bool:
            sites = event.get("sites")
            return sites is None or site_text in sites

        subscription = await self._hub.subscribe(
            READINGS_CHANNEL,
            str(org_id),
            self._settings.readings_watch_buffer_size,
            matches,
            site_id=site_text,
        )
        try:
            # After subscribing: a deletion from now on ends the subscription.
            if not await site_exists(self._pool, org_id, site_id):
                raise NotFoundError("site", site_text)
            # Headers first, so a client knows it is subscribed before any reading exists.
            await context.send_initial_metadata(())
            while True:
                # What is buffered in one statement: a fetch per event fell behind a
                # site's devices committing together, and ended readers that kept up.
                events = await subscription.next_events(WATCH_EVENTS_PER_READ)
                batches = [
                    IngestedBatch(
                        int(event["ingest"]),
                        datetime.fromisoformat(event["from"]),
                        datetime.fromisoformat(event["to"]),
                    )
                    for event in events
                ]
                fetched = await fetch_ingested(
                    self._pool,
                    org_id,
                    batches,
                    None if meter_id is not None else site_id,
                    meter_id,
                )
                for rows in fetched:
                    if rows:
                        yield _readings_response(rows)
        finally:
            subscription.close()
            self.watch_peak_buffered = max(self.watch_peak_buffered, subscription.peak_buffered)
