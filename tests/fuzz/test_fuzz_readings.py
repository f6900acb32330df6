"""Reading values from the fuzzer's strategies, sent where they reach the value rules.

The fuzzing of every RPC (``test_fuzz_rpcs.py``) rarely gets a reading past its meter and
timestamp checks. Here every reading names a meter of a balanced site, on its grid, of the
kind its meter takes, with a value from the fuzzer's floats and the values at and just
beyond ingest's bounds (``VALUE_BOUNDS``); each batch is followed by ``RunBalancing`` of the
day. Asserted: a finite value above its meter's bound is rejected as
``REJECT_REASON_VALUE_TOO_LARGE`` and one within it never is, neither call answers
UNKNOWN or INTERNAL, and nothing stored exceeds a bound. Registers of up to 1e15 Wh make
interval energy far beyond what the engine balances; random batches seldom complete such
an interval (every meter's energy known), so an explicit example does.

``OPENVPP_FUZZ_CASES`` scales the number of batches like the other fuzz test's calls, and
``OPENVPP_FUZZ_SEED`` makes a run repeatable the same way.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from openvpp.v1 import balancing_pb2 as bpb
from openvpp.v1 import (
    balancing_pb2_grpc,
    telemetry_pb2_grpc,
)
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import telemetry_pb2 as tpb

from service.app import Service
from service.auth.principal import Role
from service.grid import PT15M
from service.telemetry.domain import MAX_REGISTER_WH, max_interval_wh
from tests.conftest import MakeOrg, Org
from tests.fuzz.messages import SPECIAL_FLOATS, VALUE_BOUNDS
from tests.fuzz.test_fuzz_rpcs import CASES, NEVER, balanced_community, fuzz_settings, run_seeded
from tests.telemetry.conftest import stamp

# One batch and one RunBalancing per example.
EXAMPLES = max(50, CASES // 30)
DAY = datetime(2025, 1, 2, tzinfo=UTC)
QUARTER = timedelta(minutes=15)
VALUES = st.sampled_from(SPECIAL_FLOATS) | st.floats() | st.floats(0, 2 * MAX_REGISTER_WH)


@dataclass(frozen=True)
class Meter:
    id: str
    register: bool

    @property
    def bound(self) -> float:
        return MAX_REGISTER_WH if self.register else max_interval_wh(PT15M)


@dataclass(frozen=True)
class Community:
    org: Org
    site_id: str
    meters: tuple[Meter, ...]


@pytest.fixture
async def community(service: Service, make_org: MakeOrg, channel: grpc.aio.Channel) -> Community:
    """A balanced PT15M site (UTC): a register consumer, a load-profile consumer and a
    load-profile producer, all taking part."""
    org = await make_org(Role.PARTNER)
    kinds = [
        (0, mpb.METER_DIRECTION_CONSUMER, mpb.MEASURING_READINGS_ACCURATE),
        (1, mpb.METER_DIRECTION_CONSUMER, mpb.MEASURING_LOAD_PROFILE_ACCURATE),
        (2, mpb.METER_DIRECTION_PRODUCER, mpb.MEASURING_LOAD_PROFILE_ACCURATE),
    ]
    site_id, meter_ids = await balanced_community(channel, org, "FUZZ-VALUES", kinds)
    made = [
        Meter(meter_id, measuring == mpb.MEASURING_READINGS_ACCURATE)
        for meter_id, (_, _, measuring) in zip(meter_ids, kinds, strict=True)
    ]
    return Community(org, site_id, tuple(made))


def _reading(meter: Meter, quarter: int, value: float) -> tpb.Reading:
    at = stamp(DAY + quarter * QUARTER)
    if meter.register:
        return tpb.Reading(meter_id=meter.id, timestamp=at, register_wh=value)
    return tpb.Reading(meter_id=meter.id, timestamp=at, interval_wh=value)


def _registers_rising(batch: list[tuple[Meter, int, float]]) -> list[tuple[Meter, int, float]]:
    """The batch with its register values in the order of their quarter-hours, so that
    more of them pass the monotonicity check and make interval energy."""
    positions = [i for i, (meter, _, _) in enumerate(batch) if meter.register]
    by_time = sorted(positions, key=lambda i: batch[i][1])
    values = sorted((batch[i][2] for i in positions), key=lambda v: (math.isnan(v), v))
    result = list(batch)
    for position, value in zip(by_time, values, strict=True):
        meter, quarter, _ = batch[position]
        result[position] = (meter, quarter, value)
    return result


def _fuzz(target: str, community: Community, failures: list[str]) -> None:
    with grpc.insecure_channel(target) as channel:
        telemetry = telemetry_pb2_grpc.TelemetryStub(channel)
        balancing = balancing_pb2_grpc.BalancingStub(channel)
        auth = community.org.auth

        def call(method: Callable[..., object], request: object) -> object:
            try:
                return method(request, metadata=auth, timeout=10)
            except grpc.RpcError as error:
                if error.code() in NEVER:
                    raise AssertionError(f"{error.code().name}: {error.details()}") from None
                return None

        registers, profile, production = community.meters
        # Registers at neighbouring quarter-hours 1e15 Wh apart: an interval's demand far
        # beyond the engine's range, with every participant's energy known.
        jump = [(registers, 0, 0.0), (registers, 1, 1e15), (profile, 0, 5.0)]
        jump.append((production, 0, 4.0))

        @fuzz_settings(EXAMPLES)
        @given(
            st.lists(
                st.tuples(
                    st.sampled_from(community.meters),
                    # Mostly the first hour: registers at neighbouring quarter-hours make
                    # interval energy (their difference), up to 1e15 Wh.
                    st.integers(0, 3) | st.integers(0, 95),
                    VALUES | st.sampled_from(VALUE_BOUNDS),
                ),
                min_size=1,
                max_size=8,
            )
        )
        @example(jump)
        def case(drawn: list[tuple[Meter, int, float]]) -> None:
            batch = _registers_rising(drawn)
            readings = [_reading(meter, quarter, value) for meter, quarter, value in batch]
            response = call(
                telemetry.IngestReadings,
                tpb.IngestReadingsRequest(batch=tpb.ReadingBatch(batch_id="f", readings=readings)),
            )
            assert isinstance(response, tpb.IngestReadingsResponse)
            too_large = {
                r.index
                for r in response.ack.rejected
                if r.reason == tpb.REJECT_REASON_VALUE_TOO_LARGE
            }
            expected = {
                index
                for index, (meter, _, value) in enumerate(batch)
                if math.isfinite(value) and value > meter.bound
            }
            assert too_large == expected, (too_large, expected, batch)
            call(
                balancing.RunBalancing,
                bpb.RunBalancingRequest(
                    site_id=community.site_id,
                    start_time=stamp(DAY),
                    end_time=stamp(DAY + timedelta(days=1)),
                ),
            )

        try:
            run_seeded(case)
        except AssertionError as failure:
            failures.append(str(failure))


@pytest.mark.timeout(max(120, CASES // 50))
async def test_reading_values_beyond_the_bounds_are_refused_and_never_break_balancing(
    service: Service, community: Community
) -> None:
    failures: list[str] = []
    await asyncio.to_thread(_fuzz, f"127.0.0.1:{service.port}", community, failures)
    assert not failures, failures[0]
    assert service.pool is not None
    for meter in community.meters:
        largest = await service.pool.fetchval(
            "SELECT max(value_wh) FROM readings WHERE meter_id = $1::uuid", meter.id
        )
        assert largest is not None, "no reading of the meter got through"
        assert largest <= meter.bound
