"""ADD/DEL latency and CPU through libcni: ultranet vs Debian's reference ptp + host-local.

``python -m tools.bench.cni [-n 50] [--rounds 3] [--runs 1] [--python PATH]
[--backend daemon|inprocess] [--json] [--output FILE]`` (root: it starts a lab);
``python -m tools.bench.cni --mode cri [-n 50] [--rounds 3] [--runs 1] --output FILE``:
the same two plugins behind Debian's containerd 1.6, timed through its CRI (``cri.py``);
``python -m tools.bench.cni --mode ipv6 [-n 50] [--rounds 3] [--runs 1] --output FILE``: an
IPv6 pod's ADD against an IPv4 pod's, two real daemons in the same run (``ipv6.py``);
``python -m tools.bench.cni --combine A.json B.json ...`` summarizes several invocations.

Both plugins run in the same lab node namespace, driven by the same libcni 1.1 driver
(``libcni_driver.go``); each latency is the wall time of libcni's
``AddNetworkList``/``DelNetworkList`` call, which execs the plugin chain, as a runtime
pays it. ultranet is, by default, the real ``ultranet-ipamd`` process with the shipped
defaults behind the installed shim (``--backend inprocess``: the CNI handler in this
process over a fixed pool, a secondary figure that is not what a node runs). DEL is
reported as the runtime waits for it and with the host veth's removal inside the clock;
see ``measure.py`` for the method and ``cni/README.md`` for the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tools.bench.cni import conditions, cri, ipv6
from tools.bench.cni.driver import REFERENCE_PLUGINS
from tools.bench.cni.measure import REFERENCE, SIDES, Options, across_runs, run_once
from tools.bench.cni.nodes import BACKENDS

MAX_PODS = {"daemon": 100, "inprocess": 60}  # inprocess: four fixed /28s on the lab node


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"want KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench.cni", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "--mode",
        choices=("libcni", "cri", "ipv6"),
        default="libcni",
        help="libcni: our libcni driver execs the plugins; cri: containerd's CRI "
        "(RunPodSandbox / StopPodSandbox / RemovePodSandbox and containerd's network timers); "
        "ipv6: an IPv6 pod's ADD/DEL against an IPv4 pod's (two daemons, libcni)",
    )
    parser.add_argument("-n", "--pods", type=int, default=50, help="pods per round")
    parser.add_argument("--rounds", type=int, default=3, help="counted rounds per run")
    parser.add_argument("--warmup", type=int, default=3, help="uncounted pods per plugin first")
    parser.add_argument("--runs", type=int, default=1, help="runs, each in a fresh lab")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="daemon",
        help="daemon: the real ultranet-ipamd (the headline); inprocess: the CNI handler "
        "in this process over a fixed pool (secondary, not production)",
    )
    parser.add_argument("--python", help="the shim's interpreter (default: this one, resolved)")
    parser.add_argument(
        "--daemon-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a daemon setting away from the shipped default (recorded; not for headlines)",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON, not the table")
    parser.add_argument("--output", type=Path, help="also write the JSON to this file")
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="measure nothing: summarize the runs of these --output files together "
        "(they must share commit, flags and backend)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.combine:
        try:
            combined = combine([json.loads(path.read_text()) for path in args.combine])
        except (OSError, ValueError) as err:
            parser.error(f"--combine: {err}")
        print(json.dumps(combined, indent=2) if args.json else table(combined))
        return 0
    if not 1 <= args.pods <= MAX_PODS[args.backend]:
        parser.error(f"-n must be 1..{MAX_PODS[args.backend]} with --backend {args.backend}")
    if args.rounds < 1 or args.runs < 1 or args.warmup < 0 or args.warmup > args.pods:
        parser.error("--rounds and --runs must be >= 1, --warmup 0..n")
    if args.daemon_env and args.backend != "daemon":
        parser.error("--daemon-env needs --backend daemon")
    if args.mode in ("cri", "ipv6") and args.backend != "daemon":
        parser.error(f"--mode {args.mode} runs the real daemon only (--backend daemon)")
    if not (REFERENCE_PLUGINS / "ptp").exists():
        print("needs Debian package containernetworking-plugins", file=sys.stderr)
        return 1
    options = Options(
        pods=args.pods,
        rounds=args.rounds,
        warmup=args.warmup,
        backend=args.backend,
        python=args.python,
        daemon_env=dict(args.daemon_env),
    )
    result = measure(options, args.runs, argv if argv is not None else sys.argv[1:], args.mode)
    text = json.dumps(result, indent=2)
    if args.output is not None:
        args.output.write_text(text + "\n")
    print(text if args.json else table(result))
    return 0


def measure(options: Options, runs: int, argv: list[str], mode: str = "libcni") -> dict[str, Any]:
    if mode == "cri":
        return measure_cri(options, runs, argv)
    if mode == "ipv6":
        return measure_ipv6(options, runs, argv)
    config = {
        "command": ["python", "-m", "tools.bench.cni", *argv],
        "flags": _run_flags(options, runs),
        "headline_eligible": options.backend == "daemon" and not options.daemon_env,
        "lab": {
            "instance_type": options.lab_config().instance_type,
            "prefixes_at_launch_per_card": options.lab_config().prefixes_per_card,
        },
        "counts": {
            "pods_per_round": options.pods,
            "rounds": options.rounds,
            "warmup_pods_per_plugin": options.warmup,
            "counted_adds_per_plugin_per_run": options.pods * options.rounds,
            "runs": runs,
        },
        "concurrency": {
            "in_flight_calls": 1,
            "dels": "back to back: a DEL does not wait for the previous DEL's veth removal; "
            "each cycle ends waiting for every host veth's RTM_DELLINK",
            "order": "per round one cycle per plugin (ADD all pods, DEL all pods), "
            "the first plugin alternating between rounds",
        },
        "reference": {"conflist": REFERENCE, "plugins_dir": str(REFERENCE_PLUGINS)},
        "versions": conditions.versions(),
        "code": conditions.code(),
        "machine": conditions.machine(),
    }
    results = [run_once(options) for _ in range(runs)]
    return {"config": config, "runs": results, "across_runs": across_runs(results)}


def _runtime_flags(mode: str, options: Options, runs: int) -> dict[str, Any]:
    """The flags the CRI and IPv6 benchmarks record in their JSON: the run's and the mode."""
    return {"mode": mode, **_run_flags(options, runs)}


