"""Benchmarks of the NAU planner's two bars, run as the CLI runs them.

    .venv/bin/python tools/bench/nau/run.py            # plan x5 and simulate x1
    .venv/bin/python tools/bench/nau/run.py --quick    # simulate with 100K pod events

``plan``: wall time of ``python -m ipam.nau.cli plan`` (embedded 100K-node default),
interpreter start and imports included, best and median of five runs; bar < 1 s.
``simulate``: wall time of ``python -m ipam.nau.cli simulate`` on the same plan, 100K
nodes and 1M pod events, both scenarios (with and without prefix reservations); bar
<= 60 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    plans = [_time(["plan"])[0] for _ in range(5)]
    print(
        f"plan (100K nodes, default): best {min(plans):.3f}s, median "
        f"{statistics.median(plans):.3f}s (bar < 1 s)"
    )
    events = "100000" if args.quick else "1000000"
    seconds, out = _time(["simulate", "--pod-events", events, "--no-progress"])
    print(
        f"simulate (100K nodes, {int(events):,} pod events, both scenarios): {seconds:.1f}s"
        " (bar <= 60 s)"
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
