"""Edges of the balancing reads found in review: one-sided sites, page tokens, range bounds."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import grpc
from openvpp.v1 import balancing_pb2 as bpb
from openvpp.v1 import balancing_pb2_grpc
from openvpp.v1 import meter_registry_pb2 as mpb

from service.balancing.worker import BalancingQueueConsumer
from tests.balancing.conftest import Community, drain, stamp
from tests.conftest import Org
from tests.helpers import expect_invalid, rpc_error

Q = timedelta(minutes=15)
START = datetime(2025, 3, 4, 10, tzinfo=ZoneInfo("Europe/Berlin")).astimezone(UTC)


def window(start: datetime, end: datetime) -> dict[str, Any]:
    return {"start_time": stamp(start), "end_time": stamp(end)}


async def test_a_site_with_only_consumers_lists_its_grid_supply(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    only = await community.meter()
    await community.participate(only)
    await community.profile(only, START, [70, 80])
    await drain(consumer)
    rows = await community.balances(
        site_id=community.site.id,
        debitor_meter_id="GRID",
        interval="PT15M",
        **window(START, START + 2 * Q),
    )
    assert rows == []  # nothing is fed in without a producer
    supplied = await community.balances(
        site_id=community.site.id,
        creditor_meter_id="GRID",
        interval="PT15M",
        **window(START, START + 2 * Q),
    )
    assert [(r.debitor_meter_id, r.energy_wh) for r in supplied] == [(only.id, 70), (only.id, 80)]


async def test_a_site_with_only_producers_lists_its_feed_in(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    pv = await community.meter(direction=mpb.METER_DIRECTION_PRODUCER)
    await community.participate(pv)
    await community.profile(pv, START, [40])
    await drain(consumer)
    supplied = await community.balances(
        site_id=community.site.id,
        creditor_meter_id="GRID",
        interval="PT15M",
        **window(START, START + Q),
    )
    assert supplied == []
    fed_in = await community.balances(
        site_id=community.site.id,
        debitor_meter_id="GRID",
        interval="PT15M",
        **window(START, START + Q),
    )
    assert [(r.creditor_meter_id, r.energy_wh) for r in fed_in] == [(pv.id, 40)]


async def _first_page(community: Community, org: Org, **fields: Any) -> str:
    request = bpb.ListAggregatedBalancesRequest(
        site_id=community.site.id, interval="PT15M", page_size=1, **fields
    )
    response = await community.balancing.ListAggregatedBalances(request, metadata=org.auth)
    assert response.next_page_token
    return response.next_page_token


async def _two_intervals_first_page(community: Community, consumer: BalancingQueueConsumer) -> str:
    """A consumer and a producer balanced over two intervals; the first page's token."""
    a, pv = await community.participants(mpb.METER_DIRECTION_CONSUMER, mpb.METER_DIRECTION_PRODUCER)
    await community.profile(a, START, [50, 50])
    await community.profile(pv, START, [40, 40])
    await drain(consumer)
    return await _first_page(community, community.org, **window(START, START + 2 * Q))


async def test_a_page_token_is_bound_to_the_filters_and_the_organization(
    community: Community,
    consumer: BalancingQueueConsumer,
    other_partner: Org,
    balancing: balancing_pb2_grpc.BalancingAsyncStub,
) -> None:
    token = await _two_intervals_first_page(community, consumer)

    other_filters = bpb.ListAggregatedBalancesRequest(
        site_id=community.site.id, interval="PT1H", page_token=token, **window(START, START + 2 * Q)
    )
    rule = await expect_invalid(
        community.balancing.ListAggregatedBalances(other_filters, metadata=community.org.auth),
        "page_token",
    )
    assert "same filters" in rule

    # Another organization never sees the site; with a site of its own, the token is refused.
    mine = bpb.ListAggregatedBalancesRequest(
        site_id=community.site.id,
        interval="PT15M",
        page_token=token,
        **window(START, START + 2 * Q),
    )
    error = await rpc_error(balancing.ListAggregatedBalances(mine, metadata=other_partner.auth))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    summaries = bpb.ListBalanceSummariesRequest(
        site_id=community.site.id, interval="PT15M", page_size=1, **window(START, START + 2 * Q)
    )
    summary_token = (
        await community.balancing.ListBalanceSummaries(summaries, metadata=community.org.auth)
    ).next_page_token
    assert summary_token
    summaries.page_token = summary_token
    summaries.interval = "PT1H"
    await expect_invalid(
        community.balancing.ListBalanceSummaries(summaries, metadata=community.org.auth),
        "page_token",
    )


def _forged(token: str, **changes: object) -> str:
    """``token`` with its body changed and its fingerprint kept (a caller can compute it)."""
    body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    text = json.dumps({**body, **changes})
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


async def test_a_forged_page_token_is_invalid_argument(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    token = await _two_intervals_first_page(community, consumer)
    for forged in (
        _forged(token, s=10**30),
        _forged(token, s=-(10**30)),
        _forged(token, s="0"),
        _forged(token, s=True),
        _forged(token, c=5),
    ):
        request = bpb.ListAggregatedBalancesRequest(
            site_id=community.site.id,
            interval="PT15M",
            page_size=1,
            page_token=forged,
            **window(START, START + 2 * Q),
        )
        await expect_invalid(
            community.balancing.ListAggregatedBalances(request, metadata=community.org.auth),
            "page_token",
        )


async def test_list_ranges_are_bounded(community: Community) -> None:
    far = window(datetime(1900, 1, 1, tzinfo=UTC), datetime(2199, 1, 1, tzinfo=UTC))
    request = bpb.ListAggregatedBalancesRequest(
        site_id=community.site.id, debitor_meter_id="GRID", interval="PT15M", **far
    )
    rule = await expect_invalid(
        community.balancing.ListAggregatedBalances(request, metadata=community.org.auth),
        "end_time",
    )
    assert "3660 days" in rule
    summaries = bpb.ListBalanceSummariesRequest(site_id=community.site.id, interval="PT15M", **far)
    await expect_invalid(
        community.balancing.ListBalanceSummaries(summaries, metadata=community.org.auth),
        "end_time",
    )
    run = bpb.RunBalancingRequest(site_id=community.site.id, **far)
    assert "400 days" in await expect_invalid(
        community.balancing.RunBalancing(run, metadata=community.org.auth), "end_time"
    )
