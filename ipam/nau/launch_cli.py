"""``ultranet-nau launch``: the flags, table and JSON around :mod:`ipam.nau.launch`.

The flags and the JSON keys are those of the real-agent fleet (``python -m tools.fleet``),
so one command line runs either; what only the model has (``--seed``, a simulated
``--timeout``) says so in its help.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ipam.config import load_config
from ipam.errors import ConfigError, UltranetError
from ipam.instance_types import lookup
from ipam.nau.chart import FORMATS
from ipam.nau.launch import (
    PLAYED_NODES,
    VPCCNI_SETTINGS,
    Faults,
    LaunchConfig,
    run,
    sample_limit,
)
from ipam.nau.launch_auto import choose
from ipam.nau.throttle import BucketSpec, ThrottleTable, load_table

SCENARIOS = ("ultranet", "ultranet-reactive", "vpc-cni", "vpc-cni-reactive")
BASELINES = ("vpc-cni",)


def _rate(text: str) -> float:
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(?:/(min|s))?", text)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a rate such as 2000/min or 30/s")
    value = float(match.group(1))
    return value * 60 if match.group(2) == "s" else value


def _whole_number_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum``, or one clear line saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= {minimum}")
        return value

    return parse


_positive_int = _whole_number_at_least(1)
_count = _whole_number_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number > 0")
    return value


def _launch_prefixes(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return _count(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a count >= 0, or auto") from None


def _bucket(text: str) -> tuple[str, BucketSpec]:
    match = re.fullmatch(r"([A-Za-z]+)=([0-9.]+):([0-9.]+)", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give ACTION=CAPACITY:REFILL_PER_S")
    try:
        return match.group(1), BucketSpec(float(match.group(2)), float(match.group(3)))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def _env(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=VALUE (an ipamd setting)")
    return name, value


def _duration_s(text: str) -> float:
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(ms|s)", text)
    if match is None:
        raise ValueError(f"{text!r}: give a duration such as 50ms or 0.2s")
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "ms" else value


FAULT_HELP = "5xx|500=P (InternalError), 503=P (Unavailable), latency=50ms|0.2s"


def parse_faults(text: str) -> Faults:
    """``5xx=0.05,503=0.01,latency=200ms``, as ``python -m tools.fleet --faults``."""
    values: dict[str, float] = {}
    for part in text.split(","):
        name, sep, raw = part.partition("=")
        try:
            if not sep:
                raise ValueError(f"{part!r}: give NAME=VALUE ({FAULT_HELP})")
            if name == "latency":
                values["latency_s"] = _duration_s(raw)
                continue
            kind = {"5xx": "internal", "500": "internal", "503": "unavailable"}.get(name)
            if kind is None:
                raise ValueError(f"{name!r}: not a fault ({FAULT_HELP})")
            probability = float(raw)
            if not 0 < probability <= 1:
                raise ValueError(f"{part!r}: a probability in (0, 1]")
            values[kind] = probability
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return Faults(**values)


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


def add_wave_flags(p: argparse.ArgumentParser) -> None:
    """The flags the model and the real-agent fleet (``python -m tools.fleet``) share, so
    one command line runs either (issue 15); each adds its own (scenarios, timeout...)."""
    p.add_argument("--nodes", type=_positive_int, required=True, help="instances in the wave")
    p.add_argument("--rate", type=_rate, default=2000.0, help="launches, N/min or N/s")
    p.add_argument(
        "--burst",
        type=_burst,
        metavar="N/EVERY",
        help="N instances at once every EVERY (500/30s, 1000/1min), a Karpenter-like "
        "provisioner; replaces --rate",
    )
    p.add_argument("--instance-type", default="m5.large")
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
    p.add_argument("--pods-per-node", type=_count, default=2, help="pods with a VPC address")
    p.add_argument("--pod-rate", type=_positive_float, default=500.0, help="scheduler, pods/s")
    p.add_argument(
        "--prefixes-at-launch",
        type=_launch_prefixes,
        default=2,
        metavar="N|auto",
        help="/28s on each primary ENI at launch in 'ultranet' and 'vpc-cni'; auto: the "
        "fewest, with warm settings that keep them, for 0 EC2 calls",
    )
    p.add_argument(
        "--env",
        type=_env,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="ipamd setting for every agent, e.g. WARM_PREFIX_TARGET=1 (repeatable)",
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
    p.add_argument(
        "--faults",
        type=parse_faults,
        default=Faults(),
        metavar="SPEC",
        help=f"EC2 faults, comma-separated: {FAULT_HELP}; latency is added to every "
        "request the account's bucket admits",
    )
    p.add_argument("--no-throttle", action="store_true", help="EC2 never throttles")
    p.add_argument(
        "--refill-scale",
        type=_positive_float,
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
    p.add_argument("--json", action="store_true")


def add_launch(sub: Any) -> None:
    p = sub.add_parser(
        "launch",
        help="model a launch wave's EC2 calls, throttling and time to Ready (100K nodes)",
        description=(
            "A discrete-event model of a launch wave: every node's CNI agent as a state "
            "machine making the EC2 calls the real agent makes, against one account's "
            "throttling buckets (AWS's published numbers), on a simulated clock. Flags and "
            "--json keys are those of the real-agent fleet (python -m tools.fleet)."
        ),
    )
    add_wave_flags(p)
    p.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run this scenario (repeatable; default 'ultranet'); the -reactive ones launch "
        "with no prefix; --baseline adds each one's VPC CNI twin",
    )
    p.add_argument(
        "--baseline",
        choices=BASELINES,
        help="also model the AWS VPC CNI's calls (ipam/nau/vpccni_calls.py) for each "
        "ultranet scenario, same launch template",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        help="simulated seconds per scenario; nodes not Ready by then are reported "
        "(default: until every pod runs and every pool is settled)",
    )
    p.add_argument("--seed", type=int, default=1, help="model only: the random seed")
    p.add_argument(
        "--sample",
        type=_positive_int,
        metavar="N",
        help="model only: play one node in N against buckets, launches and scheduler divided "
        "by N (1: every node). Default: every node, unless EC2 throttles a wave of more than "
        f"{PLAYED_NODES:,}: then one in (nodes / {PLAYED_NODES:,})^2, at most 25 with AWS's "
        "buckets",
    )
    p.add_argument("--chart", type=Path, help="write Ready nodes over time (.png/.svg)")
    p.set_defaults(func=cmd_launch)


def _scenarios(args: argparse.Namespace) -> list[str]:
    """As tools/fleet: --baseline adds each ultranet scenario's VPC CNI counterpart."""
    wanted = list(dict.fromkeys(args.scenario or ["ultranet"]))
    if args.baseline is None:
        if any(s.startswith("vpc-cni") for s in wanted):
            raise ConfigError("--scenario", "vpc-cni", "needs --baseline vpc-cni")
        return wanted
    for name in list(wanted):
        twin = name.replace("ultranet", "vpc-cni", 1)
        if name.startswith("ultranet") and twin not in wanted:
            wanted.append(twin)
    return wanted


