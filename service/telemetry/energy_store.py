"""The interval energy of every meter of a site over a range, read in one query.

Interface for balancing (and anything else that needs a site's energy per interval)::

    energy = await site_interval_energy(pool_or_conn, org_id, site_id, start, end)
    energy.interval_starts   # [T] int64 UTC epoch µs: the site's balance grid in [start, end)
    energy.meter_ids         # [M] the site's meters (or the asked ones), sorted by id
    energy.import_wh         # [T, M] float64 Wh imported (consumption) per interval
    energy.export_wh         # [T, M] float64 Wh exported (production) per interval

NaN = the meter has that flow and existed in that interval but no energy is known (a
missing reading, or a register missing at either end of the interval); 0 = a flow the
meter's direction does not have, or an interval wholly outside the meter's dates. The
transformer factor is applied. The rules are those of :mod:`service.telemetry.energy`, the
same code ``ListReadings`` uses.

Reading: the site and its meters (one small query, scoped to the organization), then every
reading of those meters in the range as ONE binary ``COPY (SELECT ...) TO STDOUT``; its
fixed-width rows are decoded with ``numpy.frombuffer`` chunk by chunk as they arrive and
scattered onto the grid, so no Python object is made per reading and memory stays at a few
[T+1, M] matrices. Everything runs in one REPEATABLE READ snapshot when a pool is given (or
when the given connection is not in a transaction already); from a pool, a large read runs
as two COPYs of half the meters each on two connections sharing that snapshot
(``pg_export_snapshot``), so PostgreSQL scans on two cores while this process decodes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg
import numpy as np
from numpy.typing import NDArray

from service.common.errors import NotFoundError
from service.grid import parse_resolution
from service.grid.arrays import from_epoch_us, grid_bounds_us, to_epoch_us
from service.identifiers.ids import MeterId, OrgId, SiteId
from service.telemetry.energy import (
    FLOW_EXPORT,
    FLOW_IMPORT,
    IntervalEnergyAccumulator,
    MeterColumn,
    MeterColumns,
    SiteIntervalEnergy,
    interval_energy,
    meter_column,
)
from service.telemetry.meter_store import MeterRecord
from service.telemetry.store import fetch_range
from service.telemetry.validate import MeterInfo

_PG_EPOCH_US = 946_684_800 * 1_000_000
_COPY_HEADER_SIZE = 19  # signature (11), flags (4), header extension length (4)
# One row of (column int4, flow int2, ts timestamptz, value_wh float8) in binary COPY: the
# field count, then each field's length and big-endian value.
_ROW = np.dtype(
    [
        ("fields", ">i2"),
        ("column_size", ">i4"),
        ("column", ">i4"),
        ("flow_size", ">i4"),
        ("flow", ">i2"),
        ("ts_size", ">i4"),
        ("ts", ">i8"),
        ("value_size", ">i4"),
        ("value", ">f8"),
    ]
)
# Decode once this much has arrived (and at the end).
_DECODE_BYTES = 4 << 20
# From this many meter-intervals on (a site-month of 100 meters is 288,000), a read from a
# pool runs as two COPYs on two connections; and how long it waits for the second one.
PARALLEL_MIN_CELLS = 200_000
PARALLEL_ACQUIRE_SECONDS = 0.5


class _RowDecoder:
    """Binary COPY bytes -> arrays of whole rows, fed to the accumulator as they come."""

    def __init__(self, accumulator: IntervalEnergyAccumulator) -> None:
        self._accumulator = accumulator
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._header_left = _COPY_HEADER_SIZE

    async def feed(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self._pending_size += len(chunk)
        if self._pending_size >= _DECODE_BYTES:
            self._decode(final=False)

    def finish(self) -> None:
        self._decode(final=True)

    def _decode(self, *, final: bool) -> None:
        data = b"".join(self._pending)
        start = 0
        if self._header_left:
            start = min(self._header_left, len(data))
            self._header_left -= start
        whole = (len(data) - start) // _ROW.itemsize
        end = start + whole * _ROW.itemsize
        rest = data[end:]
        if final and rest not in (b"", b"\xff\xff"):
            raise ValueError(f"unexpected {len(rest)} bytes at the end of the readings COPY")
        self._pending = [rest] if rest and not final else []
        self._pending_size = len(rest) if not final else 0
        if whole == 0:
            return
        rows = np.frombuffer(data, dtype=_ROW, count=whole, offset=start)
        self._accumulator.add(
            rows["column"].astype(np.intp),
            rows["flow"].astype(np.int16),
            rows["ts"].astype(np.int64) + _PG_EPOCH_US,
            rows["value"].astype(np.float64),
        )


def _column(meter: MeterRecord) -> MeterColumn:
    fields = meter.fields
    assert fields.direction is not None
    assert fields.measuring is not None
    assert fields.start_date is not None
    return meter_column(
        MeterId(meter.id),
        fields.direction,
        fields.measuring,
        fields.transformer_factor or 1.0,
        to_epoch_us(fields.start_date),
        None if fields.end_date is None else to_epoch_us(fields.end_date),
    )


@contextlib.asynccontextmanager
async def _snapshot(
    db: asyncpg.Pool | asyncpg.Connection,
) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Pool | None]]:
    """A connection in one REPEATABLE READ snapshot, and the pool it came from (if any)."""
    if isinstance(db, asyncpg.Pool):
        async with (
            db.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            yield conn, db
    elif db.is_in_transaction():
        yield db, None
    else:
        async with db.transaction(isolation="repeatable_read", readonly=True):
            yield db, None


def _us_literal(value: int) -> str:
    return f"(timestamptz 'epoch' + {int(value)} * interval '1 microsecond')"


def _readings_query(
    org_id: UUID, meter_ids: Sequence[UUID], first_column: int, bounds: NDArray[np.int64]
) -> str:
    """Every reading of ``meter_ids`` (columns ``first_column`` on) within the bounds.

    Values are inlined (uuids and integers we format ourselves), so the planner prunes the
    readings partitions to the range; COPY takes no parameters.
    """
    ids = ",".join(f"'{UUID(str(m))}'" for m in meter_ids)
    return f"""
        SELECT (g.n - 1 + {int(first_column)})::int4, r.flow, r.ts, r.value_wh
        FROM unnest(ARRAY[{ids}]::uuid[]) WITH ORDINALITY AS g(id, n)
        JOIN meters m ON m.id = g.id AND m.org_id = '{UUID(str(org_id))}'
        JOIN readings r ON r.meter_id = g.id
        WHERE r.ts >= {_us_literal(int(bounds[0]))} AND r.ts <= {_us_literal(int(bounds[-1]))}
    """


async def _copy_into(
    conn: asyncpg.Connection, query: str, accumulator: IntervalEnergyAccumulator
) -> None:
    decoder = _RowDecoder(accumulator)
    await conn.copy_from_query(query, output=decoder.feed, format="binary")
    decoder.finish()


async def _copy_readings(
    conn: asyncpg.Connection,
    pool: asyncpg.Pool | None,
    org_id: UUID,
    meter_ids: Sequence[UUID],
    bounds: NDArray[np.int64],
    accumulator: IntervalEnergyAccumulator,
) -> None:
    """One COPY of every reading; for a large read from a pool, two in parallel (half the
    meters each, on a second connection in the same exported snapshot), so PostgreSQL
    scans on two cores while this process decodes."""
    cells = (len(bounds) - 1) * len(meter_ids)
    second: asyncpg.Connection | None = None
    if pool is not None and len(meter_ids) >= 2 and cells >= PARALLEL_MIN_CELLS:
        snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
        try:
            second = await pool.acquire(timeout=PARALLEL_ACQUIRE_SECONDS)
        except TimeoutError:
            second = None  # the pool is busy: one COPY it is
    if second is None or pool is None:
        await _copy_into(conn, _readings_query(org_id, meter_ids, 0, bounds), accumulator)
        return
    half = len(meter_ids) // 2
    try:
        async with second.transaction(isolation="repeatable_read", readonly=True):
            await second.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            await asyncio.gather(
                _copy_into(conn, _readings_query(org_id, meter_ids[:half], 0, bounds), accumulator),
                _copy_into(
                    second, _readings_query(org_id, meter_ids[half:], half, bounds), accumulator
                ),
            )
    finally:
        await pool.release(second)


async def site_interval_energy(
    db: asyncpg.Pool | asyncpg.Connection,
    org_id: OrgId | UUID,
    site_id: SiteId | UUID,
    start: datetime,
    end: datetime,
    meter_ids: Sequence[MeterId | UUID] | None = None,
) -> SiteIntervalEnergy:
    """The interval energy of the site's meters (all, or ``meter_ids``) over ``[start, end)``.

    Raises ``NotFoundError`` for a site (or a meter of ``meter_ids``) that does not exist in
    ``org_id``. See the module docstring for the meaning of NaN and 0.
    """
    async with _snapshot(db) as (conn, pool):
        site = await conn.fetchrow(
            "SELECT timezone, balance_resolution FROM sites WHERE id = $1 AND org_id = $2",
            site_id,
            org_id,
        )
        if site is None:
            raise NotFoundError("site", str(site_id))
        rows = await conn.fetch(
            """
            SELECT * FROM meters
            WHERE site_id = $1 AND org_id = $2 AND ($3::uuid[] IS NULL OR id = ANY($3::uuid[]))
            """,
            site_id,
            org_id,
            None if meter_ids is None else list(meter_ids),
        )
        if meter_ids is not None:
            found = {row["id"] for row in rows}
            for wanted in meter_ids:
                if wanted not in found:
                    raise NotFoundError("meter", str(wanted))
        records = sorted((MeterRecord.from_row(row) for row in rows), key=lambda m: m.id)
        meters = MeterColumns.of([_column(record) for record in records])
        bounds = grid_bounds_us(
            parse_resolution(site["balance_resolution"]), ZoneInfo(site["timezone"]), start, end
        )
        accumulator = IntervalEnergyAccumulator(bounds, meters)
        if len(bounds) and meters.ids:
            await _copy_readings(conn, pool, org_id, meters.ids, bounds, accumulator)
        return accumulator.site_energy()


@dataclass(frozen=True)
class MeterReadings:
    """``ListReadings`` of one meter: stored rows in ``[start, end)`` (records with ``flow``,
    ``ts``, ``value_wh``, by flow and time) and its known intervals as (start, flow code,
    energy Wh), import first, each flow in time order."""

    readings: list[asyncpg.Record]
    intervals: list[tuple[datetime, int, float]]


async def meter_readings(
    pool: asyncpg.Pool, meter: MeterInfo, start: datetime, end: datetime
) -> MeterReadings:
    """One meter's stored values and interval energy (the same derivation as the site's)."""
    bounds = grid_bounds_us(meter.resolution, meter.timezone, start, end)
    # A register at the end of the last interval is needed to difference it.
    upper = from_epoch_us(int(bounds[-1])) if len(bounds) else end
    rows = await fetch_range(pool, OrgId(meter.org_id), MeterId(meter.id), start, upper)
    columns = MeterColumns.of(
        [
            meter_column(
                MeterId(meter.id),
                meter.direction,
                meter.measuring,
                meter.transformer_factor,
                meter.start_us,
                meter.end_us,
            )
        ]
    )
    energies = interval_energy(
        bounds,
        columns,
        np.zeros(len(rows), dtype=np.intp),
        np.array([row["flow"] for row in rows], dtype=np.int16),
        np.array([to_epoch_us(row["ts"]) for row in rows], dtype=np.int64),
        np.array([row["value_wh"] for row in rows], dtype=np.float64),
    )
    intervals = []
    for flow, energy in zip((FLOW_IMPORT, FLOW_EXPORT), energies, strict=True):
        column = energy[:, 0]
        for index in np.flatnonzero(~np.isnan(column)):
            intervals.append((from_epoch_us(int(bounds[index])), flow, float(column[index])))
    return MeterReadings([row for row in rows if row["ts"] < end], intervals)
