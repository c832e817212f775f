"""One run of the CNI benchmark through containerd's CRI, and the summaries of its series.

A run: a fresh lab node (an m5.large), the real ``ultranet-ipamd`` with the shipped
defaults (``nodes.DaemonNode``), and one Debian containerd (``tools.lab.containerd``) in
the node with two runtime handlers, both runc: ``ultranet`` reads its network from a conf
dir holding ultranet's conflist, ``reference`` from one holding ptp + host-local
(containerd's per-runtime ``cni_conf_dir``). Pods are started with the handler of the side
being measured, as the kubelet does for a pod with a RuntimeClass; everything else (image,
snapshotter, runc, containerd itself) is shared.

Warm-up cycles first (not counted), then ``rounds`` rounds of one cycle per side, the
first side alternating between rounds. A cycle: RunPodSandbox for every pod, then
StopPodSandbox and RemovePodSandbox for each, one call in flight. Each ultranet cycle
starts once the daemon reports its warm pool met (outside the clock).

Per call: its wall time as the CRI client waits for it, and containerd's own network
timer read around it from ``/v1/metrics``: with one call in flight, the change of the
histogram's ``_sum`` is that call's CNI ADD (``containerd_cri_sandbox_create_network_
seconds``) or DEL (``..._delete_network_seconds``) exactly, and its ``_count`` must
change by one (checked). CPU per operation: containerd with the children it reaped (the
CNI plugins it exec'd, the runc shims' start commands) and, for ultranet, the daemon,
over a cycle's RunPodSandbox calls and over its Stop + Remove calls, divided by the
count; the metrics scrapes between calls are inside containerd's figure on both sides.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni.install import conflist, install
from tools.bench.cni import conditions
from tools.bench.cni.driver import REFERENCE_PLUGINS
from tools.bench.cni.measure import REFERENCE, SIDES, Options, distribution
from tools.bench.cni.nodes import DaemonNode
from tools.demo.services import scrape
from tools.lab.containerd import Containerd
from tools.lab.cri.client import RuntimeClient
from tools.lab.lab import Lab

METRICS_ADDRESS = "127.0.0.1:1338"  # containerd's metrics listener, in the node namespace
NETWORK_TIMERS = {
    "add": "containerd_cri_sandbox_create_network_seconds",
    "del": "containerd_cri_sandbox_delete_network_seconds",
}
METRICS = ("run_ms", "cni_add_ms", "stop_ms", "cni_del_ms", "remove_ms", "cni_del_remove_ms")
# The bars: ultranet / reference of the medians, at most.
BARS = {"cni_add_ms": 1.1, "cni_del_ms": 0.8, "run_ms": 1.05}


@dataclass(slots=True)
class CriSeries:
    """One side's samples over a run's counted rounds."""

    run_ms: list[float] = field(default_factory=list)
    cni_add_ms: list[float] = field(default_factory=list)
    stop_ms: list[float] = field(default_factory=list)
    cni_del_ms: list[float] = field(default_factory=list)
    remove_ms: list[float] = field(default_factory=list)
    # containerd's RemovePodSandbox stops the sandbox again, which sends one more CNI DEL
    # (the namespace gone: CNI_NETNS empty, no cached result): its delete_network timer.
    cni_del_remove_ms: list[float] = field(default_factory=list)
    add_containerd_cpu_s: float = 0.0
    del_containerd_cpu_s: float = 0.0
    add_daemon_cpu_s: float = 0.0
    del_daemon_cpu_s: float = 0.0


def process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and of the children it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class Timers:
    """containerd's network histograms, read between calls."""

    def __init__(self, node_ns: str) -> None:
        self.node_ns = node_ns

    def read(self) -> dict[str, tuple[float, int]]:
        totals = scrape(self.node_ns, METRICS_ADDRESS, "/v1/metrics", "containerd")
        return {
            op: (totals.get(f"{name}_sum", 0.0), int(totals.get(f"{name}_count", 0)))
            for op, name in NETWORK_TIMERS.items()
        }

    def timed(self, op: str, call: Callable[[], Any]) -> tuple[Any, float, float]:
        """``call()``'s answer, its wall ms and containerd's ``op`` network ms inside it."""
        before = self.read()[op]
        begun = time.perf_counter()
        answer = call()
        wall = (time.perf_counter() - begun) * 1000
        after = self.read()[op]
        if after[1] - before[1] != 1:
            raise RuntimeError(f"containerd counted {after[1] - before[1]} network {op}s in a call")
        return answer, wall, (after[0] - before[0]) * 1000


