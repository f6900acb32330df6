"""Dispatches, setpoints and attempts in PostgreSQL, scoped to one organization on every query.

Scopes:
- an **operator** dispatches across the partners' sites (every partner organization's sites
  are candidates); it reads the dispatches it created and their setpoints
  (``dispatches.org_id`` / ``setpoints.operator_org_id`` = the operator);
- a **partner** reads the setpoints of its own sites (``setpoints.partner_org_id``), and
  nothing else of a dispatch.

An id outside the caller's scope answers NOT_FOUND exactly like one that does not exist.

The setpoints table is also the delivery outbox (see :mod:`service.dispatch.outbox`): a
dispatch's setpoints are committed in the DispatchFlexibility transaction, with a NOTIFY on
``DISPATCH_OUTBOX_CHANNEL`` (service/events/channels.py) that wakes the delivery workers of
every replica at commit.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

import asyncpg

from service.auth.principal import Role
from service.common.clock import Clock
from service.common.errors import AlreadyExistsError, NotFoundError
from service.db.keyset import keyset_page
from service.db.pagination import Cursor
from service.dispatch.domain import (
    WITHDRAWN_AFTER_SETTLING,
    Allocation,
    Candidate,
    DispatchRequest,
    DispatchType,
    Selection,
    SetpointState,
    SiteEligibility,
    allocate,
    holds_a_whole_watt,
    ineligibility,
    require_open_window,
)
from service.events.channels import DISPATCH_OUTBOX_CHANNEL, SETPOINT_EVENTS_CHANNEL
from service.registry.domain import ResourceType, SiteStatus
from service.upstream.domain import UpstreamStatus

# Changes per notification (about 140 bytes each): below PostgreSQL's 8000-byte payload limit.
CHANGES_PER_NOTIFICATION = 50
# A transaction that changes more setpoints of one dispatch than this for one scope (the
# CancelDispatch of a large dispatch) publishes one event for them, ``"changed"`` with the
# dispatch's id, whose watchers read that dispatch's setpoints as they are. A notification
# per 50 changes would overflow every watcher's buffer (1,000 events by default) beyond
# 50,000 setpoints, however fast the watcher read. Claims and records (at most
# OPENVPP_DISPATCH_MAX_IN_FLIGHT rows) normally stay below it and are sent change by change.
BULK_CHANGES_PER_DISPATCH = 1000


# The id of what a dry run computed but did not store (shown as an empty id).
UNSTORED_ID = UUID(int=0)


@dataclass(frozen=True)
class AttemptRecord:
    attempt_time: datetime
    http_status: int | None
    error: str
    latency_ms: float
    cancellation: bool

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> AttemptRecord:
        return cls(
            row["attempt_time"],
            row["http_status"],
            row["error"],
            row["latency_ms"],
            row["cancellation"],
        )


@dataclass(frozen=True)
class SetpointRecord:
    id: UUID  # UNSTORED_ID in a dry run
    dispatch_id: UUID
    site_id: UUID
    resource_id: UUID
    power_kw: float
    start_time: datetime
    end_time: datetime
    state: SetpointState
    reason: str
    created_at: datetime
    updated_at: datetime
    attempts: tuple[AttemptRecord, ...] = ()

    @classmethod
    def from_row(
        cls, row: Mapping[str, Any], attempts: Sequence[AttemptRecord] = ()
    ) -> SetpointRecord:
        return cls(
            id=row["id"],
            dispatch_id=row["dispatch_id"],
            site_id=row["site_id"],
            resource_id=row["resource_id"],
            power_kw=row["power_kw"],
            start_time=row["start_time"],
            end_time=row["end_time"],
            state=SetpointState(row["state"]),
            reason=row["reason"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            attempts=tuple(attempts),
        )


@dataclass(frozen=True)
class DispatchRecord:
    id: UUID  # UNSTORED_ID in a dry run
    request: DispatchRequest
    allocated_power_kw: float
    shortfall_power_kw: float
    eligible_site_count: int
    ineligible_site_count: int
    counts: Mapping[SetpointState, int]
    cancelled_at: datetime | None
    created_at: datetime

    @classmethod
    def from_row(
        cls, row: Mapping[str, Any], counts: Mapping[SetpointState, int]
    ) -> DispatchRecord:
        return cls(
            id=row["id"],
            request=DispatchRequest(
                request_id=row["request_id"],
                power_kw=row["power_kw"],
                start_time=row["start_time"],
                end_time=row["end_time"],
                dispatch_type=DispatchType(row["dispatch_type"]),
                selection=Selection(
                    site_ids=tuple(row["selection_site_ids"]),
                    organization_id=row["selection_org_id"],
                    resource_types=tuple(ResourceType(t) for t in row["selection_resource_types"]),
                ),
            ),
            allocated_power_kw=row["allocated_power_kw"],
            shortfall_power_kw=row["shortfall_power_kw"],
            eligible_site_count=row["eligible_site_count"],
            ineligible_site_count=row["ineligible_site_count"],
            counts=counts,
            cancelled_at=row["cancelled_at"],
            created_at=row["created_at"],
        )


@dataclass(frozen=True)
class DispatchResult:
    dispatch: DispatchRecord
    # Filled for a dry run only.
    setpoints: list[SetpointRecord] = field(default_factory=list)


@dataclass(frozen=True)
class SetpointFilter:
    dispatch_id: UUID | None = None
    site_id: UUID | None = None
    state: SetpointState | None = None


@dataclass(frozen=True)
class Planned:
    """The allocation of a request over the sites it selects, before anything is stored."""

    allocation: Allocation
    partner_of_site: dict[UUID, UUID]
    eligible_site_count: int
    ineligible_site_count: int


# The candidates of a dispatch: every partner site the selection names, each with its
# controllable resources (not METER, with power bounds and a webhook), in creation order.
_CANDIDATES_SQL = """
SELECT s.id AS site_id, s.org_id AS partner_org_id, s.status, s.paused, s.upstream_status,
       r.id AS resource_id, r.power_min_kw, r.power_max_kw
