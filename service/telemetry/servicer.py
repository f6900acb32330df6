"""gRPC transport of Telemetry: batches in, acks out after commit; list and watch."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
from openvpp.v1 import telemetry_pb2 as pb
from openvpp.v1 import telemetry_pb2_grpc as pb_grpc

from service.auth.principal import Role, current_principal
from service.common.errors import NotFoundError, ValidationError
from service.common.protoconv import from_timestamp, parse_uuid, to_timestamp
from service.config import Settings
from service.events.hub import EventHub
from service.registry.store import SITE_EVENTS_CHANNEL
from service.telemetry.convert import PROTO_FLOW_BY_CODE, REASON_TO_PROTO
from service.telemetry.domain import (
    Measuring,
    RegisterPoint,
    RejectReason,
    reason_text,
    registers_to_intervals,
)
from service.telemetry.meter_store import METER_CHANGED_CHANNEL
from service.telemetry.store import (
    READINGS_CHANNEL,
    RETRYABLE,
    MeterCache,
    Partitions,
    fetch_ingested,
    fetch_range,
    lock_register_meters,
    stored_neighbours,
    unoccupied,
    write_rows,
)
from service.telemetry.validate import (
    MeterInfo,
    ValidatedBatch,
    check_register_group,
    validate_batch,
)

log = logging.getLogger(__name__)

DESCRIPTOR = pb.DESCRIPTOR.services_by_name["Telemetry"]
SERVICE = DESCRIPTOR.full_name
METHOD_ROLES: dict[str, frozenset[Role]] = {
    f"/{SERVICE}/{method}": frozenset({Role.PARTNER}) for method in DESCRIPTOR.methods_by_name
}

MAX_LIST_RANGE = timedelta(days=31)
PARTITION_CHECK_SECONDS = 3600.0
_US = 1_000_000
# Average readings per interval group from which probing for plain inserts pays off.
FRESH_PROBE_MIN_RUN = 10
_REASON_TEXTS = {reason: reason_text(reason) for reason in RejectReason}


class TelemetryServicer(pb_grpc.TelemetryServicer):
    def __init__(self, pool: asyncpg.Pool, hub: EventHub, settings: Settings) -> None:
        self._pool = pool
        self._hub = hub
        self._settings = settings
        self.meters = MeterCache(pool, settings.meter_cache_seconds)
        self.partitions = Partitions(pool)
        self._max_future_us = int(settings.max_future_seconds * _US)
        # Highest number of events any finished watch subscription had buffered (for tests
        # and diagnostics: it never exceeds readings_watch_buffer_size).
        self.watch_peak_buffered = 0
        # Batches whose stream went away keep running to their commit; held here.
        self._orphans: set[asyncio.Task[pb.ReadingBatchAck]] = set()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await self.partitions.load()
        await self.partitions.ensure_ahead(
            datetime.now(UTC), self._settings.partitions_ahead_months
        )
        await self._hub.listen(METER_CHANGED_CHANNEL, self.meters.forget_org)
        await self._hub.listen(SITE_EVENTS_CHANNEL, self._site_changed)
        self._hub.on_reset(self.meters.forget_all)

    async def stop(self) -> None:
        if self._orphans:
            await asyncio.gather(*self._orphans, return_exceptions=True)

    def _site_changed(self, payload: str) -> None:
        # A site's timezone or resolution changes the grid of all its meters.
        try:
            self.meters.forget_org(str(json.loads(payload)["key"]))
        except (ValueError, KeyError, TypeError):
            self.meters.forget_all()

    async def maintain_partitions(self) -> bool:
        """A worker pass: readings partitions exist ahead of time (a failure is retried)."""
        await self.partitions.ensure_ahead(
            datetime.now(UTC), self._settings.partitions_ahead_months
        )
        return False

    # -- ingest ---------------------------------------------------------------------------

    def _check_size(self, batch: pb.ReadingBatch) -> None:
        limit = self._settings.max_batch_readings
        if len(batch.readings) > limit:
            raise ValidationError.single(
                "batch.readings",
                f"must hold at most {limit} readings (got {len(batch.readings)}); split the batch",
            )

    async def ingest(self, org_id: UUID, batch: pb.ReadingBatch) -> pb.ReadingBatchAck:
        """Validates, stores and commits one batch; the ack for it."""
        readings = batch.readings
        meters = await self.meters.lookup(org_id, {r.meter_id for r in readings})
        now_us = int(time.time() * _US)
        checked = validate_batch(readings, meters, now_us, self._max_future_us)
        rejected = list(checked.rejected)
        inserted = updated = written = 0
        if checked.rows:
            stamps = [row[2] for row in checked.rows]
            await self.partitions.ensure_range(min(stamps), max(stamps))
            optimistic = True
            for attempt in range(3):
                try:
                    async with self._pool.acquire() as conn, conn.transaction():
                        rows, register_rejects, fresh = await self._register_check(conn, checked)
                        fresh += await self._fresh_intervals(conn, checked)
                        if rows:
                            by_id = {info.id: info for info in checked.row_meter}
                            result = await write_rows(
                                conn, org_id, rows, by_id, fresh if optimistic else ()
                            )
                            inserted, updated = result.inserted, result.updated
                        written = len(rows)
                    break
                except asyncpg.UniqueViolationError:
                    # A concurrent batch stored keys we took for new: upsert everything.
                    log.info("ingest raced a concurrent writer; retrying with the upsert")
                    if not optimistic:
                        raise
                    optimistic = False
                except RETRYABLE:
                    if attempt == 2:
                        raise
                    optimistic = False
                    log.info("ingest transaction conflicted; retrying")
                except asyncpg.UndefinedTableError:
                    # The backend lost its staging table (a new connection reusing a pid);
                    # write_rows forgot it, so the retry creates it.
                    if attempt == 2:
                        raise
            rejected.extend(register_rejects)
            rejected.sort()
        ack = pb.ReadingBatchAck(
            batch_id=batch.batch_id,
            accepted_count=inserted,
            corrected_count=updated + checked.in_batch_corrections,
            duplicate_count=written - inserted - updated + checked.in_batch_duplicates,
            rejected_count=len(rejected),
        )
        if rejected:
            ack.rejected.extend(
                pb.RejectedReading(
                    index=index, reason=REASON_TO_PROTO[reason], description=_REASON_TEXTS[reason]
                )
                for index, reason in rejected
            )
        return ack

    async def _fresh_intervals(
        self, conn: asyncpg.Connection, checked: ValidatedBatch
    ) -> list[tuple[UUID, int]]:
        """Interval groups with nothing stored in their range yet (plain-insert candidates).

        Worth one probe per group only when groups are long runs of intervals.
        """
        groups = checked.intervals
        if not groups or len(groups) * FRESH_PROBE_MIN_RUN > len(checked.rows):
            return []
        return await unoccupied(
            conn, [(meter, flow, span[0], span[1]) for (meter, flow), span in groups.items()]
        )

    async def _register_check(
        self, conn: asyncpg.Connection, checked: ValidatedBatch
    ) -> tuple[
        list[tuple[UUID, int, int, float]],
        list[tuple[int, RejectReason]],
        list[tuple[UUID, int]],
    ]:
        """The rows that keep every register monotonic, the rejections of the others, and
        the (meter, flow) groups with nothing stored from their first timestamp on."""
        rows = checked.rows
        if not checked.registers:
            return rows, [], []
        groups = list(checked.registers.items())
        await lock_register_meters(conn, sorted({meter_id for (meter_id, _), _ in groups}))
        bounds = []
        for (meter_id, flow), positions in groups:
            stamps = [rows[p][2] for p in positions]
            bounds.append((meter_id, flow, min(stamps), max(stamps)))
        stored, appends = await stored_neighbours(
            conn, bounds, self._settings.register_check_window_days
        )
        fresh = [key for (key, _), append in zip(groups, appends, strict=True) if append]
        dropped: set[int] = set()
        for (_, positions), around in zip(groups, stored, strict=True):
            candidates = [(rows[p][2], rows[p][3]) for p in positions]
            for bad in check_register_group(candidates, around):
                dropped.add(positions[bad])
        if not dropped:
            return rows, [], fresh
        kept = [row for position, row in enumerate(rows) if position not in dropped]
        rejects = [(checked.row_index[p], RejectReason.REGISTER_DECREASED) for p in dropped]
        return kept, rejects, fresh

    async def StreamReadings(
        self, request_iterator: AsyncIterator[pb.StreamReadingsRequest], context: Any
    ) -> AsyncIterator[pb.StreamReadingsResponse]:
        org_id = current_principal().org_id
        depth = max(1, self._settings.stream_pipeline_depth)
        # Bounded: the reader stops taking batches while `depth` are waiting for their ack.
        pending: asyncio.Queue[asyncio.Task[pb.ReadingBatchAck] | BaseException | None] = (
            asyncio.Queue(maxsize=depth)
        )

        async def read() -> None:
            try:
                async for request in request_iterator:
                    self._check_size(request.batch)
                    task = asyncio.create_task(self.ingest(org_id, request.batch))
                    self._orphans.add(task)
                    task.add_done_callback(self._orphans.discard)
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
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def IngestReadings(
        self, request: pb.IngestReadingsRequest, context: Any
    ) -> pb.IngestReadingsResponse:
        self._check_size(request.batch)
        ack = await self.ingest(current_principal().org_id, request.batch)
        return pb.IngestReadingsResponse(ack=ack)

    # -- reading back ---------------------------------------------------------------------

    async def _meter(self, org_id: UUID, meter_id: UUID) -> MeterInfo:
        info = (await self.meters.lookup(org_id, [str(meter_id)])).get(str(meter_id))
        if info is None:
            raise NotFoundError("meter", str(meter_id))
        return info

    async def ListReadings(
        self, request: pb.ListReadingsRequest, context: Any
    ) -> pb.ListReadingsResponse:
        meter_id = parse_uuid(request.meter_id, "meter_id")
        if not request.HasField("start_time"):
            raise ValidationError.single("start_time", "is required")
        if not request.HasField("end_time"):
            raise ValidationError.single("end_time", "is required")
        start = from_timestamp(request.start_time, "start_time")
        end = from_timestamp(request.end_time, "end_time")
        if end <= start:
            raise ValidationError.single("end_time", "must be after start_time")
        if end - start > MAX_LIST_RANGE:
            raise ValidationError.single("end_time", "must be at most 31 days after start_time")
        info = await self._meter(current_principal().org_id, meter_id)
        tz, resolution = info.timezone, info.resolution
        # A register at the end of the last interval is needed to difference it.
        upper = resolution.ceil(end, tz)
        rows = await fetch_range(self._pool, meter_id, start, upper)
        response = pb.ListReadingsResponse()
        field = "interval_wh" if info.load_profile else "register_wh"
        for row in rows:
            if row["ts"] < end:
                reading = response.readings.add(
                    meter_id=str(meter_id),
                    timestamp=to_timestamp(row["ts"]),
                    flow=PROTO_FLOW_BY_CODE[row["flow"]],
                )
                setattr(reading, field, row["value_wh"])
        for flow in (1, 2):
            points = [row for row in rows if row["flow"] == flow]
            if info.load_profile:
                intervals = [
                    (row["ts"], row["value_wh"] * info.transformer_factor)
                    for row in points
                    if row["ts"] < end
                ]
            else:
                intervals = [
                    (i.interval_start, i.energy_wh)
                    for i in registers_to_intervals(
                        [RegisterPoint(row["ts"], row["value_wh"]) for row in points],
                        resolution,
                        tz,
                        info.transformer_factor,
                    )
                    if start <= i.interval_start < end
                ]
            for interval_start, energy in intervals:
                response.intervals.add(
                    interval_start=to_timestamp(interval_start),
                    energy_wh=energy,
                    flow=PROTO_FLOW_BY_CODE[flow],
                )
        return response

    async def WatchReadings(
        self, request: pb.WatchReadingsRequest, context: Any
    ) -> AsyncIterator[pb.WatchReadingsResponse]:
        org_id = current_principal().org_id
        which = request.WhichOneof("filter")
        site_id: UUID | None = None
        meter_id: UUID | None = None
        if which == "meter_id":
            meter_id = parse_uuid(request.meter_id, "meter_id")
            site_id = (await self._meter(org_id, meter_id)).site_id
        elif which == "site_id":
            site_id = parse_uuid(request.site_id, "site_id")
            exists = await self._pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM sites WHERE id = $1 AND org_id = $2)",
                site_id,
                org_id,
            )
            if not exists:
                raise NotFoundError("site", str(site_id))
        else:
            raise ValidationError.single("site_id", "site_id or meter_id is required")
        site_text = str(site_id)

        def matches(event: dict[str, Any]) -> bool:
            sites = event.get("sites")
            return sites is None or site_text in sites

        subscription = await self._hub.subscribe(
            READINGS_CHANNEL, str(org_id), self._settings.readings_watch_buffer_size, matches
        )
        try:
            # Headers first, so a client knows it is subscribed before any reading exists.
            await context.send_initial_metadata(())
            async for event in subscription:
                rows = await fetch_ingested(
                    self._pool,
                    org_id,
                    int(event["ingest"]),
                    datetime.fromisoformat(event["from"]),
                    datetime.fromisoformat(event["to"]),
                    None if meter_id is not None else site_id,
                    meter_id,
                )
                if not rows:
                    continue
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
                yield response
        finally:
            subscription.close()
            self.watch_peak_buffered = max(self.watch_peak_buffered, subscription.peak_buffered)
