"""Interval energy of meters on a site's balance grid, as numpy arrays. No I/O.

The one derivation of "how much energy did each meter import and export in each balance
interval", used by ``Telemetry.ListReadings`` (one meter, a month at most) and by balancing
(every meter of a site, a year; read with
:func:`service.telemetry.energy_store.site_interval_energy`).

Rules, per meter and flow (1 = import, 2 = export), for interval ``t`` =
``[bounds[t], bounds[t+1])``:

- register meters (``readings_*``): ``(R(bounds[t+1]) - R(bounds[t])) * transformer_factor``,
  the registers stored exactly at the two grid points; either missing: unknown (NaN). Nothing
  is interpolated, and registers between grid points (left from a finer grid before the
  site's resolution changed) play no part.
- load-profile meters: the stored interval values whose timestamp lies in the interval,
  summed, times the factor ("as they are": on an unchanged grid that is the one value at
  ``bounds[t]``); none stored: unknown (NaN).

:func:`interval_energy` returns exactly that, NaN wherever nothing is known.
:func:`absent_as_zero` then sets to 0 what is known to be zero rather than unknown: a flow
the meter's direction does not have (a consumer's export, a producer's import) and intervals
wholly outside the meter's ``[start_date, end_date)`` (the meter was not there). A flow the
meter has, inside its dates, without data stays NaN. :class:`SiteIntervalEnergy` carries
the result of both.

Inputs are chunks of stored rows as arrays, so a store can stream a binary COPY into
:class:`IntervalEnergyAccumulator` without a Python object per reading.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from service.identifiers.ids import MeterId
from service.telemetry.domain import Measuring, MeterDirection

FLOW_IMPORT = 1
FLOW_EXPORT = 2
# An open-ended meter (no end_date) lives until this.
NO_END_US = np.iinfo(np.int64).max


@dataclass(frozen=True)
class SiteIntervalEnergy:
    """Energy of every meter of a site per balance interval over ``[start, end)``.

    ``interval_starts[t]`` is the start of interval ``t`` (UTC epoch µs; on the site's grid,
    so a DST day at PT15M has 92 or 100 of them) and ``meter_ids[m]`` the meter of column
    ``m``, sorted by id. ``import_wh`` / ``export_wh`` [T, M]: energy imported (consumed)
    and exported (produced) in Wh, transformer factor applied; NaN where the meter has that
    flow and lives in that interval but no energy is known (a missing reading, or a register
    missing at either end); 0 for a flow the meter does not have and for intervals wholly
    outside its dates.
    """

    interval_starts: NDArray[np.int64]
    meter_ids: tuple[MeterId, ...]
    import_wh: NDArray[np.float64]
    export_wh: NDArray[np.float64]


@dataclass(frozen=True)
class MeterColumn:
    """One meter's facts the derivation needs; :func:`meter_column` builds it."""

    id: MeterId
    load_profile: bool
    transformer_factor: float
    has_import: bool
    has_export: bool
    start_us: int
    end_us: int | None


def meter_column(
    meter_id: MeterId,
    direction: MeterDirection,
    measuring: Measuring,
    transformer_factor: float,
    start_us: int,
    end_us: int | None,
) -> MeterColumn:
    return MeterColumn(
        id=meter_id,
        load_profile=measuring == Measuring.LOAD_PROFILE_ACCURATE,
        transformer_factor=transformer_factor,
        has_import=direction != MeterDirection.PRODUCER,
        has_export=direction != MeterDirection.CONSUMER,
        start_us=start_us,
        end_us=end_us,
    )


@dataclass(frozen=True)
class MeterColumns:
    """:class:`MeterColumn` facts as arrays of length M, column ``m`` for ``ids[m]``."""

    ids: tuple[MeterId, ...]
    load_profile: NDArray[np.bool_]
    transformer_factor: NDArray[np.float64]
    has_import: NDArray[np.bool_]
    has_export: NDArray[np.bool_]
    start_us: NDArray[np.int64]
    end_us: NDArray[np.int64]

    @classmethod
    def of(cls, meters: Sequence[MeterColumn]) -> MeterColumns:
        return cls(
            ids=tuple(m.id for m in meters),
            load_profile=np.array([m.load_profile for m in meters], dtype=np.bool_),
            transformer_factor=np.array([m.transformer_factor for m in meters], dtype=np.float64),
            has_import=np.array([m.has_import for m in meters], dtype=np.bool_),
            has_export=np.array([m.has_export for m in meters], dtype=np.bool_),
            start_us=np.array([m.start_us for m in meters], dtype=np.int64),
            end_us=np.array(
                [NO_END_US if m.end_us is None else m.end_us for m in meters], dtype=np.int64
            ),
        )


