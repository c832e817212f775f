"""Measure the launch model's latencies on the real agents and write them as its data.

    .venv/bin/python tools/bench/nau/launch_timings.py            # print
    .venv/bin/python tools/bench/nau/launch_timings.py --write    # into the model's data

Two small waves of the real ``ultranet-ipamd`` agents (``tools/fleet``'s runner, the
same code ``python -m tools.fleet`` runs), m5.large, ``--pods-per-node`` pods each:

* ``--prefixes-at-launch auto``: no EC2 call, so launch -> Ready is the agent's own start
  (IMDS discovery, journal, pool, warm plan): ``start_s`` = its Ready p50; a pod's
  allocation ``allocate_s`` = pods-running p50 - Ready p50 - the scheduler's spacing;
* no prefix at launch and no throttling: one Assign to become Ready, so Ready p50 -
  ``start_s`` = the EC2 client's construction + one request. The request alone
  (``ec2_call_s``) is ``tools.fleet.costs``' boto3 round trip to the emulator; the rest
  is ``ec2_client_s``.

Run it under ``flock /tmp/coord/bench.lock``: on a busy machine every figure grows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))  # run as a script: the repo's own tools, not an installed copy

from ipam.nau.launch import TIMINGS_FILE  # noqa: E402
from ipam.nau.launch_auto import choose  # noqa: E402
from ipam.nau.throttle import load_table  # noqa: E402
from tools.bench.conditions import code  # noqa: E402
from tools.fleet.costs import measure  # noqa: E402
from tools.fleet.runner import Fleet, FleetConfig, Scenario, quiet_agents  # noqa: E402

DATA = ROOT / "ipam" / "nau" / "data" / TIMINGS_FILE
HOW = (
    "start_s: Ready p50 of the auto wave (no EC2 call); allocate_s: its pods-running p50 - "
    "Ready p50 - (pods - 1) / pod rate; ec2_call_s: tools.fleet.costs' boto3 round trip to "
    "the emulator; ec2_client_s: Ready p50 of the unthrottled reactive wave (one Assign) - "
    "start_s - ec2_call_s, i.e. building the node's EC2 client on this machine, the agents "
    "sharing one process"
)


def timings(nodes: int, rate_per_min: float, pods: int, pod_rate: float) -> dict[str, Any]:
    auto = choose("m5.large", pods, {})
    common: dict[str, Any] = {
        "nodes": nodes,
        "rate_per_min": rate_per_min,
        "pods_per_node": pods,
        "pod_rate_per_s": pod_rate,
    }
    pinned = Fleet(FleetConfig(env=auto.env, throttle=load_table(), **common)).run(
        [Scenario("ultranet", auto.prefixes)]
    )["ultranet"]
    reactive = Fleet(FleetConfig(throttle=None, **common)).run([Scenario("ultranet-reactive", 0)])[
        "ultranet-reactive"
    ]
    costs = measure(3)
    if pinned["ec2_calls_per_node"] or reactive["ec2_calls_per_node"] != 2:
        raise SystemExit(
            f"unexpected calls: {pinned['ec2_calls_by_action']} / {reactive['ec2_calls_by_action']}"
        )
    start = pinned["ready_p50_s"]
    spacing = (pods - 1) / pod_rate
    allocate = max(0.0, pinned["pods_running_p50_s"] - start - spacing)
    call = costs["ec2_call"]["wall_ms"] / 1000
    client = max(0.0, reactive["ready_p50_s"] - start - call)
    keys = ("ready_p50_s", "ready_p99_s", "pods_running_p50_s", "ec2_calls_per_node", "cpu_s")
    return {
        "timings": {
            "start_s": round(start, 4),
            "ec2_client_s": round(client, 4),
            "ec2_call_s": round(call, 5),
            "allocate_s": round(allocate, 4),
        },
        "source": {
            "command": "python tools/bench/nau/launch_timings.py --write "
            f"(--nodes {nodes} --rate {rate_per_min:g}/min --pods-per-node {pods})",
            "how": HOW,
            "commit": code()["commit"],
            "date": datetime.date.today().isoformat(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "runs": {
                "auto": {k: pinned[k] for k in keys},
                "reactive_unthrottled": {k: reactive[k] for k in keys},
                "costs_ec2_call_ms": costs["ec2_call"],
            },
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--rate", type=float, default=2000.0, help="launches per minute")
    parser.add_argument("--pods-per-node", type=int, default=10)
    parser.add_argument("--pod-rate", type=float, default=500.0)
    parser.add_argument("--write", action="store_true", help=f"write ipam/nau/data/{TIMINGS_FILE}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    quiet_agents(False)
    doc = timings(args.nodes, args.rate, args.pods_per_node, args.pod_rate)
    text = json.dumps(doc, indent=2) + "\n"
    if args.write:
        DATA.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
