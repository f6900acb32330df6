"""Settings and policies over gRPC: histories by date, share sums, field violations,
FAILED_PRECONDITION for sites that are not balanced, and tenancy on every RPC."""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import date, timedelta
from typing import Any

import grpc
from google.protobuf import field_mask_pb2
from google.type import date_pb2
from openvpp.v1 import balancing_pb2 as bpb
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import site_registry_pb2 as spb

from service.app import Service
from tests.balancing.conftest import (
    BERLIN_NEW_YEAR,
    Community,
    day,
    stamp,
)
from tests.conftest import Org
from tests.helpers import expect_invalid, field_violations, rpc_error

JAN = date(2025, 1, 1)


def setting_request(
    community: Community, meter: mpb.Meter, start: date, end: date | None = None, **fields: object
) -> bpb.CreateMeterBalancingSettingRequest:
    return bpb.CreateMeterBalancingSettingRequest(
        meter_id=meter.id,
        balancing=bpb.BALANCING_ROLE_PARTICIPANT,
        start_date=day(start),
        end_date=day(end) if end else None,
        **fields,  # type: ignore[arg-type]
    )


async def test_settings_form_a_history_by_date(community: Community) -> None:
    meter = await community.meter()
    api, auth = community.balancing, community.org.auth
    first = await community.participate(meter, start=JAN, end=date(2025, 2, 1), priority=2)
    # Touching periods are a clean history; an overlap names the field that runs into it.
    await community.participate(meter, start=date(2025, 2, 1), end=date(2025, 3, 1))
    rule = await expect_invalid(
        api.CreateMeterBalancingSetting(
            setting_request(community, meter, date(2025, 1, 15)), metadata=auth
        ),
        "start_date",
    )
    assert "overlaps" in rule
    await expect_invalid(
        api.CreateMeterBalancingSetting(
            setting_request(community, meter, date(2024, 12, 1), date(2025, 1, 2)), metadata=auth
        ),
        "end_date",
    )
    # Another meter's history is its own.
    other = await community.meter()
    await community.participate(other, start=JAN)

    listed = await api.ListMeterBalancingSettings(
        bpb.ListMeterBalancingSettingsRequest(site_id=community.site.id, meter_id=meter.id),
        metadata=auth,
    )
    assert [s.start_date.month for s in listed.settings] == [1, 2]
    assert listed.total_size == 2
    everything = await api.ListMeterBalancingSettings(
        bpb.ListMeterBalancingSettingsRequest(site_id=community.site.id, page_size=1),
        metadata=auth,
    )
    assert everything.total_size == 3
    assert everything.next_page_token

    # Extending the first setting into the second is an overlap too; shortening is fine.
    update = bpb.UpdateMeterBalancingSettingRequest(
        setting=bpb.MeterBalancingSetting(id=first.id, end_date=day(date(2025, 2, 15))),
        update_mask=field_mask_pb2.FieldMask(paths=["end_date"]),
    )
    await expect_invalid(api.UpdateMeterBalancingSetting(update, metadata=auth), "setting.end_date")
    update = bpb.UpdateMeterBalancingSettingRequest(
        setting=bpb.MeterBalancingSetting(id=first.id, end_date=day(date(2025, 1, 20))),
        update_mask=field_mask_pb2.FieldMask(paths=["end_date", "priority"]),
    )
    updated = (await api.UpdateMeterBalancingSetting(update, metadata=auth)).setting
    assert updated.end_date.day == 20
    assert not updated.HasField("priority")  # in the mask and unset: cleared
    await expect_invalid(
        api.UpdateMeterBalancingSetting(
            bpb.UpdateMeterBalancingSettingRequest(
                setting=bpb.MeterBalancingSetting(id=first.id),
                update_mask=field_mask_pb2.FieldMask(paths=["start_date"]),
            ),
            metadata=auth,
        ),
        "update_mask.paths",
    )
    await api.DeleteMeterBalancingSetting(
        bpb.DeleteMeterBalancingSettingRequest(setting_id=first.id), metadata=auth
    )
    # The gap it leaves may be filled again.
    await community.participate(meter, start=JAN, end=date(2025, 2, 1))


