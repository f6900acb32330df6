"""The SQL copy of contract_state (used to filter lists) agrees with the domain rules."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta

from service.app import Service
from service.upstream.domain import (
    ContractState,
    ContractTerms,
    UpstreamStatus,
    contract_state,
    derive_upstream_status,
)

START = date(2031, 3, 10)
OFFSETS = [-1, 0, 1]


def cases() -> list[tuple[ContractTerms, date]]:
    ends: list[date | None] = [None, START + timedelta(days=5)]
    terminations: list[date | None] = [None, START - timedelta(days=2), START + timedelta(days=3)]
    agreements: list[tuple[bool, datetime | None]] = [
        (False, None),
        (True, None),
        (True, datetime(2031, 1, 1, tzinfo=UTC)),
    ]
    todays = sorted(
        {
            d + timedelta(days=o)
            for d in [START, START + timedelta(days=3), START + timedelta(days=5)]
            for o in OFFSETS
        }
        | {START - timedelta(days=2)}
    )
    result = []
    for end, termination, (requires, agreed_at), today in itertools.product(
        ends, terminations, agreements, todays
    ):
        terms = ContractTerms(START, end, requires, agreed_at, termination)
        result.append((terms, today))
    return result


async def test_sql_contract_state_matches_domain(upstream_service: Service) -> None:
    assert upstream_service.pool is not None
    checked = 0
    async with upstream_service.pool.acquire() as conn:
        for terms, today in cases():
            in_sql = await conn.fetchval(
                "SELECT upstream_contract_state($1, $2, $3, $4, $5, $6)",
                terms.start_date,
                terms.end_date,
                terms.termination_date,
                terms.requires_agreement,
                terms.agreed_at,
                today,
            )
            assert ContractState(in_sql) is contract_state(terms, today), (terms, today)
            checked += 1
    assert checked > 100


async def test_sql_rank_matches_domain_precedence(upstream_service: Service) -> None:
    """Ordering states by the SQL rank gives derive_upstream_status's precedence."""
    assert upstream_service.pool is not None
    async with upstream_service.pool.acquire() as conn:
        ranked = await conn.fetch(
            "SELECT s FROM unnest($1::text[]) s ORDER BY upstream_contract_state_rank(s)",
            [str(s) for s in ContractState],
        )
    in_sql = [ContractState(r["s"]) for r in ranked]
    today = START
    by_state = {
        ContractState.ACTIVE: ContractTerms(START, None, False),
        ContractState.PENDING: ContractTerms(START + timedelta(days=1), None, False),
        ContractState.NEEDS_AGREEMENT: ContractTerms(START, None, True),
        ContractState.INACTIVE: ContractTerms(START - timedelta(days=9), START, False),
    }
    for state, terms in by_state.items():
        assert contract_state(terms, today) is state
    # Each state beats every state ranked after it.
    for i, winner in enumerate(in_sql):
        for loser in in_sql[i + 1 :]:
            status = derive_upstream_status([[by_state[winner], by_state[loser]]], today)
            assert status is UpstreamStatus("contract_" + str(winner))
