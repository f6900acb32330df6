"""Every validation rule of the registry, each with a valid and an invalid example, through
the real gRPC API: INVALID_ARGUMENT with a google.rpc.BadRequest violation on the field."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from openvpp.v1 import site_registry_pb2 as pb

from tests.conftest import Org
from tests.helpers import expect_invalid, field_violations, rpc_error, site_request
from tests.registry.support import BID, INJECTION, OFFTAKE, Stub, point, resource_request

# Published or cross-checked valid identifiers (see tests/unit/test_grid_identifiers.py).
SCHEMES: list[tuple[str, str, str, str]] = [
    # country, valid, invalid, words the rule must contain
    ("BE", "541448820000000008", "541448820000000009", "GS1 mod-10"),
    ("NL", "871234567890123451", "871234567890123452", "GS1 mod-10"),
    ("LU", "541448820000000008", "54144882000000000", "EAN-18"),
    ("FR", "30001610071843", "3000161007184", "PRM"),
    ("GB", "1200023305967", "1200023305966", "MPAN core check digit"),
    ("GB", "2200031930792", "220003193079", "MPAN core"),
    ("IE", "10012345678", "20012345678", "MPRN"),
    ("IT", "IT001E12345678", "IT001G12345678", "POD"),
    ("ES", "ES1234123456789012JY", "ES1234123456789012YJ", "CUPS control letters"),
    ("ES", "ES0021000000000000RC1F", "ES0021000000000000AA", "CUPS"),
    ("DE", "51238696781", "51238696780", "MaLo-ID check digit"),
    ("DE", "41373559241", "01238696781", "MaLo-ID"),
]


@pytest.mark.parametrize(("country", "valid", "invalid", "words"), SCHEMES)
async def test_grid_identifier_scheme_of_the_country(
    registry: Stub, partner: Org, country: str, valid: str, invalid: str, words: str
) -> None:
    site = (
        await registry.CreateSite(site_request(valid, country=country), metadata=partner.auth)
    ).site
    assert site.grid_identifier == valid
    assert site.location.country == country
    rule = await expect_invalid(
        registry.CreateSite(site_request(invalid, country=country), metadata=partner.auth),
        "supply_points[0].grid_identifier",
    )
    assert words in rule
    assert country in rule


async def test_identifier_is_normalized_before_validation(registry: Stub, partner: Org) -> None:
    site = (
        await registry.CreateSite(
            site_request("EAN 5414 4882 0000 0000 08", country="BE"), metadata=partner.auth
        )
    ).site
    assert site.grid_identifier == "541448820000000008"


async def test_seed_example_without_country(registry: Stub, partner: Org) -> None:
    request = pb.CreateSiteRequest(
        location=pb.Location(address="Dok Noord, Gent, Belgium"),
        supply_points=[point("EAN1234567890")],
    )
    site = (await registry.CreateSite(request, metadata=partner.auth)).site
    assert site.grid_identifier == "1234567890"


@pytest.mark.parametrize(
    ("invalid", "words"),
    [
        ("", "must not be empty"),
        ("EAN", "must not be empty"),
        ("A" * 65, "at most 64"),
        ("AB#1", "ASCII"),
    ],
)
async def test_generic_identifier_rules_without_a_scheme(
    registry: Stub, partner: Org, invalid: str, words: str
) -> None:
    # A country without a scheme (US) and no country get the same generic rules.
    for country in ("", "US"):
        valid = "A" * 64 if country else "a-b.c/d_e"
        await registry.CreateSite(site_request(valid, country=country), metadata=partner.auth)
        bad = site_request(country=country)
        bad.supply_points[0].grid_identifier = invalid  # site_request fills in an empty one
        rule = await expect_invalid(
            registry.CreateSite(bad, metadata=partner.auth), "supply_points[0].grid_identifier"
        )
        assert words in rule


# --- other site rules: (field, change making it valid, change making it invalid) ---------

SiteChange = Callable[[pb.CreateSiteRequest], None]


def setter(**values: Any) -> SiteChange:
    def change(request: pb.CreateSiteRequest) -> None:
        for name, value in values.items():
            target: Any = request
            *path, last = name.split("__")
            for part in path:
                target = getattr(target, part)
            setattr(target, last, value)

    return change


def supply(*points: pb.SupplyPoint) -> SiteChange:
    def change(request: pb.CreateSiteRequest) -> None:
        del request.supply_points[:]
        request.supply_points.extend(points)

    return change


def clear_latitude(request: pb.CreateSiteRequest) -> None:
    request.location.ClearField("latitude")
    request.location.longitude = 3.7


SITE_RULES: list[tuple[str, SiteChange, SiteChange]] = [
    ("name", setter(name="n" * 200), setter(name="n" * 201)),
    ("external_id", setter(external_id="e" * 200), setter(external_id="e" * 201)),
    (
        "location.address",
        setter(location__address="a" * 1000),
        setter(location__address="a" * 1001),
    ),
    ("location.country", setter(location__country="us"), setter(location__country="XX")),
    ("location.country", setter(location__country="AT"), setter(location__country="AUT")),
    (
        "location.latitude",
        setter(location__latitude=-90.0, location__longitude=0.0),
        clear_latitude,
    ),
    (
        "location.latitude",
        setter(location__latitude=90.0, location__longitude=0.0),
        setter(location__latitude=90.5, location__longitude=0.0),
    ),
    (
        "location.latitude",
        setter(location__latitude=0.0, location__longitude=0.0),
        setter(location__latitude=math.nan, location__longitude=0.0),
    ),
    (
        "location.longitude",
        setter(location__latitude=0.0, location__longitude=180.0),
        setter(location__latitude=0.0, location__longitude=-180.1),
    ),
    ("timezone", setter(timezone="America/New_York"), setter(timezone="Europe/Gent")),
    ("balance_resolution", setter(balance_resolution="P1M"), setter(balance_resolution="PT5M")),
    ("type", setter(type=pb.SITE_TYPE_BALANCED_INACCURATE), setter(type=99)),
    ("supply_points", supply(point("B-1")), supply()),
    ("supply_points[0].direction", supply(point("B-1", BID)), supply(point("B-1", 0))),
    ("supply_points[0].direction", supply(point("O-1", OFFTAKE)), supply(point("B-1", 42))),
    (
        "supply_points",
        supply(point("O-1", OFFTAKE), point("I-1", INJECTION)),
        supply(point("I-1", INJECTION)),
    ),
    ("supply_points", supply(point("O-1", OFFTAKE)), supply(point("B-1"), point("I-1", INJECTION))),
    ("supply_points", supply(point("B-1")), supply(point("B-1"), point("B-2"))),
    (
        "supply_points",
        supply(point("O-1", OFFTAKE)),
        supply(point("O-1", OFFTAKE), point("O-2", OFFTAKE)),
    ),
    (
        "supply_points",
        supply(point("O-1", OFFTAKE), point("I-1", INJECTION)),
        supply(point("O-1", OFFTAKE), point("I-1", INJECTION), point("I-2", INJECTION)),
    ),
    (
        "supply_points[1].grid_identifier",
        supply(point("O-1", OFFTAKE), point("I-1", INJECTION)),
        supply(point("O-1", OFFTAKE), point("o-1", INJECTION)),
    ),
]


@pytest.mark.parametrize(("field", "valid", "invalid"), SITE_RULES)
async def test_site_rule(
    registry: Stub, partner: Org, field: str, valid: SiteChange, invalid: SiteChange
) -> None:
    good = site_request()
    valid(good)
    await registry.CreateSite(good, metadata=partner.auth)
    bad = site_request()
    invalid(bad)
    await expect_invalid(registry.CreateSite(bad, metadata=partner.auth), field)


async def test_timezone_defaults_from_the_country(registry: Stub, partner: Org) -> None:
    for country, zone in (
        ("FR", "Europe/Paris"),
        ("GB", "Europe/London"),
        ("", "UTC"),
        ("US", "America/New_York"),
    ):
        identifier = {"FR": "30001610071843", "GB": "1200023305967"}.get(country)
        site = (
            await registry.CreateSite(
                site_request(identifier, country=country), metadata=partner.auth
            )
        ).site
        assert site.timezone == zone


async def test_every_violation_is_reported_at_once(registry: Stub, partner: Org) -> None:
    request = site_request(name="n" * 201, timezone="Bad/Zone", country="XX")
    request.supply_points[0].grid_identifier = " "
    error = await rpc_error(registry.CreateSite(request, metadata=partner.auth))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error)) >= {
        "name",
        "timezone",
        "location.country",
        "supply_points[0].grid_identifier",
    }


async def test_largest_site_fits_its_change_event(registry: Stub, partner: Org) -> None:
    """Every field at its maximum, in 4-byte characters, still fits the NOTIFY payload."""
    wide = "\U0001f50b"
    request = site_request(
        "Z" * 64,
        name=wide * 200,
        external_id=wide * 200,
        timezone="America/Argentina/ComodRivadavia",
    )
    request.location.address = wide * 1000
    site = (await registry.CreateSite(request, metadata=partner.auth)).site
    assert site.name == wide * 200


async def test_control_characters_are_refused_in_free_text_but_tabs_and_new_lines_kept(
    registry: Stub, partner: Org
) -> None:
    # JSON writes each such character as six bytes: 200 of them in the name and id and 1,000
    # in the address took the site's change event past PostgreSQL's 8,000-byte NOTIFY limit
    # (the call then failed as INTERNAL, with a stack trace in the log).
    request = site_request("Z" * 64, name="\x01" * 200, external_id="a\x1fb")
    request.location.address = "\x7f\x1b" * 500
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await registry.CreateSite(request, metadata=partner.auth)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    rule = (
        "must not contain control characters (U+0001 to U+001F other than tab, line feed"
        " and carriage return)"
    )
    assert field_violations(raised.value) == {
        "name": rule,
        "external_id": rule,
        "location.address": rule,
    }
    listed = await registry.ListSites(pb.ListSitesRequest(), metadata=partner.auth)
    assert list(listed.sites) == []
    kept = site_request("Z" * 64, name="Dok\tNoord")
    kept.location.address = "Dokweg 1\r\n1234 AB Noord\n" * 40
    site = (await registry.CreateSite(kept, metadata=partner.auth)).site
    assert site.location.address == kept.location.address.strip()  # trimmed, as ever


# --- resource rules -------------------------------------------------------------------------

RESOURCE_RULES: list[tuple[str, int, dict[str, Any], dict[str, Any]]] = [
    # field, type, valid overrides, invalid overrides
    ("type", pb.RESOURCE_TYPE_OTHER, {}, {"type": pb.RESOURCE_TYPE_UNSPECIFIED}),
    ("type", pb.RESOURCE_TYPE_OTHER, {}, {"type": 77}),
    ("name", pb.RESOURCE_TYPE_OTHER, {"name": "n" * 200}, {"name": "n" * 201}),
    ("external_id", pb.RESOURCE_TYPE_OTHER, {"external_id": "e" * 200}, {"external_id": "e" * 201}),
    ("power_kw", pb.RESOURCE_TYPE_HEAT_PUMP, {}, {"power_kw": None}),
    ("power_kw", pb.RESOURCE_TYPE_METER, {"power_kw": None}, {"power_kw": pb.Bounds(min=2, max=1)}),
    (
        "power_kw",
        pb.RESOURCE_TYPE_OTHER,
        {"power_kw": pb.Bounds(min=-3, max=-3)},
        {"power_kw": pb.Bounds(min=-3, max=-4)},
    ),
    ("power_kw.min", pb.RESOURCE_TYPE_OTHER, {}, {"power_kw": pb.Bounds(min=-math.inf, max=1)}),
    ("power_kw.max", pb.RESOURCE_TYPE_OTHER, {}, {"power_kw": pb.Bounds(min=0, max=math.nan)}),
    (
        "power_kw.max",
        pb.RESOURCE_TYPE_PHOTOVOLTAIC,
        {"power_kw": pb.Bounds(min=-5, max=0)},
        {"power_kw": pb.Bounds(min=-5, max=0.1)},
    ),
    (
        "power_kw.max",
        pb.RESOURCE_TYPE_WIND,
        {"power_kw": pb.Bounds(min=-2000, max=-1)},
        {"power_kw": pb.Bounds(min=-5, max=5)},
    ),
    (
        "power_kw.min",
        pb.RESOURCE_TYPE_HEAT_PUMP,
        {"power_kw": pb.Bounds(min=0, max=3)},
        {"power_kw": pb.Bounds(min=-1, max=3)},
    ),
    (
        "power_kw.min",
        pb.RESOURCE_TYPE_ELECTRIC_VEHICLE,
        {"power_kw": pb.Bounds(min=-11, max=11)},
        {"power_kw": pb.Bounds(min=math.inf, max=11)},
    ),
    (
        "power_kw.max",
        pb.RESOURCE_TYPE_OTHER,
        {"power_kw": pb.Bounds(min=-1_000_000, max=1_000_000)},
        {"power_kw": pb.Bounds(min=0, max=1e308)},
    ),
    (
        "power_kw.min",
        pb.RESOURCE_TYPE_OTHER,
        {"power_kw": pb.Bounds(min=-1_000_000, max=0)},
        {"power_kw": pb.Bounds(min=-1_000_000.5, max=0)},
    ),
    ("capacity_kwh", pb.RESOURCE_TYPE_STATIC_BATTERY, {}, {"capacity_kwh": None}),
    (
        "capacity_kwh.max",
        pb.RESOURCE_TYPE_STATIC_BATTERY,
        {"capacity_kwh": pb.Bounds(min=0, max=10_000_000)},
        {"capacity_kwh": pb.Bounds(min=0, max=1e12)},
    ),
    (
        "capacity_kwh",
        pb.RESOURCE_TYPE_STATIC_BATTERY,
        {},
        {"capacity_kwh": pb.Bounds(min=5, max=4)},
    ),
    (
        "capacity_kwh.min",
        pb.RESOURCE_TYPE_ELECTRIC_VEHICLE,
        {"capacity_kwh": pb.Bounds(min=0, max=60)},
        {"capacity_kwh": pb.Bounds(min=-1, max=60)},
    ),
    (
        "capacity_kwh.max",
        pb.RESOURCE_TYPE_STATIC_BATTERY,
        {"capacity_kwh": pb.Bounds(min=0, max=0.5)},
        {"capacity_kwh": pb.Bounds(min=0, max=0)},
    ),
    (
        "capacity_kwh.max",
        pb.RESOURCE_TYPE_STATIC_BATTERY,
        {},
        {"capacity_kwh": pb.Bounds(min=0, max=math.inf)},
    ),
    (
        "webhook_url",
        pb.RESOURCE_TYPE_OTHER,
        {"webhook_url": "https://h.example/x?y=1"},
        {"webhook_url": "ftp://h.example/x"},
    ),
    (
        "webhook_url",
        pb.RESOURCE_TYPE_OTHER,
        {"webhook_url": "http://127.0.0.1:8080/"},
        {"webhook_url": "http://h.example:99999/"},
    ),
    (
        "webhook_url",
        pb.RESOURCE_TYPE_OTHER,
        {"webhook_url": "http://h.example/"},
        {"webhook_url": "https:///no-host"},
    ),
    (
        "webhook_url",
        pb.RESOURCE_TYPE_OTHER,
        {"webhook_url": ""},
        {"webhook_url": "partner.example/hook"},
    ),
    (
        "webhook_url",
        pb.RESOURCE_TYPE_OTHER,
        {"webhook_url": "https://h.example/" + "p" * 2000},
        {"webhook_url": "https://h.example/" + "p" * 2100},
    ),
]


@pytest.mark.parametrize(("field", "kind", "valid", "invalid"), RESOURCE_RULES)
async def test_resource_rule(
    registry: Stub,
    partner: Org,
    site: pb.Site,
    field: str,
    kind: int,
    valid: dict[str, Any],
    invalid: dict[str, Any],
) -> None:
    await registry.CreateResource(_resource(site.id, kind, valid), metadata=partner.auth)
    await expect_invalid(
        registry.CreateResource(_resource(site.id, kind, invalid), metadata=partner.auth), field
    )


def _resource(site_id: str, kind: int, overrides: dict[str, Any]) -> pb.CreateResourceRequest:
    request = resource_request(
        site_id, kind, **{k: v for k, v in overrides.items() if v is not None}
    )
    for name, value in overrides.items():
        if value is None:
            request.ClearField(name)  # type: ignore[arg-type]
    return request


async def test_resource_update_rules_name_the_request_field(
    registry: Stub, partner: Org, site: pb.Site
) -> None:
    from tests.registry.support import mask

    created = (
        await registry.CreateResource(
            resource_request(site.id, pb.RESOURCE_TYPE_PHOTOVOLTAIC), metadata=partner.auth
        )
    ).resource
    await expect_invalid(
        registry.UpdateResource(
            pb.UpdateResourceRequest(
                resource=pb.Resource(id=created.id, power_kw=pb.Bounds(min=-1, max=1)),
                update_mask=mask("power_kw"),
            ),
            metadata=partner.auth,
        ),
        "resource.power_kw.max",
    )
    await expect_invalid(
        registry.UpdateResource(
            pb.UpdateResourceRequest(
                resource=pb.Resource(id=created.id, webhook_url="mailto:x@y"),
                update_mask=mask("webhook_url"),
            ),
            metadata=partner.auth,
        ),
        "resource.webhook_url",
    )


# --- ids, paging parameters and filters ----------------------------------------------------


async def test_ids_must_be_uuids(registry: Stub, partner: Org, site: pb.Site) -> None:
    auth = partner.auth
    calls: list[tuple[Any, str]] = [
        (registry.GetSite(pb.GetSiteRequest(site_id="42"), metadata=auth), "site_id"),
        (registry.GetSite(pb.GetSiteRequest(), metadata=auth), "site_id"),
        (registry.DeleteSite(pb.DeleteSiteRequest(site_id="x"), metadata=auth), "site_id"),
        (registry.PauseSite(pb.PauseSiteRequest(), metadata=auth), "site_id"),
        (registry.ResumeSite(pb.ResumeSiteRequest(site_id="y"), metadata=auth), "site_id"),
        (
            registry.CreateResource(resource_request("z", pb.RESOURCE_TYPE_OTHER), metadata=auth),
            "site_id",
        ),
        (registry.ListResources(pb.ListResourcesRequest(), metadata=auth), "site_id"),
        (
            registry.GetResource(pb.GetResourceRequest(resource_id="1"), metadata=auth),
            "resource_id",
        ),
        (registry.DeleteResource(pb.DeleteResourceRequest(), metadata=auth), "resource_id"),
    ]
    for call, field in calls:
        await expect_invalid(call, field)
    # The valid form of each is exercised in test_sites.py; one here for symmetry.
    await registry.GetSite(pb.GetSiteRequest(site_id=site.id.upper()), metadata=auth)


async def test_page_size_rules(registry: Stub, partner: Org, site: pb.Site) -> None:
    auth = partner.auth
    await expect_invalid(
        registry.ListSites(pb.ListSitesRequest(page_size=-1), metadata=auth), "page_size"
    )
    await expect_invalid(
        registry.ListResources(
            pb.ListResourcesRequest(site_id=site.id, page_size=-5), metadata=auth
        ),
        "page_size",
    )
    # Above the maximum is lowered to it, not refused (AIP-158).
    listed = await registry.ListSites(pb.ListSitesRequest(page_size=5000), metadata=auth)
    assert [s.id for s in listed.sites] == [site.id]


async def test_list_filters_must_be_known_values(registry: Stub, partner: Org) -> None:
    auth = partner.auth
    unknown_status: Any = 9
    unknown_upstream: Any = 99
    await expect_invalid(
        registry.ListSites(pb.ListSitesRequest(status=unknown_status), metadata=auth), "status"
    )
    await expect_invalid(
        registry.ListSites(pb.ListSitesRequest(upstream_status=unknown_upstream), metadata=auth),
        "upstream_status",
    )
    await registry.ListSites(
        pb.ListSitesRequest(
            status=pb.SITE_STATUS_ONBOARDED, upstream_status=pb.UPSTREAM_STATUS_CONTRACT_ACTIVE
        ),
        metadata=auth,
    )


@pytest.mark.parametrize(
    "identifier",
    ["a\x00", "!!", "ü" * 64],
    ids=["checked first (request limits)", "domain rule", "long and not ASCII"],
)
async def test_a_request_breaking_a_rule_in_every_item_still_gets_its_field_violations(
    registry: Stub, partner: Org, identifier: str
) -> None:
    # One violation per item, as many items as the field may hold: the trailers must stay
    # within what gRPC clients accept (beyond it the call ends RESOURCE_EXHAUSTED with no
    # details).
    request = site_request("541448820000000008", country="BE")
    del request.supply_points[:]
    request.supply_points.extend(point(identifier) for _ in range(100))
    error = await rpc_error(registry.CreateSite(request, metadata=partner.auth))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    violations = field_violations(error)
    assert 0 < len(violations) < 100
    assert all(field.startswith("supply_points[") for field in violations)
    details = error.details()
    assert details is not None
    assert details.startswith("invalid request: supply_points[0].grid_identifier: ")
    assert f", the first {len(violations)} in the details)" in details
    assert len(details.encode()) < 1024


async def test_a_site_of_a_million_empty_supply_points_is_refused_by_its_count(
    registry: Stub, partner: Org
) -> None:
    # 2 MB, well within gRPC's 16 MiB receive limit: refused before any element is judged.
    valid = site_request()
    request = pb.CreateSiteRequest.FromString(valid.SerializeToString() + b"\x2a\x00" * 1_000_000)
    error = await rpc_error(registry.CreateSite(request, metadata=partner.auth))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error) == {"supply_points": "must hold at most 100 elements"}
    # Nothing was stored: its grid identifier is still free.
    created = (await registry.CreateSite(valid, metadata=partner.auth)).site
    assert created.grid_identifier == valid.supply_points[0].grid_identifier


async def test_a_webhook_url_yarl_cannot_split_is_invalid_not_internal(
    registry: Stub, partner: Org
) -> None:
    site = (await registry.CreateSite(site_request(), metadata=partner.auth)).site
    for url in ("https://[::1]@/hook", "http://[x]@", "https://[::1]:443@"):
        rule = await expect_invalid(
            registry.CreateResource(
                resource_request(site.id, pb.RESOURCE_TYPE_STATIC_BATTERY, webhook_url=url),
                metadata=partner.auth,
            ),
            "webhook_url",
        )
        assert rule == "must be an absolute http:// or https:// URL with a host"
