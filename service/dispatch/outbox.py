"""The delivery worker: claims due setpoints from the outbox and sends them.

The outbox is the ``setpoints`` table itself: a row with ``next_attempt_at`` set has
something to deliver (the setpoint, or the cancellation of an ACCEPTED one). A worker pass:

1. **claims** due rows in one short transaction: ``FOR UPDATE SKIP LOCKED`` (two replicas
   never take the same row) and a lease (``lease_owner``, ``lease_expires_at`` =
   now + ``OPENVPP_DISPATCH_LEASE_SECONDS``), committed before anything is sent. While the
   lease lasts no other worker claims the row; once it expired (the holder crashed, was
   killed, lost its database) any worker takes it again, so every setpoint reaches a terminal
   state. Leases are set and judged by the database's clock, never a replica's: a replica
   whose clock runs ahead would otherwise take live leases from the others. The site's
   eligibility is re-checked in the same statement (NOT_ELIGIBLE with the status that made
   it so), as are the resource's power bounds (changed since, they may no longer hold the
   setpoint's power: NOT_ELIGIBLE too), cancellation and the window's end;
2. **sends** each remaining row concurrently through the
   :class:`~service.dispatch.delivery.WebhookSender` (its global and per-host limits and
   circuit breakers), at most ``OPENVPP_DISPATCH_MAX_IN_FLIGHT`` at a time per replica. A
   row that waited for its slots (towards its endpoint, and the global one) longer than
   ``OPENVPP_DISPATCH_RECHECK_AFTER_SECONDS`` since its last check is checked again once
   it holds them, right before it is sent (cancellation, eligibility, window; under lock,
   in one transaction for the queue's stale head), and one whose lease was lost meanwhile
   is not sent at all. Nor is one whose lease was last renewed so long ago that it may
   lapse before the request could end (a lease less one request timeout, or half a lease
   when the lease is shorter than two; this worker cannot reach the database, others may):
   another worker may own it by then. It is handed back to the outbox once the database
   answers again. Whatever a worker still has of a claim whose lease may have lapsed, its
   own claims do not take that setpoint again until that is settled;
3. **records** finished attempts in batches, one transaction per batch: each row is
   re-read under lock (a CancelDispatch during the attempt is seen), its attempt stored, its
   next state set by :func:`service.dispatch.domain.after_attempt`, and only while this
   worker still holds its lease.

A commit whose answer never arrives (the connection dropped during it) may have gone
through. Whatever such a claim or re-check may have leased or settled is not sent: it is
handed back to the outbox once the database answers. Such a record is made again, storing
each attempt once.

A delivery is thus at least once: a worker killed after the partner's 2xx but before its
record commits is retried by another one with the same ``webhook-id`` (the setpoint's id),
which Standard Webhooks receivers use to drop duplicates.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple
from uuid import UUID

import asyncpg

from service.auth.store import IdentityStore
from service.common.clock import Clock
from service.common.loglimit import LogLimiter, error_key, held_back
from service.common.tasks import cancel_and_wait
from service.config import Settings, refuse_broken_values
from service.dispatch.delivery import (
    AttemptOutcome,
    Delivery,
    DeliverySettings,
    OutcomeKind,
    WebhookSender,
    retry_delay_seconds,
)
from service.dispatch.domain import (
    CancellationState,
    OutboxRow,
    Outcome,
    SetpointState,
    Settled,
    SiteEligibility,
    after_attempt,
    before_attempt,
    check_transition,
    format_power,
    ineligibility,
    outside_bounds,
    unsendable,
)
from service.dispatch.store import SetpointChange, notify_setpoint_changes, wake_outbox
from service.observability import ServiceMetrics
from service.registry.domain import SiteStatus
from service.upstream.domain import UpstreamStatus

log = logging.getLogger(__name__)

# What eligibility is judged by (``_not_eligible``): a setpoint's site and resource (their
# statuses, and the resource's power bounds as they are now), as the claim and the re-check
# of a queued setpoint both read them.
_ELIGIBILITY_COLUMNS = """
    si.id IS NOT NULL AS site_exists, si.status AS site_status, si.paused AS site_paused,
    si.upstream_status, r.id IS NOT NULL AS resource_exists, r.webhook_url,
    r.power_min_kw, r.power_max_kw"""
_ELIGIBILITY_JOINS = """
    LEFT JOIN sites si ON si.id = sp.site_id AND si.org_id = sp.partner_org_id
    LEFT JOIN resources r ON r.id = sp.resource_id AND r.site_id = sp.site_id"""

# The due rows are taken first, on the setpoints table alone, and only the taken ones are
# joined (by key, one lookup each: the OFFSET 0 keeps each join a lookup per row). Joined
# before the LIMIT, a plan that misjudged how many rows are due joined and sorted every due
# row on each claim: 10,000 rows for a claim of 32 (loadtest/dispatch_bench.py, round 1).
_CLAIM_SQL = f"""
WITH due AS (
    SELECT sp.id, sp.state AS claimed_state,
        -- An expired lease still naming its owner: that worker never recorded its attempt.
        sp.lease_owner IS NOT NULL AS unrecorded_claim
    FROM setpoints sp
    WHERE sp.next_attempt_at IS NOT NULL AND sp.next_attempt_at <= $1
      AND (sp.lease_expires_at IS NULL OR sp.lease_expires_at <= now())
      -- Never what this worker holds itself, even with its lease lapsed (renewals failed
      -- while the database was away): it is queued or in flight here, and would go twice.
      AND sp.lease_owner IS DISTINCT FROM $3
      -- Nor what it still has anything of from a claim whose lease may have lapsed since
      -- (queued, in flight, unrecorded, let go and not handed back): another worker may
      -- have taken such a row and let it go again, and a new claim here would run beside
      -- what the old one left (see OutboxDeliverer._maybe_taken_over).
      AND NOT (sp.id = ANY ($5::uuid[]))
    ORDER BY sp.next_attempt_at
    LIMIT $2
    FOR UPDATE OF sp SKIP LOCKED
), claimed AS (
    UPDATE setpoints s SET lease_owner = $3, lease_expires_at = now() + $4::interval,
        -- A claimed PENDING row is being delivered; the few that must not be sent are
        -- settled otherwise in the same transaction.
        state = CASE WHEN s.state = 'pending' THEN 'delivering' ELSE s.state END
    FROM due
    -- The id list makes the rows to update an index lookup (a join to the CTE alone was
    -- planned as a scan of the whole table).
    WHERE s.id = ANY (ARRAY(SELECT id FROM due)) AND s.id = due.id
    RETURNING s.id, s.dispatch_id, s.operator_org_id, s.partner_org_id, s.site_id,
        s.resource_id, s.power_kw, s.start_time, s.end_time, due.claimed_state AS state,
        s.reason, s.attempt_count, s.cancel_requested_at, s.cancellation_state,
        s.cancellation_attempt_count, due.unrecorded_claim
)
SELECT sp.*, {_ELIGIBILITY_COLUMNS},
    si.external_id AS site_external_id, r.external_id AS resource_external_id, d.traceparent
