"""Isolation both ways: suppliers see only their own rows and never whose partner site
matches; partners see only the derived status; operators read everything, write nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from openvpp.v1 import site_registry_pb2 as site_pb
from openvpp.v1 import upstream_registry_pb2 as pb

from tests.conftest import Org
from tests.helpers import random_identifier, rpc_error, site_request
from tests.upstream.conftest import Api, day, days


async def supplier_with_contract(api: Api, supplier: Org) -> tuple[pb.UpstreamSite, pb.Contract]:
    site = await api.upstream_site(supplier, random_identifier())
    contract = await api.contract(supplier, site.id, days(5), requires_agreement=True)
    return site, contract


async def test_other_supplier_gets_not_found_everywhere(
    api: Api, supplier: Org, other_supplier: Org
) -> None:
    site, contract = await supplier_with_contract(api, supplier)
    stub, auth = api.upstream, other_supplier.auth
    calls: list[Awaitable[Any]] = [
        stub.GetUpstreamSite(pb.GetUpstreamSiteRequest(upstream_site_id=site.id), metadata=auth),
        stub.DeleteUpstreamSite(
            pb.DeleteUpstreamSiteRequest(upstream_site_id=site.id), metadata=auth
        ),
        stub.CreateContract(
            pb.CreateContractRequest(upstream_site_id=site.id, start_date=day(days(100))),
            metadata=auth,
        ),
        stub.ListContracts(pb.ListContractsRequest(upstream_site_id=site.id), metadata=auth),
        stub.AgreeContract(
            pb.AgreeContractRequest(contract_id=contract.id, agreed_by="x"), metadata=auth
        ),
        stub.TerminateContract(
            pb.TerminateContractRequest(contract_id=contract.id, effective_date=day(days(6))),
            metadata=auth,
        ),
    ]
    for call in calls:
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    listed = await stub.ListUpstreamSites(
        pb.ListUpstreamSitesRequest(grid_identifier=site.grid_identifier), metadata=auth
    )
    assert listed.total_size == 0
    # Nothing was changed by the refused calls.
    assert (await api.get_upstream_site(supplier, site.id)).contract_state == (
        pb.CONTRACT_STATE_NEEDS_AGREEMENT
    )


async def test_missing_ids_answer_like_foreign_ones(api: Api, supplier: Org) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    error = await rpc_error(
        api.upstream.GetUpstreamSite(
            pb.GetUpstreamSiteRequest(upstream_site_id=missing), metadata=supplier.auth
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await rpc_error(api.agree(supplier, missing))
    assert error.code() == grpc.StatusCode.NOT_FOUND


CallMaker = Callable[[Api, Org], Awaitable[Any]]

WRITES: list[tuple[str, CallMaker]] = [
    (
        "CreateUpstreamSite",
        lambda api, org: api.upstream.CreateUpstreamSite(
            pb.CreateUpstreamSiteRequest(grid_identifier=random_identifier()), metadata=org.auth
        ),
    ),
    (
        "DeleteUpstreamSite",
        lambda api, org: api.upstream.DeleteUpstreamSite(
            pb.DeleteUpstreamSiteRequest(upstream_site_id="x"), metadata=org.auth
        ),
    ),
    (
        "CreateContract",
        lambda api, org: api.upstream.CreateContract(
            pb.CreateContractRequest(upstream_site_id="x"), metadata=org.auth
        ),
    ),
    (
        "AgreeContract",
        lambda api, org: api.upstream.AgreeContract(
            pb.AgreeContractRequest(contract_id="x"), metadata=org.auth
        ),
    ),
    (
        "TerminateContract",
        lambda api, org: api.upstream.TerminateContract(
            pb.TerminateContractRequest(contract_id="x"), metadata=org.auth
        ),
    ),
]
READS: list[tuple[str, CallMaker]] = [
    (
        "GetUpstreamSite",
        lambda api, org: api.upstream.GetUpstreamSite(
            pb.GetUpstreamSiteRequest(upstream_site_id="x"), metadata=org.auth
        ),
    ),
    (
        "ListUpstreamSites",
        lambda api, org: api.upstream.ListUpstreamSites(
            pb.ListUpstreamSitesRequest(), metadata=org.auth
        ),
    ),
    (
        "ListContracts",
        lambda api, org: api.upstream.ListContracts(
            pb.ListContractsRequest(upstream_site_id="x"), metadata=org.auth
        ),
    ),
]


def test_every_rpc_is_covered() -> None:
    methods = set(pb.DESCRIPTOR.services_by_name["UpstreamRegistry"].methods_by_name)
    assert methods == {name for name, _ in WRITES + READS}


@pytest.mark.parametrize(("name", "call"), WRITES + READS, ids=[n for n, _ in WRITES + READS])
async def test_partner_is_denied_every_rpc(
    api: Api, partner: Org, name: str, call: CallMaker
) -> None:
    error = await rpc_error(call(api, partner))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(("name", "call"), WRITES, ids=[n for n, _ in WRITES])
async def test_operator_is_denied_writes(
    api: Api, operator: Org, name: str, call: CallMaker
) -> None:
    error = await rpc_error(call(api, operator))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_operator_reads_every_supplier(
    api: Api, operator: Org, supplier: Org, other_supplier: Org
) -> None:
    identifier = random_identifier()
    first, contract = await supplier_with_contract(api, supplier)
    second = await api.upstream_site(other_supplier, identifier)
    assert await api.get_upstream_site(operator, first.id) == await api.get_upstream_site(
        supplier, first.id
    )
    assert (await api.get_upstream_site(operator, second.id)).grid_identifier == identifier
    listed = await api.upstream.ListUpstreamSites(
        pb.ListUpstreamSitesRequest(grid_identifier=first.grid_identifier),
        metadata=operator.auth,
    )
    assert [s.id for s in listed.upstream_sites] == [first.id]
    contracts = await api.upstream.ListContracts(
        pb.ListContractsRequest(upstream_site_id=first.id), metadata=operator.auth
    )
    assert [c.id for c in contracts.contracts] == [contract.id]
    everyone = await api.upstream.ListUpstreamSites(
        pb.ListUpstreamSitesRequest(page_size=1000), metadata=operator.auth
    )
    assert everyone.total_size >= 2


async def test_supplier_cannot_use_the_partner_registry(api: Api, supplier: Org) -> None:
    error = await rpc_error(api.sites.CreateSite(site_request(), metadata=supplier.auth))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    error = await rpc_error(api.sites.ListSites(site_pb.ListSitesRequest(), metadata=supplier.auth))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_supplier_learns_a_match_but_not_whose(api: Api, supplier: Org, partner: Org) -> None:
    identifier = random_identifier()
    await api.partner_site(partner, identifier, name="Customer home", external_id="P-77")
    site = await api.upstream_site(supplier, identifier)
    assert site.matched_partner_site
    # The message carries nothing but the supplier's own fields and derived flags.
    assert {f.name for f in pb.UpstreamSite.DESCRIPTOR.fields} == {
        "id",
        "grid_identifier",
        "country",
        "external_id",
        "timezone",
        "matched_partner_site",
        "contract_state",
        "create_time",
        "update_time",
    }
    assert site.external_id == ""
    assert "Customer home" not in str(site)


async def test_partner_sees_status_not_supplier_or_contract(
    api: Api, supplier: Org, partner: Org
) -> None:
    identifier = random_identifier()
    upstream_site = await api.upstream_site(supplier, identifier, external_id="SUPPLIER-REF-9")
    await api.contract(supplier, upstream_site.id, days(-1))
    site = await api.partner_site(partner, identifier)
    assert site.upstream_status == site_pb.UPSTREAM_STATUS_CONTRACT_ACTIVE
    text = str(site)
    for secret in ("SUPPLIER-REF-9", upstream_site.id, str(supplier.id)):
        assert secret not in text
    names = {f.name for f in site_pb.Site.DESCRIPTOR.fields}
    assert not {n for n in names if "contract" in n or "supplier" in n}
