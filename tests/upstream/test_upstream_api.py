"""UpstreamRegistry calls: validation, retries, agreement records, pagination and filters."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import timestamp_pb2
from google.type import date_pb2
from openvpp.v1 import site_registry_pb2 as site_pb
from openvpp.v1 import upstream_registry_pb2 as pb

from tests.conftest import Org
from tests.helpers import expect_invalid, random_ean18, random_identifier, rpc_error
from tests.upstream.conftest import BASE, Api, FakeClock, day, days


async def test_create_upstream_site_normalizes_like_partner_sites(api: Api, supplier: Org) -> None:
    identifier = random_ean18()
    site = await api.upstream_site(
        supplier, f" ean{identifier[:9]} {identifier[9:]} ", country="be", external_id=" c-1 "
    )
    assert site.grid_identifier == identifier
    assert site.country == "BE"
    assert site.external_id == "c-1"
    assert site.timezone == "Europe/Brussels"
    assert not site.matched_partner_site
    assert site.contract_state == pb.CONTRACT_STATE_UNSPECIFIED
    assert await api.get_upstream_site(supplier, site.id) == site


async def test_new_rows_carry_one_time_as_created_and_updated(
    api: Api, supplier: Org, partner: Org
) -> None:
    identifier = random_ean18()
    upstream_site = await api.upstream_site(supplier, identifier)
    contract = await api.contract(supplier, upstream_site.id, days(-1))
    assert upstream_site.update_time == upstream_site.create_time
    assert contract.update_time == contract.create_time
    # Its upstream status is set in the transaction that creates it: part of its creation.
    site = await api.partner_site(partner, identifier)
    assert site.upstream_status == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE
    assert site.update_time == site.create_time


async def test_create_upstream_site_rejects_bad_fields(api: Api, supplier: Org) -> None:
    bad_check_digit = random_ean18()[:-1] + "X"
    rule = await expect_invalid(
        api.upstream.CreateUpstreamSite(
            pb.CreateUpstreamSiteRequest(grid_identifier=bad_check_digit, country="BE"),
            metadata=supplier.auth,
        ),
        "grid_identifier",
    )
    assert "EAN" in rule
    await expect_invalid(
        api.upstream.CreateUpstreamSite(
            pb.CreateUpstreamSiteRequest(grid_identifier=random_identifier(), country="XX"),
            metadata=supplier.auth,
        ),
        "country",
    )
    await expect_invalid(
        api.upstream.CreateUpstreamSite(pb.CreateUpstreamSiteRequest(), metadata=supplier.auth),
        "grid_identifier",
    )
    await expect_invalid(
        api.upstream.CreateUpstreamSite(
            pb.CreateUpstreamSiteRequest(
                grid_identifier=random_identifier(), external_id="x" * 201
            ),
            metadata=supplier.auth,
        ),
        "external_id",
    )


async def test_one_upstream_site_per_identifier_per_supplier(
    api: Api, supplier: Org, other_supplier: Org
) -> None:
    identifier = random_identifier()
    await api.upstream_site(supplier, identifier)
    error = await rpc_error(api.upstream_site(supplier, identifier.lower()))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    # Another supplier may register the same connection point (e.g. the next supplier).
    assert (await api.upstream_site(other_supplier, identifier)).grid_identifier == identifier


async def test_contract_fields_are_validated(api: Api, supplier: Org) -> None:
    site = await api.upstream_site(supplier, random_identifier())
    await expect_invalid(
        api.upstream.CreateContract(
            pb.CreateContractRequest(upstream_site_id=site.id), metadata=supplier.auth
        ),
        "start_date",
    )
    await expect_invalid(
        api.upstream.CreateContract(
            pb.CreateContractRequest(
                upstream_site_id=site.id, start_date=date_pb2.Date(year=2031, month=2, day=30)
            ),
            metadata=supplier.auth,
        ),
        "start_date",
    )
    await expect_invalid(
        api.upstream.CreateContract(
            pb.CreateContractRequest(
                upstream_site_id=site.id,
                start_date=day(days(1)),
                end_date=date_pb2.Date(year=2031, month=6),
            ),
            metadata=supplier.auth,
        ),
        "end_date",
    )
    rule = await expect_invalid(api.contract(supplier, site.id, days(10), days(10)), "end_date")
    assert "after start_date" in rule
    await expect_invalid(api.contract(supplier, site.id, days(10), days(5)), "end_date")
    listed = await api.upstream.ListContracts(
        pb.ListContractsRequest(upstream_site_id=site.id), metadata=supplier.auth
    )
    assert listed.total_size == 0


async def test_overlapping_contracts_are_rejected_adjacent_ones_allowed(
    api: Api, supplier: Org
) -> None:
    site = await api.upstream_site(supplier, random_identifier())
    await api.contract(supplier, site.id, days(0), days(30))
    rule = await expect_invalid(api.contract(supplier, site.id, days(29), days(60)), "start_date")
    assert "overlaps" in rule
    await expect_invalid(api.contract(supplier, site.id, days(-10)), "start_date")
    # Half-open periods: the next contract may start on the day the first one ends.
    adjacent = await api.contract(supplier, site.id, days(30), requires_agreement=True)
    assert adjacent.state == pb.CONTRACT_STATE_NEEDS_AGREEMENT
    # An ended contract no longer blocks its period: a late-registered contract may overlap it.
    ended_site = await api.upstream_site(supplier, random_identifier())
    await api.contract(supplier, ended_site.id, days(-30), days(-10))
    assert (await api.contract(supplier, ended_site.id, days(-20))).state == (
        pb.CONTRACT_STATE_ACTIVE
    )


async def test_concurrent_overlapping_contracts_only_one_wins(api: Api, supplier: Org) -> None:
    site = await api.upstream_site(supplier, random_identifier())
    results = await asyncio.gather(
        *(api.contract(supplier, site.id, days(i), days(i + 20)) for i in range(6)),
        return_exceptions=True,
    )
    created = [r for r in results if isinstance(r, pb.Contract)]
    rejected = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(created) == 1
    assert [e.code() for e in rejected] == [grpc.StatusCode.INVALID_ARGUMENT] * 5


async def test_create_contract_retry_returns_the_first(api: Api, supplier: Org) -> None:
    site = await api.upstream_site(supplier, random_identifier())
    first = await api.contract(supplier, site.id, days(3), days(40), requires_agreement=True)
    again = await api.contract(supplier, site.id, days(3), days(40), requires_agreement=True)
    assert again == first
    listed = await api.upstream.ListContracts(
        pb.ListContractsRequest(upstream_site_id=site.id), metadata=supplier.auth
    )
    assert [c.id for c in listed.contracts] == [first.id]


async def test_agreement_records_who_and_when(api: Api, supplier: Org, clock: FakeClock) -> None:
    site = await api.upstream_site(supplier, random_identifier())
    contract = await api.contract(supplier, site.id, days(5), requires_agreement=True)
    assert contract.agreed_by == ""
    assert not contract.HasField("agree_time")

    agreed = await api.agree(supplier, contract.id, who="  Jan Peeters (customer 42) ")
    assert agreed.agreed_by == "Jan Peeters (customer 42)"
    assert agreed.agree_time.ToDatetime(tzinfo=UTC) == BASE
    assert agreed.state == pb.CONTRACT_STATE_PENDING
    # A retry is answered with the agreement recorded the first time.
    clock.advance(timedelta(hours=1))
    assert await api.agree(supplier, contract.id, who="Jan Peeters (customer 42)") == agreed
    error = await rpc_error(api.agree(supplier, contract.id, who="someone else"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_agreement_time_given_and_validated(
    api: Api, supplier: Org, clock: FakeClock
) -> None:
    site = await api.upstream_site(supplier, random_identifier())
    contract = await api.contract(supplier, site.id, days(5), requires_agreement=True)
    signed = timestamp_pb2.Timestamp()
    signed.FromDatetime(BASE - timedelta(days=2))
    future = timestamp_pb2.Timestamp()
    future.FromDatetime(BASE + timedelta(minutes=5))
    await expect_invalid(
        api.upstream.AgreeContract(
            pb.AgreeContractRequest(contract_id=contract.id, agreed_by="J", agree_time=future),
            metadata=supplier.auth,
        ),
        "agree_time",
    )
    await expect_invalid(
        api.upstream.AgreeContract(
            pb.AgreeContractRequest(contract_id=contract.id), metadata=supplier.auth
        ),
        "agreed_by",
    )
    agreed = (
        await api.upstream.AgreeContract(
            pb.AgreeContractRequest(contract_id=contract.id, agreed_by="J", agree_time=signed),
            metadata=supplier.auth,
        )
    ).contract
    assert agreed.agree_time == signed


async def test_agreeing_a_contract_without_agreement_is_refused(api: Api, supplier: Org) -> None:
    site = await api.upstream_site(supplier, random_identifier())
    contract = await api.contract(supplier, site.id, days(5))
    error = await rpc_error(api.agree(supplier, contract.id))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_termination_rules(api: Api, supplier: Org) -> None:
    site = await api.upstream_site(supplier, random_identifier())
    contract = await api.contract(supplier, site.id, days(-10), days(30))
    await expect_invalid(api.terminate(supplier, contract.id, days(-1)), "effective_date")
    await expect_invalid(api.terminate(supplier, contract.id, days(30)), "effective_date")
    await expect_invalid(
        api.upstream.TerminateContract(
            pb.TerminateContractRequest(contract_id=contract.id), metadata=supplier.auth
        ),
        "effective_date",
    )
    terminated = await api.terminate(supplier, contract.id, days(7))
    assert terminated.termination_date == day(days(7))
    assert terminated.end_date == day(days(30))
    assert await api.terminate(supplier, contract.id, days(7)) == terminated
    error = await rpc_error(api.terminate(supplier, contract.id, days(3)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_terminating_frees_the_period_for_a_new_contract(api: Api, supplier: Org) -> None:
    site = await api.upstream_site(supplier, random_identifier())
    old = await api.contract(supplier, site.id, days(-10))
    await expect_invalid(api.contract(supplier, site.id, days(20)), "start_date")
    await api.terminate(supplier, old.id, days(20))
    new = await api.contract(supplier, site.id, days(20))
    assert new.state == pb.CONTRACT_STATE_PENDING


async def test_contract_terminated_before_its_start_is_inactive_everywhere(
    api: Api, supplier: Org, partner: Org
) -> None:
    # The contract, the supplier's upstream site (state computed in SQL) and the partner's
    # site must agree: it will never be in force, so it is inactive at once.
    identifier = random_identifier()
    upstream_site = await api.upstream_site(supplier, identifier)
    partner_site = await api.partner_site(partner, identifier)
    contract = await api.contract(supplier, upstream_site.id, days(30))
    terminated = await api.terminate(supplier, contract.id, days(10))
    assert terminated.state == pb.CONTRACT_STATE_INACTIVE
    shown = await api.get_upstream_site(supplier, upstream_site.id)
    assert shown.contract_state == pb.CONTRACT_STATE_INACTIVE
    assert await api.status(partner, partner_site.id) == site_pb.UPSTREAM_STATUS_CONTRACT_INACTIVE

    async def listed(state: pb.ContractState.ValueType) -> list[str]:
        page = await api.upstream.ListUpstreamSites(
            pb.ListUpstreamSitesRequest(contract_state=state), metadata=supplier.auth
        )
        return [s.id for s in page.upstream_sites]

    assert await listed(pb.CONTRACT_STATE_INACTIVE) == [upstream_site.id]
    assert await listed(pb.CONTRACT_STATE_PENDING) == []


async def test_list_upstream_sites_filters_and_pages(
    api: Api, supplier: Org, clock: FakeClock
) -> None:
    identifiers = [random_identifier() for _ in range(5)]
    created = [await api.upstream_site(supplier, i) for i in identifiers]
    await api.contract(supplier, created[0].id, days(-1))
    await api.contract(supplier, created[1].id, days(4))
    await api.contract(supplier, created[2].id, days(4), requires_agreement=True)
    await api.contract(supplier, created[3].id, days(-9), days(-2))
    await api.contract(supplier, created[3].id, days(4), requires_agreement=True)

    async def listing(**filters: object) -> list[str]:
        ids: list[str] = []
        token = ""
        while True:
            page = await api.upstream.ListUpstreamSites(
                pb.ListUpstreamSitesRequest(page_size=2, page_token=token, **filters),  # type: ignore[arg-type]
                metadata=supplier.auth,
            )
            assert len(page.upstream_sites) <= 2
            ids += [s.id for s in page.upstream_sites]
            token = page.next_page_token
            if not token:
                assert page.total_size == len(ids)
                return ids

    assert await listing() == [s.id for s in created]
    assert await listing(grid_identifier=identifiers[2].lower()) == [created[2].id]
    assert await listing(contract_state=pb.CONTRACT_STATE_ACTIVE) == [created[0].id]
    assert await listing(contract_state=pb.CONTRACT_STATE_PENDING) == [created[1].id]
    # The leading contract decides: an ended one hides behind one awaiting agreement.
    assert await listing(contract_state=pb.CONTRACT_STATE_NEEDS_AGREEMENT) == [
        created[2].id,
        created[3].id,
    ]
    assert await listing(contract_state=pb.CONTRACT_STATE_INACTIVE) == []
    clock.set(datetime.combine(days(4), datetime.min.time(), tzinfo=UTC))
    assert await listing(contract_state=pb.CONTRACT_STATE_ACTIVE) == [
        created[0].id,
        created[1].id,
    ]
    first = await api.upstream.ListUpstreamSites(
        pb.ListUpstreamSitesRequest(page_size=1), metadata=supplier.auth
    )
    await expect_invalid(
        api.upstream.ListUpstreamSites(
            pb.ListUpstreamSitesRequest(
                page_token=first.next_page_token, contract_state=pb.CONTRACT_STATE_ACTIVE
            ),
            metadata=supplier.auth,
        ),
        "page_token",
    )


async def test_list_contracts_pages(api: Api, supplier: Org) -> None:
    site = await api.upstream_site(supplier, random_identifier())
    created = [
        (await api.contract(supplier, site.id, days(10 * i), days(10 * i + 10))).id
        for i in range(5)
    ]
    seen: list[str] = []
    token = ""
    while True:
        page = await api.upstream.ListContracts(
            pb.ListContractsRequest(upstream_site_id=site.id, page_size=2, page_token=token),
            metadata=supplier.auth,
        )
        assert page.total_size == 5
        seen += [c.id for c in page.contracts]
        token = page.next_page_token
        if not token:
            break
    assert seen == created


async def test_deleting_twice_is_not_found(api: Api, supplier: Org) -> None:
    site = await api.upstream_site(supplier, random_identifier())
    await api.contract(supplier, site.id, days(1))
    request = pb.DeleteUpstreamSiteRequest(upstream_site_id=site.id)
    await api.upstream.DeleteUpstreamSite(request, metadata=supplier.auth)
    error = await rpc_error(api.upstream.DeleteUpstreamSite(request, metadata=supplier.auth))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await rpc_error(
        api.upstream.ListContracts(
            pb.ListContractsRequest(upstream_site_id=site.id), metadata=supplier.auth
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
