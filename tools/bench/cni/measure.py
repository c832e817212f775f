"""One run of the CNI benchmark, and the summaries of its series.

A run: a fresh lab node (an m5.large in the lab's VPC), ``pods`` pod namespaces, ultranet
(``nodes.DaemonNode`` or ``nodes.InProcessNode``) behind the installed shim, and the
reference ``ptp`` + ``host-local`` in the same node, each driven by its own libcni
driver. Warm-up cycles first (not counted), then ``rounds`` rounds; each round runs one
cycle per plugin, the first plugin alternating between rounds. Each ultranet cycle starts
once the daemon reports its warm pool met (outside the clock; the waits are recorded). A
cycle: ADD every pod, then DEL every pod back to back (the next DEL does not wait for the
previous one's veth), then wait until every host veth of the cycle is gone (RTM_DELLINK).

Per DEL two figures: ``del_answer_ms``, the libcni call as the runtime waits for it, and
``del_removed_ms``, until both the answer is in and the host veth is gone (from the DEL's
start). CPU per operation: the plugins the driver exec'd (per call, getrusage of its
children) and, for ultranet, the daemon's CPU over the cycle's ADDs and over its DELs up
to the last veth's removal, divided by the count.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni.install import conflist, install
from tools.bench.cni import conditions
from tools.bench.cni.driver import REFERENCE_PLUGINS, Driver
from tools.bench.cni.nodes import DaemonNode, InProcessNode, UltranetNode
from tools.lab.lab import Lab, LabConfig

SIDES = ("ultranet", "reference")
REFERENCE = {
    "cniVersion": "1.0.0",
    "name": "reference",
    "plugins": [
        {
            "type": "ptp",
            "ipMasq": False,
            "mtu": 9001,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "198.18.0.0/24"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        }
    ],
}


@dataclass(frozen=True, slots=True)
class Options:
    pods: int = 50
    rounds: int = 3
    warmup: int = 3
    backend: str = "daemon"
    python: str | None = None  # the shim's interpreter (None: this one, resolved)
    daemon_env: dict[str, str] = field(default_factory=dict)

    def lab_config(self) -> LabConfig:
        # The daemon grows its pool through EC2 from one launch prefix, as the defaults
        # do; the in-process pool is fixed, so it starts with room for every pod.
        prefixes = 1 if self.backend == "daemon" else 4
        return LabConfig(instance_type="m5.large", prefixes_per_card=prefixes)


@dataclass(slots=True)
class Series:
    """One plugin's samples over a run's counted rounds."""

    add_ms: list[float] = field(default_factory=list)
    del_answer_ms: list[float] = field(default_factory=list)
    del_removed_ms: list[float] = field(default_factory=list)
    del_link_gone_ms: list[float] = field(default_factory=list)
    add_plugin_cpu_us: list[int] = field(default_factory=list)
    del_plugin_cpu_us: list[int] = field(default_factory=list)
    add_daemon_cpu_s: float = 0.0
    del_daemon_cpu_s: float = 0.0


def host_links(result: dict[str, Any]) -> list[str]:
    """The host ends of an ADD result's veths: the interfaces with no sandbox."""
    return [i["name"] for i in result.get("interfaces", []) if not i.get("sandbox")]


def cycle(
    driver: Driver,
    side: str,
    pods: Sequence[str],
    prefix: str,
    series: Series,
    daemon_cpu_s: Callable[[], float] | None,
) -> None:
    links: list[list[str]] = []
    before_add = daemon_cpu_s() if daemon_cpu_s else 0.0
    for i, pod in enumerate(pods):
        answer = driver.call("add", f"{prefix}{i}", f"/run/netns/{pod}")
        if not answer["ok"]:
            raise RuntimeError(f"{side} ADD {prefix}{i} failed: {answer['error']}")
        series.add_ms.append(answer["ms"])
        series.add_plugin_cpu_us.append(answer["cpu_us"])
        links.append(host_links(answer["result"]))
        if not links[-1]:
            raise RuntimeError(f"{side} ADD {prefix}{i}: no host interface in {answer['result']}")
    before_del = daemon_cpu_s() if daemon_cpu_s else 0.0
    answers = []
    for i, pod in enumerate(pods):
        answer = driver.call("del", f"{prefix}{i}", f"/run/netns/{pod}", removes=links[i])
        if not answer["ok"]:
            raise RuntimeError(f"{side} DEL {prefix}{i} failed: {answer['error']}")
        answers.append(answer)
    gone = driver.gone()
    after_del = daemon_cpu_s() if daemon_cpu_s else 0.0
    for answer, names in zip(answers, links, strict=True):
        series.del_answer_ms.append(answer["ms"])
        removed = max(gone[n] for n in names)
        series.del_link_gone_ms.append(removed)
        series.del_removed_ms.append(max(answer["ms"], removed))
        series.del_plugin_cpu_us.append(answer["cpu_us"])
    series.add_daemon_cpu_s += before_del - before_add
    series.del_daemon_cpu_s += after_del - before_del


def distribution(samples: Sequence[float]) -> dict[str, float | int]:
    """Median, p10/p90 and the full range of a series."""
    if len(samples) == 1:
        (only,) = samples
        return {"n": 1, "median": only, "p10": only, "p90": only, "min": only, "max": only}
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return {
        "n": len(samples),
        "median": round(statistics.median(samples), 2),
        "p10": round(deciles[0], 2),
        "p90": round(deciles[8], 2),
        "min": round(min(samples), 2),
        "max": round(max(samples), 2),
    }