def configs(args: argparse.Namespace) -> dict[str, tuple[LaunchConfig, dict[str, Any]]]:
    """Each scenario's model input, and what the output should say about its choices."""
    try:
        itype = lookup(args.instance_type)
    except (KeyError, ValueError, UltranetError) as err:
        raise ConfigError("--instance-type", args.instance_type, str(err)) from None
    env = dict(args.env)
    try:
        load_config(env)  # a bad setting is refused here, with the knob named
    except ValueError as err:
        raise ConfigError("--env", ",".join(f"{k}={v}" for k, v in env.items()), str(err)) from None
    vpccni_env = dict(args.vpccni_env)
    try:
        LaunchConfig(
            nodes=1,
            rate_per_min=1,
            vpccni_env=vpccni_env,
            vpccni_cleanup_delay_max_s=args.vpccni_cleanup_delay_max,
        )
    except ValueError as err:
        raise ConfigError(
            "--vpccni-env", ",".join(f"{k}={v}" for k, v in vpccni_env.items()), str(err)
        ) from None
    throttle: ThrottleTable | None = None
    if not args.no_throttle:
        throttle = load_table().scaled(args.refill_scale).with_buckets(dict(args.bucket))
        if args.sample is not None and args.sample > sample_limit(throttle):
            raise ConfigError(
                "--sample",
                args.sample,
                f"at most {sample_limit(throttle)} with these buckets (each keeps a token)",
            )
    rate, burst, every = args.rate, 1, None
    if args.burst is not None:
        burst, every = args.burst
        rate = burst / every * 60
    base = LaunchConfig(
        nodes=args.nodes,
        rate_per_min=rate,
        instance_type=itype.name,
        pods_per_node=args.pods_per_node,
        pod_rate_per_s=args.pod_rate,
        env=env,
        throttle=throttle,
        burst=burst,
        burst_every_s=every,
        faults=args.faults,
        timeout_s=args.timeout,
        seed=args.seed,
        efa_only_cards=args.efa_only_cards,
        restart=args.restart,
        sample=_sample(args),
    )
    notes: dict[str, Any] = {"env": env}
    prefixes = args.prefixes_at_launch
    ultranet_env = env
    if prefixes is None:
        try:
            auto = choose(itype.name, args.pods_per_node, env)
        except ValueError as err:
            raise ConfigError("--prefixes-at-launch", "auto", str(err)) from None
        prefixes = auto.prefixes
        ultranet_env = {**env, **auto.env}
        notes["prefixes_at_launch_auto"] = {
            "prefixes": auto.prefixes,
            "warm_settings_added": auto.env,
            "addresses_per_node": auto.addresses_per_node,
            "choice": auto.describe(),
        }
    if prefixes > itype.max_prefixes_per_eni:
        raise ConfigError(
            "--prefixes-at-launch",
            prefixes,
            f"a {itype.name}'s primary ENI holds at most {itype.max_prefixes_per_eni}",
        )
    out: dict[str, tuple[LaunchConfig, dict[str, Any]]] = {}
    for name in _scenarios(args):
        at_launch = 0 if name.endswith("-reactive") else prefixes
        if name.startswith("vpc-cni"):
            config = replace(
                base,
                agent="vpc-cni",
                prefixes_at_launch=at_launch,
                vpccni_env=vpccni_env,
                vpccni_cleanup_delay_max_s=args.vpccni_cleanup_delay_max,
            )
            extra = {"env": vpccni_env, "warm_mode": "WARM_PREFIX_TARGET only (vpccni_calls.py)"}
        else:
            chosen = ultranet_env if at_launch else env
            config = replace(base, prefixes_at_launch=at_launch, env=chosen)
            extra = {**notes, "env": chosen}
        out[name] = (config, extra)
    return out