def cycle(
    client: RuntimeClient,
    timers: Timers,
    side: str,
    prefix: str,
    pods: int,
    into: CriSeries,
    containerd_cpu_s: Callable[[], float],
    daemon_cpu_s: Callable[[], float] | None,
) -> None:
    def cpu() -> tuple[float, float]:
        return containerd_cpu_s(), daemon_cpu_s() if daemon_cpu_s else 0.0

    sandboxes = []
    start = cpu()
    for i in range(pods):

        def run(name: str = f"{prefix}{i}") -> str:
            return client.run_pod_sandbox(name, runtime_handler=side)

        sandbox, wall, network = timers.timed("add", run)
        sandboxes.append(sandbox)
        into.run_ms.append(wall)
        into.cni_add_ms.append(network)
    added = cpu()
    _check_plugin(client, side, sandboxes[0])
    checked = cpu()
    for sandbox in sandboxes:

        def stop(sandbox_id: str = sandbox) -> None:
            client.stop_pod_sandbox(sandbox_id)

        _, wall, network = timers.timed("del", stop)
        into.stop_ms.append(wall)
        into.cni_del_ms.append(network)

        def remove(sandbox_id: str = sandbox) -> None:
            client.remove_pod_sandbox(sandbox_id)

        _, wall, network = timers.timed("del", remove)
        into.remove_ms.append(wall)
        into.cni_del_remove_ms.append(network)
    deleted = cpu()
    into.add_containerd_cpu_s += added[0] - start[0]
    into.del_containerd_cpu_s += deleted[0] - checked[0]
    into.add_daemon_cpu_s += added[1] - start[1]
    into.del_daemon_cpu_s += deleted[1] - checked[1]


HOST_VETH_PREFIX = {"ultranet": "eni", "reference": "veth"}  # ptp names its host end veth*


def _check_plugin(client: RuntimeClient, side: str, sandbox: str) -> None:
    """That containerd ran this side's plugin for the sandbox (its runtime handler's conf
    dir, not the default's): the host veth in the CNI result it recorded is that plugin's."""
    interfaces = client.sandbox_info(sandbox).get("cniResult", {}).get("Interfaces") or {}
    hosts = [name for name, config in interfaces.items() if not config.get("Sandbox")]
    hosts = [name for name in hosts if name != "lo"]
    if not hosts or not all(h.startswith(HOST_VETH_PREFIX[side]) for h in hosts):
        raise RuntimeError(f"{side} sandbox {sandbox}: host interfaces {hosts}, not its plugin's")


