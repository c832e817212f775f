"""``python -m tools.fleet``: a launch wave of real node agents against a throttled EC2.

Runs scenarios in the same emulator, one after the other, each with fresh request
buckets: ``ultranet`` (every node launched with ``--prefixes-at-launch`` /28 prefixes on
its primary ENI, the launch template's ``Ipv4PrefixCount``) and ``ultranet-reactive``
(none at launch: the agent asks EC2); with ``--baseline vpc-cni`` the AWS VPC CNI's own
calls in the same two launch templates (``vpc-cni``, ``vpc-cni-reactive``). Prints a
table, or with ``--json`` one object per scenario keyed by its name.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from typing import Any

from ipam.config import load_config
from ipam.errors import UltranetError
from ipam.nau.launch_auto import choose
from ipam.nau.throttle import BucketSpec, load_table
from tools.bench.conditions import code, machine
from tools.fleet.emulator import FaultSpec
from tools.fleet.runner import VPC_CNI, Fleet, FleetConfig, Scenario, quiet_agents

SCENARIOS = ("ultranet", "ultranet-reactive", "vpc-cni", "vpc-cni-reactive")
BASELINE = {"ultranet": "vpc-cni", "ultranet-reactive": "vpc-cni-reactive"}
VPCCNI_SETTINGS = ("WARM_PREFIX_TARGET", "DISABLE_LEAKED_ENI_CLEANUP")
FAULT_HELP = "5xx=P (500 InternalError), 503=P (503 Unavailable), latency=Nms|Ns"


def _rate(text: str) -> float:
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(?:/(min|s))?", text)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a rate such as 2000/min or 30/s")
    value = float(match.group(1))
    return value * 60 if match.group(2) == "s" else value


def _bucket(text: str) -> tuple[str, BucketSpec]:
    match = re.fullmatch(r"([A-Za-z]+)=([0-9.]+):([0-9.]+)", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give ACTION=CAPACITY:REFILL_PER_S")
    try:
        return match.group(1), BucketSpec(float(match.group(2)), float(match.group(3)))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def _launch_prefixes(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a count >= 0, or auto")
    return value


def _duration_s(text: str) -> float:
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(ms|s)", text)
    if match is None:
        raise ValueError(f"{text!r}: give a duration such as 50ms or 0.2s")
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "ms" else value


def _faults(text: str) -> tuple[FaultSpec, ...]:
    """``5xx=0.01,latency=50ms``: latency first, so a faulted request is slow too."""
    specs: list[FaultSpec] = []
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError(f"{part!r}: give NAME=VALUE")
            if name == "latency":
                specs.insert(0, FaultSpec("latency", latency_s=_duration_s(value)))
                continue
            kind = {"5xx": "internal", "500": "internal", "503": "unavailable"}.get(name)
            if kind is None:
                raise ValueError(f"{name!r}: not a fault ({FAULT_HELP})")
            probability = float(value)
            if not 0 < probability <= 1:
                raise ValueError(f"{part!r}: a probability in (0, 1]")
            specs.append(FaultSpec(kind, probability=probability))
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return tuple(specs)


def _burst(text: str) -> tuple[int, float]:
    """``500/30s``: 500 instances at once, every 30 s (a Karpenter-like provisioner)."""
    match = re.fullmatch(r"([0-9]+)/([0-9.]+(?:ms|s|min))", text)
    try:
        if match is None:
            raise ValueError(f"{text!r}: give N/EVERY, such as 500/30s or 1000/1min")
        size = int(match.group(1))
        every = match.group(2)
        seconds = float(every[:-3]) * 60 if every.endswith("min") else _duration_s(every)
        if size < 1 or seconds <= 0:
            raise ValueError(f"{text!r}: N >= 1 and a period > 0")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return size, seconds


def _env(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=VALUE (an ipamd setting)")
    return name, value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.fleet", description=__doc__)
    p.add_argument("--nodes", type=int, required=True, help="instances in the wave")
    p.add_argument("--rate", type=_rate, default=2000.0, help="launches, N/min or N/s")
    p.add_argument(
        "--burst",
        type=_burst,
        metavar="N/EVERY",
        help="Karpenter-like: N instances at once every EVERY (e.g. 500/30s) instead of --rate",
    )
    p.add_argument("--instance-type", default="m5.large")
    p.add_argument("--pods-per-node", type=int, default=2)
    p.add_argument("--pod-rate", type=float, default=500.0, help="scheduler, pods/s")
    p.add_argument(
        "--prefixes-at-launch",
        type=_launch_prefixes,
        default=2,
        metavar="N|auto",
        help="/28 prefixes on each primary ENI at launch in the 'ultranet' scenario; auto: "
        "the fewest, with warm settings that keep them, for 0 EC2 calls (ipam/nau/launch_auto.py)",
    )
    p.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable; default ultranet and ultranet-reactive)",
    )
    p.add_argument(
        "--baseline",
        choices=[VPC_CNI],
        help="also run the AWS VPC CNI's EC2 calls (tools/fleet/vpccni_agent.py) for each "
        "ultranet scenario, same launch template, same emulator",
    )
    p.add_argument(
        "--faults",
        type=_faults,
        default=(),
        metavar="SPEC",
        help=f"inject into every EC2 request of the run: {FAULT_HELP}; comma-separated",
    )
    p.add_argument(
        "--vpccni-env",
        type=_env,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"a VPC CNI setting for the baseline ({', '.join(VPCCNI_SETTINGS)})",
    )
    p.add_argument(
        "--vpccni-cleanup-delay-max",
        type=float,
        default=300.0,
        metavar="S",
        help="the VPC CNI's leaked-ENI sweep runs at a random 0..S s after start (its "
        "source: 300); a scenario settles only once every sweep ran",
    )
    p.add_argument("--chart", metavar="FILE", help="Ready nodes over time, .png or .svg")
    p.add_argument(
        "--env",
        type=_env,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="ipamd setting for every agent, e.g. WARM_PREFIX_TARGET=1 (repeatable)",
    )
    p.add_argument("--no-throttle", action="store_true", help="EC2 never throttles")
    p.add_argument(
        "--refill-scale",
        type=float,
        default=1.0,
        help="multiply every refill rate of AWS's published buckets (a raised account)",
    )
    p.add_argument(
        "--bucket",
        type=_bucket,
        action="append",
        default=[],
        metavar="ACTION=CAPACITY:REFILL",
        help="override one action's request bucket (repeatable)",
    )
    p.add_argument(
        "--efa-only-cards",
        action="store_true",
        help="launch with an efa-only interface on every network card but 0 (a GPU template)",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="once a scenario settles, restart every agent at once (the DaemonSet rolled)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per scenario")
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="the agents' INFO logs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.nodes < 1 or args.pods_per_node < 0:
        print("fleet: --nodes must be >= 1 and --pods-per-node >= 0", file=sys.stderr)
        return 2
    env = dict(args.env)
    vpccni_env = dict(args.vpccni_env)
    unknown = sorted(set(vpccni_env) - set(VPCCNI_SETTINGS))
    if unknown:
        print(f"fleet: --vpccni-env {unknown[0]}: one of {VPCCNI_SETTINGS}", file=sys.stderr)
        return 2
    if not vpccni_env.get("WARM_PREFIX_TARGET", "1").isdigit():
        print("fleet: --vpccni-env WARM_PREFIX_TARGET must be a count >= 0", file=sys.stderr)
        return 2
    if vpccni_env.get("DISABLE_LEAKED_ENI_CLEANUP", "false") not in ("true", "false"):
        print("fleet: --vpccni-env DISABLE_LEAKED_ENI_CLEANUP is true or false", file=sys.stderr)
        return 2
    if args.chart is not None:
        from tools.fleet.chart import check_chart_path

        problem = check_chart_path(args.chart)
        if problem:
            print(f"fleet: {problem}", file=sys.stderr)
            return 2
    auto = None
    try:
        load_config(env)  # a bad setting is refused here, not by 2,000 agents
        if args.prefixes_at_launch is None:
            auto = choose(args.instance_type, args.pods_per_node, env)
            env.update(auto.env)
    except (UltranetError, ValueError) as err:
        print(f"fleet: {err}", file=sys.stderr)
        return 2
    prefixes = auto.prefixes if auto is not None else args.prefixes_at_launch
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_agents(args.verbose)
    table = None
    if not args.no_throttle:
        table = load_table().scaled(args.refill_scale).with_buckets(dict(args.bucket))
    config = FleetConfig(
        nodes=args.nodes,
        rate_per_min=args.rate,
        instance_type=args.instance_type,
        pods_per_node=args.pods_per_node,
        pod_rate_per_s=args.pod_rate,
        env=env,
        throttle=table,
        timeout_s=args.timeout,
        restart=args.restart,
        efa_only_cards=args.efa_only_cards,
        burst=args.burst,
        faults=args.faults,
        vpccni_env=vpccni_env,
        vpccni_cleanup_delay_max_s=args.vpccni_cleanup_delay_max,
    )
    wanted = list(args.scenario or SCENARIOS[:2])
    if args.baseline:
        wanted += [BASELINE[n] for n in wanted if n in BASELINE and BASELINE[n] not in wanted]
    scenarios = [
        Scenario(
            name,
            0 if name.endswith("-reactive") else prefixes,
            VPC_CNI if name.startswith(VPC_CNI) else "ultranet",
        )
        for name in wanted
    ]
    try:
        results = Fleet(config).run(scenarios)
    except ValueError as err:
        print(f"fleet: {err}", file=sys.stderr)
        return 2
    conditions = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "code": code(),
        "machine": machine(),
    }
    for result in results.values():
        result["conditions"] = conditions
        result["throttle"] = _throttle_note(args)
        result["state_dirs"] = "tmpfs (/dev/shm): the journal's fdatasync costs no disk I/O"
        result["host_network"] = "in memory (tools/lab/memory_host.py), not netlink"
        result["clock"] = "real time"
        result["env"] = env if result["agent"] == "ultranet" else vpccni_env
        if auto is not None:
            result["prefixes_at_launch_auto"] = {
                "prefixes": auto.prefixes,
                "warm_settings_added": auto.env,
                "addresses_per_node": auto.addresses_per_node,
                "choice": auto.describe(),
            }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(render(results))
    if args.chart is not None:
        from tools.fleet.chart import write_chart

        write_chart(results, args.chart)
    ok = all(
        r["nodes_ready"] == r["nodes"]
        and ("restart" not in r or r["restart"]["nodes_ready_again"] == r["restart"]["nodes"])
        for r in results.values()
    )
    return 0 if ok else 1


def _throttle_note(args: argparse.Namespace) -> str:
    if args.no_throttle:
        return "off"
    parts = ["AWS published buckets (ipam/nau/data/ec2-throttling.json)"]
    if args.refill_scale != 1.0:
        parts.append(f"refill x{args.refill_scale:g}")
    parts += [f"{a}={s.capacity:g}:{s.refill_per_s:g}" for a, s in args.bucket]
    return ", ".join(parts)


ROWS = (
    ("nodes ready / launched", lambda r: f"{r['nodes_ready']} / {r['nodes_launched']}"),
    ("prefixes at launch", lambda r: r["prefixes_at_launch"]),
    ("EC2 calls per node (start + pods)", lambda r: r["ec2_calls_per_node"]),
    (
        "  at start / while pods land",
        lambda r: f"{r['ec2_calls_start_per_node']} / {r['ec2_calls_pods_per_node']}",
    ),
    ("  max on one node", lambda r: r["ec2_calls_per_node_max"]),
    ("throttled calls / retries", lambda r: f"{r['throttled_calls']} / {r['retries']}"),
    (
        "launch -> Ready p50 / p99 / max (s)",
        lambda r: f"{r['ready_p50_s']} / {r['ready_p99_s']} / {r['ready_max_s']}",
    ),
    (
        "launch -> all pods running p50 / p99 / max (s)",
        lambda r: (
            f"{r['pods_running_p50_s']} / {r['pods_running_p99_s']} / {r['pods_running_max_s']}"
        ),
    ),
    ("Ready nodes per minute", lambda r: r["ready_nodes_per_min"]),
    (
        "NAU / subnet addresses used at the end",
        lambda r: f"{r['nau_used']} / {r['subnet_addresses_used']}",
    ),
    (
        "wall s / CPU s / loop lag p99 ms",
        lambda r: f"{r['wall_s']} / {r['cpu_s']} / {r['loop_lag_p99_ms']}",
    ),
)


def render(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    width = max(len(label) for label, _ in ROWS)
    cols = [max(len(n), 20) for n in names]
    lines = [" " * width + "  " + "  ".join(n.rjust(c) for n, c in zip(names, cols, strict=True))]
    for label, cell in ROWS:
        values = [str(cell(results[n])).rjust(c) for n, c in zip(names, cols, strict=True)]
        lines.append(label.ljust(width) + "  " + "  ".join(values))
    for name in names:
        restart = results[name].get("restart")
        if restart:
            lines.append(
                f"{name}: mass restart of {restart['nodes']} agents: "
                f"{restart['nodes_ready_again']} Ready again, Ready p50/p99/max "
                f"{restart['ready_p50_s']}/{restart['ready_p99_s']}/{restart['ready_max_s']} s, "
                f"{restart['ec2_calls']} EC2 calls, {restart['allocations_lost']} of "
                f"{restart['allocations_before']} allocations lost, "
                f"{restart['addresses_duplicated']} addresses duplicated"
            )
        actions = results[name]["ec2_calls_by_action"]
        if actions:
            detail = ", ".join(
                f"{a} {v['per_node_mean']} (max {v['per_node_max']})" for a, v in actions.items()
            )
            lines.append(f"{name}: calls per node by action: {detail}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
