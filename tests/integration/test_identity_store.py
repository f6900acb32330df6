"""The identity store keeps out organization names `orgs list` could not print one per line."""

from __future__ import annotations

import pytest

from service.app import Service
from service.auth.principal import Role


@pytest.mark.parametrize("name", ["Volt\tSupply", "Volt\nSupply", "Soci\udce9t\udce9"])
async def test_create_org_refuses_a_broken_name_before_the_insert(
    service: Service, name: str
) -> None:
    assert service.identity is not None
    with pytest.raises(ValueError, match=r"^organization name must"):
        await service.identity.create_org(name, Role.SUPPLIER)
    assert name not in {org.name for org in await service.identity.list_orgs()}
