"""The engine against an earlier version of itself: same results, and how much faster.

Usage::

    .venv/bin/python -m loadtest.engine_ab check --reference 08e6f33
    flock /tmp/openvpp-bench.lock .venv/bin/python -m loadtest.engine_ab time --reference 08e6f33

``--reference`` is a git revision; its ``service/balancing/engine.py`` is loaded next to the
working tree's. ``check`` runs both on many seeded random sites (every method, prosumers,
tiers, keys, zeros, idle intervals, blocks larger than one chunk, sites wider than 255
consumers) and on the benchmark's site-year, and reports every input whose whole-Wh
result differs in any cell: a speed-up must not change a single Wh. ``time`` times both on
the benchmark's site-year, alternating them run by run in one process, so that the load
of a shared machine hits both alike, and prints min / median / max of each and the median
ratio; ``--daytime`` keeps only the intervals with production (the work that is left once
the idle ones are skipped). Asserts nothing; bounded in count (``--sites``, ``--repeat``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

from loadtest.balancing_bench import SiteYear, build_site_year, engine_input
from service.balancing import engine
from service.balancing.engine import AllocationMethod, BalancingInput, BalancingResult

ENGINE_PATH = "service/balancing/engine.py"


def load_reference(revision: str) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{revision}:{ENGINE_PATH}"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="engine_ab_")) / "reference_engine.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("reference_engine", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def random_site(rng: np.random.Generator) -> BalancingInput:
    """A site with the shapes and corner cases the engine distinguishes."""
    shape = rng.integers(0, 10)
    if shape == 0:  # wider than the byte-counting paths
        intervals, producers, consumers = int(rng.integers(1, 6)), int(rng.integers(1, 4)), 300
    elif shape <= 2:  # several chunks
        intervals = int(rng.integers(600, 1500))
        producers, consumers = int(rng.integers(1, 4)), int(rng.integers(50, 120))
    else:
        intervals = int(rng.integers(1, 60))
        producers, consumers = int(rng.integers(1, 6)), int(rng.integers(1, 25))
    scale = rng.choice([3, 20, 2_000, 200_000])
    production = rng.integers(0, scale, size=(intervals, producers))
    demand = rng.integers(0, scale, size=(intervals, consumers))
    production[rng.random((intervals, producers)) < 0.2] = 0
    demand[rng.random((intervals, consumers)) < 0.1] = 0
    production[rng.random(intervals) < 0.3] = 0  # idle intervals: nights of a PV site
    demand[rng.random(intervals) < 0.05] = 0
    own = np.full(producers, -1, dtype=np.int64)
    if rng.random() < 0.6:
        linked = rng.permutation(consumers)
        for producer in range(min(producers, consumers)):
            if rng.random() < 0.5:
                own[producer] = linked[producer]
    tiers = (
        rng.integers(0, 4, size=consumers) if rng.random() < 0.4 else np.zeros(consumers, np.int64)
    )
    shares = rng.integers(0, 65, size=consumers) / 64
    shares[rng.random(consumers) < 0.2] = np.nan
    if rng.random() < 0.3:
        shares[:] = 1 / consumers
    for tier in np.unique(tiers):
        members = tiers == tier
        total = np.nansum(shares[members])
        if total > 1:
            shares[members] = shares[members] / total * (1 - 1e-12)
    return BalancingInput(
        method=AllocationMethod(int(rng.integers(1, 5))),
        production_wh=production.astype(np.int64),
        demand_wh=demand.astype(np.int64),
        producer_as_consumer=own,
        consumer_tier=tiers.astype(np.int64),
        consumer_share=shares,
    )


def same(ours: BalancingResult, theirs: BalancingResult) -> bool:
    return (
        np.array_equal(ours.shared_wh, theirs.shared_wh)
        and np.array_equal(ours.feed_in_wh, theirs.feed_in_wh)
        and np.array_equal(ours.grid_supply_wh, theirs.grid_supply_wh)
        and ours.shared_wh.shape == theirs.shared_wh.shape
    )


def check(reference: ModuleType, sites: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    differing = 0
    for number in range(sites):
        block = random_site(rng)
        if not same(engine.allocate(block), reference.allocate(block)):
            differing += 1
            print(f"site {number} (seed {seed}): results differ, method {block.method.name}")
    site_year = build_site_year()
    for method in AllocationMethod:
        block = engine_input(site_year, method)
        if not same(engine.allocate(block), reference.allocate(block)):
            differing += 1
            print(f"site-year {method.name}: results differ")
    print(f"{sites} random sites + the site-year x 4 methods: {differing} differ")
    return 1 if differing else 0


def time_both(
    reference: ModuleType, repeat: int, methods: list[AllocationMethod], daytime: bool
) -> None:
    site_year = build_site_year()
    if daytime:  # the intervals with production only: the engine's work without idle ones
        producing = site_year.production_wh.any(axis=1)
        site_year = SiteYear(site_year.production_wh[producing], site_year.demand_wh[producing])
        print(f"daytime only: {int(producing.sum()):,} of {producing.size:,} intervals")
    contenders: dict[str, Callable[[BalancingInput], object]] = {
        "reference": reference.allocate,
        "working tree": engine.allocate,
    }
    for method in methods:
        block = engine_input(site_year, method)
        walls: dict[str, list[float]] = {name: [] for name in contenders}
        # This process's CPU time: what the other load of a shared machine inflates least.
        cpus: dict[str, list[float]] = {name: [] for name in contenders}
        for function in contenders.values():
            function(block)  # warm-up
        for _ in range(repeat):
            for name, function in contenders.items():
                started, started_cpu = time.perf_counter(), time.process_time()
                function(block)
                cpus[name].append(time.process_time() - started_cpu)
                walls[name].append(time.perf_counter() - started)
        for name, wall in walls.items():
            print(
                f"{method.name:<21} {name:<13} wall min {min(wall) * 1e3:6.1f} / median "
                f"{statistics.median(wall) * 1e3:6.1f} / max {max(wall) * 1e3:6.1f} ms, CPU "
                f"median {statistics.median(cpus[name]) * 1e3:6.1f} ms"
            )
        for label, times in (("wall", walls), ("CPU", cpus)):
            ratios = [
                old / new
                for old, new in zip(times["reference"], times["working tree"], strict=True)
            ]
            print(
                f"{method.name:<21} speed-up per pair ({label}): median "
                f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, "
                f"max {max(ratios):.2f}x)"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("section", choices=["check", "time"])
    parser.add_argument(
        "--reference",
        required=True,
        help="git revision to compare with (one before the change: HEAD compared with "
        "itself proves nothing)",
    )
    parser.add_argument("--sites", type=int, default=400, help="random sites for check")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=7, help="timed pairs per method")
    parser.add_argument(
        "--method", action="append", choices=[m.name for m in AllocationMethod], default=None
    )
    parser.add_argument(
        "--daytime", action="store_true", help="time: only the intervals with production"
    )
    args = parser.parse_args(argv)
    reference = load_reference(args.reference)
    if args.section == "check":
        return check(reference, args.sites, args.seed)
    methods = [AllocationMethod[name] for name in args.method or [m.name for m in AllocationMethod]]
    time_both(reference, args.repeat, methods, args.daytime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
