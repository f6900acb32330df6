"""Balancing benchmark: one site-year of energy sharing, engine and (later) service.

Usage::

    flock /tmp/openvpp-bench.lock .venv/bin/python -m loadtest.balancing_bench engine
    flock /tmp/openvpp-bench.lock .venv/bin/python -m loadtest.balancing_bench service
    ... engine --repeat 5 --peer-fraction 0.1      # peer on 10% of the year, scaled
    ... engine --peer-fraction 1                   # peer on the full year (OPTIMAL ~1 min)
    ... engine --no-peer                           # engine only

The site: 100 consumers with load-shaped demand and 2 PV-shaped producers, 35,040
quarter-hours (one year at PT15M, 3.57 M meter-intervals), from a seeded RNG.

``engine`` times :func:`service.balancing.engine.allocate` per method (``--repeat`` runs,
min and median printed) and, in the same run on the same input, the open-source peer
``openenergyid.energysharing`` (install with ``pip install -e '.[bench]'``), methods FIXED
and OPTIMAL, with the ratios. The peer runs on ``--peer-fraction`` of the year (whole
days, every n-th day of the year) and its time is scaled to the year, printed as such;
``1`` runs the whole year.
It also checks that both agree on the conservation totals where the methods coincide:

- openenergyid FIXED with keys 1/100 for every consumer == our STATIC with those keys;
- openenergyid OPTIMAL with the same keys (keys renormalised over the consumers still in
  demand, iterated until nothing more is shared) == our EQUAL (water-filling);
- openenergyid FIXED with keys ``d_i / sum d`` per interval == our PRO_RATA (no prosumers).

openenergyid works on totals per participant (shared energy received, net offtake, net
injection, floats); it returns the unshared part to the producers in proportion to their
gross injection, while we cut each offer in proportion, so per-producer feed-in may differ
between the two when both producers are capped; only the totals are compared.

Sections are subcommands: ``engine`` above, and ``service``
(:mod:`loadtest.balancing_service_bench`): the same shape of site-year loaded into a
running server, ``RunBalancing`` of the year, the year's
reads and the latency of corrections (see that module). Prints figures and asserts
nothing; bounded in count and time.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from loadtest import balancing_service_bench
from service.balancing.engine import (
    AllocationMethod,
    BalancingInput,
    BalancingResult,
    allocate,
    round_energy_wh,
)

INTERVALS_PER_DAY = 96
DAYS = 365
CONSUMERS = 100
PRODUCERS = 2


@dataclass(frozen=True)
class SiteYear:
    production_wh: NDArray[np.int64]  # [T, P]
    demand_wh: NDArray[np.int64]  # [T, C]

    @property
    def meter_intervals(self) -> int:
        intervals, producers = self.production_wh.shape
        return int(intervals * (producers + self.demand_wh.shape[1]))


def build_site_year(seed: int = 11, days: int = DAYS) -> SiteYear:
    """Load-shaped demand and PV-shaped production in whole Wh per quarter-hour."""
    rng = np.random.default_rng(seed)
    intervals = days * INTERVALS_PER_DAY
    hour = (np.arange(intervals) % INTERVALS_PER_DAY) / 4.0
    day = np.arange(intervals) // INTERVALS_PER_DAY
    # Households: a night base, a morning and a larger evening peak, more in winter.
    season = 1.0 + 0.25 * np.cos(2 * np.pi * (day - 15) / 365)
    profile = (
        0.35
        + 0.6 * np.exp(-(((hour - 7.5) / 1.2) ** 2))
        + 1.0 * np.exp(-(((hour - 19.0) / 2.0) ** 2))
        + 0.25 * np.exp(-(((hour - 13.0) / 3.0) ** 2))
    ) * season
    # ~3,500 kWh a year on average, each household its own size and noise.
    size = rng.lognormal(mean=0.0, sigma=0.4, size=CONSUMERS)
    scale = 3_500_000 / (profile.sum() * 1.0)
    noise = rng.gamma(shape=4.0, scale=0.25, size=(intervals, CONSUMERS))
    demand = profile[:, None] * size[None, :] * scale * noise
    # Two PV plants (120 and 80 kWp): a daylight bell that is longer and higher in summer,
    # with day-to-day and quarter-hour clouds.
    daylight = 12.2 + 4.2 * np.sin(2 * np.pi * (day - 80) / 365)
    solar_noon = 13.2
    elevation = np.clip(np.cos(np.pi * (hour - solar_noon) / daylight), 0.0, None)
    elevation[np.abs(hour - solar_noon) > daylight / 2] = 0.0
    clear_sky = elevation**1.5 * (0.55 + 0.45 * np.sin(2 * np.pi * (day - 80) / 365))
    daily_clouds = rng.uniform(0.25, 1.0, size=days)[day]
    production = np.empty((intervals, PRODUCERS))
    for producer, kwp in enumerate((120.0, 80.0)):
        quarter_clouds = np.clip(rng.normal(1.0, 0.15, size=intervals), 0.2, 1.2)
        production[:, producer] = kwp * 250.0 * clear_sky * daily_clouds * quarter_clouds
    return SiteYear(
        production_wh=round_energy_wh(production),
        demand_wh=round_energy_wh(demand),
    )


def engine_input(site: SiteYear, method: AllocationMethod) -> BalancingInput:
    consumers = site.demand_wh.shape[1]
    return BalancingInput(
        method=method,
        production_wh=site.production_wh,
        demand_wh=site.demand_wh,
        producer_as_consumer=np.full(site.production_wh.shape[1], -1, dtype=np.int64),
        consumer_tier=np.zeros(consumers, dtype=np.int64),
        consumer_share=np.full(consumers, 1.0 / consumers),
    )


@dataclass(frozen=True)
class Timing:
    wall: list[float]
    cpu: list[float]  # this process's CPU time: what the machine's other load does not inflate

    @property
    def median(self) -> float:
        return statistics.median(self.wall)


def timed(function: Callable[[], Any], repeat: int) -> tuple[Timing, Any]:
    wall, cpu = [], []
    result = None
    for _ in range(repeat):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = function()
        cpu.append(time.process_time() - started_cpu)
        wall.append(time.perf_counter() - started)
    return Timing(wall, cpu), result


# ---------------------------------------------------------------------------------------------
# The peer: openenergyid.energysharing
# ---------------------------------------------------------------------------------------------


def peer_intervals(total: int, fraction: float) -> NDArray[np.intp]:
    """Whole days spread over the year (every n-th day) making up ``fraction`` of it."""
    if fraction >= 1:
        return np.arange(total)
    stride = max(1, round(1 / fraction))
    days = np.arange(0, total // INTERVALS_PER_DAY, stride)
    return (days[:, None] * INTERVALS_PER_DAY + np.arange(INTERVALS_PER_DAY)[None, :]).ravel()


def peer_frame(site: SiteYear, chosen: NDArray[np.intp], keys: str) -> Any:
    """openenergyid's input: every meter a participant, injection, offtake, keys per row."""
    import pandas as pd  # the bench extra only
    from openenergyid.energysharing.data_formatting import create_multi_index_input_frame

    intervals = chosen.size
    production = site.production_wh[chosen].astype(np.float64)
    demand = site.demand_wh[chosen].astype(np.float64)
    producers = production.shape[1]
    consumers = demand.shape[1]
    names = [f"p{j}" for j in range(producers)] + [f"c{i}" for i in range(consumers)]
    index = pd.date_range("2025-01-01", periods=intervals, freq="15min", tz="UTC")
    injection = np.zeros((intervals, producers + consumers))
    injection[:, :producers] = production
    offtake = np.zeros((intervals, producers + consumers))
    offtake[:, producers:] = demand
    key = np.zeros((intervals, producers + consumers))
    if keys == "equal":
        key[:, producers:] = 1.0 / consumers
    else:  # pro rata: d_i / sum d per interval (equal where nobody has demand)
        totals = demand.sum(axis=1, keepdims=True)
        key[:, producers:] = np.where(
            totals > 0, demand / np.where(totals > 0, totals, 1), 1.0 / consumers
        )
    return create_multi_index_input_frame(
        gross_injection=pd.DataFrame(injection, index=index, columns=names),
        gross_offtake=pd.DataFrame(offtake, index=index, columns=names),
        key=pd.DataFrame(key, index=index, columns=names),
    )