class IntervalEnergyAccumulator:
    """Collects stored rows chunk by chunk onto ``bounds`` and derives the interval energy.

    Memory is a few [T+1, M] float matrices whatever the number of rows.
    """

    def __init__(self, bounds: NDArray[np.int64], meters: MeterColumns) -> None:
        self._bounds = bounds
        self._meters = meters
        self._intervals = max(len(bounds) - 1, 0)
        width = len(meters.load_profile)
        self._width = width
        points = self._intervals + 1 if len(bounds) else 0
        # Per flow: registers at grid points [T+1, M]; interval sums and counts [T, M].
        self._registers = [np.full((points, width), np.nan) for _ in (FLOW_IMPORT, FLOW_EXPORT)]
        self._any_load_profile = bool(meters.load_profile.any())
        shape = (self._intervals, width) if self._any_load_profile else (0, width)
        self._sums = [np.zeros(shape) for _ in (FLOW_IMPORT, FLOW_EXPORT)]
        self._counts = [np.zeros(shape, dtype=np.int64) for _ in (FLOW_IMPORT, FLOW_EXPORT)]

    def add(
        self,
        meter: NDArray[np.integer],
        flow: NDArray[np.integer],
        ts_us: NDArray[np.int64],
        value_wh: NDArray[np.float64],
    ) -> None:
        """Adds stored rows: column index, flow code, epoch µs and value of each."""
        if len(ts_us) == 0 or self._intervals == 0:
            return
        bounds = self._bounds
        # Index of the interval holding each timestamp; T for the end of the last one.
        slot = np.searchsorted(bounds, ts_us, side="right") - 1
        inside = (slot >= 0) & (ts_us <= bounds[-1])
        load_profile = self._meters.load_profile[meter]
        for code, registers, sums, counts in zip(
            (FLOW_IMPORT, FLOW_EXPORT), self._registers, self._sums, self._counts, strict=True
        ):
            of_flow = inside & (flow == code)
            on_point = of_flow & ~load_profile
            on_point[on_point] = bounds[slot[on_point]] == ts_us[on_point]
            registers[slot[on_point], meter[on_point]] = value_wh[on_point]
            if self._any_load_profile:
                take = of_flow & load_profile & (slot < self._intervals)
                flat = slot[take] * self._width + meter[take]
                size = self._intervals * self._width
                sums += np.bincount(flat, weights=value_wh[take], minlength=size).reshape(
                    sums.shape
                )
                counts += np.bincount(flat, minlength=size).reshape(counts.shape)

    def site_energy(self) -> SiteIntervalEnergy:
        """The :class:`SiteIntervalEnergy` of what was added (absent flows and dates as 0)."""
        imported, exported = self.energy()
        bounds, meters = self._bounds, self._meters
        return SiteIntervalEnergy(
            interval_starts=bounds[:-1] if len(bounds) else bounds,
            meter_ids=meters.ids,
            import_wh=absent_as_zero(imported, bounds, meters, meters.has_import),
            export_wh=absent_as_zero(exported, bounds, meters, meters.has_export),
        )

    def energy(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(import, export) [T, M] in Wh, NaN where unknown (see the module docstring)."""
        factor = self._meters.transformer_factor
        result = []
        for registers, sums, counts in zip(self._registers, self._sums, self._counts, strict=True):
            energy = registers[1:] - registers[:-1] if len(registers) else registers
            if self._any_load_profile:
                from_profile = np.where(counts > 0, sums, np.nan)
                energy = np.where(self._meters.load_profile, from_profile, energy)
            # A huge transformer factor may overflow to infinity: balancing leaves such
            # energy unbalanced (service.balancing.blocks), no warning per pass wanted.
            with np.errstate(over="ignore"):
                result.append(energy * factor)
        return result[0], result[1]


def interval_energy(
    bounds: NDArray[np.int64],
    meters: MeterColumns,
    meter: NDArray[np.integer],
    flow: NDArray[np.integer],
    ts_us: NDArray[np.int64],
    value_wh: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(import, export) [T, M] Wh of rows given at once, NaN where unknown."""
    accumulator = IntervalEnergyAccumulator(bounds, meters)
    accumulator.add(meter, flow, ts_us, value_wh)
    return accumulator.energy()


def absent_as_zero(
    energy: NDArray[np.float64],
    bounds: NDArray[np.int64],
    meters: MeterColumns,
    has_flow: NDArray[np.bool_],
) -> NDArray[np.float64]:
    """``energy`` [T, M] of one flow with 0 where it is known to be none (in place).

    ``has_flow[m]``: the meter's direction has this flow. An interval wholly outside the
    meter's ``[start, end)`` is 0 as well.
    """
    if energy.size == 0:
        return energy
    starts, ends = bounds[:-1, None], bounds[1:, None]
    outside = (ends <= meters.start_us[None, :]) | (starts >= meters.end_us[None, :])
    energy[outside | ~has_flow[None, :]] = 0.0
    return energy