FROM claimed sp
LEFT JOIN LATERAL (
    SELECT * FROM sites WHERE id = sp.site_id AND org_id = sp.partner_org_id OFFSET 0
) si ON true
LEFT JOIN LATERAL (
    SELECT * FROM resources WHERE id = sp.resource_id AND site_id = sp.site_id OFFSET 0
) r ON true
LEFT JOIN LATERAL (SELECT traceparent FROM dispatches WHERE id = sp.dispatch_id OFFSET 0) d
    ON true
"""

# Set in the claim's and the re-check's transactions: their statements are planned for the
# tables as they are at each execution. A plan PostgreSQL cached for the claim while the table
# was empty (every poll of an idle service runs it) scanned and joined the whole table once it
# held a dispatch: until the next ANALYZE, a claim of 32 due rows of 10,000 cost the database
# 40-50 ms instead of 2. Planning at each execution costs well under a millisecond a claim.
# Not in the record's transaction: there it would plan the attempts' foreign key check
# afresh for every row inserted.
_PLAN_FOR_THE_TABLE_AS_IT_IS = "SET LOCAL plan_cache_mode = force_custom_plan"

# A claimed setpoint that waited for a free slot towards its endpoint is looked at again
# before it is sent: what the claim checked may have changed meanwhile.
_RECHECK_SQL = f"""
SELECT sp.id, sp.state, sp.reason, sp.attempt_count, sp.power_kw, sp.end_time,
    sp.cancel_requested_at, sp.cancellation_state, sp.cancellation_attempt_count,
    {_ELIGIBILITY_COLUMNS}
FROM setpoints sp {_ELIGIBILITY_JOINS}
WHERE sp.id = ANY($1::uuid[]) AND sp.lease_owner = $2
ORDER BY sp.id
FOR UPDATE OF sp
"""

_RELOCK_SQL = """
SELECT id, state, reason, attempt_count, end_time, cancel_requested_at, cancellation_state,
    cancellation_attempt_count
FROM setpoints WHERE id = ANY($1::uuid[]) AND lease_owner = $2
ORDER BY id
FOR UPDATE
"""

# Only for rows this transaction holds locked with its lease checked (claimed by it, or
# re-read by _RELOCK_SQL): the lease cannot change under the lock. A lease condition here
# made the planner expect one row and rescan the arrays once per row updated.
_APPLY_SQL = """
UPDATE setpoints s SET state = c.state, reason = c.reason, attempt_count = c.attempt_count,
    next_attempt_at = c.next_attempt_at, cancellation_state = c.cancellation_state,
    cancellation_attempt_count = c.cancellation_attempt_count,
    lease_owner = CASE WHEN c.release THEN NULL ELSE s.lease_owner END,
    lease_expires_at = CASE WHEN c.release THEN NULL ELSE s.lease_expires_at END,
    updated_at = clock_timestamp()
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::timestamptz[], $6::text[],
            $7::int[], $8::bool[])
    AS c (id, state, reason, attempt_count, next_attempt_at, cancellation_state,
          cancellation_attempt_count, release)
WHERE s.id = ANY ($1::uuid[]) AND s.id = c.id
"""

# Setpoints a worker holds and will not send, back to the outbox. One whose earlier claim's
# attempt is unrecorded keeps naming an owner (a fresh id, no worker's) with its lease
# expired: the next claim, by any worker, then counts that attempt.
_HAND_BACK_SQL = """
UPDATE setpoints s SET
    lease_owner = CASE WHEN s.id = ANY ($3::uuid[]) THEN gen_random_uuid() END,
    lease_expires_at = CASE WHEN s.id = ANY ($3::uuid[]) THEN now() END
-- Locked in id order, as CancelDispatch and the record lock a dispatch's rows: in the
-- order of a scan, a hand-back beside a CancelDispatch of the same dispatch could deadlock.
FROM (SELECT id FROM setpoints WHERE id = ANY ($1::uuid[]) AND lease_owner = $2
      ORDER BY id FOR UPDATE) held
WHERE s.id = held.id
"""

_ATTEMPTS_SQL = """
INSERT INTO setpoint_attempts (setpoint_id, attempt_time, cancellation, http_status, error,
    latency_ms)
SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::bool[], $4::int[], $5::text[],
                     $6::float8[])
"""

# The same, leaving out what is already stored: the attempts of setpoints deleted meanwhile
# (their dispatch was deleted with its operator organization), and attempts a batch whose
# commit went unanswered (the connection dropped) stored after all. Used only after the plain
# insert broke the key or a batch's recording failed, since the lookups cost every attempt.
# An attempt is known by all it stored: two attempts of one setpoint alike in time, status,
# error and latency to the microsecond are one.
_ATTEMPTS_NOT_STORED_SQL = """
INSERT INTO setpoint_attempts (setpoint_id, attempt_time, cancellation, http_status, error,
    latency_ms)
SELECT a.* FROM unnest($1::uuid[], $2::timestamptz[], $3::bool[], $4::int[], $5::text[],
                       $6::float8[]) AS a (setpoint_id, attempt_time, cancellation,
                                           http_status, error, latency_ms)
WHERE EXISTS (SELECT 1 FROM setpoints s WHERE s.id = a.setpoint_id)
  AND NOT EXISTS (
    SELECT 1 FROM setpoint_attempts o
    WHERE o.setpoint_id = a.setpoint_id AND o.attempt_time = a.attempt_time
      AND o.cancellation = a.cancellation AND o.http_status IS NOT DISTINCT FROM a.http_status
      AND o.error = a.error AND o.latency_ms = a.latency_ms)
