"""The dispatch flow: a partner's battery receives a signed setpoint, then its cancellation.

1. As the partner: a site with a battery whose ``webhook_url`` is this script's own receiver
   (aiohttp on 127.0.0.1) that verifies every request with the ``standardwebhooks`` package
   and the partner's signing secret (``openvpp orgs signing-secret ORG``).
2. As a supplier: the site's grid identifier with an active contract, so the site is
   ONBOARDED / CONTRACT_ACTIVE and thus eligible.
3. As the operator: ``DispatchFlexibility`` of 3 kW (EXACT) for the current quarter-hour
   and the next one; the setpoint is delivered at once, the receiver verifies and accepts it.
4. ``CancelDispatch``: the accepted setpoint gets a cancellation (``power_kw`` null).

The server must allow webhooks to 127.0.0.1 (``OPENVPP_WEBHOOK_ALLOW_PRIVATE_NETWORKS=true``).

    .venv/bin/python examples/dispatch_flow.py [--address 127.0.0.1:50051] \
        --token "$OPERATOR_TOKEN" --partner-token "$PARTNER_TOKEN" \
        --supplier-token "$SUPPLIER_TOKEN" \
        --signing-secret "$(openvpp orgs signing-secret "$PARTNER_ORG_ID")"

``--token`` (or ``OPENVPP_TOKEN``) is the operator's: it makes and cancels the dispatch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from collections.abc import Collection
from datetime import UTC, date, datetime, timedelta
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import timestamp_pb2
from google.type import date_pb2
from openvpp.v1 import dispatch_pb2 as dispatch_pb
from openvpp.v1 import dispatch_pb2_grpc as dispatch_grpc
from openvpp.v1 import site_registry_pb2 as sites_pb
from openvpp.v1 import site_registry_pb2_grpc as sites_grpc
from openvpp.v1 import upstream_registry_pb2 as upstream_pb
from openvpp.v1 import upstream_registry_pb2_grpc as upstream_grpc
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

import openvpp_client

QUARTER_HOUR = 900
SETTLED = {
    dispatch_pb.SETPOINT_STATE_ACCEPTED,
    dispatch_pb.SETPOINT_STATE_REJECTED,
    dispatch_pb.SETPOINT_STATE_FAILED,
    dispatch_pb.SETPOINT_STATE_EXPIRED,
    dispatch_pb.SETPOINT_STATE_NOT_ELIGIBLE,
    dispatch_pb.SETPOINT_STATE_CANCELLED,
}


class Receiver:
    """The partner's endpoint: verifies the Standard Webhooks signature, then accepts."""

    def __init__(self, signing_secret: str) -> None:
        self.webhook = Webhook(signing_secret)
        self.verified: list[dict[str, Any]] = []
        self.refused = 0
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            # Checks webhook-signature over webhook-id.webhook-timestamp.body, and freshness.
            payload = self.webhook.verify(body, dict(request.headers))
        except WebhookVerificationError:
            self.refused += 1
            return web.Response(status=401, text="bad signature")
        self.verified.append(payload)
        print(f"receiver: verified {request.headers['webhook-id']}: {json.dumps(payload)}")
        return web.Response(status=204)


