"""A message of a client stream that cannot be decoded ends the stream, after its acks."""

from __future__ import annotations

import grpc
from openvpp.v1 import telemetry_pb2 as tpb

from tests.conftest import Org
from tests.helpers import raw_method, rpc_error
from tests.integration.test_edge import GARBAGE
from tests.telemetry.conftest import Setup, quarter, register

STREAM = "/openvpp.v1.Telemetry/StreamReadings"


async def test_a_bad_message_on_a_stream_ends_it_after_the_acks_already_sent(
    setup: Setup, channel: grpc.aio.Channel
) -> None:
    meter = await setup.meter()
    good = tpb.StreamReadingsRequest(
        batch=tpb.ReadingBatch(batch_id="first", readings=[register(meter, quarter(1), 10.0)])
    ).SerializeToString()
    call = raw_method(channel, STREAM, "stream_stream")(metadata=setup.org.auth)
    await call.write(good)
    first = tpb.StreamReadingsResponse.FromString(await call.read())
    assert first.ack.batch_id == "first"
    assert first.ack.accepted_count == 1
    await call.write(GARBAGE)
    error = await rpc_error(call.read())
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "request is not a valid `openvpp.v1.StreamReadingsRequest`"


async def test_garbage_as_the_first_stream_message_is_invalid_argument(
    channel: grpc.aio.Channel, partner: Org
) -> None:
    call = raw_method(channel, STREAM, "stream_stream")(iter([GARBAGE]), metadata=partner.auth)
    error = await rpc_error(call.read())
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    # Without a token the same stream is refused before anything is read.
    anonymous = raw_method(channel, STREAM, "stream_stream")(iter([GARBAGE]))
    assert (await rpc_error(anonymous.read())).code() is grpc.StatusCode.UNAUTHENTICATED
