"""Upstream sites and contracts in PostgreSQL, scoped on every query.

:class:`UpstreamReader` reads within a scope fixed at construction: one supplier
organization, or every organization (operators, read only). :class:`SupplierStore` adds the
writes and exists only for one organization, so another supplier's id behaves exactly like
an id that does not exist. Every write recomputes the matching partner sites'
``upstream_status`` in its own transaction (``status.refresh_upstream_status``).

Lock order of every write: the upstream site row (serializes its contracts, so two
concurrent contracts cannot both pass the overlap check), then the identifier's advisory
lock, then partner site rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg

from service.common.clock import Clock
from service.common.errors import AlreadyExistsError, NotFoundError
from service.db.keyset import keyset_page
from service.db.pagination import Cursor
from service.identifiers.ids import ContractId, OrgId, UpstreamSiteId
from service.upstream.domain import (
    ContractState,
    ContractTerms,
    contract_state,
    validate_agreement,
    validate_new_contract,
    validate_termination,
)
from service.upstream.sites import UpstreamSiteFields, local_date, validate_agreement_input
from service.upstream.status import lock_identifiers, refresh_upstream_status, terms_from_row


@dataclass(frozen=True)
class UpstreamSiteRecord:
    id: UpstreamSiteId
    fields: UpstreamSiteFields
    # Whether some partner site (of any organization) has this primary identifier.
    matched_partner_site: bool
    # Leading contract's state today (derive_upstream_status precedence); None: no contract.
    contract_state: ContractState | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> UpstreamSiteRecord:
        state = row["contract_state"]
        return cls(
            id=row["id"],
            fields=UpstreamSiteFields(
                grid_identifier=row["grid_identifier"],
                country=row["country"],
                external_id=row["external_id"],
                timezone=row["timezone"],
            ),
            matched_partner_site=row["matched_partner_site"],
            contract_state=ContractState(state) if state is not None else None,
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )


@dataclass(frozen=True)
class ContractRecord:
    id: ContractId
    upstream_site_id: UpstreamSiteId
    terms: ContractTerms
    # State on "today" in the upstream site's time zone.
    state: ContractState
    agreed_by: str | None
    terminated_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Mapping[str, Any], today: date) -> ContractRecord:
        terms = terms_from_row(row)
        return cls(
            id=row["id"],
            upstream_site_id=row["upstream_site_id"],
            terms=terms,
            state=contract_state(terms, today),
            agreed_by=row["agreed_by"],
            terminated_at=row["terminated_at"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )


@dataclass(frozen=True)
class UpstreamSiteFilter:
    grid_identifier: str | None = None
    contract_state: ContractState | None = None


# An upstream site with its derived columns; $1 is "now" (today is taken in the site's zone).
_SITE_VIEW = """
    SELECT u.*,
        EXISTS (SELECT 1 FROM sites s WHERE s.grid_identifier = u.grid_identifier)
            AS matched_partner_site,
        (SELECT x.state FROM (
            SELECT upstream_contract_state(c.start_date, c.end_date, c.termination_date,
                c.requires_agreement, c.agreed_at, ($1::timestamptz AT TIME ZONE u.timezone)::date)
                AS state
            FROM contracts c WHERE c.upstream_site_id = u.id) x
         ORDER BY upstream_contract_state_rank(x.state) LIMIT 1) AS contract_state
    FROM upstream_sites u