async def test_field_rules_are_reported_all_at_once(community: Community) -> None:
    meter = await community.meter()
    api, auth = community.balancing, community.org.auth
    bad = bpb.CreateMeterBalancingSettingRequest(
        meter_id=meter.id,
        start_date=day(JAN),
        end_date=day(JAN),
        priority=0,
        share=1.5,
    )
    error = await rpc_error(api.CreateMeterBalancingSetting(bad, metadata=auth))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error)) == {"balancing", "end_date", "priority", "share"}
    await expect_invalid(
        api.CreateMeterBalancingSetting(
            bpb.CreateMeterBalancingSettingRequest(
                meter_id=meter.id, balancing=bpb.BALANCING_ROLE_PARTICIPANT
            ),
            metadata=auth,
        ),
        "start_date",
    )
    await expect_invalid(
        api.CreateMeterBalancingSetting(
            bpb.CreateMeterBalancingSettingRequest(meter_id="nope"), metadata=auth
        ),
        "meter_id",
    )
    await expect_invalid(
        api.CreateSiteBalancingPolicy(
            bpb.CreateSiteBalancingPolicyRequest(site_id=community.site.id, start_date=day(JAN)),
            metadata=auth,
        ),
        "allocation_method",
    )
    policy: dict[str, Any] = {
        "site_id": community.site.id,
        "allocation_method": bpb.ALLOCATION_METHOD_EQUAL,
    }
    await expect_invalid(
        api.CreateSiteBalancingPolicy(
            bpb.CreateSiteBalancingPolicyRequest(
                start_date=date_pb2.Date(year=2025, month=2, day=30), **policy
            ),
            metadata=auth,
        ),
        "start_date",
    )
    await expect_invalid(
        api.CreateSiteBalancingPolicy(
            bpb.CreateSiteBalancingPolicyRequest(
                start_date=day(JAN), end_date=day(JAN - timedelta(days=1)), **policy
            ),
            metadata=auth,
        ),
        "end_date",
    )
    # Output intervals finer than the site's resolution, and unknown ones.
    for interval in ("PT5M", "P1W"):
        await expect_invalid(
            api.ListBalanceSummaries(
                bpb.ListBalanceSummariesRequest(
                    site_id=community.site.id,
                    start_time=stamp(BERLIN_NEW_YEAR),
                    end_time=stamp(BERLIN_NEW_YEAR + timedelta(days=1)),
                    interval=interval,
                ),
                metadata=auth,
            ),
            "interval",
        )
    await expect_invalid(
        api.ListAggregatedBalances(
            bpb.ListAggregatedBalancesRequest(
                start_time=stamp(BERLIN_NEW_YEAR), end_time=stamp(BERLIN_NEW_YEAR)
            ),
            metadata=auth,
        ),
        "site_id",
    )
    await expect_invalid(
        api.RunBalancing(
            bpb.RunBalancingRequest(
                site_id=community.site.id,
                start_time=stamp(BERLIN_NEW_YEAR),
                end_time=stamp(BERLIN_NEW_YEAR),
            ),
            metadata=auth,
        ),
        "end_time",
    )


async def test_ranges_are_judged_to_the_nanosecond(community: Community) -> None:
    """A range's length is judged on the stamps as sent: one nanosecond over the bound is
    refused, and a range shorter than the microsecond the instants are read at is a valid
    one."""
    api, auth = community.balancing, community.org.auth
    site_id = community.site.id
    start = stamp(BERLIN_NEW_YEAR)
    over = stamp(BERLIN_NEW_YEAR + timedelta(days=400))
    over.nanos += 1
    rule = await expect_invalid(
        api.RunBalancing(
            bpb.RunBalancingRequest(site_id=site_id, start_time=start, end_time=over),
            metadata=auth,
        ),
        "end_time",
    )
    assert "400 days" in rule
    tiny = stamp(BERLIN_NEW_YEAR)
    tiny.nanos += 1
    ran = await api.RunBalancing(
        bpb.RunBalancingRequest(site_id=site_id, start_time=start, end_time=tiny), metadata=auth
    )
    assert (ran.balanced_intervals, ran.incomplete_intervals) == (0, 0)
    aggregated = await api.ListAggregatedBalances(
        bpb.ListAggregatedBalancesRequest(site_id=site_id, start_time=start, end_time=tiny),
        metadata=auth,
    )
    assert list(aggregated.balances) == []
    # Summaries are of the output intervals the range overlaps: the first one, as for a
    # microsecond.
    summaries = [
        await api.ListBalanceSummaries(
            bpb.ListBalanceSummariesRequest(site_id=site_id, start_time=start, end_time=end),
            metadata=auth,
        )
        for end in (tiny, stamp(BERLIN_NEW_YEAR + timedelta(microseconds=1)))
    ]
    assert [s.interval_start for s in summaries[0].summaries] == [start]
    assert summaries[0] == summaries[1]


