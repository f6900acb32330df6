"""Upstream records <-> protobuf messages."""

from __future__ import annotations

from openvpp.v1 import upstream_registry_pb2 as pb

from service.common.protoconv import (
    date_to_proto,
    enum_to_proto,
    to_timestamp,
)
from service.upstream.domain import ContractState
from service.upstream.store import ContractRecord, UpstreamSiteRecord

CONTRACT_STATE_PREFIX = "CONTRACT_STATE_"


def contract_state_to_proto(state: ContractState | None) -> pb.ContractState.ValueType:
    if state is None:
        return pb.CONTRACT_STATE_UNSPECIFIED
    value: pb.ContractState.ValueType = enum_to_proto(
        pb.ContractState, CONTRACT_STATE_PREFIX, state
    )
    return value


def upstream_site_to_proto(site: UpstreamSiteRecord) -> pb.UpstreamSite:
    fields = site.fields
    return pb.UpstreamSite(
        id=str(site.id),
        grid_identifier=fields.grid_identifier,
        country=fields.country,
        external_id=fields.external_id,
        timezone=fields.timezone,
        matched_partner_site=site.matched_partner_site,
        contract_state=contract_state_to_proto(site.contract_state),
        create_time=to_timestamp(site.created_at),
        update_time=to_timestamp(site.updated_at),
    )


def contract_to_proto(contract: ContractRecord) -> pb.Contract:
    terms = contract.terms
    message = pb.Contract(
        id=str(contract.id),
        upstream_site_id=str(contract.upstream_site_id),
        start_date=date_to_proto(terms.start_date),
        requires_agreement=terms.requires_agreement,
        state=contract_state_to_proto(contract.state),
        agreed_by=contract.agreed_by or "",
        create_time=to_timestamp(contract.created_at),
        update_time=to_timestamp(contract.updated_at),
    )
    if terms.end_date is not None:
        message.end_date.CopyFrom(date_to_proto(terms.end_date))
    if terms.agreed_at is not None:
        message.agree_time.CopyFrom(to_timestamp(terms.agreed_at))
    if terms.termination_date is not None:
        message.termination_date.CopyFrom(date_to_proto(terms.termination_date))
    if contract.terminated_at is not None:
        message.terminate_time.CopyFrom(to_timestamp(contract.terminated_at))
    return message
