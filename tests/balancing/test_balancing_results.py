"""What the worker stores, read back over gRPC: settings and methods changing mid-month,
meters starting and ending mid-day, DST days, incomplete intervals becoming complete, a
correction re-balancing only its interval, and exact aggregation to coarser intervals."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import pytest
from google.protobuf import field_mask_pb2
from openvpp.v1 import balancing_pb2 as bpb
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import site_registry_pb2 as spb
from openvpp.v1 import telemetry_pb2 as tpb

from service.app import Service
from service.balancing.worker import BalancingQueueConsumer
from tests.balancing.conftest import Community, by_pair, day, drain, stamp
from tests.conftest import Org
from tests.helpers import expect_invalid

BERLIN = ZoneInfo("Europe/Berlin")
Q = timedelta(minutes=15)


def local(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=BERLIN).astimezone(UTC)


def window(start: datetime, end: datetime) -> dict[str, Any]:
    return {"start_time": stamp(start), "end_time": stamp(end)}


async def test_settings_and_methods_changing_mid_month(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    a = await community.meter()
    b = await community.meter()
    pv = await community.meter(direction=mpb.METER_DIRECTION_PRODUCER)
    days = [local(2025, 1, d, 12) for d in (10, 20, 28)]
    for at in days:
        await community.profile(a, at, [80])
        await community.profile(b, at, [20])
        await community.profile(pv, at, [60])
    # Settings and the policy come after the data: their writes queue the days with data.
    await community.participate(a)
    await community.participate(b, end=date(2025, 1, 25))
    await community.participate(pv)
    await community.policy(bpb.ALLOCATION_METHOD_PRO_RATA, date(2025, 1, 15))
    await drain(consumer)

    async def january() -> dict[tuple[datetime, str, str], int]:
        return by_pair(
            await community.balances(
                site_id=community.site.id,
                interval="PT15M",
                **window(local(2025, 1, 1), local(2025, 2, 1)),
            )
        )

    cells = await january()
    # Jan 10, EQUAL (no policy yet): 30 each, B needs 20, A takes the 10 B leaves.
    assert cells[(days[0], pv.id, a.id)] == 40
    assert cells[(days[0], pv.id, b.id)] == 20
    # Jan 20, PRO_RATA by demand 80:20.
    assert cells[(days[1], pv.id, a.id)] == 48
    assert cells[(days[1], pv.id, b.id)] == 12
    # Jan 28: B's setting ended on the 25th; A takes everything.
    assert cells[(days[2], pv.id, a.id)] == 60
    assert (days[2], pv.id, b.id) not in cells
    assert cells[(days[2], "GRID", a.id)] == 20

    # Ending A's participation on the 15th re-balances the days after it.
    settings = await community.balancing.ListMeterBalancingSettings(
        bpb.ListMeterBalancingSettingsRequest(site_id=community.site.id, meter_id=a.id),
        metadata=community.org.auth,
    )
    await community.balancing.UpdateMeterBalancingSetting(
        bpb.UpdateMeterBalancingSettingRequest(
            setting=bpb.MeterBalancingSetting(
                id=settings.settings[0].id, end_date=day(date(2025, 1, 15))
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["end_date"]),
        ),
        metadata=community.org.auth,
    )
    await drain(consumer)
    cells = await january()
    assert cells[(days[0], pv.id, a.id)] == 40
    assert cells[(days[1], pv.id, b.id)] == 20
    assert cells[(days[1], pv.id, "GRID")] == 40
    assert (days[1], pv.id, a.id) not in cells


async def test_meters_starting_and_ending_mid_day(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    noon, evening = local(2025, 1, 10, 12), local(2025, 1, 10, 18)
    early = await community.meter()
    late = await community.meter(start=noon)
    pv = await community.meter(direction=mpb.METER_DIRECTION_PRODUCER, end=evening)
    for meter in (early, late, pv):
        await community.participate(meter)
    await community.profile(early, local(2025, 1, 10), [100] * 96)
    await community.profile(late, noon, [100] * 48)
    await community.profile(pv, local(2025, 1, 10), [60] * 72)
    await drain(consumer)

    rows = await community.balances(
        site_id=community.site.id,
        interval="PT15M",
        **window(local(2025, 1, 10), local(2025, 1, 11)),
    )
    cells = by_pair(rows)
    assert all(r.complete for r in rows)
    before = noon - Q
    assert cells[(before, pv.id, early.id)] == 60
    assert (before, pv.id, late.id) in cells
    assert cells[(before, pv.id, late.id)] == 0
    assert cells[(before, "GRID", late.id)] == 0
    assert cells[(noon, pv.id, early.id)] == 30
    assert cells[(noon, pv.id, late.id)] == 30
    # From 18:00 the producer is out of service: all demand from the grid, nothing missing.
    assert cells[(evening, pv.id, early.id)] == 0
    assert cells[(evening, "GRID", early.id)] == 100
    assert cells[(evening, "GRID", late.id)] == 100
    day_summary = await community.summaries(
        interval="P1D", **window(local(2025, 1, 10), local(2025, 1, 11))
    )
    assert len(day_summary) == 1
    assert day_summary[0].production_wh == 60 * 72
    assert day_summary[0].demand_wh == 100 * 96 + 100 * 48
    assert day_summary[0].complete_intervals == 96


async def test_dst_days_have_92_and_100_quarter_hours(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    home = await community.meter()
    pv = await community.meter(direction=mpb.METER_DIRECTION_PRODUCER)
    await community.participate(home)
    await community.participate(pv)
    for day_start, count in ((local(2025, 3, 30), 92), (local(2025, 10, 26), 100)):
        await community.profile(home, day_start, [10] * count)
        await community.profile(pv, day_start, [4] * count)
    await drain(consumer)
    for day_start, count in ((local(2025, 3, 30), 92), (local(2025, 10, 26), 100)):
        end = day_start + timedelta(hours=24 + (-1 if count == 92 else 1))
        summaries = await community.summaries(interval="P1D", **window(day_start, end))
        assert [(s.balance_intervals, s.complete_intervals) for s in summaries] == [(count, count)]
        assert summaries[0].interval_end.ToDatetime(tzinfo=UTC) == end
        assert summaries[0].demand_wh == 10 * count
        assert summaries[0].shared_wh == 4 * count
        hours = await community.summaries(interval="PT1H", **window(day_start, end))
        assert len(hours) == count // 4
        assert sum(h.shared_wh for h in hours) == 4 * count


async def test_hourly_outputs_in_lord_howe_stay_on_local_hours_across_its_half_hour_dst(
    partner: Org, community: Community, consumer: BalancingQueueConsumer
) -> None:
    lord_howe = ZoneInfo("Australia/Lord_Howe")  # +11 in summer, +10:30 in winter
    island = await community.another_site(
        timezone="Australia/Lord_Howe",
        location=spb.Location(address="Lord Howe Island"),
        balance_resolution="PT1H",
    )
    home = await island.meter(start=datetime(2024, 1, 1, tzinfo=UTC))
    pv = await island.meter(
        direction=mpb.METER_DIRECTION_PRODUCER, start=datetime(2024, 1, 1, tzinfo=UTC)
    )
    for meter in (home, pv):
        await island.participate(meter)
    winter_noon = datetime(2025, 6, 2, 12, tzinfo=lord_howe).astimezone(UTC)
    await island.profile(home, winter_noon, [500])
    await island.profile(pv, winter_noon, [300])
    await drain(consumer)
    # A year from summer to summer: both ends of the range are at +11, a whole hour.
    summaries = await island.summaries(
        interval="PT1H",
        page_size=10_000,
        **window(datetime(2025, 1, 10, tzinfo=UTC), datetime(2026, 1, 10, tzinfo=UTC)),
    )
    assert {
        s.interval_start.ToDatetime(tzinfo=UTC).astimezone(lord_howe).minute for s in summaries
    } == {0}
    noon = [s for s in summaries if s.demand_wh]
    assert [s.interval_start.ToDatetime(tzinfo=UTC).astimezone(lord_howe) for s in noon] == [
        datetime(2025, 6, 2, 12, tzinfo=lord_howe)
    ]
    assert [(s.demand_wh, s.shared_wh, s.complete_intervals) for s in noon] == [(500, 300, 1)]


async def test_an_incomplete_interval_becomes_complete_when_its_reading_arrives(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    a, b, pv = await community.participants(
        mpb.METER_DIRECTION_CONSUMER, mpb.METER_DIRECTION_CONSUMER, mpb.METER_DIRECTION_PRODUCER
    )
    start = local(2025, 2, 3, 10)
    await community.profile(a, start, [50, 50])
    await community.profile(b, start, [50])  # the second quarter-hour is missing
    await community.profile(pv, start, [40, 40])
    await drain(consumer)
    assert consumer.last_result is not None
    rows = await community.balances(
        debitor_meter_id=a.id, interval="PT15M", **window(start, start + 2 * Q)
    )
    state = {(r.interval_start.ToDatetime(tzinfo=UTC), r.creditor_meter_id): r for r in rows}
    assert state[(start, pv.id)].complete
    assert state[(start, pv.id)].energy_wh == 20
    assert not state[(start + Q, pv.id)].complete
    assert state[(start + Q, pv.id)].energy_wh == 0  # never guessed
    hour = await community.summaries(interval="PT1H", **window(start, start + Q))
    assert (hour[0].balance_intervals, hour[0].complete_intervals) == (4, 1)

    await community.profile(b, start + Q, [30])
    await drain(consumer)
    rows = await community.balances(
        debitor_meter_id=a.id, interval="PT15M", **window(start, start + 2 * Q)
    )
    state = {(r.interval_start.ToDatetime(tzinfo=UTC), r.creditor_meter_id): r for r in rows}
    assert state[(start + Q, pv.id)].complete
    assert state[(start + Q, pv.id)].energy_wh == 20
    assert state[(start + Q, "GRID")].energy_wh == 30


async def test_a_correction_rebalances_only_its_interval(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    a, b, pv = await community.participants(
        mpb.METER_DIRECTION_CONSUMER, mpb.METER_DIRECTION_CONSUMER, mpb.METER_DIRECTION_PRODUCER
    )
    day_start = local(2025, 2, 4)
    await community.profile(a, day_start, [30] * 96)
    await community.profile(b, day_start, [10] * 96)
    await community.profile(pv, day_start, [20] * 96)
    await drain(consumer)
    assert consumer.last_result is not None
    assert consumer.last_result.balanced == 96

    corrected = day_start + 40 * Q
    ack = await community.profile(pv, corrected, [100])
    assert ack.corrected_count == 1
    assert await drain(consumer) == 1
    assert consumer.last_result is not None
    assert (consumer.last_result.balanced, consumer.last_result.incomplete) == (1, 0)
    assert consumer.last_result.ranges == [(corrected, corrected + Q)]
    cells = by_pair(
        await community.balances(
            site_id=community.site.id, interval="PT15M", **window(day_start, day_start + 96 * Q)
        )
    )
    assert cells[(corrected, pv.id, a.id)] == 30
    assert cells[(corrected, pv.id, b.id)] == 10
    assert cells[(corrected, pv.id, "GRID")] == 60
    assert cells[(corrected - Q, pv.id, a.id)] == 10
    assert cells[(corrected + Q, pv.id, b.id)] == 10


async def test_aggregating_quarter_hours_gives_exactly_the_coarser_results(
    community: Community, consumer: BalancingQueueConsumer
) -> None:
    rng = random.Random(11)
    consumers = [await community.meter() for _ in range(3)]
    producers = [await community.meter(direction=mpb.METER_DIRECTION_PRODUCER) for _ in range(2)]
    prosumer = await community.meter(direction=mpb.METER_DIRECTION_BIDIRECTIONAL)
    for index, meter in enumerate([*consumers, *producers]):
        await community.participate(meter, priority=1 if index == 0 else None)
    await community.participate(prosumer)
    first_day = local(2025, 3, 30)  # a 92-quarter-hour day, then two ordinary ones
    count = 92 + 96 + 96
    for meter in [*consumers, *producers]:
        await community.profile(meter, first_day, [rng.uniform(0, 300) for _ in range(count)])
    for flow in (tpb.FLOW_IMPORT, tpb.FLOW_EXPORT):
        await community.ingest(
            [
                tpb.Reading(
                    meter_id=prosumer.id,
                    timestamp=stamp(first_day + i * Q),
                    interval_wh=rng.uniform(0, 200),
                    flow=flow,
                )
                for i in range(count)
            ]
        )
    await drain(consumer)
    span = window(first_day, first_day + count * Q)
    fine = await community.balances(site_id=community.site.id, interval="PT15M", **span)
    assert all(r.complete for r in fine)
    # The prosumer never receives its own production.
    assert not [r for r in fine if r.creditor_meter_id == r.debitor_meter_id]
    # Small pages, each resuming after the last row of the one before, give the same rows.
    paged = await community.balances(
        site_id=community.site.id, interval="PT15M", page_size=7, **span
    )
    assert [(r.interval_start, r.creditor_meter_id, r.debitor_meter_id) for r in paged] == [
        (r.interval_start, r.creditor_meter_id, r.debitor_meter_id) for r in fine
    ]
    assert len(await community.summaries(interval="PT1H", page_size=5, **span)) == count // 4
    # A debitor's or creditor's rows (read as a slice of each block) are the site's rows.
    for meter in [*consumers, prosumer]:
        mine = await community.balances(debitor_meter_id=meter.id, interval="PT15M", **span)
        assert by_pair(mine) == {k: v for k, v in by_pair(fine).items() if k[2] == meter.id}
    daily = by_pair(await community.balances(site_id=community.site.id, interval="P1D", **span))
    for meter in [*consumers, prosumer]:
        # Day outputs read the blocks' stored totals, sliced to the debitor.
        mine = await community.balances(debitor_meter_id=meter.id, interval="P1D", **span)
        assert by_pair(mine) == {k: v for k, v in daily.items() if k[2] == meter.id}
    for meter in [*producers, prosumer]:
        mine = await community.balances(creditor_meter_id=meter.id, interval="PT1H", **span)
        hourly = by_pair(
            await community.balances(site_id=community.site.id, interval="PT1H", **span)
        )
        assert by_pair(mine) == {k: v for k, v in hourly.items() if k[1] == meter.id}
    grid_rows = await community.balances(
        site_id=community.site.id, creditor_meter_id="GRID", interval="P1D", **span
    )
    assert {r.creditor_meter_id for r in grid_rows} == {"GRID"}
    assert {r.debitor_meter_id for r in grid_rows} == {m.id for m in [*consumers, prosumer]}
    for interval in ("PT1H", "P1D", "P1M"):
        coarse = await community.balances(site_id=community.site.id, interval=interval, **span)
        expected: dict[tuple[datetime, str, str], int] = defaultdict(int)
        bounds = sorted({r.interval_start.ToDatetime(tzinfo=UTC) for r in coarse})
        for row in fine:
            at = row.interval_start.ToDatetime(tzinfo=UTC)
            owner = max(b for b in bounds if b <= at)
            expected[(owner, row.creditor_meter_id, row.debitor_meter_id)] += row.energy_wh
        assert by_pair(coarse) == dict(expected), interval
    summaries = await community.summaries(interval="P1M", **span)
    total_shared = sum(
        r.energy_wh for r in fine if "GRID" not in (r.creditor_meter_id, r.debitor_meter_id)
    )
    assert sum(s.shared_wh for s in summaries) == total_shared
    # Margins per interval: what each producer shared plus its feed-in is its production.
    quarter = await community.summaries(interval="PT15M", **span)
    assert len(quarter) == count
    for summary in quarter:
        assert summary.shared_wh + summary.feed_in_wh == summary.production_wh
        assert summary.shared_wh + summary.grid_supply_wh == summary.demand_wh


async def test_a_monthly_site_is_balanced_on_monthly_totals(
    partner: Org,
    community: Community,
    consumer: BalancingQueueConsumer,
) -> None:
    monthly = await community.another_site(
        balance_resolution="P1M",
        type=spb.SITE_TYPE_BALANCED_INACCURATE,
    )
    home = await monthly.meter(measuring=mpb.MEASURING_READINGS_INACCURATE)
    pv = await monthly.meter(
        direction=mpb.METER_DIRECTION_PRODUCER, measuring=mpb.MEASURING_READINGS_INACCURATE
    )
    await monthly.participate(home)
    await monthly.participate(pv)
    months = [local(2025, m, 1) for m in (1, 2, 3, 4)]
    await monthly.ingest(
        [
            tpb.Reading(meter_id=home.id, timestamp=stamp(at), register_wh=1000.0 * n)
            for n, at in enumerate(months)
        ]
        + [
            tpb.Reading(meter_id=pv.id, timestamp=stamp(at), register_wh=400.0 * n * n)
            for n, at in enumerate(months)
        ]
    )
    await drain(consumer)
    rows = await monthly.balances(site_id=monthly.site.id, **window(months[0], months[3]))
    cells = by_pair(rows)
    # Production 400, 1200, 2000 against a demand of 1000 a month.
    assert [cells[(m, pv.id, home.id)] for m in months[:3]] == [400, 1000, 1000]
    assert [cells[(m, pv.id, "GRID")] for m in months[:3]] == [0, 200, 1000]
    assert all(r.complete for r in rows)
    await expect_invalid(
        monthly.balancing.ListBalanceSummaries(
            bpb.ListBalanceSummariesRequest(
                site_id=monthly.site.id, interval="P1D", **window(months[0], months[1])
            ),
            metadata=monthly.org.auth,
        ),
        "interval",
    )


async def test_a_site_no_longer_balanced_loses_its_balances(
    partner: Org, community: Community, consumer: BalancingQueueConsumer, service: Service
) -> None:
    site = await community.another_site(
        supply_points=[
            spb.SupplyPoint(
                grid_identifier="51234567895", direction=spb.SUPPLY_POINT_DIRECTION_OFFTAKE
            )
        ],
    )
    home = await site.meter()
    await site.participate(home)
    start = local(2025, 6, 2, 12)
    await site.profile(home, start, [10, 10])
    await drain(consumer)
    assert service.pool is not None
    blocks = "SELECT count(*) FROM balance_blocks WHERE site_id = $1"
    assert await service.pool.fetchval(blocks, UUID(site.site.id)) == 1

    await site.registry.UpdateSite(
        spb.UpdateSiteRequest(
            site=spb.Site(id=site.site.id, type=spb.SITE_TYPE_UNBALANCED_ACCURATE),
            update_mask=field_mask_pb2.FieldMask(paths=["type"]),
        ),
        metadata=site.org.auth,
    )
    await drain(consumer)
    assert await service.pool.fetchval(blocks, UUID(site.site.id)) == 0
    rows = await site.balances(site_id=site.site.id, **window(start, start + Q))
    assert rows == []


@pytest.mark.parametrize("gap", [False, True], ids=["all-readings", "a-gap-before-joining"])
async def test_a_rows_complete_is_the_same_whichever_filter_reads_it(
    community: Community, consumer: BalancingQueueConsumer, gap: bool
) -> None:
    a = await community.meter()
    joiner = await community.meter()  # joins the community on 15 February
    pv = await community.meter(direction=mpb.METER_DIRECTION_PRODUCER)
    await community.participate(a)
    await community.participate(pv)
    await community.participate(joiner, start=date(2025, 2, 15))
    february, mid, march = local(2025, 2, 1), local(2025, 2, 15), local(2025, 3, 1)
    whole, second_half = (march - february) // Q, (march - mid) // Q
    missing = local(2025, 2, 3, 12) if gap else None
    await community.ingest(
        [
            tpb.Reading(meter_id=a.id, timestamp=stamp(february + i * Q), interval_wh=40)
            for i in range(whole)
            if february + i * Q != missing  # a's reading of 3 February, 12:00, not sent
        ]
    )
    await community.profile(pv, february, [30] * whole)
    await community.profile(joiner, mid, [20] * second_half)
    await drain(consumer)
    summaries = await community.summaries(interval="P1M", **window(february, march))
    complete = whole - 1 if gap else whole
    assert [(s.balance_intervals, s.complete_intervals) for s in summaries] == [(whole, complete)]

    # README: complete = every balance interval of the site's grid inside it is stored and
    # balanced. The same row says the same through every filter that lists it.
    filters: list[dict[str, str]] = [
        {"debitor_meter_id": joiner.id},
        {"creditor_meter_id": pv.id},
        {"creditor_meter_id": pv.id, "debitor_meter_id": joiner.id},
        {"site_id": community.site.id, "creditor_meter_id": "GRID"},
    ]
    spans = {
        "P1M": window(february, march),
        "P1D": window(february, march),
        "PT1H": window(local(2025, 2, 14, 22), local(2025, 2, 15, 2)),
    }
    for interval, span in spans.items():
        site_view = {
            (r.interval_start.ToDatetime(), r.creditor_meter_id, r.debitor_meter_id): r.complete
            for r in await community.balances(site_id=community.site.id, interval=interval, **span)
        }
        if interval == "P1M":
            assert site_view[(february.replace(tzinfo=None), pv.id, joiner.id)] is not gap
        for given in filters:
            rows = await community.balances(interval=interval, **given, **span)
            assert rows, (interval, given)
            for r in rows:
                key = (r.interval_start.ToDatetime(), r.creditor_meter_id, r.debitor_meter_id)
                assert r.complete is site_view[key], (interval, given, key)