def _run_flags(options: Options, runs: int) -> dict[str, Any]:
    """The flags every mode records in its JSON."""
    return {
        "pods": options.pods,
        "rounds": options.rounds,
        "warmup": options.warmup,
        "runs": runs,
        "backend": options.backend,
        "python": options.python,
        "daemon_env": options.daemon_env,
    }


def measure_cri(options: Options, runs: int, argv: list[str]) -> dict[str, Any]:
    config = {
        "command": ["python", "-m", "tools.bench.cni", *argv],
        "flags": _runtime_flags("cri", options, runs),
        "headline_eligible": not options.daemon_env,
        "lab": {
            "instance_type": options.lab_config().instance_type,
            "prefixes_at_launch_per_card": options.lab_config().prefixes_per_card,
        },
        "counts": {
            "pods_per_round": options.pods,
            "rounds": options.rounds,
            "warmup_pods_per_plugin": options.warmup,
            "counted_sandboxes_per_plugin_per_run": options.pods * options.rounds,
            "runs": runs,
        },
        "runtime": {
            "containerd": "one Debian containerd 1.6 in the lab node, two runc runtime "
            "handlers named after the sides, each with its own cni_conf_dir; pods are "
            "started with the side's runtime_handler",
            "metrics": cri.NETWORK_TIMERS,
            "network_ms": "per call, the change of the histogram's _sum around it (its "
            "_count must change by exactly one)",
        },
        "concurrency": {
            "in_flight_calls": 1,
            "order": "per round one cycle per plugin (RunPodSandbox for every pod, then "
            "StopPodSandbox + RemovePodSandbox for each), the first plugin alternating "
            "between rounds",
        },
        "bars": cri.BARS,
        "reference": {"conflist": REFERENCE, "plugins_dir": str(REFERENCE_PLUGINS)},
        "versions": {
            **conditions.versions(),
            "containerd": conditions.run(["containerd", "--version"]),
            "runc": conditions.run(["runc", "--version"]).split("\n")[0],
        },
        "code": conditions.code(),
        "machine": conditions.machine(),
    }
    results = [cri.run_once(options) for _ in range(runs)]
    return {"config": config, "runs": results, "across_runs": cri.across_runs(results)}


def measure_ipv6(options: Options, runs: int, argv: list[str]) -> dict[str, Any]:
    config = {
        "command": ["python", "-m", "tools.bench.cni", *argv],
        "flags": _runtime_flags("ipv6", options, runs),
        "headline_eligible": not options.daemon_env,
        "what": (ipv6.__doc__ or "").strip(),
        "ipv6_daemon_env": ipv6.IPV6_ENV,
        "lab": {
            "instance_type": options.lab_config().instance_type,
            "prefixes_at_launch_per_card": options.lab_config().prefixes_per_card,
            "ipv6": {"vpc": ipv6.VPC_56, "subnet": ipv6.SUBNET_64, "prefix": "one /80 at launch"},
        },
        "counts": {
            "pods_per_round": options.pods,
            "rounds": options.rounds,
            "warmup_pods_per_family": options.warmup,
            "counted_adds_per_family_per_run": options.pods * options.rounds,
            "runs": runs,
        },
        "concurrency": {"in_flight_calls": 1, "order": "first family alternating by round"},
        "bar": ipv6.BAR,
        "versions": conditions.versions(),
        "code": conditions.code(),
        "machine": conditions.machine(),
    }
    results = [ipv6.run_once(options) for _ in range(runs)]
    return {"config": config, "runs": results, "across_runs": ipv6.across_runs(results)}


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several invocations' runs as one result; refuses to mix code or flags."""
    first = results[0]["config"]
    for other in results[1:]:
        for key in ("code", "flags"):
            mine, theirs = dict(first[key]), dict(other["config"][key])
            if key == "flags":
                mine.pop("runs"), theirs.pop("runs")
            if mine != theirs:
                raise ValueError(f"the files differ in {key}: {mine} vs {theirs}")
    runs = [run for result in results for run in result["runs"]]
    config = {**first, "combined_from": len(results)}
    mode = first["flags"].get("mode")
    summary = {"cri": cri.across_runs, "ipv6": ipv6.across_runs}.get(mode, across_runs)
    return {"config": config, "runs": runs, "across_runs": summary(runs)}


