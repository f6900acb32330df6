"""Static keys the API accepts (a tier's shares within ``SHARE_SUM_SLACK`` of 1) balance,
by RunBalancing and by the queue worker alike: they made the engine raise, so RunBalancing
answered INTERNAL and the worker held the site back on every pass, its new readings too."""

from __future__ import annotations

from datetime import UTC, date, datetime
from uuid import UUID
from zoneinfo import ZoneInfo

from openvpp.v1 import balancing_pb2 as bpb
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import site_registry_pb2 as spb
from openvpp.v1 import telemetry_pb2 as tpb

from service.balancing.worker import BalancingQueueConsumer
from tests.balancing.conftest import Community, drain, stamp

BERLIN = ZoneInfo("Europe/Berlin")


def local(year: int, month: int, day: int = 1) -> datetime:
    return datetime(year, month, day, tzinfo=BERLIN).astimezone(UTC)


async def run_balancing(site: Community, start: datetime, end: datetime) -> int:
    response = await site.balancing.RunBalancing(
        bpb.RunBalancingRequest(site_id=site.site.id, start_time=stamp(start), end_time=stamp(end)),
        metadata=site.org.auth,
    )
    return response.balanced_intervals


async def test_keys_a_little_over_one_balance_a_large_month(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    """0.6 + 0.4000000009 is accepted; at 2e9 Wh a month (2.7 MW on average) the 1e-9 too
    much was 2 Wh offered beyond the producer's energy, and the margins broke."""
    site = await community.another_site(
        balance_resolution="P1M", type=spb.SITE_TYPE_BALANCED_INACCURATE
    )
    register = mpb.MEASURING_READINGS_INACCURATE
    pv = await site.meter(direction=mpb.METER_DIRECTION_PRODUCER, measuring=register)
    homes = [await site.meter(measuring=register) for _ in range(2)]
    await site.policy(bpb.ALLOCATION_METHOD_STATIC, date(2025, 1, 1))
    await site.participate(pv)
    for home, share in zip(homes, (0.6, 0.4000000009), strict=True):
        await site.participate(home, share=share)
    months = [local(2025, 1), local(2025, 2)]
    await site.ingest(
        [
            tpb.Reading(meter_id=meter.id, timestamp=stamp(at), register_wh=2e9 * n)
            for meter in (pv, *homes)
            for n, at in enumerate(months)
        ]
    )
    await drain(consumer)  # raised on the site's pass
    assert await run_balancing(site, *months) == 1


async def test_keys_the_api_sums_as_the_engine_does(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    """Nine keys at most 1 + 1e-9 added one by one (the API's check), one ulp over it as
    numpy pairs them up (the engine's): accepted, then refused by the engine."""
    nine = [
        0.14326733703072186,
        0.11569730588112762,
        0.05236256591434324,
        0.10141866116745812,
        0.15231925260463125,
        0.14605691263981405,
        0.08721392104667393,
        0.10166404371523,
        0.10000000100000007,
    ]
    pv = await community.meter(direction=mpb.METER_DIRECTION_PRODUCER)
    # In meter-id order: the engine's columns, and so the order numpy added them in.
    homes = sorted([await community.meter() for _ in nine], key=lambda meter: UUID(meter.id))
    await community.policy(bpb.ALLOCATION_METHOD_STATIC, date(2025, 1, 1))
    await community.participate(pv)
    for home, share in zip(homes, nine, strict=True):
        await community.participate(home, share=share)
    start = local(2025, 1, 1)
    await community.ingest(
        [
            tpb.Reading(meter_id=meter.id, timestamp=stamp(start), interval_wh=100.0)
            for meter in (pv, *homes)
        ]
    )
    await drain(consumer)
    assert await run_balancing(community, start, local(2025, 1, 2)) == 1