def _sample(args: argparse.Namespace) -> int | None:
    if args.sample is not None and args.sample > args.nodes:
        raise ConfigError("--sample", args.sample, f"must be at most --nodes ({args.nodes})")
    sample: int | None = args.sample
    return sample


def cmd_launch(args: argparse.Namespace) -> int:
    if args.chart is not None and args.chart.suffix.lower() not in FORMATS:
        raise ConfigError("--chart", str(args.chart), "must end in .png or .svg")
    planned = configs(args)
    results: dict[str, dict[str, Any]] = {}
    conditions = {"argv": sys.argv[1:]}
    for name, (config, extra) in planned.items():
        result = run(config)
        result["scenario"] = name
        result.update(extra)
        result["throttle"] = throttle_note(args)
        result["conditions"] = conditions
        results[name] = result
    if args.chart is not None:
        from ipam.nau.launch_chart import write_launch_chart

        write_launch_chart(results, args.chart)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(render_model(results))
    return 0 if all(_all_ready(r) for r in results.values()) else 1


def _all_ready(result: dict[str, Any]) -> bool:
    """Every node Ready, and Ready again after ``--restart`` (tools/fleet's exit status)."""
    again = result.get("restart")
    return result["nodes_ready"] == result["nodes"] and (
        again is None or again["nodes_ready_again"] == again["nodes"]
    )


def throttle_note(args: argparse.Namespace) -> str:
    """The ``throttle`` key of every scenario's result: the buckets the flags chose."""
    if args.no_throttle:
        return "off"
    parts = ["AWS published buckets (ipam/nau/data/ec2-throttling.json)"]
    if args.refill_scale != 1.0:
        parts.append(f"refill x{args.refill_scale:g}")
    parts += [f"{a}={s.capacity:g}:{s.refill_per_s:g}" for a, s in args.bucket]
    return ", ".join(parts)


