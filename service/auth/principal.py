"""Who is calling: the organization behind the bearer token, and its role."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from enum import StrEnum
from uuid import UUID

from service.identifiers.ids import OrgId


class Role(StrEnum):
    PARTNER = "partner"
    SUPPLIER = "supplier"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Principal:
    org_id: OrgId
    role: Role
    token_id: UUID


_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("openvpp_principal")


def current_principal() -> Principal:
    """The caller of the RPC being handled; set by the auth interceptor before the handler runs."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("no authenticated caller in this context") from None


def bind_principal(principal: Principal) -> contextvars.Token[Principal]:
    return _current.set(principal)


def unbind_principal(token: contextvars.Token[Principal]) -> None:
    # A stream closed from another context raises ValueError; the RPC's task context ends anyway.
    with contextlib.suppress(ValueError):
        _current.reset(token)
