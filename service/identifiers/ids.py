"""Typed ids: a site id cannot be passed where a meter id is expected (mypy tells).

Each is a ``UUID`` at run time (``NewType``), so asyncpg, protos and JSON see no difference;
wrap a UUID once where it enters (``SiteId(parse_uuid(...))``, a row's ``id``).
"""

from __future__ import annotations

from typing import NewType
from uuid import UUID

OrgId = NewType("OrgId", UUID)
SiteId = NewType("SiteId", UUID)
MeterId = NewType("MeterId", UUID)
ResourceId = NewType("ResourceId", UUID)
UpstreamSiteId = NewType("UpstreamSiteId", UUID)
ContractId = NewType("ContractId", UUID)