async def test_static_shares_of_a_tier_must_not_exceed_one(community: Community) -> None:
    api, auth = community.balancing, community.org.auth
    first = await community.meter()
    second = await community.meter()
    third = await community.meter()
    await community.participate(first, share=0.6, priority=1)
    await community.participate(second, share=0.6, priority=2)
    # Under EQUAL (no policy) keys do not matter; a STATIC policy makes them count, per tier.
    await community.policy(bpb.ALLOCATION_METHOD_STATIC, date(2025, 3, 1))
    rule = await expect_invalid(
        api.CreateMeterBalancingSetting(
            setting_request(community, third, date(2025, 3, 10), share=0.5, priority=1),
            metadata=auth,
        ),
        "share",
    )
    assert "priority 1" in rule
    assert "2025-03-10" in rule
    # Before the STATIC policy starts, the same keys are fine.
    await community.participate(third, start=JAN, end=date(2025, 2, 1), share=0.5, priority=1)
    # A policy that would make existing keys exceed 1: refused on allocation_method.
    fourth = await community.meter()
    await community.participate(fourth, start=JAN, end=date(2025, 2, 1), share=0.9, priority=2)
    await expect_invalid(
        api.CreateSiteBalancingPolicy(
            bpb.CreateSiteBalancingPolicyRequest(
                site_id=community.site.id,
                allocation_method=bpb.ALLOCATION_METHOD_STATIC_REDISTRIBUTED,
                start_date=day(JAN),
                end_date=day(date(2025, 2, 1)),
            ),
            metadata=auth,
        ),
        "allocation_method",
    )
    # Policies form a history by date as well.
    await expect_invalid(
        api.CreateSiteBalancingPolicy(
            bpb.CreateSiteBalancingPolicyRequest(
                site_id=community.site.id,
                allocation_method=bpb.ALLOCATION_METHOD_PRO_RATA,
                start_date=day(date(2025, 4, 1)),
            ),
            metadata=auth,
        ),
        "start_date",
    )
    await community.policy(bpb.ALLOCATION_METHOD_PRO_RATA, JAN, date(2025, 2, 1))
    listed = await api.ListSiteBalancingPolicies(
        bpb.ListSiteBalancingPoliciesRequest(site_id=community.site.id), metadata=auth
    )
    assert [p.allocation_method for p in listed.policies] == [
        bpb.ALLOCATION_METHOD_STATIC,
        bpb.ALLOCATION_METHOD_PRO_RATA,
    ]
    # Raising a key through an update is checked the same way.
    settings = await api.ListMeterBalancingSettings(
        bpb.ListMeterBalancingSettingsRequest(site_id=community.site.id, meter_id=second.id),
        metadata=auth,
    )
    await api.UpdateMeterBalancingSetting(
        bpb.UpdateMeterBalancingSettingRequest(
            setting=bpb.MeterBalancingSetting(id=settings.settings[0].id, share=0.5),
            update_mask=field_mask_pb2.FieldMask(paths=["share"]),
        ),
        metadata=auth,
    )
    await expect_invalid(
        api.UpdateMeterBalancingSetting(
            bpb.UpdateMeterBalancingSettingRequest(
                setting=bpb.MeterBalancingSetting(id=settings.settings[0].id, priority=1),
                update_mask=field_mask_pb2.FieldMask(paths=["priority"]),
            ),
            metadata=auth,
        ),
        "setting.share",
    )