def table(result: dict[str, Any]) -> str:
    if result["config"]["flags"].get("mode") == "cri":
        return cri_table(result)
    if result["config"]["flags"].get("mode") == "ipv6":
        return ipv6.table(result)
    lines = []
    config = result["config"]
    for index, run in enumerate(result["runs"]):
        lines.append(
            f"run {index + 1} ({config['flags']['backend']}), load "
            f"{run['load']['before']['loadavg'][0]} -> {run['load']['after']['loadavg'][0]}"
        )
        for side in SIDES:
            row = run[side]
            cpu = row["cpu_us_per_op"]
            lines.append(
                f"  {side:10s}"
                + "".join(
                    f" {label} {row[key]['median']:6.2f} ms [{row[key]['min']:.1f}-"
                    f"{row[key]['max']:.1f}]"
                    for label, key in (
                        ("ADD", "add_ms"),
                        ("DEL", "del_answer_ms"),
                        ("DEL+veth", "del_removed_ms"),
                    )
                )
                + f"  CPU/op ADD {cpu['add']['total']} us DEL {cpu['del']['total']} us"
            )
        ratio = run["ratio"]
        lines.append(
            f"  ratio      ADD {ratio['add_ms_p50']}x  DEL {ratio['del_answer_ms_p50']}x  "
            f"DEL+veth {ratio['del_removed_ms_p50']}x  CPU ADD {ratio['add_cpu']}x "
            f"DEL {ratio['del_cpu']}x"
        )
    keys = ("add_ms", "del_answer_ms", "del_removed_ms")
    lines += _across_lines(result, [(key, key) for key in keys], cpu=True)
    return "\n".join(lines)


def cri_table(result: dict[str, Any]) -> str:
    lines = []
    labels = [("Run", "run_ms"), ("cni_add", "cni_add_ms"), ("Stop", "stop_ms")]
    labels += [("cni_del", "cni_del_ms"), ("Remove", "remove_ms")]
    labels += [("Remove's cni_del", "cni_del_remove_ms")]
    for index, run in enumerate(result["runs"]):
        lines.append(
            f"run {index + 1} (containerd CRI), load "
            f"{run['load']['before']['loadavg'][0]} -> {run['load']['after']['loadavg'][0]}"
        )
        for side in SIDES:
            row = run[side]
            cpu = row["cpu_us_per_op"]
            lines.append(
                f"  {side:10s}"
                + "".join(
                    f" {label} {row[key]['median']:.1f}/{row[key]['p90']:.1f} ms"
                    for label, key in labels
                )
                + f"  CPU/op run {cpu['add']['total']} us stop+rm {cpu['del']['total']} us"
            )
        lines.append("  ratio      " + "  ".join(f"{k} {v}x" for k, v in run["ratio"].items()))
        lines.append(
            "  bars       "
            + "  ".join(
                f"{k} {b['ratio']}x <= {b['at_most']}: {'met' if b['met'] else 'MISSED'}"
                for k, b in run["bars"].items()
            )
        )
    lines += _across_lines(result, labels, cpu=False)
    return "\n".join(lines)


def _across_lines(result: dict[str, Any], labels: list[tuple[str, str]], *, cpu: bool) -> list[str]:
    """The summary over several runs: each (label, key) series' median of the runs' medians,
    their range and every sample's range, CPU per op with ``cpu``, then the ratios."""
    across = result["across_runs"]
    if across["runs"] <= 1:
        return []
    loads = [x for run in result["runs"] for x in _loads(run)]
    lines = [
        f"over {across['runs']} runs (1-min load {min(loads)}-{max(loads)}): median of the "
        "runs' medians [their range] {all samples' range}"
    ]
    for side in SIDES:
        row = across[side]
        cells = []
        for label, key in labels:
            m, full = row[key]["run_medians"], row[key]
            cells.append(
                f"{label} {m['median']} [{m['min']}-{m['max']}] "
                f"{{{full['samples_min']}-{full['samples_max']}}}"
            )
        if cpu:
            for op in ("add", "del"):
                spread = row[f"{op}_cpu_us_per_op"]
                cells.append(f"{op} CPU/op {spread['median']} us [{spread['min']}-{spread['max']}]")
        lines.append(f"  {side:10s} " + "; ".join(cells))
    for key, spread in across["ratio"].items():
        lines.append(f"  {key:18s} {spread['median']}x [{spread['min']}-{spread['max']}]")
    return lines


def _loads(run: dict[str, Any]) -> list[float]:
    return [run["load"][moment]["loadavg"][0] for moment in ("before", "after")]


if __name__ == "__main__":
    sys.exit(main())
