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
# Every day from three before START to three after. The rule compares only today, the start,
# the end and the termination with each other, and three days either side of START give the
# other three dates room to take every ordering relative to it and to each other, ties
# included (e.g. today < termination <= start, a termination between today and the start).
DAYS_AROUND_START = [START + timedelta(days=offset) for offset in range(-3, 4)]


def cases() -> list[tuple[ContractTerms, date]]:
    """Every ordering of today, start, end and termination, each end unset or set (also ends
    on or before the start, which the table forbids but the rule still decides), and every
    kind of agreement."""
    ends: list[date | None] = [None, *DAYS_AROUND_START]
    agreements: list[tuple[bool, datetime | None]] = [
        (False, None),
        (True, None),
        (True, datetime(2031, 1, 1, tzinfo=UTC)),
    ]
    return [
        (ContractTerms(START, end, requires, agreed_at, termination), today)
        for end, termination, (requires, agreed_at), today in itertools.product(
            ends, ends, agreements, DAYS_AROUND_START
        )
    ]


async def test_sql_contract_state_matches_domain(upstream_service: Service) -> None:
    assert upstream_service.pool is not None
    all_cases = cases()
    async with upstream_service.pool.acquire() as conn:
        # One statement for all cases: over a thousand round trips would slow the suite.
        rows = await conn.fetch(
            """
            SELECT upstream_contract_state(start_date, end_date, termination_date,
                requires_agreement, agreed_at, today) AS state
            FROM unnest($1::date[], $2::date[], $3::date[], $4::boolean[], $5::timestamptz[],
                $6::date[]) WITH ORDINALITY
                AS c(start_date, end_date, termination_date, requires_agreement, agreed_at,
                    today, position)
            ORDER BY position
            """,
            [terms.start_date for terms, _ in all_cases],
            [terms.end_date for terms, _ in all_cases],
            [terms.termination_date for terms, _ in all_cases],
            [terms.requires_agreement for terms, _ in all_cases],
            [terms.agreed_at for terms, _ in all_cases],
            [today for _, today in all_cases],
        )
    assert len(rows) == len(all_cases)
    disagreements = [
        (terms, today, row["state"], contract_state(terms, today))
        for (terms, today), row in zip(all_cases, rows, strict=True)
        if ContractState(row["state"]) is not contract_state(terms, today)
    ]
    assert disagreements == []


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