FROM sites s
JOIN organizations o ON o.id = s.org_id AND o.role = 'partner'
LEFT JOIN resources r ON r.site_id = s.id AND r.resource_type <> 'meter'
    AND r.power_min_kw IS NOT NULL AND r.power_max_kw IS NOT NULL AND r.webhook_url <> ''
    AND (cardinality($3::text[]) = 0 OR r.resource_type = ANY($3::text[]))
WHERE (cardinality($1::uuid[]) = 0 OR s.id = ANY($1::uuid[]))
  AND ($2::uuid IS NULL OR s.org_id = $2::uuid)
ORDER BY s.created_at, s.id, r.created_at, r.id
"""


class SetpointChange(NamedTuple):
    """A setpoint's new state, for the watchers of its operator and of its partner."""

    setpoint_id: UUID
    dispatch_id: UUID
    site_id: UUID
    operator_org_id: UUID
    partner_org_id: UUID
    state: str  # as stored


# Each payload is put together from the callers' own rows (the ids and states contain nothing
# to escape): reading the setpoints back and aggregating them as JSON here cost the database
# as much per change as recording the attempt did. The instant is still the database's.
_NOTIFY_SQL = """
SELECT pg_notify($1, '{"key":"' || k || '","at":' || to_json(clock_timestamp())::text
    || ',' || c || '}')
FROM unnest($2::text[], $3::text[]) AS n (k, c)
"""


async def notify_setpoint_changes(
    conn: asyncpg.Connection, changes: Sequence[SetpointChange]
) -> None:
    """Publishes the changes to both scopes, at most CHANGES_PER_NOTIFICATION a payload, or
    one ``changed`` event per scope and dispatch beyond BULK_CHANGES_PER_DISPATCH; sent only
    if the caller's transaction commits. A change is [setpoint id, dispatch id, site id,
    state]; watchers read the rest from the row."""
    if not changes:
        return
    # By (scope, dispatch): a scope is the organization whose watchers see the change.
    by_dispatch: dict[tuple[UUID, UUID], list[str]] = {}
    for change in changes:
        text = (
            f'["{change.setpoint_id}","{change.dispatch_id}","{change.site_id}","{change.state}"]'
        )
        by_dispatch.setdefault((change.operator_org_id, change.dispatch_id), []).append(text)
        if change.partner_org_id != change.operator_org_id:
            by_dispatch.setdefault((change.partner_org_id, change.dispatch_id), []).append(text)
    keys: list[str] = []
    payloads: list[str] = []
    one_by_one: dict[UUID, list[str]] = {}
    for (key, dispatch_id), texts in by_dispatch.items():
        if len(texts) > BULK_CHANGES_PER_DISPATCH:
            keys.append(str(key))
            payloads.append(f'"changed":"{dispatch_id}"')
        else:
            one_by_one.setdefault(key, []).extend(texts)
    for key, texts in one_by_one.items():
        for first in range(0, len(texts), CHANGES_PER_NOTIFICATION):
            keys.append(str(key))
            payloads.append(
                '"changes":[' + ",".join(texts[first : first + CHANGES_PER_NOTIFICATION]) + "]"
            )
    await conn.execute(_NOTIFY_SQL, SETPOINT_EVENTS_CHANNEL, keys, payloads)