def summarize(series: dict[str, CriSeries]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side in SIDES:
        s = series[side]
        row: dict[str, Any] = {m: distribution(getattr(s, m)) for m in METRICS}
        count = len(s.run_ms)
        cpu: dict[str, dict[str, int]] = {}
        for op in ("add", "del"):
            runtime = round(1e6 * getattr(s, f"{op}_containerd_cpu_s") / count)
            daemon = round(1e6 * getattr(s, f"{op}_daemon_cpu_s") / count)
            cpu[op] = {"containerd": runtime, "total": runtime + daemon}
            if side == "ultranet":
                cpu[op]["daemon"] = daemon
        row["cpu_us_per_op"] = cpu
        out[side] = row
    ours, theirs = out["ultranet"], out["reference"]
    ratio = {
        f"{m}_p50": round(ours[m]["median"] / theirs[m]["median"], 2)
        for m in METRICS
        if theirs[m]["median"] > 0
    }
    for op in ("add", "del"):
        ratio[f"{op}_cpu"] = round(
            ours["cpu_us_per_op"][op]["total"] / max(1, theirs["cpu_us_per_op"][op]["total"]), 2
        )
    out["ratio"] = ratio
    out["bars"] = {
        f"{m}_p50": {"at_most": bar, "ratio": ratio[f"{m}_p50"], "met": ratio[f"{m}_p50"] <= bar}
        for m, bar in BARS.items()
    }
    return out


def _write_cni(root: Path, python: str | None, shim_env: dict[str, str]) -> dict[str, Path]:
    """bin dir (ultranet's shim, Debian's ptp, host-local and loopback) and one conf dir per
    side; returns {"bin": ..., "shim": ..., side: conf dir}."""
    bin_dir = root / "cni" / "bin"
    (shim,) = install(
        bin_dir,
        None,
        python=python,
        socket_path=shim_env["ULTRANET_CNI_SOCKET"],
        spool_dir=shim_env["ULTRANET_CNI_SPOOL"],
    )
    for plugin in ("ptp", "host-local", "loopback"):
        (bin_dir / plugin).symlink_to(REFERENCE_PLUGINS / plugin)
    ours = conflist()
    ours.pop("cniVersions")  # containerd 1.6's libcni 1.1 reads cniVersion only
    theirs = json.loads(json.dumps(REFERENCE))
    theirs["plugins"][0]["ipam"]["dataDir"] = str(root / "host-local")
    dirs = {"bin": bin_dir, "shim": shim}
    for side, body in (("ultranet", ours), ("reference", theirs)):
        conf_dir = root / "cni" / side
        conf_dir.mkdir(parents=True)
        (conf_dir / f"10-{side}.conflist").write_text(json.dumps(body))
        dirs[side] = conf_dir
    return dirs


def run_once(options: Options) -> dict[str, Any]:
    """One run in a fresh lab with one containerd; its summary and conditions."""
    series = {side: CriSeries() for side in SIDES}
    load_before = conditions.load()
    with Lab(options.lab_config()) as lab, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        node = DaemonNode(lab, root / "ipamd", options.daemon_env)
        try:
            dirs = _write_cni(root, options.python, node.shim_env)
            containerd = Containerd(
                lab.node_ns,
                root / "containerd",
                dirs["bin"],
                dirs["ultranet"],
                metrics_address=METRICS_ADDRESS,
                runtime_cni_conf_dirs={side: dirs[side] for side in SIDES},
            )
            with containerd, containerd.client(timeout=60) as client:
                version = client.version()
                assert containerd.process is not None
                pid = containerd.process.pid
                timers = Timers(lab.node_ns)
                waited: list[float] = []
                ec2_before = lab.cloud.requests.counts()

                def run_cycle(side: str, pods: int, prefix: str, into: CriSeries) -> None:
                    ours = side == "ultranet"
                    if ours:
                        waited.append(round(node.wait_steady(), 3))
                    daemon = node.cpu_s if ours else None
                    containerd_cpu = lambda: process_tree_cpu_s(pid)  # noqa: E731
                    cycle(client, timers, side, prefix, pods, into, containerd_cpu, daemon)

                for side in SIDES:
                    run_cycle(side, options.warmup, f"w{side[0]}-", CriSeries())
                for r in range(options.rounds):
                    for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                        run_cycle(side, options.pods, f"{side[0]}{r}-", series[side])
                ec2_calls = dict(lab.cloud.requests.counts() - ec2_before)
            left = containerd.left_behind()
            if left:
                raise RuntimeError(f"containerd left behind: {left}")
            described = node.describe()
            shim_interpreter = dirs["shim"].read_text().split("\n", 1)[0][2:].split()[0]
        finally:
            node.close()
    result = summarize(series)
    result["shim_interpreter"] = conditions.interpreter(shim_interpreter)
    result["load"] = {"before": load_before, "after": conditions.load()}
    result["ec2_calls_during_cycles"] = ec2_calls
    result["ultranet_waits_for_warm_pool_s"] = waited
    result["ultranet_node"] = described
    result["containerd"] = {
        "runtime": f"{version.runtime_name} {version.runtime_version}",
        "cri_api": version.runtime_api_version,
        "config": containerd.config(),
    }
    return result


def across_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the runs' medians, their range, and all samples' range."""

    def spread(values: list[float]) -> dict[str, float]:
        return {
            "median": round(statistics.median(values), 2),
            "min": round(min(values), 2),
            "max": round(max(values), 2),
        }

    out: dict[str, Any] = {"runs": len(runs)}
    for side in SIDES:
        out[side] = {}
        for metric in METRICS:
            rows = [run[side][metric] for run in runs]
            out[side][metric] = {
                "run_medians": spread([row["median"] for row in rows]),
                "run_p90s": spread([row["p90"] for row in rows]),
                "samples_min": min(row["min"] for row in rows),
                "samples_max": max(row["max"] for row in rows),
            }
        for op in ("add", "del"):
            totals = [run[side]["cpu_us_per_op"][op]["total"] for run in runs]
            out[side][f"{op}_cpu_us_per_op"] = spread(totals)
    out["ratio"] = {key: spread([run["ratio"][key] for run in runs]) for key in runs[0]["ratio"]}
    return out
