"""A small client for OpenVPP: channels with the token and retries, and script arguments.

    import openvpp_client
    from openvpp.v1 import site_registry_pb2 as pb, site_registry_pb2_grpc

    with openvpp_client.channel("127.0.0.1:50051", token) as channel:
        sites = site_registry_pb2_grpc.SiteRegistryStub(channel)
        print(sites.ListSites(pb.ListSitesRequest()).total_size)

See ``openvpp_client.channel`` for how the token travels and what is retried.
"""

from openvpp_client.args import add_connection_arguments, channel_from_args, failure_line
from openvpp_client.channel import (
    DEFAULT_RETRY,
    DEFAULT_TARGET,
    RetryPolicy,
    aio_channel,
    bearer,
    channel,
    channel_options,
)

__all__ = [
    "DEFAULT_RETRY",
    "DEFAULT_TARGET",
    "RetryPolicy",
    "add_connection_arguments",
    "aio_channel",
    "bearer",
    "channel",
    "channel_from_args",
    "channel_options",
    "failure_line",
]
