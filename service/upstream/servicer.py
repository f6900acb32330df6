"""gRPC transport of the upstream registry: requests in, domain and store calls, messages out."""

from __future__ import annotations

from typing import Any

import asyncpg
from openvpp.v1 import upstream_registry_pb2 as pb
from openvpp.v1 import upstream_registry_pb2_grpc as pb_grpc

from service.auth.principal import Role, current_principal
from service.common.clock import Clock
from service.common.errors import ViolationCollector
from service.common.protoconv import date_from_proto, enum_from_proto, from_timestamp, parse_uuid
from service.db.pagination import fetch_page, page_size_or_default
from service.identifiers import normalize_grid_identifier
from service.identifiers.ids import ContractId, UpstreamSiteId
from service.upstream import convert
from service.upstream.domain import ContractState, ContractTerms
from service.upstream.sites import validate_upstream_site
from service.upstream.store import SupplierStore, UpstreamReader, UpstreamSiteFilter

DESCRIPTOR = pb.DESCRIPTOR.services_by_name["UpstreamRegistry"]
SERVICE = DESCRIPTOR.full_name
_READS = frozenset({"GetUpstreamSite", "ListUpstreamSites", "ListContracts"})
METHOD_ROLES: dict[str, frozenset[Role]] = {
    f"/{SERVICE}/{method}": frozenset({Role.SUPPLIER, Role.OPERATOR})
    if method in _READS
    else frozenset({Role.SUPPLIER})
    for method in DESCRIPTOR.methods_by_name
}


class UpstreamRegistryServicer(pb_grpc.UpstreamRegistryServicer):
    def __init__(self, pool: asyncpg.Pool, clock: Clock) -> None:
        self._pool = pool
        self._clock = clock

    def _reader(self) -> UpstreamReader:
        """A supplier reads its own rows; an operator reads everyone's."""
        principal = current_principal()
        if principal.role is Role.OPERATOR:
            return UpstreamReader(self._pool, self._clock, None)
        return self._supplier()

    def _supplier(self) -> SupplierStore:
        principal = current_principal()
        # METHOD_ROLES already refuses anyone else; this keeps a wrong table from leaking.
        if principal.role is not Role.SUPPLIER:
            raise PermissionError(f"role {principal.role} cannot write upstream data")
        return SupplierStore(self._pool, self._clock, principal.org_id)

    async def CreateUpstreamSite(
        self, request: pb.CreateUpstreamSiteRequest, context: Any
    ) -> pb.CreateUpstreamSiteResponse:
        fields = validate_upstream_site(
            request.grid_identifier, request.country, request.external_id
        )
        site = await self._supplier().create_upstream_site(fields)
        return pb.CreateUpstreamSiteResponse(upstream_site=convert.upstream_site_to_proto(site))

    async def GetUpstreamSite(
        self, request: pb.GetUpstreamSiteRequest, context: Any
    ) -> pb.GetUpstreamSiteResponse:
        site = await self._reader().get_upstream_site(
            UpstreamSiteId(parse_uuid(request.upstream_site_id, "upstream_site_id"))
        )
        return pb.GetUpstreamSiteResponse(upstream_site=convert.upstream_site_to_proto(site))

    async def ListUpstreamSites(
        self, request: pb.ListUpstreamSitesRequest, context: Any
    ) -> pb.ListUpstreamSitesResponse:
        limit = page_size_or_default(request.page_size)
        site_filter = UpstreamSiteFilter(
            grid_identifier=normalize_grid_identifier(request.grid_identifier) or None,
            contract_state=enum_from_proto(
                pb.ContractState,
                convert.CONTRACT_STATE_PREFIX,
                request.contract_state,
                ContractState,
                "contract_state",
            ),
        )
        reader = self._reader()
        page = await fetch_page(
            "ListUpstreamSites",
            lambda after, n: reader.list_upstream_sites(site_filter, after, n),
            limit,
            request.page_token,
            site_filter,
        )
        return pb.ListUpstreamSitesResponse(
            upstream_sites=[convert.upstream_site_to_proto(site) for site in page.rows],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    async def DeleteUpstreamSite(
        self, request: pb.DeleteUpstreamSiteRequest, context: Any
    ) -> pb.DeleteUpstreamSiteResponse:
        await self._supplier().delete_upstream_site(
            UpstreamSiteId(parse_uuid(request.upstream_site_id, "upstream_site_id"))
        )
        return pb.DeleteUpstreamSiteResponse()

    async def CreateContract(
        self, request: pb.CreateContractRequest, context: Any
    ) -> pb.CreateContractResponse:
        upstream_site_id = UpstreamSiteId(parse_uuid(request.upstream_site_id, "upstream_site_id"))
        errors = ViolationCollector()
        start = date_from_proto(
            errors, "start_date", request.start_date, request.HasField("start_date"), True
        )
        end = date_from_proto(
            errors, "end_date", request.end_date, request.HasField("end_date"), False
        )
        errors.raise_if_any()
        assert start is not None
        terms = ContractTerms(
            start_date=start, end_date=end, requires_agreement=request.requires_agreement
        )
        contract = await self._supplier().create_contract(upstream_site_id, terms)
        return pb.CreateContractResponse(contract=convert.contract_to_proto(contract))

    async def AgreeContract(
        self, request: pb.AgreeContractRequest, context: Any
    ) -> pb.AgreeContractResponse:
        contract_id = ContractId(parse_uuid(request.contract_id, "contract_id"))
        agreed_at = (
            from_timestamp(request.agree_time, "agree_time")
            if request.HasField("agree_time")
            else None
        )
        contract = await self._supplier().agree_contract(contract_id, request.agreed_by, agreed_at)
        return pb.AgreeContractResponse(contract=convert.contract_to_proto(contract))

    async def TerminateContract(
        self, request: pb.TerminateContractRequest, context: Any
    ) -> pb.TerminateContractResponse:
        contract_id = ContractId(parse_uuid(request.contract_id, "contract_id"))
        errors = ViolationCollector()
        effective = date_from_proto(
            errors,
            "effective_date",
            request.effective_date,
            request.HasField("effective_date"),
            True,
        )
        errors.raise_if_any()
        assert effective is not None
        contract = await self._supplier().terminate_contract(contract_id, effective)
        return pb.TerminateContractResponse(contract=convert.contract_to_proto(contract))

    async def ListContracts(
        self, request: pb.ListContractsRequest, context: Any
    ) -> pb.ListContractsResponse:
        upstream_site_id = UpstreamSiteId(parse_uuid(request.upstream_site_id, "upstream_site_id"))
        limit = page_size_or_default(request.page_size)
        reader = self._reader()
        page = await fetch_page(
            "ListContracts",
            lambda after, n: reader.list_contracts(upstream_site_id, after, n),
            limit,
            request.page_token,
            upstream_site_id,
        )
        return pb.ListContractsResponse(
            contracts=[convert.contract_to_proto(c) for c in page.rows],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )
