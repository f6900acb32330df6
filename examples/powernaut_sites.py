"""The partner's sites flow (seed guide "Sites"): a site, its resource, its statuses.

As a partner: create a site in Ghent with a valid EAN (status NO_RESOURCES), add a battery
(ONBOARDED), list the sites page by page, delete the site. With ``--supplier-token`` a
supplier registers the same EAN as an upstream site with a contract the end-customer
agrees to, and the partner watches ``upstream_status`` go NO_UPSTREAM_REGISTERED ->
NO_CONTRACT -> CONTRACT_NEEDS_AGREEMENT -> CONTRACT_ACTIVE.

    .venv/bin/python examples/powernaut_sites.py --token "$TOKEN" \
        [--supplier-token "$SUPPLIER_TOKEN"] [--address 127.0.0.1:50051] [--keep]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import grpc
from google.type import date_pb2
from openvpp.v1 import site_registry_pb2 as sites_pb
from openvpp.v1 import site_registry_pb2_grpc as sites_grpc
from openvpp.v1 import upstream_registry_pb2 as upstream_pb
from openvpp.v1 import upstream_registry_pb2_grpc as upstream_grpc

import openvpp_client

# A valid Belgian EAN-18 (GS1 check digit), as the README's sample identifier table lists.
SAMPLE_EAN = "541448123456789016"


@dataclass
class Partner:
    sites: sites_grpc.SiteRegistryStub

    def show(self, site_id: str, what: str) -> sites_pb.Site:
        site = self.sites.GetSite(sites_pb.GetSiteRequest(site_id=site_id)).site
        print(
            f"{what}: status {sites_pb.SiteStatus.Name(site.status)}, "
            f"upstream_status {sites_pb.UpstreamStatus.Name(site.upstream_status)}"
        )
        return site


def create_site(partner: Partner, grid_identifier: str) -> sites_pb.Site:
    site = partner.sites.CreateSite(
        sites_pb.CreateSiteRequest(
            name="Dok Noord",
            location=sites_pb.Location(address="Dok Noord, Gent, Belgium", country="BE"),
            supply_points=[
                sites_pb.SupplyPoint(
                    # Normalized on write: "EAN 5414 4812 ..." is stored as these digits.
                    grid_identifier=f"EAN {grid_identifier}",
                    direction=sites_pb.SUPPLY_POINT_DIRECTION_BIDIRECTIONAL,
                )
            ],
        )
    ).site
    print(f"created site {site.id} (grid identifier {site.grid_identifier}, {site.timezone})")
    partner.show(site.id, "new site")
    return site


def add_battery(partner: Partner, site: sites_pb.Site) -> sites_pb.Resource:
    resource = partner.sites.CreateResource(
        sites_pb.CreateResourceRequest(
            site_id=site.id,
            type=sites_pb.RESOURCE_TYPE_STATIC_BATTERY,
            name="home battery",
            power_kw=sites_pb.Bounds(min=-5, max=5),
            capacity_kwh=sites_pb.Bounds(min=0, max=10),
            webhook_url="https://partner.example/setpoints",
        )
    ).resource
    print(f"created resource {resource.id} ({sites_pb.ResourceType.Name(resource.type)})")
    partner.show(site.id, "with a battery")
    return resource


def supply_site(
    partner: Partner, supplier: upstream_grpc.UpstreamRegistryStub, site: sites_pb.Site
) -> upstream_pb.UpstreamSite:
    """The supplier's side, for the same grid identifier; the partner sees only the status."""
    upstream = supplier.CreateUpstreamSite(
        upstream_pb.CreateUpstreamSiteRequest(grid_identifier=site.grid_identifier, country="BE")
    ).upstream_site
    print(f"supplier: upstream site {upstream.id}, matched {upstream.matched_partner_site}")
    partner.show(site.id, "upstream site registered")
    contract = supplier.CreateContract(
        upstream_pb.CreateContractRequest(
            upstream_site_id=upstream.id,
            start_date=date_pb2.Date(year=2025, month=1, day=1),
            requires_agreement=True,
        )
    ).contract
    print(f"supplier: contract {contract.id}, {upstream_pb.ContractState.Name(contract.state)}")
    partner.show(site.id, "contract created")
    agreed = supplier.AgreeContract(
        upstream_pb.AgreeContractRequest(contract_id=contract.id, agreed_by="Jan Peeters")
    ).contract
    print(f"supplier: agreed by {agreed.agreed_by}, {upstream_pb.ContractState.Name(agreed.state)}")
    partner.show(site.id, "contract agreed")
    return upstream


def list_sites(partner: Partner) -> int:
    """Every site of the partner, following next_page_token."""
    seen, token = 0, ""
    while True:
        page = partner.sites.ListSites(sites_pb.ListSitesRequest(page_size=10, page_token=token))
        for site in page.sites:
            print(f"  {site.id} {site.grid_identifier} {sites_pb.SiteStatus.Name(site.status)}")
        seen += len(page.sites)
        token = page.next_page_token
        if not token:
            print(f"listed {seen} of {page.total_size} site(s)")
            return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    openvpp_client.add_connection_arguments(parser)
    parser.add_argument("--supplier-token", help="a supplier's token: also run its side")
    parser.add_argument("--grid-identifier", default=SAMPLE_EAN, help="a Belgian EAN-18")
    parser.add_argument("--keep", action="store_true", help="keep the site (and upstream site)")
    args = parser.parse_args(argv)

    with openvpp_client.channel_from_args(parser, args) as channel:
        partner = Partner(sites_grpc.SiteRegistryStub(channel))
        site = create_site(partner, args.grid_identifier)
        add_battery(partner, site)
        upstream = None
        if args.supplier_token:
            with openvpp_client.channel(args.address, args.supplier_token) as supplier_channel:
                supplier = upstream_grpc.UpstreamRegistryStub(supplier_channel)
                upstream = supply_site(partner, supplier, site)
                if not args.keep:
                    supplier.DeleteUpstreamSite(
                        upstream_pb.DeleteUpstreamSiteRequest(upstream_site_id=upstream.id)
                    )
        list_sites(partner)
        if not args.keep:
            partner.sites.DeleteSite(sites_pb.DeleteSiteRequest(site_id=site.id))
            print(f"deleted site {site.id}" + (" and the upstream site" if upstream else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except grpc.RpcError as error:
        sys.exit(openvpp_client.failure_line(error))