@dataclass(frozen=True)
class Totals:
    shared_wh: float
    grid_supply_wh: float
    feed_in_wh: float
    shared_per_consumer: NDArray[np.float64]


def peer_totals(result: Any, producers: int) -> Totals:
    from openenergyid.energysharing.const import NET_INJECTION, NET_OFFTAKE, SHARED_ENERGY

    shared = result[SHARED_ENERGY].to_numpy()[:, producers:]
    return Totals(
        shared_wh=float(shared.sum()),
        grid_supply_wh=float(result[NET_OFFTAKE].to_numpy()[:, producers:].sum()),
        feed_in_wh=float(result[NET_INJECTION].to_numpy()[:, :producers].sum()),
        shared_per_consumer=shared.sum(axis=0),
    )


def engine_totals(result: BalancingResult, chosen: NDArray[np.intp]) -> Totals:
    shared = result.shared_wh[chosen].sum(axis=(0, 1)).astype(np.float64)
    return Totals(
        shared_wh=float(shared.sum()),
        grid_supply_wh=float(result.grid_supply_wh[chosen].sum()),
        feed_in_wh=float(result.feed_in_wh[chosen].sum()),
        shared_per_consumer=shared,
    )


def compare(label: str, ours: Totals, theirs: Totals, intervals: int) -> None:
    # Our cells are the floor or ceiling of the exact value: at most 1 Wh per cell away.
    per_consumer = float(np.abs(ours.shared_per_consumer - theirs.shared_per_consumer).max())
    print(
        f"  agree {label}: shared {ours.shared_wh:,.0f} vs {theirs.shared_wh:,.1f} Wh, "
        f"grid supply {ours.grid_supply_wh:,.0f} vs {theirs.grid_supply_wh:,.1f}, "
        f"feed-in {ours.feed_in_wh:,.0f} vs {theirs.feed_in_wh:,.1f}; "
        f"largest per-consumer difference {per_consumer:,.1f} Wh over {intervals:,} intervals "
        f"(rounding allows < {intervals * PRODUCERS:,})"
    )


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def section_engine(args: argparse.Namespace) -> int:
    site = build_site_year(seed=args.seed)
    intervals = site.production_wh.shape[0]
    print(
        f"site-year: {intervals:,} intervals x {PRODUCERS} producers + {CONSUMERS} consumers = "
        f"{site.meter_intervals:,} meter-intervals; production "
        f"{site.production_wh.sum() / 1e6:,.1f} MWh, demand {site.demand_wh.sum() / 1e6:,.1f} MWh"
    )
    results: dict[AllocationMethod, BalancingResult] = {}
    medians: dict[AllocationMethod, float] = {}
    for method in AllocationMethod:
        block = engine_input(site, method)
        allocate(block)  # warm-up (page faults of the big arrays)
        timing, result = timed(functools.partial(allocate, block), args.repeat)
        results[method] = result
        medians[method] = timing.median
        per_second = site.meter_intervals / 1e6
        print(
            f"engine {method.name:<21} wall min {min(timing.wall) * 1e3:6.0f} / median "
            f"{timing.median * 1e3:6.0f} / max {max(timing.wall) * 1e3:6.0f} ms "
            f"({per_second / timing.median:5.1f} M meter-intervals/s median, "
            f"{per_second / min(timing.wall):5.1f} best); CPU min "
            f"{min(timing.cpu) * 1e3:4.0f} ms ({per_second / min(timing.cpu):5.1f} M/s)"
        )
    if args.no_peer:
        return 0
    try:
        from openenergyid.energysharing import CalculationMethod, calculate
    except ImportError:
        print("peer: openenergyid is not installed (pip install -e '.[bench]'); skipped")
        return 0
    chosen = peer_intervals(intervals, args.peer_fraction)
    scale = intervals / chosen.size
    sampled = (
        ""
        if chosen.size == intervals
        else f" (every {round(1 / args.peer_fraction)}th day; times x{scale:.1f} to the year)"
    )
    print(f"peer openenergyid.energysharing on {chosen.size:,} intervals{sampled}")
    runs = [
        ("FIXED", CalculationMethod.FIXED, "equal", AllocationMethod.STATIC),
        ("OPTIMAL", CalculationMethod.OPTIMAL, "equal", AllocationMethod.EQUAL),
        ("FIXED pro rata keys", CalculationMethod.FIXED, "pro_rata", AllocationMethod.PRO_RATA),
    ]
    for label, peer_method, keys, ours in runs:
        frame = peer_frame(site, chosen, keys)
        repeat = args.peer_repeat if peer_method is CalculationMethod.FIXED else 1
        timing, peer_result = timed(functools.partial(calculate, frame, peer_method), repeat)
        year_seconds = min(timing.wall) * scale
        year_cpu = min(timing.cpu) * scale
        ratio = year_seconds / medians[ours]
        print(
            f"peer {label:<20} min {min(timing.wall):7.2f} s ({repeat} run"
            f"{'s' if repeat > 1 else ''}, CPU {min(timing.cpu):.2f} s) -> {year_seconds:7.2f} s "
            f"per year{' (scaled)' if scale != 1 else ''}, CPU {year_cpu:.2f} s; engine "
            f"{ours.name} (median) is {ratio:,.0f}x faster"
        )
        compare(
            f"{label} ~ {ours.name}",
            engine_totals(results[ours], chosen),
            peer_totals(peer_result, PRODUCERS),
            chosen.size,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sections = parser.add_subparsers(dest="section", required=True)
    engine = sections.add_parser("engine", help="allocate() per method vs openenergyid")
    engine.add_argument("--repeat", type=int, default=5, help="timed runs per method")
    engine.add_argument("--seed", type=int, default=11)
    engine.add_argument(
        "--peer-fraction",
        type=float,
        default=0.1,
        help="share of the year the peer runs on (every n-th day, time scaled); 1 = full year",
    )
    engine.add_argument("--peer-repeat", type=int, default=3, help="timed runs of peer FIXED")
    engine.add_argument("--no-peer", action="store_true", help="skip openenergyid")
    engine.set_defaults(run=section_engine)
    service = sections.add_parser(
        "service",
        help="RunBalancing of the site-year, year reads, correction latency, server RSS",
    )
    balancing_service_bench.add_arguments(service)
    service.set_defaults(run=balancing_service_bench.run_sections)
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