"""


# The transport's outcome kinds, as the domain names them.
_OUTCOME_OF = {kind: Outcome(kind.value) for kind in OutcomeKind}
_RETRIED = frozenset({Outcome.RETRYABLE, Outcome.CIRCUIT_OPEN})

# Rows of the first claim after idling (see OutboxDeliverer.step).
FIRST_CLAIM = 32
# Finished attempts are recorded together: up to this long is waited for this many.
RECORD_LINGER_SECONDS = 0.01
RECORD_BATCH = 200


@dataclass(frozen=True)
class OutboxSettings:
    """Every field is an ``OPENVPP_DISPATCH_*`` variable; see ``Settings`` and the README."""

    lease_seconds: float = 30.0
    max_attempts: int = 10
    claim_batch_size: int = 500
    max_in_flight: int = 512
    # A claimed setpoint still queued this long after its last check is checked again
    # (cancellation, eligibility, window) right before it is sent.
    recheck_after_seconds: float = 1.0
    # How often the worker looks for due retries and expired leases: nothing else wakes it
    # for them.
    poll_interval_seconds: float = 1.0

    def __post_init__(self) -> None:
        # Checked at start-up: each of these would stop deliveries without a word.
        refuse_broken_values(
            "DISPATCH",
            (
                ("lease_seconds", not self.lease_seconds > 0, "> 0"),
                ("max_attempts", self.max_attempts < 1, ">= 1"),
                ("claim_batch_size", self.claim_batch_size < 1, ">= 1"),
                ("max_in_flight", self.max_in_flight < 1, ">= 1"),
                ("recheck_after_seconds", not self.recheck_after_seconds >= 0, ">= 0"),
                (
                    "poll_interval_seconds",
                    not self.poll_interval_seconds > 0,
                    "> 0 (due retries and expired leases are found by it)",
                ),
            ),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> OutboxSettings:
        return cls(
            lease_seconds=settings.dispatch_lease_seconds,
            max_attempts=settings.dispatch_max_attempts,
            claim_batch_size=settings.dispatch_claim_batch_size,
            max_in_flight=settings.dispatch_max_in_flight,
            recheck_after_seconds=settings.dispatch_recheck_after_seconds,
            poll_interval_seconds=settings.dispatch_poll_interval_seconds,
        )


# Tuples, not frozen dataclasses: one of each is made per attempt, several times cheaper.
class Claimed(NamedTuple):
    setpoint_id: UUID
    row: OutboxRow
    delivery: Delivery
    # Whose setpoint it is and its state once claimed, for the change notification when the
    # attempt is recorded.
    change: SetpointChange
    # When cancellation, eligibility and the window were last checked (at the claim, or
    # again while it waited for a slot).
    checked_at: datetime


class Finished(NamedTuple):
    claimed: Claimed
    attempt_time: datetime
    outcome: AttemptOutcome


# The stored text of a state to the enum member: a dict lookup instead of an Enum call.
_SETPOINT_STATE_OF = {state.value: state for state in SetpointState}
_CANCELLATION_STATE_OF: dict[str | None, CancellationState | None] = {
    None: None,
    **{state.value: state for state in CancellationState},
}


def _outbox_row(row: asyncpg.Record, unrecorded_claim: bool = False) -> OutboxRow:
    return OutboxRow(
        _SETPOINT_STATE_OF[row["state"]],
        row["reason"],
        row["attempt_count"],
        row["end_time"],
        row["cancel_requested_at"] is not None,
        _CANCELLATION_STATE_OF[row["cancellation_state"]],
        row["cancellation_attempt_count"],
        unrecorded_claim,
    )


def _change(row: asyncpg.Record, state: SetpointState) -> SetpointChange:
    return SetpointChange(
        row["id"],
        row["dispatch_id"],
        row["site_id"],
        row["operator_org_id"],
        row["partner_org_id"],
        state.value,
    )


def _not_eligible(row: asyncpg.Record) -> str | None:
    reason = _ineligibility_of(
        row["site_exists"],
        row["resource_exists"],
        bool(row["webhook_url"]),
        row["site_status"],
        row["site_paused"],
        row["upstream_status"],
    )
    if reason is None:
        reason = outside_bounds(row["power_kw"], row["power_min_kw"], row["power_max_kw"])
    return reason


@functools.lru_cache(maxsize=256)
def _ineligibility_of(
    site_exists: bool,
    resource_exists: bool,
    has_webhook: bool,
    site_status: str | None,
    site_paused: bool | None,
    upstream_status: str | None,
) -> str | None:
    # Cached: a claim's rows share a handful of status combinations, and the verdict is a
    # pure function of them.
    if not site_exists:
        return "site deleted"
    if not resource_exists:
        return "resource deleted"
    if not has_webhook:
        return "resource has no webhook_url"
    # An existing site's columns are NOT NULL.
    assert site_status is not None
    assert upstream_status is not None
    return ineligibility(
        SiteEligibility(
            SiteStatus(site_status),
            bool(site_paused),
            UpstreamStatus(upstream_status),
        )
    )


@functools.lru_cache(maxsize=256)
def _iso(value: datetime) -> str:
    # Cached: the setpoints of one dispatch share their start and end.
    return value.isoformat().replace("+00:00", "Z")


def setpoint_body(row: Mapping[str, Any], cancellation: bool) -> bytes:
    """The JSON a partner receives. ``power_kw`` is a decimal string, or null in a
    cancellation (back to normal operation); either way the value holds until
    ``valid_until``, the window's end, after which the partner returns to normal operation
    without any further message.

    Written out rather than ``json.dumps`` of a dict (the same bytes, ``test_setpoint_body``
    checks it): it is made once per delivery, and only the external ids, which partners
    choose, need escaping; ids, instants and the power are ASCII without quotes.
    """
    end = _iso(row["end_time"])
    power = "null" if cancellation else f'"{format_power(row["power_kw"])}"'
    return (
        f'{{"type":"{"setpoint.cancelled" if cancellation else "setpoint"}",'
        f'"setpoint_id":"{row["id"]}","dispatch_id":"{row["dispatch_id"]}",'
        f'"site_id":"{row["site_id"]}","site_external_id":{_json_text(row["site_external_id"])},'
        f'"resource_id":"{row["resource_id"]}",'
        f'"resource_external_id":{_json_text(row["resource_external_id"])},'
        f'"start":"{_iso(row["start_time"])}","end":"{end}","power_kw":{power},'
        f'"valid_until":"{end}"}}'
    ).encode()


def _json_text(value: str | None) -> str:
    text = value or ""
    # Printable ASCII without a quote or backslash is what json.dumps leaves as it is;
    # anything else gets json.dumps' own escaping (ASCII, its default): the same bytes.
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text)


def delivery_id(setpoint_id: UUID, cancellation: bool) -> str:
    """Stable across retries (receivers drop duplicates by it); a cancellation is another
    message than its setpoint, so it has its own."""
    return f"{setpoint_id}.cancel" if cancellation else str(setpoint_id)


def _traceparent(dispatch_traceparent: str | None) -> str:
    """A fresh span id per attempt, in the dispatch's trace (or in a trace of its own when
    the dispatch was not traced)."""
    # Trace and span ids need to be unique, not secret: the non-cryptographic generator is
    # enough (OpenTelemetry's own id generator uses it) and several times cheaper per
    # delivery. All-zero is not a valid id.
    trace_id = _trace_id(dispatch_traceparent) or f"{random.getrandbits(128) or 1:032x}"
    return f"00-{trace_id}-{random.getrandbits(64) or 1:016x}-01"


@functools.lru_cache(maxsize=256)
def _trace_id(dispatch_traceparent: str | None) -> str | None:
    # Cached: the setpoints of one dispatch share it.
    if dispatch_traceparent and dispatch_traceparent.count("-") == 3:
        return dispatch_traceparent.split("-")[1]
    return None


async def _wake_if_due(
    conn: asyncpg.Connection, settled: Sequence[tuple[UUID, Settled, bool]], now: datetime
) -> None:
    """Wakes the delivery workers (at this transaction's commit) when something settled
    here is due again at once (a withdrawal to send), rather than at the next poll."""
    for _, verdict, _ in settled:
        if verdict.next_attempt_at is not None and verdict.next_attempt_at <= now:
            await wake_outbox(conn)
            return


class OutboxDeliverer:
    """One replica's delivery worker; ``step`` is run by a :class:`~service.common.worker.Worker`
    (woken by the outbox NOTIFY, and by a timer for retries and expired leases)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        identity: IdentityStore,
        clock: Clock,
        settings: OutboxSettings,
        delivery_settings: DeliverySettings,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._pool = pool
        self._identity = identity
        # Attempts by outcome, while metrics are on (one attribute set per kind, made once).
        self._attempts_counter = None if metrics is None else metrics.delivery_attempts
        self._outcome_attributes = {kind: {"outcome": kind.value} for kind in OutcomeKind}
        self._clock = clock
        self._settings = settings
        self._delivery_settings = delivery_settings
        self._recheck_after = timedelta(seconds=settings.recheck_after_seconds)
        self._sender = WebhookSender(delivery_settings, clock)
        self.owner = uuid.uuid4()
        # Claimed setpoints wait in a queue per endpoint; up to the per-host limit of lanes
        # (tasks) per endpoint take them one after another. One task per setpoint waiting for
        # a slot towards its endpoint cost twice the CPU per delivery.
        self._queues: dict[str, collections.deque[Claimed]] = {}
        self._lane_counts: dict[str, int] = {}
        self._lanes: set[asyncio.Task[None]] = set()
        # Claimed and not yet finished: queued or being sent.
        self._unfinished = 0
        # Setpoints claimed here whose attempt has not been recorded yet: their leases are
        # renewed while this worker lives (an attempt may wait for a slot towards a busy
        # endpoint longer than one lease), and expire soon after it dies. Each maps to when
        # its lease was last set (time.monotonic() before the claim or renewal that set it):
        # the database's lease runs at least ``lease_seconds`` from then.
        self._held: dict[UUID, float] = {}
        # Of those, the ones whose claim found an earlier claim's attempt unrecorded: never
        # let go of unrecorded (see stop), so that the next claim finds it out again.
        self._unrecorded: set[UUID] = set()
        # Claimed here, let go unsent because their leases may have lapsed (see
        # _abandon_if_lapsed), still leased to this worker in the database: released
        # as soon as the database answers again, since no claim of this worker takes its
        # own rows. True for the ones that were also unrecorded.
        self._abandoned: dict[UUID, bool] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._lease_log = LogLimiter(60.0)
        self._bug_log = LogLimiter(60.0)
        # A request may take up to its timeout: begun later than this after its lease was
        # last set, it could still be under way when the lease lapses and another worker
        # sends the same setpoint (with a lease too short for that, half of it is kept).
        self._send_before_lease_age = settings.lease_seconds - min(
            delivery_settings.timeout_seconds, settings.lease_seconds / 2
        )
        self._claim_batch = min(settings.claim_batch_size, settings.max_in_flight)
        # Claim in batches: with the pipeline nearly full, wait for a quarter of it to free
        # up rather than claiming a row or two per transaction.
        self._claim_low_water = max(1, self._claim_batch // 4)
        self._slot_freed = asyncio.Event()
        self._finished: list[Finished] = []
        self._finished_ready = asyncio.Event()
        self._recorder: asyncio.Task[None] | None = None
        # The setpoints of a batch whose recording failed (or was cut off), until one
        # records them: its commit may have gone through with the answer lost. Recorded
        # again, their attempts are stored only once; and their rows may be settled and
        # released already, so this worker must not claim them meanwhile (the new claim's
        # lease would take the old result).
        self._recorded_perhaps: set[UUID] = set()
        self._started = False
        # Attempts this replica made (tests and operators see each replica's share).
        self.attempts_sent = 0

    @property
    def in_flight(self) -> int:
        return self._unfinished

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        timeout = self._delivery_settings.timeout_seconds
        if self._settings.lease_seconds < 2 * timeout:
            # Accepted (tests and demos use short leases), but the guarantee is weaker: told.
            log.warning(
                "OPENVPP_DISPATCH_LEASE_SECONDS (%g) is less than twice"
                " OPENVPP_DISPATCH_TIMEOUT_SECONDS (%g): a request begun just before the"
                " lease renewals fail may outlast the lease, and another replica may then send"
                " the same setpoint while it is under way",
                self._settings.lease_seconds,
                timeout,
            )
        # A fresh identity per run: rows a stopped run could not let go of (the database was
        # away) are then claimable again, by this worker too, once their leases expire.
        self.owner = uuid.uuid4()
        await self._sender.start()
        self._recorder = asyncio.create_task(self._record_loop(), name="dispatch-recorder")
        self._renewer = asyncio.create_task(self._renew_loop(), name="dispatch-lease-renewal")

    async def stop(self) -> None:
        """Stops sending: attempts in flight are cancelled, finished ones recorded, and the
        rest of what this worker claimed is released for any worker to take at once."""
        if not self._started:
            return
        self._started = False
        # Cancelled for certain: a lane or loop whose cleanup raised in place of the
        # cancellation would otherwise go on (and this would wait for ever). Again while any
        # is left: a lane's re-check may start lanes as it ends.
        while self._lanes:
            await cancel_and_wait(self._lanes)
        self._queues.clear()
        self._lane_counts.clear()
        self._unfinished = 0
        await cancel_and_wait(task for task in (self._recorder, self._renewer) if task is not None)
        self._recorder = self._renewer = None
        # Attempts that could not be recorded keep their rows leased, like the ones below.
        unrecorded_attempts: set[UUID] = set()
        if self._finished:
            batch = self._take_finished()
            try:
                await self._record(batch, retried=bool(self._recorded_perhaps))
            except Exception:
                unrecorded_attempts = {item.claimed.setpoint_id for item in batch}
        # What was claimed here and not recorded goes back to the outbox now, rather than
        # when its lease expires (an attempt under way was cut off above and recorded as
        # one). Not a row whose earlier claim's attempt is still unrecorded: released, it
        # would look never sent; its lease expires instead, and the next claim sees why.
        releasable = self._held.keys() - self._unrecorded - unrecorded_attempts
        if releasable:
            with contextlib.suppress(Exception):
                await self._hand_back(releasable, ())
        if self._abandoned:
            with contextlib.suppress(Exception):
                await self._release_abandoned()
        self._held.clear()
        self._unrecorded.clear()
        self._abandoned.clear()
        self._recorded_perhaps.clear()
        await self._sender.close()

    async def step(self) -> bool:
        """Claims what is due (up to the free capacity) and starts sending it; True when
        there may be more due right now."""
        if not self._started:
            await self.start()
        batch = self._claim_batch
        while self._settings.max_in_flight - self._unfinished < self._claim_low_water:
            self._slot_freed.clear()
            await self._slot_freed.wait()
        capacity = self._settings.max_in_flight - self._unfinished
        # From idle, a small first claim: its sends start while the next, larger claims
        # (doubling with what is in flight) are made.
        limit = min(capacity, batch, max(FIRST_CLAIM, 2 * self._unfinished))
        # Before the claim's transaction begins, so the lease it writes lasts at least as
        # long from here.
        leased_at = time.monotonic()
        claimed, claimed_count = await self._claim(limit, self._maybe_taken_over(leased_at))
        for item in claimed:
            self._held[item.setpoint_id] = leased_at
            if item.row.unrecorded_claim:
                self._unrecorded.add(item.setpoint_id)
            self._enqueue(item)
        return claimed_count >= limit

    def _enqueue(self, item: Claimed) -> None:
        endpoint = self._sender.endpoint(item.delivery.url)
        queue = self._queues.get(endpoint)
        if queue is None:
            queue = self._queues[endpoint] = collections.deque()
        queue.append(item)
        self._unfinished += 1
        self._start_lanes(endpoint, queue, 1)

    def _start_lanes(self, endpoint: str, queue: collections.deque[Claimed], count: int) -> None:
        """Up to ``count`` more lanes for ``endpoint``, within its per-host limit."""
        lanes = self._lane_counts.get(endpoint, 0)
        for _ in range(min(count, self._delivery_settings.max_concurrency_per_host - lanes)):
            lanes += 1
            lane = asyncio.create_task(self._lane(endpoint, queue), name=f"deliver-to-{endpoint}")
            self._lanes.add(lane)
            lane.add_done_callback(self._lanes.discard)
        self._lane_counts[endpoint] = lanes

    async def _lane(self, endpoint: str, queue: collections.deque[Claimed]) -> None:
        """Sends an endpoint's queued setpoints one after another until none is left."""
        try:
            while queue:
                item = queue.popleft()
                withdrawn = False
                try:
                    withdrawn = not await self._send(endpoint, item, queue)
                finally:
                    # A withdrawn setpoint was finished by its re-check.
                    if not withdrawn:
                        self._finish_one()
        finally:
            # No await since the queue was found empty: a setpoint queued from now on
            # starts a lane of its own.
            left = self._lane_counts[endpoint] - 1
            if left:
                self._lane_counts[endpoint] = left
            else:
                del self._lane_counts[endpoint]
                if not queue:
                    del self._queues[endpoint]

    def _maybe_taken_over(self, now: float) -> list[UUID]:
        """Setpoints this worker still has state of whose leases may have lapsed: let go
        unsent and not yet handed back, or held (queued, in flight, finished unrecorded)
        with no renewal for half a lease (a renewal every third of one failed or skipped
        them). Normally none."""
        horizon = now - self._settings.lease_seconds / 2
        stale = [setpoint_id for setpoint_id, last_set in self._held.items() if last_set <= horizon]
        stale.extend(self._abandoned)
        stale.extend(self._recorded_perhaps)
        return stale

    def _finish_one(self) -> None:
        self._unfinished -= 1
        # Only once a claim is worth making: woken at every finished setpoint, the waiting
        # step would run (and wait again) once per delivery.
        if self._settings.max_in_flight - self._unfinished >= self._claim_low_water:
            self._slot_freed.set()

    def _let_go(self, setpoint_id: UUID) -> None:
        """Finishes a claimed setpoint here without an attempt to record."""
        self._held.pop(setpoint_id, None)
        self._unrecorded.discard(setpoint_id)
        self._finish_one()

    def _abandon_if_lapsed(self, item: Claimed) -> bool:
        """True, and ``item`` let go unsent, when its lease may have lapsed, or may lapse
        before its request could end (``_send_before_lease_age``).

        Renewals failed for most of a lease (this worker cannot reach the database, other
        replicas may): another worker may own the setpoint by then, which the re-check cannot
        tell with the database away. Handed back by :meth:`_release_abandoned`."""
        setpoint_id = item.setpoint_id
        # Every setpoint being sent is held: one that is not counts as lapsed.
        last_set = self._held.get(setpoint_id, -math.inf)
        if time.monotonic() - last_set < self._send_before_lease_age:
            return False
        dropped = self._lease_log.admit("lapsed")
        if dropped is not None:
            log.warning(
                "not sending setpoint %s: its lease was last renewed %.1f s ago (the database"
                " is out of reach); it goes back to the outbox once the database answers%s",
                setpoint_id,
                time.monotonic() - last_set,
                held_back(dropped),
            )
        self._abandoned[setpoint_id] = setpoint_id in self._unrecorded
        self._let_go(setpoint_id)
        return True

    async def _recheck(
        self, endpoint: str, first: Claimed, queue: collections.deque[Claimed]
    ) -> datetime | None:
        """Checks ``first`` again, with the setpoints queued behind it that are as stale (up
        to one per slot towards the endpoint): what must no longer be sent is settled as the
        claim would have (CANCELLED, EXPIRED, NOT_ELIGIBLE, a withdrawal instead), what lost
        its lease is let go unsent, the rest goes back to the head of the queue. Returns when
        it was checked if ``first`` is still to be sent, else None."""
        recheck_after = self._recheck_after
        now = self._clock.now()
        stale = [first]
        limit = self._delivery_settings.max_concurrency_per_host
        # The queue is in claim order, so what is due for a check is at its head.
        while queue and len(stale) < limit and now - queue[0].checked_at >= recheck_after:
            stale.append(queue.popleft())
        by_id = {item.setpoint_id: item for item in stale}
        keep: set[UUID] = set()
        settled: list[tuple[UUID, Settled, bool]] = []
        try:
            async with self._transaction(plan_afresh=True) as conn:
                rows = await conn.fetch(_RECHECK_SQL, list(by_id), self.owner)
                changed: list[SetpointChange] = []
                for row in rows:
                    item = by_id[row["id"]]
                    # As the claim found earlier claims: this worker has not sent it yet.
                    current = _outbox_row(row, item.row.unrecorded_claim)
                    verdict = before_attempt(current, _not_eligible(row), now)
                    if verdict is None:
                        keep.add(item.setpoint_id)
                        continue
                    settled.append((row["id"], verdict, True))
                    if verdict.state is not current.state:
                        check_transition(current.state, verdict.state)
                        changed.append(item.change._replace(state=verdict.state.value))
                await self._apply(conn, settled)
                await notify_setpoint_changes(conn, changed)
                await _wake_if_due(conn, settled, now)
        except Exception as error:
            log.warning("re-checking %d queued setpoints failed: %s", len(stale), error)
            # What this check settled (cancelled, no longer eligible, past its window) is not
            # sent: its commit may have gone through with only the answer lost. Handed back
            # once the database answers, which does nothing where the settlement committed
            # (the row is no longer leased here). The rest was left as the claim found it,
            # so it is sent as claimed (the database is away, the claim's check stands).
            unsure = {setpoint_id for setpoint_id, _, _ in settled}
            for setpoint_id in unsure:
                self._abandoned[setpoint_id] = setpoint_id in self._unrecorded
            keep = set(by_id) - unsure
        checked = self._clock.now()
        # Settled here, or no longer ours (the lease expired and another worker has it).
        for setpoint_id in by_id.keys() - keep:
            self._let_go(setpoint_id)
        behind = [
            item._replace(checked_at=checked) for item in stale[1:] if item.setpoint_id in keep
        ]
        queue.extendleft(reversed(behind))
        # Lanes that found the queue empty while this check ran have ended: as many again
        # as there is work for, within the per-host limit.
        self._start_lanes(endpoint, queue, len(behind))
        return checked if first.setpoint_id in keep else None

    @contextlib.asynccontextmanager
    async def _transaction(self, plan_afresh: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """A transaction of this worker on the outbox; ``plan_afresh``: see
        _PLAN_FOR_THE_TABLE_AS_IT_IS."""
        async with self._pool.acquire() as conn, conn.transaction():
            if plan_afresh:
                await conn.execute(_PLAN_FOR_THE_TABLE_AS_IT_IS)
            yield conn

    async def _claim(self, limit: int, excluded: list[UUID]) -> tuple[list[Claimed], int]:
        now = self._clock.now()
        lease = timedelta(seconds=self._settings.lease_seconds)
        rows: list[asyncpg.Record] = []
        try:
            async with self._transaction(plan_afresh=True) as conn:
                rows = await conn.fetch(_CLAIM_SQL, now, limit, self.owner, lease, excluded)
                if not rows:
                    return [], 0
                settled: list[tuple[UUID, Settled, bool]] = []
                sendable: list[tuple[asyncpg.Record, OutboxRow, SetpointChange]] = []
                changed: list[SetpointChange] = []
                secrets_of = await self._signing_secrets(
                    conn, {row["partner_org_id"] for row in rows}
                )
                for row in rows:
                    outbox_row = _outbox_row(row, row["unrecorded_claim"])
                    # Eligibility counts for the setpoint itself, never for its cancellation.
                    verdict = before_attempt(outbox_row, _not_eligible(row), now)
                    if verdict is None and not secrets_of[row["partner_org_id"]]:
                        # Never sent unsigned (the organization is gone, or has no secret).
                        verdict = unsendable(
                            outbox_row, "partner organization has no signing secret"
                        )
                    if verdict is None and not row["webhook_url"]:
                        # A cancellation is sent whatever the site's status, but not to nowhere:
                        # the resource (and with it its endpoint) was deleted since.
                        verdict = unsendable(outbox_row, "resource deleted")
                    if verdict is not None:
                        settled.append((row["id"], verdict, True))
                        if verdict.state is not outbox_row.state:
                            # A bug, never input: the transaction rolls back, the row stays due.
                            check_transition(outbox_row.state, verdict.state)
                            changed.append(_change(row, verdict.state))
                        continue
                    if outbox_row.state is SetpointState.PENDING:
                        change = _change(row, SetpointState.DELIVERING)  # the claim set it
                        changed.append(change)
                    else:
                        change = _change(row, outbox_row.state)
                    sendable.append((row, outbox_row, change))
                await self._apply(conn, settled)
                await notify_setpoint_changes(conn, changed)
                await _wake_if_due(conn, settled, now)
            claimed = []
            for row, outbox_row, change in sendable:
                cancellation = outbox_row.delivers_cancellation
                claimed.append(
                    Claimed(
                        row["id"],
                        outbox_row,
                        Delivery(
                            delivery_id=delivery_id(row["id"], cancellation),
                            url=row["webhook_url"],
                            body=setpoint_body(row, cancellation),
                            signing_secrets=secrets_of[row["partner_org_id"]],
                            traceparent=_traceparent(row["traceparent"]),
                        ),
                        change,
                        now,
                    )
                )
            return claimed, len(rows)
        except BaseException:
            # The claim may have committed with only its answer lost (the connection dropped
            # during the commit, or a stop cut it off): its rows are then leased to this
            # worker, which never claims its own rows, and no renewal or stop knows of them;
            # with no other replica they would never be sent. Let go of as rows whose lease
            # may have lapsed: handed back once the database answers, which does nothing to
            # a row the claim did not take after all.
            for row in rows:
                self._abandoned[row["id"]] = row["unrecorded_claim"]
            raise

    async def _signing_secrets(
        self, conn: asyncpg.Connection, org_ids: set[UUID]
    ) -> dict[UUID, list[str]]:
        if not org_ids:
            return {}
        found = await self._identity.signing_secrets_for(org_ids, self._clock.now(), conn)
        return {org_id: found.get(org_id, []) for org_id in org_ids}

    async def _apply(
        self, conn: asyncpg.Connection, settled: Sequence[tuple[UUID, Settled, bool]]
    ) -> None:
        if not settled:
            return
        # One pass into the statement's columns: this runs for every row claimed or recorded.
        ids: list[UUID] = []
        states: list[str] = []
        reasons: list[str] = []
        attempt_counts: list[int] = []
        next_attempts: list[datetime | None] = []
        cancellation_states: list[str | None] = []
        cancellation_counts: list[int] = []
        releases: list[bool] = []
        for setpoint_id, verdict, release in settled:
            ids.append(setpoint_id)
            states.append(verdict.state.value)
            reasons.append(verdict.reason)
            attempt_counts.append(verdict.attempt_count)
            next_attempts.append(verdict.next_attempt_at)
            cancellation = verdict.cancellation_state
            cancellation_states.append(cancellation.value if cancellation else None)
            cancellation_counts.append(verdict.cancellation_attempt_count)
            releases.append(release)
        await conn.execute(
            _APPLY_SQL,
            ids,
            states,
            reasons,
            attempt_counts,
            next_attempts,
            cancellation_states,
            cancellation_counts,
            releases,
        )

    async def _send(self, endpoint: str, item: Claimed, queue: collections.deque[Claimed]) -> bool:
        """One attempt of ``item``; False when a re-check found it must not be sent (it is
        then settled, or no longer this worker's)."""
        attempt_time = self._clock.now()
        # Sent right after a check, whatever the check took: a check slower than
        # recheck_after must not make the lane check again and again.
        checked_at = item.checked_at
        if attempt_time - checked_at >= self._recheck_after:
            # Before waiting for slots, so that a check waiting on the database (a large
            # CancelDispatch's locks, a full pool) holds none that other endpoints could use.
            rechecked = await self._recheck(endpoint, item, queue)
            if rechecked is None:
                return False
            checked_at = rechecked
        # When the request began (once past the checks), for an attempt cut off by stop().
        posted: list[tuple[float, datetime]] = []

        async def withdrawn() -> bool:
            # Once the slots are free, right before the request: a send can wait for a
            # global slot behind other endpoints' timeouts.
            if self._abandon_if_lapsed(item):
                return True
            now = self._clock.now()
            if now - checked_at >= self._recheck_after:
                if await self._recheck(endpoint, item, queue) is None:
                    return True
                # Again after it: the check may have waited for the database (away, or a
                # row lock, which renewals skip) for longer than what was left of the lease.
                if self._abandon_if_lapsed(item):
                    return True
                now = self._clock.now()
            posted.append((time.perf_counter(), now))
            return False

        try:
            outcome = await self._sender.send_unless_withdrawn(item.delivery, withdrawn)
        except asyncio.CancelledError:
            if posted:
                # Cut off during its request (this worker is stopping): it may have arrived,
                # so it is recorded as an attempt, which a cancellation then withdraws.
                started, at = posted[0]
                interrupted = AttemptOutcome(
                    kind=OutcomeKind.RETRYABLE,
                    http_status=None,
                    error="interrupted: the delivery worker stopped during the request",
                    latency_ms=(time.perf_counter() - started) * 1000.0,
                    retry_after_seconds=None,
                    attempted_at=at,
                )
                self._finished.append(Finished(item, attempt_time, interrupted))
            raise
        except Exception as error:  # a transport bug must not lose the setpoint
            # A bug fails every send alike: one trace per bug a minute, not one per attempt.
            dropped = self._bug_log.admit(error_key(error))
            if dropped is not None:
                log.error(
                    "delivery of setpoint %s failed unexpectedly%s",
                    item.setpoint_id,
                    held_back(dropped),
                    exc_info=error,
                )
            outcome = AttemptOutcome(
                kind=OutcomeKind.RETRYABLE,
                http_status=None,
                error=f"internal error: {type(error).__name__}",
                latency_ms=0.0,
                retry_after_seconds=None,
            )
        if outcome is None:
            return False
        self.attempts_sent += 1
        if self._attempts_counter is not None:
            self._attempts_counter.add(1, self._outcome_attributes[outcome.kind])
        self._finished.append(Finished(item, attempt_time, outcome))
        self._finished_ready.set()
        return True

    async def _renew_loop(self) -> None:
        interval = max(self._settings.lease_seconds / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            if self._abandoned:
                try:
                    await self._release_abandoned()
                except Exception as error:  # the next round tries again
                    log.warning(
                        "releasing %d abandoned dispatch leases failed: %s",
                        len(self._abandoned),
                        error,
                    )
            held = list(self._held)
            if not held:
                continue
            renewed_at = time.monotonic()
            try:
                # Rows being recorded right now are skipped: they are let go of anyway.
                renewed = await self._pool.fetch(
                    """
                    UPDATE setpoints s SET lease_expires_at = now() + $3::interval
                    FROM (SELECT id FROM setpoints
                          WHERE id = ANY($1::uuid[]) AND lease_owner = $2
                          ORDER BY id FOR UPDATE SKIP LOCKED) held
                    WHERE s.id = held.id
                    RETURNING s.id
                    """,
                    held,
                    self.owner,
                    timedelta(seconds=self._settings.lease_seconds),
                )
            except Exception as error:  # the next round tries again; leases may lapse
                log.warning("renewing %d dispatch leases failed: %s", len(held), error)
                continue
            for row in renewed:
                if row["id"] in self._held:
                    self._held[row["id"]] = renewed_at

    async def _release_abandoned(self) -> None:
        abandoned = dict(self._abandoned)
        await self._hand_back(
            abandoned, [setpoint_id for setpoint_id, unrecorded in abandoned.items() if unrecorded]
        )
        for setpoint_id in abandoned:
            self._abandoned.pop(setpoint_id, None)

    async def _hand_back(self, setpoint_ids: Iterable[UUID], unrecorded: Iterable[UUID]) -> None:
        """Lets go of rows this worker still leases, without sending them (``_HAND_BACK_SQL``),
        and wakes the workers: most of them are due now."""
        async with self._transaction() as conn:
            await conn.execute(_HAND_BACK_SQL, list(setpoint_ids), self.owner, list(unrecorded))
            await wake_outbox(conn)

    def _take_finished(self) -> list[Finished]:
        batch, self._finished = self._finished, []
        return batch

    async def _record_loop(self) -> None:
        while True:
            await self._finished_ready.wait()
            if len(self._finished) < RECORD_BATCH:
                # Let a few more attempts finish: one transaction for many rows costs the
                # database (and this process) far less than one per row.
                await asyncio.sleep(RECORD_LINGER_SECONDS)
            self._finished_ready.clear()
            batch = self._take_finished()
            if not batch:
                continue
            try:
                await self._record(batch, retried=bool(self._recorded_perhaps))
            except asyncio.CancelledError:
                # stop() records them; the commit may have gone through as it was cut off.
                self._recorded_perhaps.update(item.claimed.setpoint_id for item in batch)
                self._finished[:0] = batch
                raise
            except Exception:
                log.warning("recording %d delivery attempts failed; retrying", len(batch))
                self._recorded_perhaps.update(item.claimed.setpoint_id for item in batch)
                self._finished[:0] = batch
                await asyncio.sleep(1.0)
                self._finished_ready.set()
            else:
                self._recorded_perhaps.clear()

    async def _record(self, batch: Sequence[Finished], retried: bool = False) -> None:
        """Records ``batch``; ``retried`` after a failed recording of any of it, whose commit
        may have gone through unanswered: its attempts are then stored only once."""
        if retried:
            await self._record_once(batch, _ATTEMPTS_NOT_STORED_SQL)
            return
        try:
            await self._record_once(batch, _ATTEMPTS_SQL)
        except asyncpg.ForeignKeyViolationError:
            # A setpoint of the batch is gone: without this, the batch (and every result
            # added to it later) would fail again on each retry.
            await self._record_once(batch, _ATTEMPTS_NOT_STORED_SQL)

    async def _record_once(self, batch: Sequence[Finished], attempts_sql: str) -> None:
        now = self._clock.now()
        by_id = {item.claimed.setpoint_id: item for item in batch}
        async with self._transaction() as conn:
            rows = await conn.fetch(_RELOCK_SQL, list(by_id), self.owner)
            settled: list[tuple[UUID, Settled, bool]] = []
            changed: list[SetpointChange] = []
            for row in rows:
                item = by_id[row["id"]]
                current = _outbox_row(row, item.claimed.row.unrecorded_claim)
                outcome = item.outcome
                kind = _OUTCOME_OF[outcome.kind]
                counted = (
                    current.cancellation_attempt_count
                    if current.delivers_cancellation
                    else current.attempt_count
                ) + (1 + current.unrecorded_claim)
                # Only an outcome that may be retried needs the backoff (a random draw).
                retry_in = 0.0
                if kind is Outcome.CIRCUIT_OPEN and outcome.retry_after_seconds is not None:
                    retry_in = outcome.retry_after_seconds
                elif kind in _RETRIED:
                    retry_in = retry_delay_seconds(
                        counted, self._delivery_settings, outcome.retry_after_seconds
                    )
                verdict = after_attempt(
                    current,
                    kind,
                    outcome.http_status,
                    outcome.error,
                    now,
                    self._settings.max_attempts,
                    retry_in,
                )
                settled.append((row["id"], verdict, True))
                if verdict.state is not current.state:
                    check_transition(current.state, verdict.state)
                if verdict.state is not current.state or (
                    verdict.cancellation_state is not current.cancellation_state
                ):
                    held = item.claimed.change
                    changed.append(
                        SetpointChange(
                            held.setpoint_id,
                            held.dispatch_id,
                            held.site_id,
                            held.operator_org_id,
                            held.partner_org_id,
                            verdict.state.value,
                        )
                    )
            await self._apply(conn, settled)
            # Every attempt that sent something is history, even one whose lease expired
            # meanwhile (another worker then owns the row's state).
            ids: list[UUID] = []
            times: list[datetime] = []
            cancellations: list[bool] = []
            statuses: list[int | None] = []
            errors: list[str] = []
            latencies: list[float] = []
            for attempt in batch:
                outcome = attempt.outcome
                if outcome.kind is OutcomeKind.CIRCUIT_OPEN:
                    continue  # nothing was sent
                ids.append(attempt.claimed.setpoint_id)
                # When the request went out (after any wait for a slot towards the
                # endpoint), or, for an attempt that failed before, when it began.
                times.append(outcome.attempted_at or attempt.attempt_time)
                cancellations.append(attempt.claimed.row.delivers_cancellation)
                statuses.append(outcome.http_status)
                errors.append(outcome.error or "")
                latencies.append(outcome.latency_ms)
            if ids:
                await conn.execute(
                    attempts_sql, ids, times, cancellations, statuses, errors, latencies
                )
            await notify_setpoint_changes(conn, changed)
            await _wake_if_due(conn, settled, now)
        for setpoint_id in by_id:
            self._held.pop(setpoint_id, None)
        self._unrecorded.difference_update(by_id)
        lost = len(batch) - len(rows)
        if lost:
            # The lease expired during the attempt and another worker owns the row now, or
            # (recorded again) a commit whose answer was lost already settled it.
            log.warning("%d delivery results found their setpoints no longer leased here", lost)