def timestamp(instant: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(instant)
    return stamp


def day(value: date) -> date_pb2.Date:
    return date_pb2.Date(year=value.year, month=value.month, day=value.day)


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def wait_for(
    dispatch: Any, token: str, dispatch_id: str, states: Collection[int]
) -> list[dispatch_pb.Setpoint]:
    """The dispatch's setpoints once all are in ``states`` (``dispatch``: the async stub)."""
    async with asyncio.timeout(30):
        while True:
            listed = await dispatch.ListSetpoints(
                dispatch_pb.ListSetpointsRequest(dispatch_id=dispatch_id), metadata=auth(token)
            )
            if listed.setpoints and all(s.state in states for s in listed.setpoints):
                return list(listed.setpoints)
            await asyncio.sleep(0.1)


async def run(args: argparse.Namespace) -> int:
    receiver = Receiver(args.signing_secret)
    app = web.Application()
    app.router.add_post("/setpoints", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    receiver.port = runner.addresses[0][1]
    try:
        # Tokens go per call: three organizations take part.
        async with openvpp_client.aio_channel(args.address) as channel:
            return await flow(channel, receiver, args)
    finally:
        await runner.cleanup()


async def flow(channel: grpc.aio.Channel, receiver: Receiver, args: argparse.Namespace) -> int:
    sites = sites_grpc.SiteRegistryStub(channel)
    upstream = upstream_grpc.UpstreamRegistryStub(channel)
    dispatch = dispatch_grpc.DispatchStub(channel)

    # 1. The partner's site and battery, delivering to our receiver.
    identifier = "DEMO" + secrets.token_hex(6).upper()
    site = (
        await sites.CreateSite(
            sites_pb.CreateSiteRequest(
                name="Dok Noord",
                timezone="UTC",
                supply_points=[
                    sites_pb.SupplyPoint(
                        grid_identifier=identifier,
                        direction=sites_pb.SUPPLY_POINT_DIRECTION_BIDIRECTIONAL,
                    )
                ],
            ),
            metadata=auth(args.partner_token),
        )
    ).site
    battery = (
        await sites.CreateResource(
            sites_pb.CreateResourceRequest(
                site_id=site.id,
                type=sites_pb.RESOURCE_TYPE_STATIC_BATTERY,
                name="home battery",
                external_id="battery-1",
                power_kw=sites_pb.Bounds(min=-5, max=5),
                capacity_kwh=sites_pb.Bounds(min=0, max=10),
                webhook_url=f"http://127.0.0.1:{receiver.port}/setpoints",
            ),
            metadata=auth(args.partner_token),
        )
    ).resource
    print(f"partner: site {site.id}, battery {battery.id} (-5..5 kW)")

    # 2. The supplier's side: an active contract makes the site eligible.
    upstream_site = (
        await upstream.CreateUpstreamSite(
            upstream_pb.CreateUpstreamSiteRequest(grid_identifier=identifier),
            metadata=auth(args.supplier_token),
        )
    ).upstream_site
    await upstream.CreateContract(
        upstream_pb.CreateContractRequest(
            upstream_site_id=upstream_site.id,
            start_date=day(datetime.now(UTC).date() - timedelta(days=1)),
        ),
        metadata=auth(args.supplier_token),
    )
    site = (
        await sites.GetSite(
            sites_pb.GetSiteRequest(site_id=site.id), metadata=auth(args.partner_token)
        )
    ).site
    print(
        f"site: {sites_pb.SiteStatus.Name(site.status)}, "
        f"{sites_pb.UpstreamStatus.Name(site.upstream_status)}"
    )

    # 3. The operator dispatches 3 kW more consumption for half an hour.
    now = int(datetime.now(UTC).timestamp())
    start = datetime.fromtimestamp(now - now % QUARTER_HOUR, UTC)
    made = (
        await dispatch.DispatchFlexibility(
            dispatch_pb.DispatchFlexibilityRequest(
                request_id=f"demo-{secrets.token_hex(4)}",
                power_kw=3.0,
                start_time=timestamp(start),
                end_time=timestamp(start + timedelta(minutes=30)),
                type=dispatch_pb.DISPATCH_TYPE_EXACT,
                selection=dispatch_pb.DispatchSelection(site_ids=[site.id]),
            ),
            metadata=auth(args.token),
        )
    ).dispatch
    print(
        f"operator: dispatch {made.id}: allocated {made.allocated_power_kw} kW, "
        f"shortfall {made.shortfall_power_kw} kW"
    )
    (setpoint,) = await wait_for(dispatch, args.token, made.id, SETTLED)
    print(
        f"setpoint {setpoint.id}: {dispatch_pb.SetpointState.Name(setpoint.state)}, "
        f"{setpoint.power_kw} kW, {len(setpoint.attempts)} attempt(s)"
    )
    if setpoint.state != dispatch_pb.SETPOINT_STATE_ACCEPTED:
        print(f"not accepted: {setpoint.reason}", file=sys.stderr)
        return 1

    # 4. Cancelling: the partner is told to go back to normal operation.
    await dispatch.CancelDispatch(
        dispatch_pb.CancelDispatchRequest(dispatch_id=made.id), metadata=auth(args.token)
    )
    (setpoint,) = await wait_for(
        dispatch, args.token, made.id, {dispatch_pb.SETPOINT_STATE_CANCELLED}
    )
    state = dispatch_pb.SetpointState.Name(setpoint.state)
    print(f"setpoint {setpoint.id}: {state}: {setpoint.reason}")
    kinds = [payload["type"] for payload in receiver.verified]
    if kinds != ["setpoint", "setpoint.cancelled"] or receiver.refused:
        print(f"unexpected deliveries: {kinds}, {receiver.refused} refused", file=sys.stderr)
        return 1
    print("receiver: 2 deliveries, every signature verified")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    openvpp_client.add_connection_arguments(parser)
    parser.add_argument("--partner-token", required=True)
    parser.add_argument("--supplier-token", required=True)
    parser.add_argument("--signing-secret", required=True, help="the partner's whsec_ secret")
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("an operator token is needed: --token or OPENVPP_TOKEN")
    return asyncio.run(run(args))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except grpc.RpcError as error:
        sys.exit(openvpp_client.failure_line(error))
