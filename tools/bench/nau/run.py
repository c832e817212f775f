"""Benchmarks of the NAU planner's two bars, run as the CLI runs them.

    .venv/bin/python tools/bench/nau/run.py            # plan x5 and simulate x1
    .venv/bin/python tools/bench/nau/run.py --quick    # simulate with 100K pod events
    .venv/bin/python tools/bench/nau/run.py --jobs 1   # the two scenarios one after the other
    .venv/bin/python tools/bench/nau/run.py --json out.json   # and the run's conditions
    .venv/bin/python tools/bench/nau/run.py --only launch      # the launch model's row alone

``plan``: wall time of ``python -m ipam.nau.cli plan`` (embedded 100K-node default),
interpreter start and imports included, best and median of five runs; bar < 1 s.
``simulate``: wall time of ``python -m ipam.nau.cli simulate`` on the same plan, 100K
nodes and 1M pod events, both scenarios (with and without prefix reservations); bar
<= 60 s. ``launch``: wall time of ``python -m ipam.nau.cli launch`` playing the 100K-node
wave of issue 15 (100,000 p5.48xlarge at 2,000/min, 12 pods each, ``--prefixes-at-launch
auto``); bar <= 60 s. The 1-minute load average before and after each part is printed beside it
(the "after" includes this benchmark's own processes): the machine is shared, and a
figure means little without it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))  # run as a script: the repo's own tools, not an installed copy

from tools.bench.conditions import code, load, machine  # noqa: E402


def _time(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "ipam.nau.cli", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return elapsed, done.stdout


def _load() -> float:
    return os.getloadavg()[0]


LAUNCH_NODES = 100_000


def _launch_argv(nodes: int) -> list[str]:
    return [
        "launch",
        f"--nodes={nodes}",
        "--rate=2000/min",
        "--instance-type=p5.48xlarge",
        "--pods-per-node=12",
        "--prefixes-at-launch=auto",
        "--json",
    ]


def _launch_row(nodes: int) -> dict[str, object]:
    argv = _launch_argv(nodes)
    before = _load()
    seconds, out = _time(argv)
    result = json.loads(out)["ultranet"]
    print(
        f"launch ({nodes:,} p5.48xlarge at 2,000/min, 12 pods, auto): {seconds:.1f}s "
        "(bar <= 60 s at 100K); "
        f"{result['nodes_ready']:,} Ready, {result['ec2_calls_per_node']} EC2 calls per node, "
        f"Ready p99 {result['ready_p99_s']} s, {result['events']:,} events; "
        f"load {before:.2f} -> {_load():.2f}"
    )
    keep = ("nodes_ready", "ec2_calls_per_node", "ready_p99_s", "events", "simulated_s")
    return {
        "argv": argv,
        "seconds": seconds,
        "load_1min": (before, _load()),
        "result": {k: result[k] for k in keep},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="simulate 100K pod events, not 1M; launch 10K nodes"
    )
    parser.add_argument("--jobs", type=int, help="simulate's --jobs (default: its own)")
    parser.add_argument("--json", type=Path, help="write the figures and the run's conditions")
    parser.add_argument("--only", choices=("launch",), help="run this row alone")
    args = parser.parse_args()
    if args.only == "launch":
        row = _launch_row(LAUNCH_NODES)
        if args.json is not None:
            only = {
                "launch": row,
                "conditions": {"code": code(), "machine": machine(), "load_after": load()},
            }
            args.json.write_text(json.dumps(only, indent=2) + "\n")
        return 0
    conditions = {"code": code(), "machine": machine(), "load_before": load()}
    before = _load()
    plans = [_time(["plan"])[0] for _ in range(5)]
    plan_load = (before, _load())
    print(
        f"plan (100K nodes, default): best {min(plans):.3f}s, median "
        f"{statistics.median(plans):.3f}s (bar < 1 s); load {before:.2f} -> {_load():.2f}"
    )
    events = "100000" if args.quick else "1000000"
    before = _load()
    jobs = [] if args.jobs is None else ["--jobs", str(args.jobs)]
    seconds, out = _time(["simulate", "--pod-events", events, "--no-progress", *jobs])
    print(
        f"simulate (100K nodes, {int(events):,} pod events, both scenarios, "
        f"--jobs {args.jobs or 'default'}): {seconds:.1f}s (bar <= 60 s); "
        f"load {before:.2f} -> {_load():.2f}"
    )
    print(out)
    launch = _launch_row(10_000 if args.quick else LAUNCH_NODES)
    if args.json is not None:
        result = {
            "config": {
                "argv": sys.argv[1:],
                "python": sys.version.replace("\n", " "),
                "plan": {"argv": ["plan"], "repeats": len(plans), "plan": "embedded default"},
                "simulate": {"pod_events": int(events), "jobs": args.jobs},
            },
            "conditions": {**conditions, "load_after": load()},
            "plan_seconds": {
                "all": plans,
                "best": min(plans),
                "median": statistics.median(plans),
                "load_1min": plan_load,
            },
            "simulate_seconds": {"value": seconds, "load_1min": (before, _load())},
            "launch": launch,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
