"""``--mode ipv6``: ADD and DEL of an IPv6 pod against an IPv4 pod, same run, same driver.

Issue 17's bar: an IPv6 pod's ADD p50 within 10% of an IPv4 pod's. Two lab nodes (m5.large,
each in its own lab), each with the real ``ultranet-ipamd`` and the shipped defaults
behind the installed shim: the IPv4 node as the headline ``--mode libcni`` runs it (one
/28 at launch, the pool grown through EC2), the IPv6 node with ``ENABLE_IPv6=true``
(``ENABLE_IPv4=false``, ``ENABLE_PREFIX_DELEGATION=true``), its VPC given a /56, its
subnet a /64 and its primary ENI a /80 before the daemon starts, as a launch template's
``Ipv6PrefixCount=1`` does. One libcni driver per node, one call in flight; per round
one cycle per family (ADD every pod, then DEL every pod back to back, then wait for
every host veth's removal), the first family alternating between rounds; each cycle
starts once its daemon reports a steady pool (outside the clock, recorded). The
reference plugins do not take part: the comparison is ultranet with itself. The IPv6 pod
is what an IPv6 node gives by default: its /128 and, with ``ENABLE_V4_EGRESS``, the
``v4if0`` veth with a node-local IPv4 (the range in the lab's address space).
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.bench.cni import conditions
from tools.bench.cni.driver import Driver
from tools.bench.cni.measure import Options, Series, _write_conflists, cycle, distribution
from tools.bench.cni.nodes import DaemonNode
from tools.lab.lab import Lab

FAMILIES = ("ipv4", "ipv6")
IPV6_ENV = {
    "ENABLE_IPv4": "false",
    "ENABLE_IPv6": "true",
    "ENABLE_PREFIX_DELEGATION": "true",
    # The shipped ENABLE_V4_EGRESS=true gives each pod v4if0 too; its range moves from the
    # default 169.254.172.0/22 to a /22 of the lab's address space, nothing else changes.
    "ULTRANET_V4_EGRESS_RANGE": "198.18.4.0/22",
}
VPC_56 = "fd12:3456:789a:1000::/56"
SUBNET_64 = "fd12:3456:789a:1000::/64"
BAR = {"metric": "add_ms_p50 ipv6 / ipv4", "at_most": 1.10}


def give_ipv6(lab: Lab) -> str:
    """The lab VPC's /56, the node subnet's /64 and the primary ENI's /80; returns it."""
    (primary,) = [e for e in lab.cloud.enis_of(lab.instance_id) if e.attachment]
    lab.cloud.associate_vpc_ipv6_cidr(lab.vpc_id, VPC_56)
    lab.cloud.associate_subnet_ipv6_cidr(primary.subnet_id, SUBNET_64)
    lab.cloud.assign_ipv6_addresses(primary.eni_id, prefix_count=1)
    (prefix,) = lab.cloud.eni_view(primary.eni_id).ipv6_prefixes
    return str(prefix)


def _summary(series: Series) -> dict[str, Any]:
    adds, dels = len(series.add_ms), len(series.del_answer_ms)
    return {
        "add_ms": distribution(series.add_ms),
        "del_answer_ms": distribution(series.del_answer_ms),
        "del_removed_ms": distribution(series.del_removed_ms),
        "cpu_us_per_op": {
            "add": {
                "shim": round(statistics.fmean(series.add_plugin_cpu_us)),
                "daemon": round(1e6 * series.add_daemon_cpu_s / adds),
            },
            "del": {
                "shim": round(statistics.fmean(series.del_plugin_cpu_us)),
                "daemon": round(1e6 * series.del_daemon_cpu_s / dels),
            },
        },
    }


