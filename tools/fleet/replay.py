"""``python -m tools.fleet.replay WAVE.json``: the launch model on a real wave's inputs.

Reads the JSON of a ``python -m tools.fleet ... --json`` run, rebuilds each scenario's
model input from the run's own command line (its ``conditions.argv``, the flags both
share), and plays it over several seeds twice: at the model's shipped timings (each node
on its own machine, as on AWS and as ``ultranet-nau launch`` plays it) and replaying this
run's lab machine (``ipam.nau.launch.LabHost``: each node's first request, the answers'
latencies and the sleeps' lateness by second of the wave). Both play the launches the run
made (``launch_at_s``), not the schedule. Prints real against the model's median [range]
per scenario, or ``--json``.

Where the two model columns differ, the difference is this machine's, not EC2's or the
agent's (``ipam/nau/README.md``, "launch": calibration).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from ipam.errors import UltranetError
from ipam.nau.launch import LabHost, LaunchConfig, run
from ipam.nau.launch_cli import configs
from tools.fleet.__main__ import parser as fleet_parser

# The figures compared, each a number in both the fleet's and the model's results.
FIGURES = (
    "ec2_calls_per_node",
    "throttled_calls",
    "ready_p50_s",
    "ready_p99_s",
    "ready_max_s",
    "pods_running_p99_s",
)
# After ``--restart``: the restart object's figures, in both.
RESTART_FIGURES = (
    "ec2_calls",
    "throttled_calls",
    "vpccni_init_failures",
    "allocations_lost",
    "addresses_duplicated",
    "ready_p50_s",
    "ready_p99_s",
    "ready_max_s",
)

# What the replay reads from each scenario of the wave, beyond those figures.
NEEDED = (
    "prefixes_at_launch",
    "launch_at_s",
    "first_request_after_launch_s",
    "request_latency_s",
    "loop_lag_s",
    "ec2_calls_by_action",
    *FIGURES,
)


class ReplayError(ValueError):
    """A wave's JSON this tool cannot replay, with the reason."""


def model_inputs(wave: dict[str, Any]) -> dict[str, LaunchConfig]:
    """Each scenario of a fleet run as the model's input, from the run's own flags."""
    if (
        not isinstance(wave, dict)
        or not wave
        or not all(isinstance(r, dict) for r in wave.values())
    ):
        raise ReplayError("not a tools/fleet --json output (an object keyed by scenario)")
    argvs = {json.dumps(r.get("conditions", {}).get("argv")) for r in wave.values()}
    if len(argvs) != 1 or argvs == {"null"}:
        raise ReplayError("each scenario needs the same conditions.argv (tools/fleet writes it)")
    try:
        args = fleet_parser().parse_args(json.loads(argvs.pop()))
    except SystemExit:
        raise ReplayError("the run's conditions.argv is not a tools/fleet command line") from None
    args.scenario = list(wave)
    args.baseline = "vpc-cni" if any(n.startswith("vpc-cni") for n in wave) else None
    args.sample, args.seed = None, 1
    args.timeout = None  # the fleet's is wall seconds; the model runs until settled
    try:
        planned = configs(args)
    except UltranetError as err:
        raise ReplayError(str(err)) from None
    out = {}
    for name, real in wave.items():
        missing = [k for k in NEEDED if k not in real]
        if missing:
            raise ReplayError(
                f"{name}: no {', '.join(missing)} (a run before tools/fleet wrote it)"
            )
        config = planned[name][0]
        if config.prefixes_at_launch != real["prefixes_at_launch"]:
            raise ReplayError(
                f"{name}: {real['prefixes_at_launch']} prefixes at launch in the run, "
                f"{config.prefixes_at_launch} from its flags"
            )
        out[name] = dataclasses.replace(config, launch_at_s=tuple(real["launch_at_s"]))
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def calls_per_node_by_action(result: dict[str, Any]) -> dict[str, float]:
    """A wave's mean EC2 calls per node by action, the fleet's result or the model's."""
    return {a: v["per_node_mean"] for a, v in result["ec2_calls_by_action"].items()}


def compare(real: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The model's runs summarised as median and range, figure by figure."""
    by_action = [calls_per_node_by_action(r) for r in runs]
    actions = sorted(set(calls_per_node_by_action(real)).union(*by_action))
    out = {
        "figures": {k: _spread([float(r[k]) for r in runs]) for k in FIGURES},
        "calls_per_node_by_action": {
            a: _spread([calls.get(a, 0.0) for calls in by_action]) for a in actions
        },
    }
    if "restart" in real:
        out["restart"] = {
            k: _spread([float(r["restart"][k]) for r in runs]) for k in RESTART_FIGURES
        }
    return out


def replay(wave: dict[str, Any], seeds: int) -> dict[str, Any]:
    """Real and both model columns for every scenario of the wave."""
    out: dict[str, Any] = {}
    for name, config in model_inputs(wave).items():
        real = wave[name]
        columns = {"aws_timings": None, "lab_replayed": LabHost.from_fleet(real)}
        out[name] = {
            "real": {k: real[k] for k in FIGURES}
            | {"calls_per_node_by_action": calls_per_node_by_action(real)},
            "seeds": seeds,
        }
        if "restart" in real:
            out[name]["real"]["restart"] = {k: real["restart"][k] for k in RESTART_FIGURES}
        for column, lab in columns.items():
            runs = [run(dataclasses.replace(config, seed=s, lab=lab)) for s in range(1, seeds + 1)]
            out[name][column] = compare(real, runs)
    return out


def _cell(spread: dict[str, float]) -> str:
    return f"{spread['median']:.4g} [{spread['min']:.4g}-{spread['max']:.4g}]"


def render(result: dict[str, Any]) -> str:
    lines = []
    for name, r in result.items():
        lines.append(f"{name}: real / model at AWS timings / model replaying this run's machine")
        lines.append(f"  (model: median [range] of seeds 1-{r['seeds']})")
        for key in FIGURES:
            lines.append(
                f"  {key}: {r['real'][key]} / {_cell(r['aws_timings']['figures'][key])}"
                f" / {_cell(r['lab_replayed']['figures'][key])}"
            )
        for action in r["aws_timings"]["calls_per_node_by_action"]:
            real = r["real"]["calls_per_node_by_action"].get(action, 0.0)
            aws = r["aws_timings"]["calls_per_node_by_action"][action]
            lab = r["lab_replayed"]["calls_per_node_by_action"][action]
            lines.append(f"  {action} per node: {real} / {_cell(aws)} / {_cell(lab)}")
        for key in RESTART_FIGURES if "restart" in r["real"] else ():
            lines.append(
                f"  restart {key}: {r['real']['restart'][key]}"
                f" / {_cell(r['aws_timings']['restart'][key])}"
                f" / {_cell(r['lab_replayed']['restart'][key])}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.fleet.replay", description=__doc__)
    p.add_argument("wave", type=Path, help="a `python -m tools.fleet ... --json` output")
    p.add_argument("--seeds", type=int, default=5, help="model runs per column (seeds 1..N)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds: at least 1")
    try:
        wave = json.loads(args.wave.read_text())
        result = replay(wave, args.seeds)
    except (OSError, json.JSONDecodeError, ReplayError) as err:
        print(f"replay: {args.wave}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
