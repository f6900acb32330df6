"""The seed guide "Metered in, balanced out" end to end over gRPC: a balanced site without
supply points, a meter, its balancing setting with a priority, readings, and the
aggregated balances of the meter as debitor at PT15M."""

from __future__ import annotations

from datetime import UTC, timedelta

from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import telemetry_pb2 as tpb

from service.balancing.worker import BalancingQueueConsumer
from tests.balancing.conftest import BERLIN_NEW_YEAR, Community, by_pair, drain, stamp

Q = timedelta(minutes=15)


async def test_seed_flow_registers_to_aggregated_balances(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    assert community.site.grid_identifier == ""
    meter = await community.meter(
        measuring=mpb.MEASURING_READINGS_ACCURATE,
        start=BERLIN_NEW_YEAR,
        identifier="1ISK0001",
    )
    pv = await community.meter(direction=mpb.METER_DIRECTION_PRODUCER)
    setting = await community.participate(meter, priority=1)
    assert setting.priority == 1
    assert setting.site_id == community.site.id
    await community.participate(pv)

    registers = [1000.0, 1100.0, 1250.0, 1300.0, 1400.0]
    await community.ingest(
        [
            tpb.Reading(meter_id=meter.id, timestamp=stamp(BERLIN_NEW_YEAR + i * Q), register_wh=v)
            for i, v in enumerate(registers)
        ]
    )
    await community.profile(pv, BERLIN_NEW_YEAR, [80, 80, 80, 80])
    assert await drain(consumer) >= 1

    rows = await community.balances(
        debitor_meter_id=meter.id,
        start_time=stamp(BERLIN_NEW_YEAR),
        end_time=stamp(BERLIN_NEW_YEAR + timedelta(days=31)),
        interval="PT15M",
    )
    cells = by_pair(rows)
    demand = [100, 150, 50, 100]
    for i, wanted in enumerate(demand):
        at = BERLIN_NEW_YEAR + i * Q
        assert cells[(at, pv.id, meter.id)] == min(80, wanted)
        assert cells[(at, "GRID", meter.id)] == wanted - min(80, wanted)
    complete = {r.interval_start.ToDatetime(tzinfo=UTC) for r in rows if r.complete}
    assert complete == {BERLIN_NEW_YEAR + i * Q for i in range(4)}
    # Every row names this meter as debitor; its day (96 quarter-hours) is reported.
    assert {r.debitor_meter_id for r in rows} == {meter.id}
    assert len(rows) == 96 * 2

    summary = await community.summaries(
        start_time=stamp(BERLIN_NEW_YEAR),
        end_time=stamp(BERLIN_NEW_YEAR + timedelta(days=1)),
        interval="P1D",
    )
    assert len(summary) == 1
    day = summary[0]
    assert (day.production_wh, day.demand_wh, day.shared_wh) == (320, 400, 290)
    assert (day.feed_in_wh, day.grid_supply_wh) == (30, 110)
    assert (day.balance_intervals, day.complete_intervals) == (96, 4)