def _cpu_per_op(plugin_us: list[int], daemon_s: float, with_daemon: bool) -> dict[str, int]:
    plugins = round(statistics.fmean(plugin_us))
    if not with_daemon:
        return {"plugins": plugins, "total": plugins}
    daemon = round(1e6 * daemon_s / len(plugin_us))
    return {"shim": plugins, "daemon": daemon, "total": plugins + daemon}


def summarize(series: dict[str, Series]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side in SIDES:
        s = series[side]
        ours = side == "ultranet"
        out[side] = {
            "add_ms": distribution(s.add_ms),
            "del_answer_ms": distribution(s.del_answer_ms),
            "del_removed_ms": distribution(s.del_removed_ms),
            "del_link_gone_ms": distribution(s.del_link_gone_ms),
            "cpu_us_per_op": {
                "add": _cpu_per_op(s.add_plugin_cpu_us, s.add_daemon_cpu_s, ours),
                "del": _cpu_per_op(s.del_plugin_cpu_us, s.del_daemon_cpu_s, ours),
            },
        }
    ours, theirs = out["ultranet"], out["reference"]
    ratio = {
        f"{metric}_p50": round(ours[metric]["median"] / theirs[metric]["median"], 2)
        for metric in ("add_ms", "del_answer_ms", "del_removed_ms")
    }
    for op in ("add", "del"):
        ratio[f"{op}_cpu"] = round(
            ours["cpu_us_per_op"][op]["total"] / max(1, theirs["cpu_us_per_op"][op]["total"]), 2
        )
    out["ratio"] = ratio
    return out


def _write_conflists(root: Path, python: str | None) -> tuple[Path, Path, Path]:
    (shim,) = install(root / "bin", None, python=python)
    body = conflist()
    body.pop("cniVersions")  # libcni 1.1 reads cniVersion only
    ours = root / "ultranet.conflist"
    ours.write_text(json.dumps(body))
    reference = json.loads(json.dumps(REFERENCE))
    reference["plugins"][0]["ipam"]["dataDir"] = str(root / "host-local")
    theirs = root / "reference.conflist"
    theirs.write_text(json.dumps(reference))
    return shim, ours, theirs


def run_once(options: Options) -> dict[str, Any]:
    """One run in a fresh lab; its summary, conditions and the ultranet node's config."""
    series = {side: Series() for side in SIDES}
    load_before = conditions.load()
    with Lab(options.lab_config()) as lab, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pods = [lab.create_pod_namespace(f"b{i}") for i in range(options.pods)]
        shim, ours_conf, theirs_conf = _write_conflists(root, options.python)
        node: UltranetNode = (
            DaemonNode(lab, root / "ipamd", options.daemon_env)
            if options.backend == "daemon"
            else InProcessNode(lab, root)
        )
        try:
            ec2_before = lab.cloud.requests.counts()
            with (
                Driver(
                    lab.node_ns, ours_conf, root / "cache-u", [shim.parent], node.shim_env
                ) as ours,
                Driver(lab.node_ns, theirs_conf, root / "cache-r", [REFERENCE_PLUGINS]) as theirs,
            ):
                drivers = {"ultranet": ours, "reference": theirs}
                cpu = {"ultranet": node.cpu_s, "reference": None}
                waited: list[float] = []

                def run_cycle(side: str, some: Sequence[str], prefix: str, into: Series) -> None:
                    if side == "ultranet":
                        waited.append(round(node.wait_steady(), 3))
                    cycle(drivers[side], side, some, prefix, into, cpu[side])

                for side in SIDES:
                    run_cycle(side, pods[: options.warmup], f"w{side[0]}", Series())
                for r in range(options.rounds):
                    for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                        run_cycle(side, pods, f"{side[0]}{r}-", series[side])
            ec2_calls = dict(lab.cloud.requests.counts() - ec2_before)
            described = node.describe()
        finally:
            node.close()
        shim_interpreter = shim.read_text().split("\n", 1)[0][2:].split()[0]
    result = summarize(series)
    result["load"] = {"before": load_before, "after": conditions.load()}
    result["ec2_calls_during_cycles"] = ec2_calls
    # Before each ultranet cycle (warm-up first): seconds until its warm pool was met.
    result["ultranet_waits_for_warm_pool_s"] = waited
    result["ultranet_node"] = described
    result["shim_interpreter"] = conditions.interpreter(shim_interpreter)
    return result


def across_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the runs' medians, with the range of those medians, and
    the full range of the samples of every run."""

    def spread(values: list[float]) -> dict[str, float]:
        return {
            "median": round(statistics.median(values), 2),
            "min": round(min(values), 2),
            "max": round(max(values), 2),
        }

    out: dict[str, Any] = {"runs": len(runs)}
    for side in SIDES:
        out[side] = {}
        for metric in ("add_ms", "del_answer_ms", "del_removed_ms"):
            rows = [run[side][metric] for run in runs]
            out[side][metric] = {
                "run_medians": spread([row["median"] for row in rows]),
                "samples_min": min(row["min"] for row in rows),
                "samples_max": max(row["max"] for row in rows),
            }
        for op in ("add", "del"):
            totals = [run[side]["cpu_us_per_op"][op]["total"] for run in runs]
            out[side][f"{op}_cpu_us_per_op"] = spread(totals)
    out["ratio"] = {key: spread([run["ratio"][key] for run in runs]) for key in runs[0]["ratio"]}
    return out