def run_once(options: Options) -> dict[str, Any]:
    series = {family: Series() for family in FAMILIES}
    load_before = conditions.load()
    with (
        Lab(options.lab_config()) as lab4,
        Lab(options.lab_config()) as lab6,
        tempfile.TemporaryDirectory() as tmp,
    ):
        root = Path(tmp)
        prefix = give_ipv6(lab6)
        labs = {"ipv4": lab4, "ipv6": lab6}
        pods = {
            f: [lab.create_pod_namespace(f"b{i}") for i in range(options.pods)]
            for f, lab in labs.items()
        }
        shim, conf, _ = _write_conflists(root, options.python)
        nodes: dict[str, DaemonNode] = {}
        try:
            for family, lab in labs.items():
                env = {**options.daemon_env, **(IPV6_ENV if family == "ipv6" else {})}
                nodes[family] = DaemonNode(lab, root / f"ipamd-{family}", env)
            ec2_before = {f: lab.cloud.requests.counts() for f, lab in labs.items()}
            waited: dict[str, list[float]] = {f: [] for f in FAMILIES}
            with (
                Driver(
                    lab4.node_ns, conf, root / "cache4", [shim.parent], nodes["ipv4"].shim_env
                ) as driver4,
                Driver(
                    lab6.node_ns, conf, root / "cache6", [shim.parent], nodes["ipv6"].shim_env
                ) as driver6,
            ):
                drivers = {"ipv4": driver4, "ipv6": driver6}

                def run_cycle(family: str, some: Sequence[str], tag: str, into: Series) -> None:
                    waited[family].append(round(nodes[family].wait_steady(), 3))
                    cycle(drivers[family], family, some, tag, into, nodes[family].cpu_s)

                for family in FAMILIES:
                    run_cycle(family, pods[family][: options.warmup], "w", Series())
                for r in range(options.rounds):
                    for family in FAMILIES if r % 2 == 0 else FAMILIES[::-1]:
                        run_cycle(family, pods[family], f"r{r}-", series[family])
            ec2_calls = {
                f: dict(lab.cloud.requests.counts() - ec2_before[f]) for f, lab in labs.items()
            }
            described = {f: node.describe() for f, node in nodes.items()}
        finally:
            for node in nodes.values():
                node.close()
    out: dict[str, Any] = {family: _summary(series[family]) for family in FAMILIES}
    ratio = round(out["ipv6"]["add_ms"]["median"] / out["ipv4"]["add_ms"]["median"], 3)
    out["ratio"] = {
        "add_ms_p50": ratio,
        "del_answer_ms_p50": round(
            out["ipv6"]["del_answer_ms"]["median"] / out["ipv4"]["del_answer_ms"]["median"], 3
        ),
    }
    out["bar"] = {**BAR, "ratio": ratio, "met": ratio <= BAR["at_most"]}
    out["ipv6_prefix"] = prefix
    out["load"] = {"before": load_before, "after": conditions.load()}
    out["ec2_calls_during_cycles"] = ec2_calls
    out["waits_for_steady_pool_s"] = waited
    out["nodes"] = described
    return out


def across_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def spread(values: list[float]) -> dict[str, float]:
        return {
            "median": round(statistics.median(values), 3),
            "min": round(min(values), 3),
            "max": round(max(values), 3),
        }

    out: dict[str, Any] = {"runs": len(runs)}
    for family in FAMILIES:
        out[family] = {
            metric: spread([run[family][metric]["median"] for run in runs])
            for metric in ("add_ms", "del_answer_ms", "del_removed_ms")
        }
    out["ratio"] = {key: spread([run["ratio"][key] for run in runs]) for key in runs[0]["ratio"]}
    out["bar"] = {**BAR, "met_in_runs": sum(run["bar"]["met"] for run in runs)}
    return out


def table(result: dict[str, Any]) -> str:
    lines = []
    for index, run in enumerate(result["runs"]):
        lines.append(
            f"run {index + 1} (IPv6 vs IPv4, two daemons), load "
            f"{run['load']['before']['loadavg'][0]} -> {run['load']['after']['loadavg'][0]}"
        )
        for family in FAMILIES:
            row = run[family]
            cpu = row["cpu_us_per_op"]
            answered, gone = row["del_answer_ms"], row["del_removed_ms"]
            lines.append(
                f"  {family}  ADD {row['add_ms']['median']:.2f} ms [{row['add_ms']['min']:.1f}-"
                f"{row['add_ms']['max']:.1f}]  DEL {answered['median']:.2f} ms "
                f"(p90 {answered['p90']:.1f}), veth gone {gone['median']:.2f} ms "
                f"(p90 {gone['p90']:.1f})  "
                f"CPU/op ADD shim {cpu['add']['shim']} + daemon {cpu['add']['daemon']} us"
            )
        bar = run["bar"]
        lines.append(
            f"  ADD p50 ipv6/ipv4 {bar['ratio']}x (bar <= {bar['at_most']}x: "
            f"{'met' if bar['met'] else 'MISSED'}); DEL {run['ratio']['del_answer_ms_p50']}x"
        )
    across = result["across_runs"]
    if across["runs"] > 1:
        lines.append(f"over {across['runs']} runs: median of the runs' medians [their range]")
        for family in FAMILIES:
            row = across[family]
            lines.append(
                f"  {family}  "
                + "; ".join(
                    f"{key} {row[key]['median']} [{row[key]['min']}-{row[key]['max']}]"
                    for key in ("add_ms", "del_answer_ms", "del_removed_ms")
                )
            )
        for key, spread in across["ratio"].items():
            lines.append(f"  {key:18s} {spread['median']}x [{spread['min']}-{spread['max']}]")
        bar = across["bar"]
        lines.append(
            f"  bar ADD p50 <= {bar['at_most']}x: met in {bar['met_in_runs']} of "
            f"{across['runs']} runs"
        )
    return "\n".join(lines)