"""


class UpstreamReader:
    """Reads of one organization's upstream data, or of all (``org_id`` None: operators)."""

    def __init__(self, pool: asyncpg.Pool, clock: Clock, org_id: OrgId | None) -> None:
        self._pool = pool
        self._clock = clock
        self._org_id = org_id

    def _scope(self, column: str, args: list[Any]) -> str:
        """The SQL condition limiting ``column`` (an org_id) to the scope; appends its arg."""
        if self._org_id is None:
            return "TRUE"
        args.append(self._org_id)
        return f"{column} = ${len(args)}"

    async def get_upstream_site(self, upstream_site_id: UpstreamSiteId) -> UpstreamSiteRecord:
        return await self._get_site(self._pool, upstream_site_id)

    async def _get_site(self, conn: Any, upstream_site_id: UpstreamSiteId) -> UpstreamSiteRecord:
        args: list[Any] = [self._clock.now(), upstream_site_id]
        scope = self._scope("u.org_id", args)
        row = await conn.fetchrow(f"{_SITE_VIEW} WHERE u.id = $2 AND {scope}", *args)
        if row is None:
            raise NotFoundError("upstream site", str(upstream_site_id))
        return UpstreamSiteRecord.from_row(row)

    async def list_upstream_sites(
        self, site_filter: UpstreamSiteFilter, after: Cursor | None, limit: int
    ) -> tuple[list[UpstreamSiteRecord], int]:
        """One page in creation order, and the number of upstream sites matching the filter."""
        args: list[Any] = [self._clock.now()]
        conditions = [self._scope("u.org_id", args)]
        if site_filter.grid_identifier:
            args.append(site_filter.grid_identifier)
            conditions.append(f"u.grid_identifier = ${len(args)}")
        outer = ["TRUE"]
        if site_filter.contract_state is not None:
            args.append(str(site_filter.contract_state))
            outer.append(f"v.contract_state = ${len(args)}")
        matching = (
            f"SELECT * FROM ({_SITE_VIEW} WHERE {' AND '.join(conditions)}) v "
            f"WHERE {' AND '.join(outer)}"
        )
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            rows, total = await keyset_page(conn, matching, args, after, limit)
        return [UpstreamSiteRecord.from_row(row) for row in rows], total

    async def list_contracts(
        self, upstream_site_id: UpstreamSiteId, after: Cursor | None, limit: int
    ) -> tuple[list[ContractRecord], int]:
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            args: list[Any] = [upstream_site_id]
            scope = self._scope("org_id", args)
            timezone = await conn.fetchval(
                f"SELECT timezone FROM upstream_sites WHERE id = $1 AND {scope}", *args
            )
            if timezone is None:
                raise NotFoundError("upstream site", str(upstream_site_id))
            today = local_date(self._clock.now(), timezone)
            # The upstream site is in scope, and so are its contracts (same organization).
            rows, total = await keyset_page(
                conn,
                "SELECT * FROM contracts WHERE upstream_site_id = $1",
                [upstream_site_id],
                after,
                limit,
            )
        return [ContractRecord.from_row(row, today) for row in rows], total


def _duplicate_identifier(identifier: str) -> AlreadyExistsError:
    return AlreadyExistsError(
        "grid_identifier", f"you already registered an upstream site with identifier {identifier}"
    )


