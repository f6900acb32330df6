"""DeleteMeter of a participant: every interval it took part in is re-balanced without it,
also those where it had no readings (which its participation alone left incomplete)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from openvpp.v1 import meter_registry_pb2 as mpb

from service.balancing.worker import BalancingQueueConsumer
from tests.balancing.conftest import Community, drain, stamp

BERLIN = ZoneInfo("Europe/Berlin")
Q = timedelta(minutes=15)


def local(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=BERLIN).astimezone(UTC)


async def _delete(community: Community, meter: mpb.Meter) -> None:
    await community.meters.DeleteMeter(
        mpb.DeleteMeterRequest(meter_id=meter.id), metadata=community.org.auth
    )


async def test_deleting_a_participant_without_readings_completes_its_intervals(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    a = await community.meter()
    pv = await community.meter(direction=mpb.METER_DIRECTION_PRODUCER)
    mistaken = await community.meter()  # set up by mistake, never delivers readings
    for meter in (a, pv, mistaken):
        await community.participate(meter)
    at = local(2025, 3, 4, 10)
    await community.profile(a, at, [50])
    await community.profile(pv, at, [40])
    await drain(consumer)
    before = await community.summaries(
        interval="PT15M", start_time=stamp(at), end_time=stamp(at + Q)
    )
    assert [s.complete_intervals for s in before] == [0]  # the mistaken meter has no energy

    await _delete(community, mistaken)
    await drain(consumer)
    after = await community.summaries(
        interval="PT15M", start_time=stamp(at), end_time=stamp(at + Q)
    )
    assert [(s.complete_intervals, s.shared_wh) for s in after] == [(1, 40)]
    rows = await community.balances(
        site_id=community.site.id, interval="PT15M", start_time=stamp(at), end_time=stamp(at + Q)
    )
    assert mistaken.id not in {r.debitor_meter_id for r in rows}


async def test_deleting_a_participant_completes_the_intervals_beyond_its_readings(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    a = await community.meter()
    pv = await community.meter(direction=mpb.METER_DIRECTION_PRODUCER)
    short_lived = await community.meter()  # delivered one day, then fell silent
    for meter in (a, pv, short_lived):
        await community.participate(meter)
    first, later = local(2025, 3, 4, 10), local(2025, 3, 20, 10)
    for at in (first, later):
        await community.profile(a, at, [50])
        await community.profile(pv, at, [40])
    await community.profile(short_lived, first, [30])
    await drain(consumer)
    span = {"start_time": stamp(first), "end_time": stamp(later + Q), "interval": "P1D"}
    assert sum(s.complete_intervals for s in await community.summaries(**span)) == 1

    await _delete(community, short_lived)
    await drain(consumer)
    days = [s for s in await community.summaries(**span) if s.demand_wh]
    assert [(s.complete_intervals, s.demand_wh, s.shared_wh) for s in days] == [
        (1, 50, 40),
        (1, 50, 40),
    ]