async def test_sites_that_are_not_balanced_have_no_balances(
    community: Community, service: Service
) -> None:
    site = (
        await community.registry.CreateSite(
            spb.CreateSiteRequest(
                supply_points=[
                    spb.SupplyPoint(
                        grid_identifier="UNBALANCED1" + community.site.id[:8].upper(),
                        direction=spb.SUPPLY_POINT_DIRECTION_BIDIRECTIONAL,
                    )
                ],
                type=spb.SITE_TYPE_UNBALANCED_ACCURATE,
                timezone="Europe/Berlin",
            ),
            metadata=community.org.auth,
        )
    ).site
    error = await rpc_error(
        community.balancing.RunBalancing(
            bpb.RunBalancingRequest(
                site_id=site.id,
                start_time=stamp(BERLIN_NEW_YEAR),
                end_time=stamp(BERLIN_NEW_YEAR + timedelta(days=1)),
            ),
            metadata=community.org.auth,
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    summaries = await community.balancing.ListBalanceSummaries(
        bpb.ListBalanceSummariesRequest(
            site_id=site.id,
            start_time=stamp(BERLIN_NEW_YEAR),
            end_time=stamp(BERLIN_NEW_YEAR + timedelta(days=1)),
        ),
        metadata=community.org.auth,
    )
    assert list(summaries.summaries) == []


async def test_another_organizations_ids_are_not_found_on_every_rpc(
    community: Community, other_partner: Org
) -> None:
    meter = await community.meter()
    setting = await community.participate(meter)
    api, theirs = community.balancing, other_partner.auth
    site_id = community.site.id
    window: dict[str, Any] = {
        "start_time": stamp(BERLIN_NEW_YEAR),
        "end_time": stamp(BERLIN_NEW_YEAR + timedelta(days=1)),
    }
    their_meter = await (await community.another_site(other_partner)).meter()
    calls: list[Awaitable[Any]] = [
        api.CreateMeterBalancingSetting(
            setting_request(community, meter, date(2026, 1, 1)), metadata=theirs
        ),
        # Their own meter, filed under our site.
        api.CreateMeterBalancingSetting(
            bpb.CreateMeterBalancingSettingRequest(
                site_id=site_id,
                meter_id=their_meter.id,
                balancing=bpb.BALANCING_ROLE_PARTICIPANT,
                start_date=day(JAN),
            ),
            metadata=theirs,
        ),
        api.ListMeterBalancingSettings(
            bpb.ListMeterBalancingSettingsRequest(site_id=site_id), metadata=theirs
        ),
        api.UpdateMeterBalancingSetting(
            bpb.UpdateMeterBalancingSettingRequest(
                setting=bpb.MeterBalancingSetting(id=setting.id, share=0.1),
                update_mask=field_mask_pb2.FieldMask(paths=["share"]),
            ),
            metadata=theirs,
        ),
        api.DeleteMeterBalancingSetting(
            bpb.DeleteMeterBalancingSettingRequest(setting_id=setting.id), metadata=theirs
        ),
        api.CreateSiteBalancingPolicy(
            bpb.CreateSiteBalancingPolicyRequest(
                site_id=site_id,
                allocation_method=bpb.ALLOCATION_METHOD_EQUAL,
                start_date=day(JAN),
            ),
            metadata=theirs,
        ),
        api.ListSiteBalancingPolicies(
            bpb.ListSiteBalancingPoliciesRequest(site_id=site_id), metadata=theirs
        ),
        api.RunBalancing(bpb.RunBalancingRequest(site_id=site_id, **window), metadata=theirs),
        api.ListAggregatedBalances(
            bpb.ListAggregatedBalancesRequest(site_id=site_id, **window), metadata=theirs
        ),
        api.ListAggregatedBalances(
            bpb.ListAggregatedBalancesRequest(debitor_meter_id=meter.id, **window), metadata=theirs
        ),
        # Our site with their own meter: the site is not theirs to name.
        api.ListAggregatedBalances(
            bpb.ListAggregatedBalancesRequest(
                site_id=site_id, debitor_meter_id=their_meter.id, **window
            ),
            metadata=theirs,
        ),
        api.ListBalanceSummaries(
            bpb.ListBalanceSummariesRequest(site_id=site_id, **window), metadata=theirs
        ),
    ]
    for call in calls:
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    stream = api.WatchBalances(bpb.WatchBalancesRequest(site_id=site_id), metadata=theirs)
    error = await rpc_error(stream.read())
    assert error.code() == grpc.StatusCode.NOT_FOUND
    # Nothing of theirs changed ours.
    mine = await api.ListMeterBalancingSettings(
        bpb.ListMeterBalancingSettingsRequest(site_id=site_id), metadata=community.org.auth
    )
    assert [s.id for s in mine.settings] == [setting.id]
    assert not mine.settings[0].HasField("share")
