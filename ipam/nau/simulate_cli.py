"""``ultranet-nau simulate``: the I/O around :mod:`ipam.nau.simulate` (progress bar, output)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from dataclasses import asdict
from typing import Any, TextIO

from ipam.errors import ConfigError
from ipam.nau.budget import Budget
from ipam.nau.simulate import SimResult, simulate

BAR_WIDTH = 30
MAX_POD_EVENTS = 100_000_000


class ProgressBar:
    """A one-line bar on a stream, redrawn at most every percent."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream, self.label = stream, label
        self.start = time.perf_counter()
        self._last = -1

    def __call__(self, done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        if percent == self._last:
            return
        self._last = percent
        filled = BAR_WIDTH * percent // 100
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        elapsed = time.perf_counter() - self.start
        self.stream.write(
            f"\r{self.label:<26} [{bar}] {percent:3d}% {done:,}/{total:,} {elapsed:5.1f}s"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _failure_line(result: SimResult) -> str:
    f = result.first_icb
    if f is None:
        return "no InsufficientCidrBlocks"
    where = f"node {f.step:,}" if f.phase == "launch" else f"pod event {f.step:,}"
    return (
        f"first InsufficientCidrBlocks at {where} ({f.phase}) in {f.subnet}, with "
        f"{f.free_addresses:,} addresses free and {f.free_blocks} aligned /28s"
    )


def render(results: list[tuple[SimResult, float]], plan_name: str) -> str:
    out = [f"simulate {plan_name}"]
    for r, seconds in results:
        out.append(
            f"  {r.scenario}: {r.nodes:,} nodes, {r.pod_events:,} pod events in {seconds:.1f}s"
        )
        out.append(f"    {_failure_line(r)}")
        out.append(
            f"    prefix requests refused {r.prefixes_failed:,} "
            f"(InsufficientCidrBlocks {r.insufficient_cidr_blocks:,}), addresses refused "
            f"{r.addresses_failed:,}, nodes short of prefixes at the end {r.nodes_short:,}"
        )
        out.append(
            f"    fragmentation: {r.stranded:,} of {r.free_addresses:,} free addresses are in no "
            f"free aligned /28; {r.blocks_lost:,} prefixes' worth lost; "
            f"{r.prefix_ops:,} prefix assigns/releases during churn"
        )
    return "\n".join(out)


def _label(reserved: bool) -> str:
    return "with reservations" if reserved else "without reservations"


def _sequential(
    budget: Budget, args: argparse.Namespace, scenarios: tuple[bool, ...], show: bool
) -> list[tuple[SimResult, float]]:
    results = []
    for reserved in scenarios:
        bar = ProgressBar(sys.stderr, _label(reserved)) if show else None
        start = time.perf_counter()
        result = simulate(
            budget,
            pod_events=args.pod_events,
            seed=args.seed,
            reservations=reserved,
            progress=bar,
        )
        results.append((result, time.perf_counter() - start))
    return results


def _worker(budget: Budget, events: int, seed: int, reserved: bool, queue: Any) -> None:
    start = time.perf_counter()
    result = simulate(
        budget,
        pod_events=events,
        seed=seed,
        reservations=reserved,
        progress=lambda done, total: queue.put(("progress", reserved, done, total)),
    )
    queue.put(("done", reserved, result, time.perf_counter() - start))


def _parallel(
    budget: Budget, args: argparse.Namespace, scenarios: tuple[bool, ...], show: bool
) -> list[tuple[SimResult, float]]:
    """One process per scenario (the machine has two cores); one bar for both."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [
        context.Process(target=_worker, args=(budget, args.pod_events, args.seed, r, queue))
        for r in scenarios
    ]
    for w in workers:
        w.start()
    bar = ProgressBar(sys.stderr, "both scenarios") if show else None
    progress = {r: (0, 1) for r in scenarios}
    finished: dict[bool, tuple[SimResult, float]] = {}
    while len(finished) < len(scenarios):
        kind, reserved, first, second = queue.get()
        if kind == "done":
            finished[reserved] = (first, second)
        else:
            progress[reserved] = (first, second)
        if bar is not None:
            bar(sum(d for d, _ in progress.values()), sum(t for _, t in progress.values()))
    for w in workers:
        w.join()
    return [finished[r] for r in scenarios]


def cmd_simulate(args: argparse.Namespace, raw: dict[str, Any]) -> int:
    from ipam.nau.budget import evaluate
    from ipam.nau.model import parse_plan

    if not 0 <= args.pod_events <= MAX_POD_EVENTS:
        raise ConfigError("--pod-events", args.pod_events, f"must be 0..{MAX_POD_EVENTS:,}")
    if args.jobs < 1:
        raise ConfigError("--jobs", args.jobs, "must be >= 1")
    plan = parse_plan(raw)
    budget = evaluate(plan)
    show = sys.stderr.isatty() if args.progress is None else args.progress
    scenarios = {"both": (True, False), "reserved": (True,), "unreserved": (False,)}[args.scenario]
    if args.jobs > 1 and len(scenarios) > 1:
        results = _parallel(budget, args, scenarios, show)
    else:
        results = _sequential(budget, args, scenarios, show)
    if not budget.layout.fits_max:
        print(
            f"note: the planned layout needs {len(budget.layout.blocks)} VPC CIDR blocks, "
            "more than the 50 a VPC may have; simulated as planned",
            file=sys.stderr,
        )
    if args.json:
        doc = {
            "plan": plan.name,
            "scenarios": [
                asdict(r) | {"seconds": round(s, 3), "blocks_lost": r.blocks_lost}
                for r, s in results
            ],
        }
        print(json.dumps(doc, indent=2))
    else:
        print(render(results, plan.name))
    return 0
