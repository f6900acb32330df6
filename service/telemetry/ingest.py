"""The ingest path of one readings batch: validate, check registers, write, commit.

:meth:`Ingest.ingest` takes the readings of a batch (``openvpp.v1.Reading`` messages, read
field by field on the hot path without converting each) and returns an
:class:`IngestResult` once the batch's transaction has COMMITTED: nothing acknowledged is
lost. One batch is one transaction:

1. every reading is validated against its meter's cached context (``validate_batch``);
2. the months it touches have partitions;
3. in one transaction: the batch's meters are locked (a meter deleted since it was cached
   is found gone, one whose dates or site grid changed is found changed), register meters
   are checked against their stored neighbours (a register may never go backwards),
   interval groups with nothing stored are found, and the rows are written
   (:func:`service.telemetry.store.write_rows`);
4. a conflict with a concurrent writer is retried, at most three attempts: a unique
   violation on the plain-COPY path (someone stored keys we took for new) retries through
   the upsert; a deadlock or serialization failure retries the whole transaction;
5. a batch naming meters found gone or changed rolls back and is validated again without
   them or on their new context.

On a stream, batches are validated concurrently, but a batch's write (step 3 on) waits for
the batches that arrived before it naming one of its meters, on this stream or another
(:class:`WriteOrder`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg

from service.common.errors import ConcurrentChangeError, NotFoundError, ValidationError
from service.config import Settings
from service.events.channels import METER_CHANGED_CHANNEL, SITE_EVENTS_CHANNEL
from service.events.hub import EventHub
from service.events.payloads import event_org
from service.identifiers.ids import MeterId, OrgId
from service.observability import ServiceMetrics
from service.telemetry.domain import RejectReason
from service.telemetry.store import (
    RETRYABLE,
    MeterCache,
    Partitions,
    Row,
    context_changed,
    lock_meters,
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

_US = 1_000_000
_ATTEMPTS = 3
# Average readings per interval group from which probing for plain inserts pays off.
FRESH_PROBE_MIN_RUN = 10


# The outcomes the readings counter is labelled with (committed batches only).
_ACCEPTED = {"outcome": "accepted"}
_CORRECTED = {"outcome": "corrected"}
_DUPLICATE = {"outcome": "duplicate"}
_REJECTED = {"outcome": "rejected"}


@dataclass(frozen=True)
class IngestResult:
    """What a committed batch did; ``rejected`` is (index in the batch, reason), ascending."""

    accepted: int
    corrected: int
    duplicates: int
    rejected: list[tuple[int, RejectReason]]


class MetersGoneError(Exception):
    """Meters of a batch no longer exist; raised inside its transaction, which rolls back."""

    def __init__(self, meter_ids: set[UUID]) -> None:
        super().__init__(f"{len(meter_ids)} meters of the batch were deleted")
        self.meter_ids = meter_ids


class MetersChangedError(Exception):
    """Meters of a batch were validated on a cached context (dates, site grid) that an
    update has changed since; raised inside its transaction, which rolls back."""

    def __init__(self, meter_ids: set[UUID]) -> None:
        super().__init__(f"{len(meter_ids)} meters of the batch changed since they were cached")
        self.meter_ids = meter_ids


class WriteOrder:
    """The order of the writes of the server's batches (streamed or unary): a batch writes
    only once every batch of its organization that arrived before it naming one of its
    meters has finished (committed or failed).

    A stream's batches run concurrently, each in its own transaction. Without an order, a
    batch held up in its transaction (another writer holding one of its meters) could
    commit after a later batch of the stream and "correct" a key back to its older value:
    the value the client sent last would be lost while both acks report success. The same
    goes for a batch whose stream broke before its ack: it still runs to its commit, while
    the client, reconnected, sends its later values on a new stream or by IngestReadings.
    So the order is one per server rather than per stream, and kept per (organization,
    meter): another organization naming a meter id cannot hold up its owner's batches.
    Ordering by meter rather than by batch keeps batches with no meter in common writing in
    parallel (as in the benchmark's default layout, where consecutive batches name other
    meters).

    A batch waits before it takes a connection and holds no transaction or lock while it
    waits, and only for batches that arrived before it, so the wait can deadlock neither
    with the database nor with other batches. Another replica's batches are not ordered
    with these: a client that reconnects elsewhere while its old batch is held up races it.
    """

    def __init__(self) -> None:
        # (Organization, meter) -> the turn of the latest batch naming it not yet finished.
        self._latest: dict[tuple[str, UUID], WriteTurn] = {}

    def enter(self, org_id: str, readings: Sequence[Any]) -> WriteTurn:
        """The turn of a batch of ``org_id``'s, called as it arrives (a stream's batches in
        stream order)."""
        keys: set[tuple[str, UUID]] = set()
        for text in {r.meter_id for r in readings}:
            # Not a UUID: UNKNOWN_METER, never written. Parsed, every spelling of an id is
            # one meter.
            with contextlib.suppress(ValueError):
                keys.add((org_id, UUID(text)))
        turn = WriteTurn(self, keys)
        for key in keys:
            earlier = self._latest.get(key)
            if earlier is not None:
                turn.after.add(earlier.finished)
            self._latest[key] = turn
        return turn

    def _forget(self, turn: WriteTurn) -> None:
        # Bounded by the meters of the batches in flight, not by those ever sent.
        for key in turn.keys:
            if self._latest.get(key) is turn:
                del self._latest[key]


class WriteTurn:
    """One batch's place in the :class:`WriteOrder`."""

    def __init__(self, order: WriteOrder, keys: set[tuple[str, UUID]]) -> None:
        self._order = order
        self.keys = keys
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.after: set[asyncio.Future[None]] = set()

    async def wait(self) -> None:
        """Until the earlier batches this one must write after have finished."""
        if self.after:
            await asyncio.wait(self.after)

    def finish_with(self, task: asyncio.Task[Any]) -> None:
        """Lets the batches after this one write once ``task`` (the batch's ingest) ends,
        however it ends (also cancelled before it ran), and the batches this one was to
        write after have finished too.

        The second condition makes the order transitive: a later batch waits only for the
        latest earlier one naming its meter, and that one may end without having waited
        (all its readings rejected, a failure before its write). Its end alone would let
        the later batch overtake a still earlier one held up in its transaction.
        """
        task.add_done_callback(self._task_done)

    def _task_done(self, _task: asyncio.Task[Any]) -> None:
        waiting = [earlier for earlier in self.after if not earlier.done()]
        if not waiting:
            self._finish()
            return
        remaining = [len(waiting)]

        def earlier_done(_earlier: asyncio.Future[None]) -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                self._finish()

        for earlier in waiting:
            earlier.add_done_callback(earlier_done)

    def _finish(self) -> None:
        self.finished.set_result(None)
        self._order._forget(self)