Result = dict[str, Any]
Row = tuple[str, Callable[[Result], object]]
Notes = Callable[[str, Result], list[str]]

ROWS: tuple[Row, ...] = (
    ("nodes ready / launched", lambda r: f"{r['nodes_ready']:,} / {r['nodes_launched']:,}"),
    ("prefixes at launch", lambda r: r["prefixes_at_launch"]),
    ("EC2 calls per node (start + pods)", lambda r: r["ec2_calls_per_node"]),
    (
        "  at start / while pods land",
        lambda r: f"{r['ec2_calls_start_per_node']} / {r['ec2_calls_pods_per_node']}",
    ),
    ("  max on one node", lambda r: r["ec2_calls_per_node_max"]),
    ("throttled calls / retries", lambda r: f"{r['throttled_calls']:,} / {r['retries']:,}"),
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
        lambda r: f"{r['nau_used']:,} / {r['subnet_addresses_used']:,}",
    ),
)
MODEL_ROWS: tuple[Row, ...] = (
    ("simulated s / model wall s", lambda r: f"{r['simulated_s']} / {r['model_wall_s']}"),
    (
        "nodes played (one in N)",
        lambda r: f"{r['sample']['nodes_played']:,} ({r['sample']['one_node_in']})",
    ),
)


def _no_notes(name: str, result: Result) -> list[str]:
    return []


def render(
    results: dict[str, Result],
    extra_rows: tuple[Row, ...] = (),
    *,
    before: Notes = _no_notes,
    after: Notes = _no_notes,
    min_width: int = 22,
) -> str:
    """The table of the model and of the real-agent fleet: ``ROWS`` then ``extra_rows``, a
    column per scenario; then per scenario ``before`` lines, its calls by action, ``after``."""
    names = list(results)
    rows = ROWS + extra_rows
    width = max(len(label) for label, _ in rows)
    cols = [max(len(n), min_width) for n in names]
    lines = [" " * width + "  " + "  ".join(n.rjust(c) for n, c in zip(names, cols, strict=True))]
    for label, cell in rows:
        values = [str(cell(results[n])).rjust(c) for n, c in zip(names, cols, strict=True)]
        lines.append(label.ljust(width) + "  " + "  ".join(values))
    for name in names:
        result = results[name]
        lines += before(name, result)
        actions = result["ec2_calls_by_action"]
        if actions:
            detail = ", ".join(
                f"{a} {v['per_node_mean']} (max {v['per_node_max']})" for a, v in actions.items()
            )
            lines.append(f"{name}: calls per node by action: {detail}")
        lines += after(name, result)
    return "\n".join(lines)


def _auto_note(name: str, result: Result) -> list[str]:
    auto = result.get("prefixes_at_launch_auto")
    if auto and result["prefixes_at_launch"]:
        return [f"{name}: --prefixes-at-launch auto: {auto['choice']}"]
    return []


def _timeout_note(name: str, result: Result) -> list[str]:
    if result["timed_out"]:
        return [f"{name}: stopped at --timeout {result['simulated_s']} s (simulated)"]
    return []


def restart_note(name: str, result: Result) -> list[str]:
    """The ``--restart`` line of the table, as ``python -m tools.fleet`` prints it."""
    restart = result.get("restart")
    if not restart:
        return []
    return [
        f"{name}: mass restart of {restart['nodes']:,} agents: "
        f"{restart['nodes_ready_again']:,} Ready again, Ready p50/p99/max "
        f"{restart['ready_p50_s']}/{restart['ready_p99_s']}/{restart['ready_max_s']} s, "
        f"{restart['ec2_calls']:,} EC2 calls, {restart['allocations_lost']:,} of "
        f"{restart['allocations_before']:,} allocations lost, "
        f"{restart['addresses_duplicated']:,} addresses duplicated"
    ]


def _after_notes(name: str, result: Result) -> list[str]:
    return restart_note(name, result) + _timeout_note(name, result)


def render_model(results: dict[str, Result]) -> str:
    table = render(results, MODEL_ROWS, before=_auto_note, after=_after_notes)
    return table + "\nmodel: simulated clock; latencies from ipam/nau/data/launch-timings.json"
