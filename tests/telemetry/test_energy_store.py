"""site_interval_energy: every meter of a site in one read, equal to the per-meter rules."""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import meter_registry_pb2_grpc, site_registry_pb2_grpc, telemetry_pb2_grpc
from openvpp.v1 import telemetry_pb2 as tpb

from service.app import Service
from service.common.errors import NotFoundError
from service.grid import PT15M
from service.grid.arrays import to_epoch_us
from service.identifiers.ids import MeterId, OrgId
from service.telemetry import energy_store
from service.telemetry.energy_store import site_interval_energy
from service.telemetry.store import fetch_range
from tests.conftest import Org
from tests.telemetry.conftest import interval, make_setup, register, stamp
from tests.unit.reference_rules import RegisterPoint, registers_to_intervals

BERLIN = ZoneInfo("Europe/Berlin")
# Across the fall-back day (25 hours, 100 quarter-hours).
START = datetime(2025, 10, 24, 22, tzinfo=BERLIN)
END = datetime(2025, 10, 28, tzinfo=BERLIN)
ENDED = datetime(2025, 10, 27, 6, 15, tzinfo=BERLIN)


async def test_site_energy_equals_the_per_meter_derivation(
    partner: Org,
    other_partner: Org,
    registry: site_registry_pb2_grpc.SiteRegistryAsyncStub,
    meters: meter_registry_pb2_grpc.MeterRegistryAsyncStub,
    telemetry: telemetry_pb2_grpc.TelemetryAsyncStub,
    service: Service,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(8)
    assert service.pool is not None
    site = await make_setup(partner, registry, meters, telemetry, timezone="Europe/Berlin")
    kinds = [
        (mpb.METER_DIRECTION_CONSUMER, mpb.MEASURING_READINGS_ACCURATE, 2.0, None),
        (mpb.METER_DIRECTION_PRODUCER, mpb.MEASURING_LOAD_PROFILE_ACCURATE, 1.0, None),
        (mpb.METER_DIRECTION_BIDIRECTIONAL, mpb.MEASURING_READINGS_ACCURATE, 0.5, None),
        (mpb.METER_DIRECTION_CONSUMER, mpb.MEASURING_READINGS_ACCURATE, 1.0, ENDED),
    ]
    created = []
    for direction, measuring, factor, end_date in kinds:
        fields: dict[str, Any] = {
            "direction": direction,
            "measuring": measuring,
            "transformer_factor": factor,
        }
        if end_date is not None:
            fields["end_date"] = stamp(end_date)
        created.append(await site.meter(**fields))
    stamps = list(PT15M.iter_starts(START - timedelta(hours=2), END + timedelta(hours=2), BERLIN))
    readings: list[tpb.Reading] = []
    sent: dict[tuple[str, int], list[tuple[datetime, float]]] = {}
    for meter, (direction, measuring, _, end_date) in zip(created, kinds, strict=True):
        flows = {
            mpb.METER_DIRECTION_CONSUMER: (tpb.FLOW_IMPORT,),
            mpb.METER_DIRECTION_PRODUCER: (tpb.FLOW_EXPORT,),
            mpb.METER_DIRECTION_BIDIRECTIONAL: (tpb.FLOW_IMPORT, tpb.FLOW_EXPORT),
        }[direction]
        for flow in flows:
            value = rng.uniform(0, 1000)
            points = sent.setdefault((meter.id, flow), [])
            for at in stamps:
                if rng.random() < 0.05 or (end_date is not None and at >= end_date):
                    continue  # a gap
                step = rng.uniform(0, 300)
                if measuring == mpb.MEASURING_LOAD_PROFILE_ACCURATE:
                    points.append((at, step))
                    readings.append(interval(meter, at, step, flow=flow))
                else:
                    value += step
                    points.append((at, value))
                    readings.append(register(meter, at, value, flow=flow))
    for first in range(0, len(readings), 5000):
        ack = await site.ingest(readings[first : first + 5000])
        assert ack.rejected_count == 0, ack.rejected
    # Another site of the same partner: its readings are not this site's.
    other = await make_setup(partner, registry, meters, telemetry, timezone="Europe/Berlin")
    elsewhere = await other.meter()
    assert (await other.ingest([register(elsewhere, at, 1.0) for at in stamps[:50]])).rejected == []

    copies: list[str] = []
    real_copy = energy_store._copy_into

    async def counted(conn: Any, query: str, accumulator: Any) -> None:
        copies.append(query)
        await real_copy(conn, query, accumulator)

    monkeypatch.setattr(energy_store, "_copy_into", counted)
    # Decode in tiny chunks too, so rows arrive split across COPY messages; and read as two
    # COPYs on two connections of one snapshot.
    for decode_bytes, parallel_from in ((4 << 20, 10**9), (333, 10**9), (4 << 20, 0)):
        monkeypatch.setattr(energy_store, "_DECODE_BYTES", decode_bytes)
        monkeypatch.setattr(energy_store, "PARALLEL_MIN_CELLS", parallel_from)
        copies.clear()
        energy = await site_interval_energy(
            service.pool, partner.id, _uuid(site.site.id), START, END
        )
        grid = [to_epoch_us(p) for p in PT15M.iter_starts(START, END, BERLIN)]
        assert energy.interval_starts.tolist() == grid
        assert len(grid) == 8 + 96 + 100 + 96  # 2 h, then the 25th, the 26th (fall back), the 27th
        order = sorted(created, key=lambda m: _uuid(m.id))
        assert energy.meter_ids == tuple(_uuid(m.id) for m in order)
        for column, meter in enumerate(order):
            kind = kinds[created.index(meter)]
            for flow, matrix in (
                (tpb.FLOW_IMPORT, energy.import_wh),
                (tpb.FLOW_EXPORT, energy.export_wh),
            ):
                expected = _expected(meter, kind, flow, sent.get((meter.id, flow)), grid)
                np.testing.assert_array_equal(matrix[:, column], expected, err_msg=meter.identifier)
        assert len(copies) == (2 if parallel_from == 0 else 1)
        assert np.isnan(energy.import_wh).any()
        assert (energy.export_wh[:, [order.index(created[0])]] == 0).all()

    subset = await site_interval_energy(
        service.pool, partner.id, _uuid(site.site.id), START, END, [_uuid(created[2].id)]
    )
    assert subset.meter_ids == (_uuid(created[2].id),)
    full_column = energy.meter_ids.index(MeterId(_uuid(created[2].id)))
    np.testing.assert_array_equal(subset.export_wh[:, 0], energy.export_wh[:, full_column])

    # Inside a caller's transaction, on its connection.
    async with service.pool.acquire() as conn, conn.transaction():
        same = await site_interval_energy(conn, partner.id, _uuid(site.site.id), START, END)
    np.testing.assert_array_equal(same.import_wh, energy.import_wh)

    with pytest.raises(NotFoundError):
        await site_interval_energy(service.pool, other_partner.id, _uuid(site.site.id), START, END)
    with pytest.raises(NotFoundError):
        await site_interval_energy(
            service.pool, partner.id, _uuid(site.site.id), START, END, [_uuid(elsewhere.id)]
        )


def _uuid(text: str) -> MeterId:
    return MeterId(uuid.UUID(text))


def _expected(
    meter: mpb.Meter,
    kind: tuple[int, int, float, datetime | None],
    flow: int,
    points: list[tuple[datetime, float]] | None,
    grid: list[int],
) -> np.ndarray:
    _, measuring, factor, end_date = kind
    result = np.full(len(grid), np.nan)
    if points is None:  # the meter's direction does not have this flow
        return np.zeros(len(grid))
    if measuring == mpb.MEASURING_LOAD_PROFILE_ACCURATE:
        known = {to_epoch_us(at): value * factor for at, value in points}
    else:
        known = {
            to_epoch_us(i.interval_start): i.energy_wh
            for i in registers_to_intervals(
                [RegisterPoint(at, value) for at, value in points], PT15M, BERLIN, factor
            )
        }
    for index, start in enumerate(grid):
        if end_date is not None and start >= to_epoch_us(end_date):
            result[index] = 0.0  # the meter was gone
        elif start in known:
            result[index] = known[start]
    return result


async def test_a_meters_readings_are_read_only_in_its_own_organization(
    partner: Org,
    other_partner: Org,
    registry: site_registry_pb2_grpc.SiteRegistryAsyncStub,
    meters: meter_registry_pb2_grpc.MeterRegistryAsyncStub,
    telemetry: telemetry_pb2_grpc.TelemetryAsyncStub,
    service: Service,
) -> None:
    assert service.pool is not None
    setup = await make_setup(partner, registry, meters, telemetry)
    meter = await setup.meter(
        measuring=mpb.MEASURING_LOAD_PROFILE_ACCURATE, start_date=stamp(START)
    )
    at = START + timedelta(minutes=15)
    assert (await setup.ingest([interval(meter, at, 7.0)])).accepted_count == 1
    meter_id = MeterId(_uuid(meter.id))
    own = await fetch_range(service.pool, OrgId(partner.id), meter_id, START, END)
    assert [(row["ts"], row["value_wh"]) for row in own] == [(at, 7.0)]
    assert await fetch_range(service.pool, OrgId(other_partner.id), meter_id, START, END) == []