class Ingest:
    """Batches in, committed results out; owns the meter cache and the partitions."""

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
        self._readings_counter = None if metrics is None else metrics.readings
        self.meters = MeterCache(pool, settings.meter_cache_seconds)
        self.partitions = Partitions(pool)
        self._max_future_us = int(settings.max_future_seconds * _US)

    async def start(self) -> None:
        await self.partitions.load()
        await self.maintain_partitions()
        await self._hub.listen(METER_CHANGED_CHANNEL, self.meters.forget_org)
        await self._hub.listen(SITE_EVENTS_CHANNEL, self._site_changed)
        self._hub.on_reset(self.meters.forget_all)

    def _site_changed(self, payload: str) -> None:
        # A site's timezone or resolution changes the grid of all its meters.
        org_id = event_org(payload)
        if org_id is None:
            self.meters.forget_all()
        else:
            self.meters.forget_org(org_id)

    async def maintain_partitions(self) -> bool:
        """A worker pass: readings partitions exist ahead of time (a failure is retried)."""
        await self.partitions.ensure_ahead(
            datetime.now(UTC), self._settings.partitions_ahead_months
        )
        return False

    def check_size(self, count: int) -> None:
        limit = self._settings.max_batch_readings
        if count > limit:
            raise ValidationError.single(
                "batch.readings",
                f"must hold at most {limit} readings (got {count}); split the batch",
            )

    async def meter(self, org_id: OrgId, meter_id: MeterId) -> MeterInfo:
        """The cached context of one of ``org_id``'s meters; NotFoundError otherwise."""
        info = (await self.meters.lookup(org_id, [str(meter_id)])).get(str(meter_id))
        if info is None:
            raise NotFoundError("meter", str(meter_id))
        return info

    async def ingest(self, org_id: OrgId, readings: Sequence[Any], turn: WriteTurn) -> IngestResult:
        """Validates, stores and commits one batch; returns only after COMMIT.

        The write waits for the batch's ``turn`` in the server's write order; the caller
        ends the turn when this call ends (:meth:`WriteTurn.finish_with`).
        """
        gone: set[UUID] = set()
        site_retried = False
        changes_met = 0
        while True:
            try:
                result = await self._ingest_once(org_id, readings, gone, turn)
                if self._readings_counter is not None:
                    self._count(result)
                return result
            except MetersChangedError as error:
                # Updated after they were cached (the NOTIFY not yet seen here): judged
                # again on what is stored now, as if the batch had come after the update
                # (which it did, if its client waited for the update's answer). The meters
                # are locked once found, so only an update in the moment between loading
                # and locking them changes them again.
                changes_met += 1
                if changes_met == _ATTEMPTS:
                    raise ConcurrentChangeError(str(error)) from None
                log.info("ingest met meters updated meanwhile; validating the batch again")
                self.meters.forget_meters(str(org_id), error.meter_ids)
            except MetersGoneError as error:
                # Meters of the batch were deleted after they were cached (the NOTIFY not
                # yet seen here): the batch rolled back before writing. Judged again without
                # them, their readings are UNKNOWN_METER and the others are stored, as if
                # the batch had come after the deletion. Each round drops at least one
                # meter, so this ends.
                log.info("ingest met meters deleted meanwhile; validating the batch again")
                gone |= error.meter_ids
                self.meters.forget_meters(str(org_id), error.meter_ids)
            except asyncpg.ForeignKeyViolationError:
                # A site of the batch was deleted after its meters were cached (its NOTIFY
                # not yet seen here): the batch rolled back whole. Judged again on fresh
                # meters, that site's readings are UNKNOWN_METER and the others are stored.
                if site_retried:
                    raise
                site_retried = True
                log.info("ingest met a site deleted meanwhile; validating the batch again")
                self.meters.forget_org(str(org_id))

    def _count(self, result: IngestResult) -> None:
        counter = self._readings_counter
        assert counter is not None
        for attributes, count in (
            (_ACCEPTED, result.accepted),
            (_CORRECTED, result.corrected),
            (_DUPLICATE, result.duplicates),
            (_REJECTED, len(result.rejected)),
        ):
            if count:
                counter.add(count, attributes)

    async def _ingest_once(
        self, org_id: OrgId, readings: Sequence[Any], gone: set[UUID], turn: WriteTurn
    ) -> IngestResult:
        meters = await self.meters.lookup(org_id, {r.meter_id for r in readings})
        if gone:
            meters = {
                text: None if info is None or info.id in gone else info
                for text, info in meters.items()
            }
        checked = validate_batch(readings, meters, int(time.time() * _US), self._max_future_us)
        rejected = list(checked.rejected)
        inserted = updated = written = 0
        in_batch_duplicates = checked.in_batch_duplicates
        in_batch_corrections = checked.in_batch_corrections
        if checked.rows:
            await self.partitions.ensure_for([row[2] for row in checked.rows])
            await turn.wait()
            written, inserted, updated, register_rejects = await self._write_with_retries(
                org_id, checked
            )
            rejected.extend(register_rejects)
            rejected.sort()
            if checked.superseded and register_rejects:
                # Readings superseded in the batch by one refused are refused with it: each
                # reading is counted once, and only for what was stored.
                was_duplicate = dict(checked.superseded_by(checked.superseded))
                for index, _ in register_rejects:
                    duplicate = was_duplicate.get(index)
                    if duplicate is not None:
                        in_batch_duplicates -= duplicate
                        in_batch_corrections -= not duplicate
        return IngestResult(
            accepted=inserted,
            corrected=updated + in_batch_corrections,
            duplicates=written - inserted - updated + in_batch_duplicates,
            rejected=rejected,
        )

    async def _write_with_retries(
        self, org_id: OrgId, checked: ValidatedBatch
    ) -> tuple[int, int, int, list[tuple[int, RejectReason]]]:
        """(rows written, inserted, updated, register rejections) of the committed attempt."""
        optimistic = True
        for attempt in range(_ATTEMPTS):
            last = attempt == _ATTEMPTS - 1
            try:
                return await self._write_once(org_id, checked, optimistic)
            except asyncpg.UniqueViolationError:
                # A concurrent batch stored keys we took for new: upsert everything.
                log.info("ingest raced a concurrent writer; retrying with the upsert")
                if not optimistic or last:
                    raise
                optimistic = False
            except RETRYABLE:
                if last:
                    raise
                optimistic = False
                log.info("ingest transaction conflicted; retrying")
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _write_once(
        self, org_id: OrgId, checked: ValidatedBatch, optimistic: bool
    ) -> tuple[int, int, int, list[tuple[int, RejectReason]]]:
        # Each context validation used: a meter named in two spellings of its id may have
        # one cached before an update and one after.
        contexts = list({id(info): info for info in checked.row_meter}.values())
        by_id = {info.id: info for info in contexts}
        async with self._pool.acquire() as conn, conn.transaction():
            await self._lock_meters(conn, org_id, checked, contexts)
            rows, register_rejects, fresh = await self._register_check(conn, checked)
            fresh += await self._fresh_intervals(conn, checked)
            inserted = updated = 0
            if rows:
                result = await write_rows(conn, org_id, rows, by_id, fresh if optimistic else ())
                inserted, updated = result.inserted, result.updated
        return len(rows), inserted, updated, register_rejects

    async def _lock_meters(
        self,
        conn: asyncpg.Connection,
        org_id: OrgId,
        checked: ValidatedBatch,
        validated_on: list[MeterInfo],
    ) -> None:
        """Holds the batch's meters until COMMIT; MetersGoneError when some were deleted,
        MetersChangedError when some were validated on a context no longer theirs."""
        registers = {meter_id for meter_id, _ in checked.registers}
        # A meter is locked once, the stronger way if it is in both.
        profiles = {meter_id for meter_id, _ in checked.intervals} - registers
        present = await lock_meters(conn, org_id, list(registers), list(profiles))
        if len(present) < len(registers) + len(profiles):
            raise MetersGoneError((registers | profiles) - present.keys())
        changed = {info.id for info in validated_on if context_changed(info, present[info.id])}
        if changed:
            raise MetersChangedError(changed)

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
    ) -> tuple[list[Row], list[tuple[int, RejectReason]], list[tuple[UUID, int]]]:
        """The rows that keep every register monotonic, the rejections of the others, and
        the (meter, flow) groups with nothing stored from their first timestamp on."""
        rows = checked.rows
        if not checked.registers:
            return rows, [], []
        # Locked by _lock_meters: no concurrent batch stores these registers before COMMIT.
        groups = list(checked.registers.items())
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
        # With the readings of their keys the batch superseded: nothing of those is stored.
        rejects = [(checked.row_index[p], RejectReason.REGISTER_DECREASED) for p in dropped]
        rejects.extend(
            (index, RejectReason.REGISTER_DECREASED)
            for index, _ in checked.superseded_by(sorted(dropped))
        )
        return kept, rejects, fresh