class SupplierStore(UpstreamReader):
    """Reads and writes of one supplier organization's upstream sites and contracts."""

    def __init__(self, pool: asyncpg.Pool, clock: Clock, org_id: OrgId) -> None:
        super().__init__(pool, clock, org_id)
        self._supplier_id = org_id

    async def create_upstream_site(self, fields: UpstreamSiteFields) -> UpstreamSiteRecord:
        async with self._pool.acquire() as conn, conn.transaction():
            # The identifier's lock before the INSERT takes its created_at: waiting for it
            # after, the row would commit later than rows created after it, and a
            # ListUpstreamSites paging by created_at meanwhile would pass it by for good.
            await lock_identifiers(conn, [fields.grid_identifier])
            try:
                site_id = await conn.fetchval(
                    """
                    INSERT INTO upstream_sites (org_id, grid_identifier, country, timezone,
                        external_id)
                    VALUES ($1, $2, $3, $4, $5)
                    RETURNING id
                    """,
                    self._supplier_id,
                    fields.grid_identifier,
                    fields.country,
                    fields.timezone,
                    fields.external_id,
                )
            except asyncpg.UniqueViolationError:
                raise _duplicate_identifier(fields.grid_identifier) from None
            await refresh_upstream_status(conn, [fields.grid_identifier], self._clock.now())
            return await self._get_site(conn, site_id)

    async def delete_upstream_site(self, upstream_site_id: UpstreamSiteId) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            identifier = await conn.fetchval(
                "DELETE FROM upstream_sites WHERE id = $1 AND org_id = $2 "
                "RETURNING grid_identifier",
                upstream_site_id,
                self._supplier_id,
            )
            if identifier is None:
                raise NotFoundError("upstream site", str(upstream_site_id))
            await refresh_upstream_status(conn, [identifier], self._clock.now())

    async def _lock_site(
        self, conn: asyncpg.Connection, upstream_site_id: UpstreamSiteId
    ) -> asyncpg.Record:
        row = await conn.fetchrow(
            "SELECT * FROM upstream_sites WHERE id = $1 AND org_id = $2 FOR UPDATE",
            upstream_site_id,
            self._supplier_id,
        )
        if row is None:
            raise NotFoundError("upstream site", str(upstream_site_id))
        return row

    async def _lock_contract(
        self, conn: asyncpg.Connection, contract_id: ContractId
    ) -> tuple[asyncpg.Record, asyncpg.Record]:
        """The contract and its upstream site, the site row locked (which guards its contracts)."""
        site_id = await conn.fetchval(
            "SELECT upstream_site_id FROM contracts WHERE id = $1 AND org_id = $2",
            contract_id,
            self._supplier_id,
        )
        if site_id is None:
            raise NotFoundError("contract", str(contract_id))
        site = await self._lock_site(conn, site_id)
        contract = await conn.fetchrow(
            "SELECT * FROM contracts WHERE id = $1 AND org_id = $2", contract_id, self._supplier_id
        )
        if contract is None:  # deleted with its upstream site meanwhile
            raise NotFoundError("contract", str(contract_id))
        return site, contract

    async def create_contract(
        self, upstream_site_id: UpstreamSiteId, terms: ContractTerms
    ) -> ContractRecord:
        """Creates the contract; identical terms to a live contract return that one (retry)."""
        now = self._clock.now()
        async with self._pool.acquire() as conn, conn.transaction():
            site = await self._lock_site(conn, upstream_site_id)
            today = local_date(now, site["timezone"])
            existing = await conn.fetch(
                "SELECT * FROM contracts WHERE upstream_site_id = $1 AND org_id = $2 "
                "ORDER BY created_at, id",
                upstream_site_id,
                self._supplier_id,
            )
            for row in existing:
                if (
                    row["termination_date"] is None
                    and row["start_date"] == terms.start_date
                    and row["end_date"] == terms.end_date
                    and row["requires_agreement"] == terms.requires_agreement
                ):
                    return ContractRecord.from_row(row, today)
            validate_new_contract(terms, [terms_from_row(row) for row in existing], today)
            row = await conn.fetchrow(
                """
                INSERT INTO contracts (org_id, upstream_site_id, start_date, end_date,
                    requires_agreement)
                VALUES ($1, $2, $3, $4, $5)
                RETURNING *
                """,
                self._supplier_id,
                upstream_site_id,
                terms.start_date,
                terms.end_date,
                terms.requires_agreement,
            )
            await refresh_upstream_status(conn, [site["grid_identifier"]], now)
        return ContractRecord.from_row(row, today)

    async def agree_contract(
        self, contract_id: ContractId, agreed_by: str, agreed_at: datetime | None
    ) -> ContractRecord:
        now = self._clock.now()
        when = agreed_at or now
        who = validate_agreement_input(agreed_by, when, now)
        async with self._pool.acquire() as conn, conn.transaction():
            site, row = await self._lock_contract(conn, contract_id)
            today = local_date(now, site["timezone"])
            if (
                row["agreed_at"] is not None
                and row["agreed_by"] == who
                and (agreed_at is None or agreed_at == row["agreed_at"])
            ):
                return ContractRecord.from_row(row, today)
            validate_agreement(terms_from_row(row), today)
            row = await conn.fetchrow(
                """
                UPDATE contracts SET agreed_at = $2, agreed_by = $3, updated_at = clock_timestamp()
                WHERE id = $1 RETURNING *
                """,
                contract_id,
                when,
                who,
            )
            await refresh_upstream_status(conn, [site["grid_identifier"]], now)
        return ContractRecord.from_row(row, today)

    async def terminate_contract(
        self, contract_id: ContractId, effective_date: date
    ) -> ContractRecord:
        now = self._clock.now()
        async with self._pool.acquire() as conn, conn.transaction():
            site, row = await self._lock_contract(conn, contract_id)
            today = local_date(now, site["timezone"])
            if row["termination_date"] == effective_date:
                return ContractRecord.from_row(row, today)
            validate_termination(terms_from_row(row), effective_date, today)
            row = await conn.fetchrow(
                """
                UPDATE contracts SET termination_date = $2, terminated_at = $3,
                    updated_at = clock_timestamp()
                WHERE id = $1 RETURNING *
                """,
                contract_id,
                effective_date,
                now,
            )
            await refresh_upstream_status(conn, [site["grid_identifier"]], now)
        return ContractRecord.from_row(row, today)
