"""Crash soak of the CNI teardown through containerd's CRI: ``kill -9`` of ``ultranet-ipamd``
at a random moment of a burst of concurrent StopPodSandbox calls, then what is left.

Why StopPodSandbox and not libcni: it is the call a node makes (the kubelet's, to
containerd), so the DELs come as containerd sends them: after it has stopped the pause
process, one ``loopback`` + ``ultranet`` DEL per sandbox, the sandbox's network namespace
removed by containerd right after a DEL that answered (which takes the pod ends of its
veths with it), and, if the DEL fails, the whole StopPodSandbox fails and the kubelet
calls it again. A libcni driver would choose the order of those things itself.

A trial, on a lab node with the real daemon (shipped defaults, ``ENABLE_MULTI_NIC`` on a
multi-card type), the installed shim, and one Debian containerd:

1. ``pods`` sandboxes are run (``multi_nic`` of them with the multi-NIC annotation, one
   interface per card), retried as the kubelet retries a refused sandbox (11, no free
   address: the pool grows meanwhile);
2. every sandbox's StopPodSandbox is sent at once, one thread each, and the daemon is
   killed with SIGKILL ``uniform(0, window)`` seconds after the first is sent (the seed
   decides);
3. the daemon is restarted and waited for (its spooled DELs replayed, strays swept);
4. the StopPodSandbox calls that failed are sent again (the kubelet's retry), then every
   sandbox is removed (RemovePodSandbox, which sends the DEL once more);
5. left: host ``eni*`` links, host rules 512/1536, /32 routes of the main table, the
   daemon's allocations, spooled DELs, sandboxes: all must be zero.

``python -m tools.bench.cni.crash --trials 10`` runs trials on an m5.large and on a
p5.48xlarge with multi-NIC pods, prints one line per trial with its seed, and writes the
JSON with ``--output``. A trial is reproduced by its seed (the kill instant; the
machine's timing still moves what is in flight then). The short version is in
``tests/lab/test_containerd.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from pyroute2 import IPRoute

from cni.install import install
from cni.plumbing import RULE_FROM_POD, RULE_TO_POD
from cni.spec import MULTI_NIC_ANNOTATION, MULTI_NIC_VALUE
from ipam.client import AsyncIpamClient
from ipam.instance_types import lookup
from tools.lab.containerd import Containerd
from tools.lab.cri.client import RuntimeClient
from tools.lab.daemon import IpamdProcess
from tools.lab.lab import Lab, LabConfig

MULTI_NIC = {MULTI_NIC_ANNOTATION: MULTI_NIC_VALUE}
NO_FREE_ADDRESS = "no free pod address"  # code 11: the kubelet retries RunPodSandbox
RUN_ATTEMPTS = 20


@dataclass
class CrashNode:
    """A lab node with the daemon, the installed shim and containerd."""

    lab: Lab
    daemon: IpamdProcess
    containerd: Containerd
    cri: RuntimeClient

    @property
    def spool(self) -> Path:
        return self.daemon.state_dir / "spool"


@contextmanager
def crash_node(instance_type: str, base: Path) -> Iterator[CrashNode]:
    """A fresh lab of ``instance_type`` (launched with one /28 per card) with the real
    daemon, ``ENABLE_MULTI_NIC`` when it has several cards, and one containerd."""
    bin_dir, conf_dir = base / "bin", base / "net.d"
    with ExitStack() as stack:
        lab = stack.enter_context(Lab(LabConfig(instance_type=instance_type, prefixes_per_card=1)))
        env = {
            "ULTRANET_CNI_SPOOL": str(base / "d" / "spool"),
            "ULTRANET_CNI_CONF_DIR": str(conf_dir),  # written once the warm pool is met
        }
        if len(lookup(instance_type).network_cards) > 1:
            env["ENABLE_MULTI_NIC"] = "true"
        daemon = IpamdProcess(lab, base / "d", env)
        install(
            bin_dir,
            None,
            python=sys.executable,
            socket_path=str(daemon.cni_socket),
            spool_dir=str(daemon.state_dir / "spool"),
        )
        stack.callback(daemon.stop)
        daemon.start()
        daemon.wait_ready(timeout=60)
        daemon.wait_cni_socket()
        containerd = stack.enter_context(
            Containerd(lab.node_ns, base / "containerd", bin_dir, conf_dir)
        )
        cri = stack.enter_context(containerd.client())
        yield CrashNode(lab, daemon, containerd, cri)


@dataclass
class Trial:
    instance_type: str
    seed: int
    pods: int
    multi_nic: int
    interfaces: int  # host veths before the stops
    window_ms: tuple[float, float]  # the kill instant was drawn from this
    kill_after_ms: float  # after the first StopPodSandbox was sent
    stopped_before_kill: int  # StopPodSandbox calls answered before the kill
    stops_failed: int  # answered with an error: sent again after the restart
    spooled: int  # DELs the shim spooled while the daemon was down, replayed at restart
    restart_s: float  # kill to the CNI socket served again
    left: dict[str, list[Any]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not any(self.left.values())


def run_as_the_kubelet(cri: RuntimeClient, name: str, annotations: dict[str, str]) -> str:
    """RunPodSandbox, retried while it is refused 'no free pod address' (11), as the
    kubelet retries it; the pool grows meanwhile. Any other error is raised."""
    for attempt in range(1, RUN_ATTEMPTS + 1):
        try:
            return cri.run_pod_sandbox(name, annotations=annotations)
        except grpc.RpcError as err:
            if NO_FREE_ADDRESS not in str(err.details()) or attempt == RUN_ATTEMPTS:
                raise
        time.sleep(0.05 * attempt)  # the kubelet's back-off, shortened
    raise AssertionError("unreachable")


def held(daemon: IpamdProcess) -> list[str]:
    async def listed() -> list[str]:
        async with AsyncIpamClient(daemon.socket) as client:
            return sorted(a["container_id"] for a in await client.list())

    return asyncio.run(listed())


def leftovers(node: CrashNode) -> dict[str, list[Any]]:
    """What the node holds of pods: eni* links, rules 512/1536, /32 routes in main,
    allocations, spooled DELs, sandboxes."""
    with IPRoute(netns=node.lab.node_ns) as ipr:
        links = sorted(
            str(link.get("ifname"))
            for link in ipr.get_links()
            if str(link.get("ifname")).startswith("eni")
        )
        rules = sorted(
            (r.get("priority"), r.get("src") or r.get("dst"), r.get("table"))
            for r in ipr.get_rules()
            if r.get("priority") in (RULE_TO_POD, RULE_FROM_POD)
        )
        routes = sorted(
            str(r.get("dst")) for r in ipr.get_routes(table=254) if r["dst_len"] in (32, 128)
        )
    return {
        "veths": links,
        "rules": rules,
        "routes": routes,
        "allocations": held(node.daemon),
        "spooled": sorted(p.name for p in node.spool.glob("*.del")),
        "sandboxes": sorted(s.id for s in node.cri.list_pod_sandbox()),
    }


def run_trial(
    node: CrashNode, seed: int, *, pods: int, multi_nic: int, window_s: tuple[float, float]
) -> Trial:
    started = time.monotonic()
    rng = random.Random(seed)
    kill_after = rng.uniform(*window_s)
    names = [f"s{seed}-{i}" for i in range(pods)]
    annotations = [MULTI_NIC if i < multi_nic else {} for i in range(pods)]
    with ThreadPoolExecutor(8) as pool:
        sandboxes = list(
            pool.map(lambda n, a: run_as_the_kubelet(node.cri, n, a), names, annotations)
        )
    interfaces = len(leftovers(node)["veths"])
    answered: list[float] = []
    failed: list[str] = []
    lock = threading.Lock()
    go = threading.Event()

    def stop(sandbox: str) -> None:
        go.wait()
        try:
            node.cri.stop_pod_sandbox(sandbox)
        except grpc.RpcError:
            with lock:
                failed.append(sandbox)
        else:
            with lock:
                answered.append(time.monotonic())

    threads = [threading.Thread(target=stop, args=(s,)) for s in sandboxes]
    for thread in threads:
        thread.start()
    first = time.monotonic()
    go.set()
    time.sleep(kill_after)  # the random instant is the point: not a stand-in for a wait
    killed_at = time.monotonic()
    node.daemon.kill()
    for thread in threads:
        thread.join()
    spool_after_kill = {p.name for p in node.spool.glob("*.del")}
    node.daemon.start()
    node.daemon.wait_ready(timeout=60)
    node.daemon.wait_cni_socket()  # spooled DELs replayed, strays swept
    restart_s = time.monotonic() - killed_at
    for sandbox in failed:  # the kubelet calls StopPodSandbox again
        node.cri.stop_pod_sandbox(sandbox)
    for sandbox in sandboxes:
        node.cri.remove_pod_sandbox(sandbox)
    return Trial(
        instance_type=node.lab.config.instance_type,
        seed=seed,
        pods=pods,
        multi_nic=multi_nic,
        interfaces=interfaces,
        window_ms=(round(window_s[0] * 1000), round(window_s[1] * 1000)),
        kill_after_ms=round((killed_at - first) * 1000, 1),
        stopped_before_kill=sum(1 for t in answered if t < killed_at),
        stops_failed=len(failed),
        spooled=len(spool_after_kill),
        restart_s=round(restart_s, 2),
        left=leftovers(node),
        seconds=round(time.monotonic() - started, 1),
    )


def calibrate(node: CrashNode, *, pods: int, multi_nic: int) -> tuple[float, float]:
    """When the StopPodSandbox calls of a burst answer on this node, no kill: (first,
    last) in seconds after the burst is sent. containerd stops every pause process before
    it sends a DEL, so on a busy node the DELs start hundreds of ms into the burst."""
    names = [f"calibrate-{i}" for i in range(pods)]
    annotations = [MULTI_NIC if i < multi_nic else {} for i in range(pods)]
    with ThreadPoolExecutor(8) as pool:
        sandboxes = list(
            pool.map(lambda n, a: run_as_the_kubelet(node.cri, n, a), names, annotations)
        )
    go = threading.Event()
    answered: list[float] = []

    def stop(sandbox: str) -> None:
        go.wait()
        node.cri.stop_pod_sandbox(sandbox)
        answered.append(time.monotonic())

    with ThreadPoolExecutor(len(sandboxes)) as pool:
        stops = [pool.submit(stop, s) for s in sandboxes]
        first = time.monotonic()
        go.set()
        for done in stops:
            done.result()
    for sandbox in sandboxes:
        node.cri.remove_pod_sandbox(sandbox)
    return min(answered) - first, max(answered) - first


def kill_window(first: float, last: float) -> tuple[float, float]:
    """The kill instants are drawn from: half the first StopPodSandbox answer of the
    calibration burst (its DELs were being sent then) to 1.1x its last."""
    return first / 2, last * 1.1


def soak(
    instance_type: str,
    seeds: Sequence[int],
    *,
    pods: int,
    multi_nic: int,
    window_s: tuple[float, float] | None = None,
    report: Callable[[Trial], None] = lambda trial: None,
) -> list[Trial]:
    """Trials on one fresh node of ``instance_type``, one per seed; the kill falls in
    ``window_s`` (seconds after the burst is sent), or in one calibrated on the node."""
    trials = []
    with (
        tempfile.TemporaryDirectory(prefix="ul-crash-") as tmp,
        crash_node(instance_type, Path(tmp)) as node,
    ):
        if window_s is None:
            window_s = kill_window(*calibrate(node, pods=pods, multi_nic=multi_nic))
        for seed in seeds:
            trial = run_trial(node, seed, pods=pods, multi_nic=multi_nic, window_s=window_s)
            report(trial)
            trials.append(trial)
    return trials


def describe(trial: Trial) -> str:
    left = {k: len(v) for k, v in trial.left.items() if v}
    return (
        f"{trial.instance_type} seed {trial.seed}: {trial.pods} pods ({trial.multi_nic} "
        f"multi-NIC, {trial.interfaces} veths), kill at {trial.kill_after_ms} ms (drawn "
        f"from {trial.window_ms[0]}-{trial.window_ms[1]}) after the first stop, "
        f"{trial.stopped_before_kill} stops answered before it, "
        f"{trial.stops_failed} failed, {trial.spooled} DELs spooled, restart "
        f"{trial.restart_s} s; left: {left or 'nothing'} ({trial.seconds} s)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench.cni.crash",
        description="kill -9 ultranet-ipamd during concurrent StopPodSandbox calls through "
        "containerd's CRI, restart it, retry the failed stops, remove the sandboxes, and "
        "count what is left (root; the lab)",
    )
    parser.add_argument("--trials", type=int, default=10, help="per instance type")
    parser.add_argument("--seed", type=int, help="the first trial's seed (default: random)")
    parser.add_argument("--pods", type=int, default=30)
    parser.add_argument(
        "--multi-nic", type=int, default=6, help="multi-NIC pods among them on a multi-card type"
    )
    parser.add_argument(
        "--window-ms",
        type=float,
        nargs=2,
        help="the kill falls uniformly in [LOW, HIGH) ms after the burst (default: from "
        "half the first to 1.1x the last StopPodSandbox answer of a calibration burst)",
    )
    parser.add_argument(
        "--instance-type",
        action="append",
        help="m5.large and p5.48xlarge unless given (repeatable)",
    )
    parser.add_argument("--output", type=Path, help="write the JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    first = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    seeds = [first + i for i in range(args.trials)]
    print(f"seeds {seeds[0]}..{seeds[-1]}", flush=True)
    types = args.instance_type or ["m5.large", "p5.48xlarge"]
    results: list[Trial] = []
    started = time.time()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    for instance_type in types:
        cards = len(lookup(instance_type).network_cards)
        results += soak(
            instance_type,
            seeds,
            pods=args.pods,
            multi_nic=args.multi_nic if cards > 1 else 0,
            window_s=None
            if args.window_ms is None
            else (args.window_ms[0] / 1000, args.window_ms[1] / 1000),
            report=lambda trial: print(describe(trial), flush=True),
        )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    summary = {
        "config": {
            "argv": sys.argv,
            "seeds": seeds,
            "pods": args.pods,
            "multi_nic": args.multi_nic,
            "window_ms": args.window_ms,
            "instance_types": types,
            "git_commit": subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip(),
            "dirty_paths": [line[3:] for line in dirty if line],
            "python": platform.python_version(),
            "load_before": load_before,
            "load_after": Path("/proc/loadavg").read_text().split()[:3],
            "seconds": round(time.time() - started, 1),
        },
        "trials": [{**asdict(t), "clean": t.clean} for t in results],
        "clean": sum(t.clean for t in results),
        "total": len(results),
    }
    print(f"{summary['clean']} of {summary['total']} trials left nothing behind")
    if args.output is not None:
        args.output.write_text(json.dumps(summary, indent=2, default=str))
    return 0 if summary["clean"] == summary["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
