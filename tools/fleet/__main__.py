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
import sys
from typing import Any

from ipam.config import load_config
from ipam.errors import UltranetError
from ipam.nau.launch import VPCCNI_SETTINGS, Faults
from ipam.nau.launch_auto import choose
from ipam.nau.launch_cli import Row, add_wave_flags, render, throttle_note
from ipam.nau.throttle import load_table
from tools.bench.conditions import code, machine
from tools.fleet.emulator import FaultSpec
from tools.fleet.runner import VPC_CNI, Fleet, FleetConfig, Scenario, quiet_agents

SCENARIOS = ("ultranet", "ultranet-reactive", "vpc-cni", "vpc-cni-reactive")
BASELINE = {"ultranet": "vpc-cni", "ultranet-reactive": "vpc-cni-reactive"}


def _fault_specs(faults: Faults) -> tuple[FaultSpec, ...]:
    """The model's ``--faults`` as the emulator's rules: latency first, so a faulted
    request is slow too; then InternalError, then Unavailable (``Faults``' order)."""
    specs: list[FaultSpec] = []
    if faults.latency_s:
        specs.append(FaultSpec("latency", latency_s=faults.latency_s))
    for kind, probability in (("internal", faults.internal), ("unavailable", faults.unavailable)):
        if probability:
            specs.append(FaultSpec(kind, probability=probability))
    return tuple(specs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.fleet", description=__doc__)
    add_wave_flags(p)
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
    p.add_argument("--chart", metavar="FILE", help="Ready nodes over time, .png or .svg")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per scenario")
    p.add_argument("-v", "--verbose", action="store_true", help="the agents' INFO logs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
        faults=_fault_specs(args.faults),
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
        result["throttle"] = throttle_note(args)
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
    for name, result in results.items():
        if differences := result["clients_and_emulator_disagree"]:
            print(
                f"fleet: warning: {name}: the agents' clients and EC2 disagree, so these "
                f"figures include the lab's own failures: {'; '.join(differences)}",
                file=sys.stderr,
            )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(render(results, FLEET_ROWS, before=_restart_note, min_width=20))
    if args.chart is not None:
        from tools.fleet.chart import write_chart

        write_chart(results, args.chart)
    ok = all(
        r["nodes_ready"] == r["nodes"]
        and ("restart" not in r or r["restart"]["nodes_ready_again"] == r["restart"]["nodes"])
        for r in results.values()
    )
    return 0 if ok else 1


FLEET_ROWS: tuple[Row, ...] = (
    (
        "wall s / CPU s / loop lag p99 ms",
        lambda r: f"{r['wall_s']} / {r['cpu_s']} / {r['loop_lag_p99_ms']}",
    ),
)


def _restart_note(name: str, result: dict[str, Any]) -> list[str]:
    restart = result.get("restart")
    if not restart:
        return []
    return [
        f"{name}: mass restart of {restart['nodes']} agents: "
        f"{restart['nodes_ready_again']} Ready again, Ready p50/p99/max "
        f"{restart['ready_p50_s']}/{restart['ready_p99_s']}/{restart['ready_max_s']} s, "
        f"{restart['ec2_calls']} EC2 calls, {restart['allocations_lost']} of "
        f"{restart['allocations_before']} allocations lost, "
        f"{restart['addresses_duplicated']} addresses duplicated"
    ]


if __name__ == "__main__":
    sys.exit(main())
