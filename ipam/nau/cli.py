"""``ultranet-nau``: plan, simulate and inspect VPC address budgets.

Thin I/O shell: flags and plan files become one mapping, parsed once by
:func:`ipam.nau.model.parse_plan`; the pure planner answers; this module prints.
Exit codes: 0 done (``--exit-code``: 0 fits, 1 does not fit), 2 an error (one line).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ipam.errors import ConfigError, UltranetError

PROG = "ultranet-nau"

# Flags that describe one node group: only without --plan.
_GROUP_FLAGS = {
    "nodes": "nodes",
    "instance_type": "instance_type",
    "pods_per_node": "pods_per_node",
    "max_pods": "max_pods",
    "efa": "efa_interfaces",
    "efa_only": "efa_only_interfaces",
    "efa_primary": "efa_primary",
    "multi_nic_cards": "multi_nic_cards",
    "multi_nic_pods": "multi_nic_pods",
    "public_ipv4": "public_ipv4",
}
_CONSUMER_FLAGS = (
    "nlb",
    "gwlb",
    "vpc_endpoints",
    "nat_gateways",
    "lambda_functions",
    "efs_mount_targets",
    "tgw_attachments",
    "other_nau",
)
_WARM_FLAGS = {
    "warm_prefix_target": "WARM_PREFIX_TARGET",
    "warm_ip_target": "WARM_IP_TARGET",
    "minimum_ip_target": "MINIMUM_IP_TARGET",
    "warm_eni_target": "WARM_ENI_TARGET",
}
_PLAN_FLAGS = ("mode", "azs", "peered_nau", "efa_counting", "vpc_cidr", "name")
DEFAULT_PODS_PER_NODE = 10


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, as every other error of this tool (argparse prints the usage too)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", type=Path, help="YAML plan file (node groups, consumers, knobs)")
    g = p.add_argument_group("one node group (without --plan)")
    g.add_argument("--nodes", type=_int)
    g.add_argument("--instance-type")
    g.add_argument("--pods-per-node", type=_int, help=f"default {DEFAULT_PODS_PER_NODE}")
    g.add_argument("--max-pods", type=_int, help="default: the EKS max-pods calculator's")
    g.add_argument("--efa", type=_int, help="EFA (with ENA) interfaces besides the primary")
    g.add_argument("--efa-only", type=_int, help="EFA-only interfaces")
    g.add_argument("--efa-primary", action="store_true", default=None)
    g.add_argument("--multi-nic-cards", type=_int)
    g.add_argument("--multi-nic-pods", type=_int)
    g.add_argument("--public-ipv4", action="store_true", default=None)
    c = p.add_argument_group("cluster and VPC")
    c.add_argument("--mode", choices=("secondary-ip", "prefix", "ipv6"))
    for flag in _WARM_FLAGS:
        c.add_argument("--" + flag.replace("_", "-"), type=_int)
    c.add_argument("--custom-networking", action="store_true", default=None)
    c.add_argument("--azs", type=_int)
    for flag in _CONSUMER_FLAGS:
        c.add_argument("--" + flag.replace("_", "-"), type=_int)
    c.add_argument("--peered-nau", type=_int, help="NAU of same-Region peered VPCs")
    c.add_argument("--quota", help="default (64K), max (256K, the default) or a number")
    c.add_argument("--vpc-cidr", help="primary VPC block, default 10.0.0.0/16")
    c.add_argument("--name")
    r = p.add_argument_group("rule readings where AWS is ambiguous")
    r.add_argument("--efa-counting", choices=("adds", "restate"), help="default adds")
    r.add_argument("--extra-eni-primary-ip", choices=("counted", "covered"), help="default counted")
    r.add_argument("--count-eks-pods", action="store_true", default=None)
    r.add_argument("--no-prefix-reservations", action="store_true", default=None)


def plan_mapping(args: argparse.Namespace) -> dict[str, Any]:
    """The plan file, the embedded default, or the group flags; cluster flags on top."""
    from ipam.nau.defaults import DEFAULT_PLAN

    group = {key: getattr(args, flag) for flag, key in _GROUP_FLAGS.items()}
    group = {k: v for k, v in group.items() if v is not None}
    if args.plan is not None:
        if group:
            flags = ", ".join(
                "--" + f.replace("_", "-") for f, k in _GROUP_FLAGS.items() if k in group
            )
            raise ConfigError(
                "--plan", str(args.plan), f"give node groups in the file, not {flags}"
            )
        raw = _read_plan(args.plan)
    elif group:
        for needed in ("nodes", "instance_type"):
            if needed not in group:
                raise ConfigError(
                    "--" + needed.replace("_", "-"), None, "is required with node-group flags"
                )
        group.setdefault("pods_per_node", DEFAULT_PODS_PER_NODE)
        raw = {"name": f"{group['nodes']:,} x {group['instance_type']}", "node_groups": [group]}
    else:
        raw = json.loads(json.dumps(DEFAULT_PLAN))  # a deep copy
        if args.mode == "ipv6":
            # The default's WARM_PREFIX_TARGET is a prefix-mode knob; IPv6 mode has no warm
            # pool, so `plan --mode ipv6` plans the default without it rather than refusing.
            raw.pop("warm", None)
    for flag in _PLAN_FLAGS:
        if getattr(args, flag) is not None:
            raw[flag] = getattr(args, flag)
    warm = {env: getattr(args, f) for f, env in _WARM_FLAGS.items() if getattr(args, f) is not None}
    if warm:
        raw["warm"] = warm  # the flags replace the file's knobs, so no stale one lingers
    consumers = {f: getattr(args, f) for f in _CONSUMER_FLAGS if getattr(args, f) is not None}
    if consumers:
        raw["consumers"] = {**(raw.get("consumers") or {}), **consumers}
    if args.quota is not None:
        raw["quota"] = args.quota if args.quota in ("default", "max") else _quota_number(args.quota)
    if args.custom_networking:
        raw["custom_networking"] = True
    if args.count_eks_pods:
        raw["count_eks_pods"] = True
    if args.no_prefix_reservations:
        raw["prefix_reservations"] = False
    if args.extra_eni_primary_ip is not None:
        raw["extra_eni_primary_ip"] = args.extra_eni_primary_ip == "counted"
    return raw


def _quota_number(text: str) -> int:
    try:
        return int(text.replace(",", "").replace("_", ""), 10)
    except ValueError:
        raise ConfigError("--quota", text, "must be default, max or a number") from None


def _read_plan(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError("--plan", str(path), err.strerror or str(err)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError("--plan", str(path), f"not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError("--plan", str(path), "must hold a mapping with node_groups")
    return raw


def cmd_plan(args: argparse.Namespace) -> int:
    from ipam.nau.budget import evaluate, knobs, largest
    from ipam.nau.model import parse_plan
    from ipam.nau.report import to_json, to_table

    plan = parse_plan(plan_mapping(args))
    budget = evaluate(plan)
    best, found = largest(budget), knobs(budget)
    if args.chart is not None:
        from ipam.nau.chart import write_chart

        write_chart(plan, args.chart)
    if args.json:
        print(json.dumps(to_json(budget, best, found), indent=2))
    else:
        print(to_table(budget, best, found))
        if args.chart is not None:
            print(f"chart: {args.chart}")
    return 1 if args.exit_code and not budget.fits else 0


def cmd_rules(args: argparse.Namespace) -> int:
    from ipam.nau.model import parse_plan
    from ipam.nau.report import rule_lines

    plan = parse_plan(plan_mapping(args))
    print("\n".join(rule_lines(plan.rules)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="NAU planner: VPC address budgets for EKS clusters")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    plan = sub.add_parser("plan", help="NAU and addresses of a plan (default: 100K AI/ML nodes)")
    _add_plan_args(plan)
    plan.add_argument("--json", action="store_true")
    plan.add_argument("--chart", type=Path, help="write NAU vs node count per mode (.png/.svg)")
    plan.add_argument("--exit-code", action="store_true", help="exit 1 when the plan does not fit")
    plan.set_defaults(func=cmd_plan)
    rules = sub.add_parser("rules", help="print the versioned NAU rule table")
    _add_plan_args(rules)
    rules.set_defaults(func=cmd_rules)
    _add_simulate(sub)
    _add_inspect(sub)
    _add_launch(sub)
    return parser


def _add_launch(sub: Any) -> None:
    from ipam.nau.launch_cli import add_launch

    add_launch(sub)


def _add_simulate(sub: Any) -> None:
    sim = sub.add_parser("simulate", help="replay launches and pod churn on the planned subnets")
    _add_plan_args(sim)
    sim.add_argument("--pod-events", type=_int, default=1_000_000)
    sim.add_argument("--seed", type=_int, default=1)
    sim.add_argument(
        "--scenario",
        choices=("both", "reserved", "unreserved"),
        default="both",
        help="with prefix reservations, without, or both (default)",
    )
    sim.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    sim.add_argument("--jobs", type=_int, default=2, help="scenarios run in parallel (default 2)")
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from ipam.nau.simulate_cli import cmd_simulate

    return cmd_simulate(args, plan_mapping(args))


def _add_inspect(sub: Any) -> None:
    ins = sub.add_parser("inspect", help="current NAU of a live VPC, by resource (boto3)")
    ins.add_argument("--vpc", required=True, help="VPC id")
    ins.add_argument("--region")
    ins.add_argument("--endpoint-url", help="EC2 endpoint (the lab's emulator, for example)")
    ins.add_argument("--profile")
    ins.add_argument("--efa-counting", choices=("adds", "restate"), default="adds")
    ins.add_argument("--extra-eni-primary-ip", choices=("counted", "covered"), default="counted")
    ins.add_argument("--quota", default="max")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ipam.nau.live_cli import cmd_inspect

    return cmd_inspect(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except UltranetError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