async def notify_dispatch_created(
    conn: asyncpg.Connection, dispatch_id: UUID, keys: Sequence[UUID]
) -> None:
    """One event per scope for all of a new dispatch's (PENDING) setpoints: watchers read
    the ones they want, rather than the database sending one change per setpoint."""
    await conn.execute(
        """
        SELECT pg_notify($3, json_build_object('key', k, 'at', clock_timestamp(),
            'created', $1::uuid)::text)
        FROM unnest($2::uuid[]) AS k
        """,
        dispatch_id,
        list(keys),
        SETPOINT_EVENTS_CHANNEL,
    )


async def wake_outbox(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_notify($1, '')", DISPATCH_OUTBOX_CHANNEL)


def plan(request: DispatchRequest, rows: Sequence[Mapping[str, Any]]) -> Planned:
    """Eligibility and allocation over the candidate rows of ``_CANDIDATES_SQL``.

    An eligible site counts once it has a resource the dispatch can use: a controllable one
    of a selected type, with a webhook and bounds that hold a whole watt (setpoints are
    sent in watts). Every selected site that is not eligible counts as such."""
    candidates: list[Candidate] = []
    partner_of_site: dict[UUID, UUID] = {}
    eligible_sites: set[UUID] = set()
    ineligible_sites: set[UUID] = set()
    # Rows come site by site: judge each site once.
    judged: UUID | None = None
    eligible = counted = False
    for row in rows:
        site_id = row["site_id"]
        if site_id != judged:
            judged = site_id
            eligible = (
                ineligibility(
                    SiteEligibility(
                        SiteStatus(row["status"]),
                        row["paused"],
                        UpstreamStatus(row["upstream_status"]),
                    )
                )
                is None
            )
            if not eligible:
                ineligible_sites.add(site_id)
            counted = False
        if (
            not eligible
            or row["resource_id"] is None
            or not holds_a_whole_watt(row["power_min_kw"], row["power_max_kw"])
        ):
            continue
        if not counted:
            # Once per site, at its first usable resource.
            counted = True
            partner_of_site[site_id] = row["partner_org_id"]
            eligible_sites.add(site_id)
        candidates.append(
            Candidate(row["resource_id"], site_id, row["power_min_kw"], row["power_max_kw"])
        )
    assert request.dispatch_type is not None
    return Planned(
        allocate(request.dispatch_type, request.power_kw, candidates),
        partner_of_site,
        len(eligible_sites),
        len(ineligible_sites),
    )


_ATTEMPTS_SQL = """
SELECT setpoint_id, attempt_time, http_status, error, latency_ms, cancellation
FROM setpoint_attempts WHERE setpoint_id = ANY($1::uuid[]) ORDER BY setpoint_id, id
"""


# Whether the dispatch_id ($1) and site_id ($2) filters of a setpoint read name what the
# caller ($3) can see (a NULL filter is visible); see DispatchStore.check_filter.
# A site is also visible once deleted where the caller has setpoints of it: they outlive the
# site, and its id is the filter for their history.
_OPERATOR_FILTER_SQL = """
SELECT ($1::uuid IS NULL OR EXISTS (SELECT 1 FROM dispatches WHERE id = $1 AND org_id = $3))
           AS dispatch_visible,
       ($2::uuid IS NULL OR EXISTS (SELECT 1 FROM sites s JOIN organizations o ON o.id = s.org_id
                                    WHERE s.id = $2 AND o.role = 'partner')
                         OR EXISTS (SELECT 1 FROM setpoints
                                    WHERE site_id = $2 AND operator_org_id = $3)) AS site_visible
"""
_PARTNER_FILTER_SQL = """
SELECT ($1::uuid IS NULL OR EXISTS (SELECT 1 FROM setpoints
                                    WHERE dispatch_id = $1 AND partner_org_id = $3))
           AS dispatch_visible,
       ($2::uuid IS NULL OR EXISTS (SELECT 1 FROM sites WHERE id = $2 AND org_id = $3)
                         OR EXISTS (SELECT 1 FROM setpoints
                                    WHERE site_id = $2 AND partner_org_id = $3)) AS site_visible
"""


class DispatchStore:
    """One caller's view: ``role`` operator or partner decides the scope (see module doc)."""

    def __init__(self, pool: asyncpg.Pool, org_id: UUID, role: Role, clock: Clock) -> None:
        self._pool = pool
        self._org_id = org_id
        self._role = role
        self._clock = clock
        self._scope_column = "operator_org_id" if role is Role.OPERATOR else "partner_org_id"

    def _require_operator(self) -> None:
        # METHOD_ROLES refuses partners first; this keeps a wrong wiring from leaking.
        if self._role is not Role.OPERATOR:
            raise PermissionError(f"role {self._role} cannot use dispatches")

    # Dispatches

    async def dispatch(self, request: DispatchRequest, traceparent: str = "") -> DispatchResult:
        """Plans ``request`` and, unless a dry run, commits the dispatch and its setpoints
        (the outbox) in one transaction; a known request_id returns the first dispatch."""
        self._require_operator()
        now = self._clock.now()
        selection = request.selection
        async with self._pool.acquire() as conn, conn.transaction():
            # A dry run neither takes nor answers from a request_id: it stores nothing.
            existing = None if request.dry_run else await self._existing(conn, request)
            if existing is not None:
                return DispatchResult(existing)
            require_open_window(request, now)
            await self._check_selection(conn, selection)
            rows = await conn.fetch(
                _CANDIDATES_SQL,
                list(selection.site_ids),
                selection.organization_id,
                [str(t) for t in selection.resource_types],
            )
            planned = plan(request, rows)
            allocation = planned.allocation
            if request.dry_run:
                return self._dry_run_result(request, planned, now)
            dispatch_id = uuid.uuid4()
            inserted = await conn.fetchrow(
                """
                INSERT INTO dispatches (id, org_id, request_id, request_digest, power_kw,
                    start_time, end_time, dispatch_type, selection_site_ids, selection_org_id,
                    selection_resource_types, allocated_power_kw, shortfall_power_kw,
                    eligible_site_count, ineligible_site_count, traceparent)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
                ON CONFLICT ON CONSTRAINT dispatches_request_id_unique DO NOTHING
                RETURNING *
                """,
                dispatch_id,
                self._org_id,
                request.request_id,
                request.digest(),
                request.power_kw,
                request.start_time,
                request.end_time,
                str(request.dispatch_type),
                list(selection.site_ids),
                selection.organization_id,
                [str(t) for t in selection.resource_types],
                allocation.allocated_power_kw,
                allocation.shortfall_power_kw,
                planned.eligible_site_count,
                planned.ineligible_site_count,
                traceparent or None,
            )
            if inserted is None:
                # A concurrent call with this request_id committed first (the constraint
                # waited for it): answer as a retry would.
                existing = await self._existing(conn, request)
                assert existing is not None
                return DispatchResult(existing)
            setpoints = allocation.setpoints
            if setpoints:
                # One statement for the whole outbox batch; ids are made by the database.
                await conn.execute(
                    """
                    INSERT INTO setpoints (id, dispatch_id, operator_org_id, partner_org_id,
                        site_id, resource_id, power_kw, start_time, end_time, next_attempt_at)
                    SELECT gen_random_uuid(), $1, $2, p, s, r, w, $3, $4, $5
                    FROM unnest($6::uuid[], $7::uuid[], $8::uuid[], $9::float8[])
                        AS c (p, s, r, w)
                    """,
                    dispatch_id,
                    self._org_id,
                    request.start_time,
                    request.end_time,
                    now,
                    [planned.partner_of_site[c.site_id] for c, _ in setpoints],
                    [c.site_id for c, _ in setpoints],
                    [c.resource_id for c, _ in setpoints],
                    [power for _, power in setpoints],
                )
                partners = set(planned.partner_of_site.values())
                await notify_dispatch_created(conn, dispatch_id, [self._org_id, *partners])
                await wake_outbox(conn)
            counts = {SetpointState.PENDING: len(setpoints)} if setpoints else {}
            return DispatchResult(DispatchRecord.from_row(inserted, counts))

    def _dry_run_result(
        self, request: DispatchRequest, planned: Planned, now: datetime
    ) -> DispatchResult:
        allocation = planned.allocation
        setpoints = [
            SetpointRecord(
                id=UNSTORED_ID,
                dispatch_id=UNSTORED_ID,
                site_id=candidate.site_id,
                resource_id=candidate.resource_id,
                power_kw=power,
                start_time=request.start_time,
                end_time=request.end_time,
                state=SetpointState.PENDING,
                reason="",
                created_at=now,
                updated_at=now,
            )
            for candidate, power in allocation.setpoints
        ]
        record = DispatchRecord(
            id=UNSTORED_ID,
            request=request,
            allocated_power_kw=allocation.allocated_power_kw,
            shortfall_power_kw=allocation.shortfall_power_kw,
            eligible_site_count=planned.eligible_site_count,
            ineligible_site_count=planned.ineligible_site_count,
            counts={SetpointState.PENDING: len(setpoints)} if setpoints else {},
            cancelled_at=None,
            created_at=now,
        )
        return DispatchResult(record, setpoints)

    async def _existing(
        self, conn: asyncpg.Connection, request: DispatchRequest
    ) -> DispatchRecord | None:
        row = await conn.fetchrow(
            "SELECT * FROM dispatches WHERE org_id = $1 AND request_id = $2",
            self._org_id,
            request.request_id,
        )
        if row is None:
            return None
        if row["request_digest"] != request.digest():
            raise AlreadyExistsError(
                "request_id",
                f"request_id {request.request_id!r} was already used for a different request "
                f"(dispatch {row['id']}); use a new request_id",
            )
        return DispatchRecord.from_row(row, await self._counts(conn, row["id"]))

    async def _check_selection(self, conn: asyncpg.Connection, selection: Selection) -> None:
        """Named sites and organization must exist as partner ones (NOT_FOUND otherwise)."""
        if selection.organization_id is not None:
            known = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM organizations WHERE id = $1 AND role = 'partner')",
                selection.organization_id,
            )
            if not known:
                raise NotFoundError("organization", str(selection.organization_id))
        if selection.site_ids:
            # Held until the dispatch commits (FOR KEY SHARE, in id order): a site deleted
            # between this check and the read of the candidates was counted neither eligible
            # nor ineligible. Its DeleteSite waits instead; the outbox then finds it gone.
            await conn.execute(
                "SELECT FROM sites WHERE id = ANY($1::uuid[]) ORDER BY id FOR KEY SHARE",
                list(selection.site_ids),
            )
            missing = await conn.fetchval(
                """
                SELECT wanted FROM unnest($1::uuid[]) AS wanted
                WHERE NOT EXISTS (SELECT 1 FROM sites s JOIN organizations o ON o.id = s.org_id
                                  WHERE s.id = wanted AND o.role = 'partner')
                LIMIT 1
                """,
                list(selection.site_ids),
            )
            if missing is not None:
                raise NotFoundError("site", str(missing))

    async def _counts(
        self, conn: asyncpg.Connection | asyncpg.Pool, dispatch_id: UUID
    ) -> dict[SetpointState, int]:
        rows = await conn.fetch(
            "SELECT state, count(*) AS n FROM setpoints WHERE dispatch_id = $1 GROUP BY state",
            dispatch_id,
        )
        return {SetpointState(row["state"]): row["n"] for row in rows}

    async def get_dispatch(self, dispatch_id: UUID) -> DispatchRecord:
        self._require_operator()
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            row = await conn.fetchrow(
                "SELECT * FROM dispatches WHERE id = $1 AND org_id = $2",
                dispatch_id,
                self._org_id,
            )
            if row is None:
                raise NotFoundError("dispatch", str(dispatch_id))
            return DispatchRecord.from_row(row, await self._counts(conn, dispatch_id))

    async def list_dispatches(
        self, after: Cursor | None, limit: int
    ) -> tuple[list[DispatchRecord], int]:
        self._require_operator()
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            rows, total = await keyset_page(
                conn, "SELECT * FROM dispatches WHERE org_id = $1", [self._org_id], after, limit
            )
            counts: dict[UUID, dict[SetpointState, int]] = {row["id"]: {} for row in rows}
            for count in await conn.fetch(
                """
                SELECT dispatch_id, state, count(*) AS n FROM setpoints
                WHERE dispatch_id = ANY($1::uuid[]) GROUP BY dispatch_id, state
                """,
                list(counts),
            ):
                counts[count["dispatch_id"]][SetpointState(count["state"])] = count["n"]
        return [DispatchRecord.from_row(row, counts[row["id"]]) for row in rows], total

    async def cancel(self, dispatch_id: UUID) -> DispatchRecord:
        """Open setpoints never attempted and claimed by no worker (or let go by one that
        did not send them) become CANCELLED now; the others are marked and settled by a
        worker (at once for one waiting for a retry, or whose lease expired with its attempt
        unrecorded: it may have reached the partner, so it is withdrawn); ACCEPTED ones
        within their window get a cancellation delivery, and so do FAILED and NOT_ELIGIBLE
        ones whose attempts may have arrived. Calling it again changes nothing more."""
        self._require_operator()
        now = self._clock.now()
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """
                UPDATE dispatches SET cancelled_at = coalesce(cancelled_at, $3)
                WHERE id = $1 AND org_id = $2 RETURNING *
                """,
                dispatch_id,
                self._org_id,
                now,
            )
            if row is None:
                raise NotFoundError("dispatch", str(dispatch_id))
            # Row locks in id order, the order the delivery workers' records take them too,
            # so a cancellation and a worker wait for each other rather than deadlock.
            await conn.execute(
                "SELECT 1 FROM setpoints WHERE dispatch_id = $1 ORDER BY id FOR UPDATE",
                dispatch_id,
            )
            cancelled = await conn.fetch(
                """
                UPDATE setpoints SET state = 'cancelled', reason = 'cancelled before delivery',
                    next_attempt_at = NULL, lease_owner = NULL, lease_expires_at = NULL,
                    cancel_requested_at = coalesce(cancel_requested_at, $2),
                    updated_at = clock_timestamp()
                WHERE dispatch_id = $1 AND state IN ('pending', 'delivering')
                  -- No lease, not even an expired one: a worker that claimed it and died
                  -- may have sent it, and the worker that claims it next withdraws it.
                  AND lease_owner IS NULL
                  AND attempt_count = 0
                RETURNING id, dispatch_id, site_id, operator_org_id, partner_org_id, state
                """,
                dispatch_id,
                now,
            )
            # An attempt in flight: its worker settles it (CANCELLED, or ACCEPTED and then
            # a cancellation delivery) when the attempt ends. One waiting for a retry was
            # attempted before, and one whose lease expired was perhaps attempted by a worker
            # that died: either may have reached the partner, so a worker takes it now and
            # settles it by the same rule as an attempt ended by a cancellation (withdrawn).
            retried = await conn.fetchval(
                """
                WITH requested AS (
                    UPDATE setpoints SET cancel_requested_at = $2,
                        -- The earlier of the two: a row whose lease expired has long been
                        -- due, by the clock of the worker that claimed it.
                        next_attempt_at = CASE
                            WHEN lease_expires_at IS NULL OR lease_expires_at <= now()
                            THEN least(next_attempt_at, $2)
                            ELSE next_attempt_at END
                    WHERE dispatch_id = $1 AND state IN ('pending', 'delivering')
                      AND cancel_requested_at IS NULL
                    RETURNING lease_expires_at
                )
                SELECT count(*) FROM requested
                WHERE lease_expires_at IS NULL OR lease_expires_at <= now()
                """,
                dispatch_id,
                now,
            )
            to_withdraw = await conn.fetch(
                """
                UPDATE setpoints SET cancel_requested_at = coalesce(cancel_requested_at, $2),
                    cancellation_state = 'pending', next_attempt_at = $2,
                    reason = 'cancellation pending', updated_at = clock_timestamp()
                WHERE dispatch_id = $1 AND state = 'accepted' AND cancellation_state IS NULL
                  AND end_time > $2
                RETURNING id, dispatch_id, site_id, operator_org_id, partner_org_id, state
                """,
                dispatch_id,
                now,
            )
            # FAILED and NOT_ELIGIBLE ones attempted before may have reached the partner
            # too: a worker takes them now and withdraws them, or leaves them as they are
            # (before_attempt decides).
            settled_unsuccessfully = await conn.fetchval(
                """
                WITH requested AS (
                    UPDATE setpoints SET cancel_requested_at = $2, next_attempt_at = $2
                    WHERE dispatch_id = $1 AND state = ANY ($3::text[]) AND attempt_count > 0
                      AND cancel_requested_at IS NULL AND cancellation_state IS NULL
                      AND end_time > $2
                    RETURNING 1
                )
                SELECT count(*) FROM requested
                """,
                dispatch_id,
                now,
                [state.value for state in WITHDRAWN_AFTER_SETTLING],
            )
            await notify_setpoint_changes(
                conn, [SetpointChange(*row) for row in [*cancelled, *to_withdraw]]
            )
            if to_withdraw or retried or settled_unsuccessfully:
                await wake_outbox(conn)
            return DispatchRecord.from_row(row, await self._counts(conn, dispatch_id))

    # Setpoints

    async def check_filter(self, dispatch_id: UUID | None, site_id: UUID | None) -> None:
        """NotFoundError for a filter naming a dispatch or a site the caller cannot see:
        an operator its own dispatches and every partner site (it dispatches across them),
        a partner the dispatches that gave it setpoints and its own sites. Without it, a
        list answered empty and a watch stayed silent for good on a mistyped id."""
        if dispatch_id is None and site_id is None:
            return
        sql = _OPERATOR_FILTER_SQL if self._role is Role.OPERATOR else _PARTNER_FILTER_SQL
        row = await self._pool.fetchrow(sql, dispatch_id, site_id, self._org_id)
        if not row["dispatch_visible"]:
            raise NotFoundError("dispatch", str(dispatch_id))
        if not row["site_visible"]:
            raise NotFoundError("site", str(site_id))

    async def get_setpoint(self, setpoint_id: UUID) -> SetpointRecord:
        found = await self.setpoints_by_id([setpoint_id])
        if not found:
            raise NotFoundError("setpoint", str(setpoint_id))
        return found[0]

    async def setpoints_by_id(self, setpoint_ids: Sequence[UUID]) -> list[SetpointRecord]:
        """The caller's setpoints among ``setpoint_ids`` (others are left out), with attempts."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            rows = await conn.fetch(
                f"SELECT * FROM setpoints WHERE id = ANY($1::uuid[]) AND {self._scope_column} = $2",
                list(setpoint_ids),
                self._org_id,
            )
            return await self._with_attempts(conn, rows)

    async def setpoints_of_dispatch(
        self, dispatch_id: UUID, site_id: UUID | None
    ) -> list[SetpointRecord]:
        """The caller's setpoints of one dispatch (of one site if given), in creation order."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            rows = await conn.fetch(
                f"""
                SELECT * FROM setpoints
                WHERE dispatch_id = $1 AND {self._scope_column} = $2
                  AND ($3::uuid IS NULL OR site_id = $3::uuid)
                ORDER BY created_at, id
                """,
                dispatch_id,
                self._org_id,
                site_id,
            )
            return await self._with_attempts(conn, rows)

    async def _with_attempts(
        self, conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]
    ) -> list[SetpointRecord]:
        attempts: dict[UUID, list[AttemptRecord]] = {row["id"]: [] for row in rows}
        if attempts:
            for attempt in await conn.fetch(_ATTEMPTS_SQL, list(attempts)):
                attempts[attempt["setpoint_id"]].append(AttemptRecord.from_row(attempt))
        return [SetpointRecord.from_row(row, attempts[row["id"]]) for row in rows]

    async def list_setpoints(
        self, setpoint_filter: SetpointFilter, after: Cursor | None, limit: int
    ) -> tuple[list[SetpointRecord], int]:
        conditions = [f"{self._scope_column} = $1"]
        args: list[Any] = [self._org_id]
        if setpoint_filter.dispatch_id is not None:
            args.append(setpoint_filter.dispatch_id)
            conditions.append(f"dispatch_id = ${len(args)}")
        if setpoint_filter.site_id is not None:
            args.append(setpoint_filter.site_id)
            conditions.append(f"site_id = ${len(args)}")
        if setpoint_filter.state is not None:
            args.append(str(setpoint_filter.state))
            conditions.append(f"state = ${len(args)}")
        where = " AND ".join(conditions)
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            rows, total = await keyset_page(
                conn, f"SELECT * FROM setpoints WHERE {where}", args, after, limit
            )
            return await self._with_attempts(conn, rows), total
