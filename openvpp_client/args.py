"""Command-line arguments of client scripts (examples, tools): where the server is, which token."""

from __future__ import annotations

import argparse
import os

import grpc

from openvpp_client.channel import DEFAULT_TARGET, channel

ADDRESS_VARIABLE = "OPENVPP_ADDRESS"
TOKEN_VARIABLE = "OPENVPP_TOKEN"


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """``--address`` and ``--token``, defaulting to OPENVPP_ADDRESS and OPENVPP_TOKEN."""
    parser.add_argument(
        "--address",
        default=os.environ.get(ADDRESS_VARIABLE, DEFAULT_TARGET),
        help=f"server host:port (env {ADDRESS_VARIABLE}, default {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_VARIABLE),
        help=f"API token of the calling organization (env {TOKEN_VARIABLE})",
    )


def channel_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> grpc.Channel:
    """The channel ``--address`` and ``--token`` ask for; a missing token is a usage error."""
    if not args.token:
        parser.error(f"a token is needed: --token or {TOKEN_VARIABLE}")
    return channel(args.address, args.token)


def failure_line(error: grpc.RpcError) -> str:
    """The line a client script exits with for a failed call: its status and details, and
    when nothing answers at the address, what a newcomer most often got wrong."""
    code = error.code()
    line = f"{code.name}: {error.details()}"
    # gRPC's own words when nothing answers, not the server's UNAVAILABLE (e.g. its
    # database is away), for which starting it is no advice.
    if code is grpc.StatusCode.UNAVAILABLE and "failed to connect" in str(error.details()).lower():
        line += (
            "\n(is the service running there? Start it with ./scripts/serve, or point"
            f" --address or {ADDRESS_VARIABLE} at it)"
        )
    return line
