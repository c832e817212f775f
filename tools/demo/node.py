"""The root half of ``make demo``: a lab node running ultranet, pods and all.

Pods start through containerd's CRI in the node (``tools/demo/runtime.py``); where
containerd cannot start, the demo prints why and starts them through the libcni driver.

Every step registers its undo on one ``ExitStack`` before it starts what it undoes, so
the lab's namespaces, the processes (ultranet-ipamd, ultranet-dns, the upstream,
containerd with its shims and sandboxes, or the libcni driver and the shims it execs) and
the temporary directory are removed on success, on failure and on Ctrl-C (SIGTERM is
treated as Ctrl-C). Clean-up itself ignores both signals, so a second Ctrl-C cannot cut
it short, and it ends by checking that nothing is left: no namespace of the lab, no
process of ours, no containerd shim, mount, sandbox namespace file or libcni cache entry,
no temp dir.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from tools.demo.progress import DemoError, Progress, Step
from tools.demo.runtime import CriPods, LibcniPods, Pod, RuntimeUnavailable, build_driver
from tools.demo.services import (
    NODE_LOCAL_ADDRESS,
    Answer,
    Child,
    NodeDns,
    Upstream,
    dig_from_pod,
    host_name,
    query_from_pod,
)

if TYPE_CHECKING:
    from tools.demo.node6 import Ipv6Report
    from tools.lab.daemon import IpamdProcess

NODE_STEPS = 11  # the IPv4 node's steps run_node shows; the planner adds one


@dataclass(frozen=True, slots=True)
class Options:
    instance_type: str = "p5.48xlarge"
    prefixes_per_card: int = 1
    pods: int = 100
    multi_nic: int = 10
    queries_per_pod: int = 5
    fail_at: str | None = None
    containerd: str = "containerd"  # the binary; one that cannot start means libcni
    ipv6_pods: int = 3  # on the IPv6 node; 0: no IPv6 node


def node_steps(options: Options) -> int:
    """How many steps run_node shows."""
    from tools.demo.node6 import IPV6_STEPS

    return NODE_STEPS + (IPV6_STEPS if options.ipv6_pods else 0)


@dataclass(frozen=True, slots=True)
class Card:
    enis: int
    kinds: str
    prefixes: tuple[IPv4Network, ...]


@dataclass(slots=True)
class Report:
    """What the summary prints, gathered as the steps run."""

    lab_ids: list[str] = field(default_factory=list)  # the IPv4 node's, then the IPv6 node's
    runtime: str = ""  # CriPods.label or LibcniPods.label
    runtime_calls: tuple[str, str] = ("", "")  # the ADD and DEL calls timed
    fallback_reason: str = ""  # why not containerd, when the pods went through libcni
    network_timers: dict[str, tuple[float, int]] = field(default_factory=dict)
    pods: list[Pod] = field(default_factory=list)
    cards_at_launch: dict[int, Card] = field(default_factory=dict)
    cards_now: dict[int, Card] = field(default_factory=dict)
    nau_at_launch: int = 0
    nau_now: int = 0
    nau_quota: int = 0
    ec2_calls: Counter[str] = field(default_factory=Counter)
    answers: list[Answer] = field(default_factory=list)
    dns_metrics: dict[str, float] = field(default_factory=dict)
    dns_names: int = 0
    warm_settled: bool = True
    left_behind: list[str] = field(default_factory=list)
    # What leftovers() checks, filled in as things are made.
    sessions: list[int] = field(default_factory=list)  # our children that lead a session
    tmp: Path | None = None
    runtime_left_behind: list[Callable[[], list[str]]] = field(default_factory=list)
    ipv6: Ipv6Report | None = None  # the IPv6 node's part, when it runs


def prerequisites() -> None:
    """The tools every run needs; errors name the Debian packages."""
    missing = [
        pkg
        for tool, pkg in (("ip", "iproute2"), ("iptables", "iptables"))
        if shutil.which(tool) is None
    ]
    if missing:
        raise DemoError(f"needs Debian packages: {' '.join(missing)} (make demo installs them)")


def run_node(options: Options, progress: Progress) -> Report:
    report = Report()
    stack = ExitStack()
    previous_int = signal.getsignal(signal.SIGINT)
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        try:
            _steps(options, progress, stack, report)
            labs = "the labs" if options.ipv6_pods else "the lab"
            with progress.step("teardown", f"stopping everything, removing {labs}") as step:
                _quiet_signals()
                stack.close()
                report.left_behind = leftovers(report)
                checked = "nothing (checked: lab namespaces, our processes, the temp dir" + (
                    ", containerd's shims, mounts, pause processes, sandbox namespace "
                    "files and libcni cache entries)"
                    if report.runtime_left_behind
                    else ")"
                )
                step.note(f"left behind: {', '.join(report.left_behind) or checked}")
        except BaseException:
            _quiet_signals()
            what = "interrupted" if sys.exc_info()[0] is KeyboardInterrupt else "failed"
            progress.out.write(f"demo {what}: cleaning up ...")
            progress.out.flush()
            begun = time.perf_counter()
            try:
                stack.close()  # a no-op for what the teardown step already closed
            finally:
                report.left_behind = leftovers(report)
                progress.out.write(
                    f" done ({time.perf_counter() - begun:.2f} s); left behind: "
                    f"{', '.join(report.left_behind) or 'nothing'}\n"
                )
            raise
        if report.left_behind:
            raise DemoError(f"clean-up left {', '.join(report.left_behind)}")
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    return report


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held back (delivered on exit) while the lab creates namespaces.

    pyroute2's ``netns.create`` forks a Python child; a Ctrl-C reaches the whole process
    group, so that child would raise KeyboardInterrupt inside a copy of this program and
    run its clean-up too. Blocked here, the signal stays pending in the child, which
    exits without seeing it, and reaches this process when the block is lifted.
    """
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _quiet_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def leftovers(report: Report) -> list[str]:
    from tools.lab import netns

    found = []
    for lab_id in report.lab_ids:
        mine = [n for n in netns.list_lab_namespaces() if n.startswith(f"ul-{lab_id}-")]
        if mine:
            found.append(f"{len(mine)} namespaces ({', '.join(mine[:3])})")
    sessions = set(report.sessions)
    for pid, ppid, sid, cmd in _processes():
        if ppid == os.getpid() or sid in sessions:
            found.append(f"process {pid} ({cmd})")
    for runtime_left_behind in report.runtime_left_behind:
        found += runtime_left_behind()
    for pod in [*report.pods, *(report.ipv6.pods if report.ipv6 else [])]:
        if pod.pid and Path(f"/proc/{pod.pid}").exists():
            found.append(f"pause process {pod.pid} of {pod.name}")
    if report.tmp is not None and report.tmp.exists():
        found.append(f"temp dir {report.tmp}")
    return found


def _processes() -> Iterator[tuple[int, int, int, str]]:
    """(pid, ppid, session, command) of every live process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        command, _, rest = stat.rpartition(")")
        fields = rest.split()
        if fields[0] in ("Z", "X"):
            continue
        yield int(entry.name), int(fields[1]), int(fields[3]), command.partition("(")[2]


def _steps(options: Options, progress: Progress, stack: ExitStack, report: Report) -> None:
    from tools.lab.lab import Lab, LabConfig

    with progress.step("build", "checking tools (iproute2, iptables)"):
        prerequisites()

    tmp = Path(tempfile.mkdtemp(prefix="ultranet-demo-"))
    report.tmp = tmp
    stack.callback(shutil.rmtree, tmp, ignore_errors=True)

    config = LabConfig(
        instance_type=options.instance_type, prefixes_per_card=options.prefixes_per_card
    )
    with progress.step(
        "lab",
        f"lab up: VPC, {options.instance_type} launched with {options.prefixes_per_card}"
        " /28 per card, vpc + node namespaces",
    ) as step:
        lab = Lab(config)
        report.lab_ids.append(lab.lab_id)
        stack.callback(lab.close)  # idempotent, and safe on a half-started lab
        with signals_held():
            lab.start()
        report.cards_at_launch = cards(lab)
        report.nau_at_launch = lab.cloud.nau_used(lab.vpc_id)
        report.nau_quota = lab.cloud.nau_quota(lab.vpc_id)
        step.note(
            f"lab {lab.lab_id}: namespaces {lab.vpc_ns}, {lab.node_ns}; "
            f"instance {lab.instance_id}, {len(report.cards_at_launch)} network cards"
        )

    with progress.step("imds", "the node reads itself from IMDSv2 (169.254.169.254)") as step:
        seen = lab.node_exec([sys.executable, "-m", "ipam.imds"], timeout=60)
        imds = json.loads(seen.stdout)
        identity, interfaces = imds["identity"], imds["interfaces"]
        prefixes = sum(len(i["ipv4_prefixes"]) for i in interfaces)
        step.note(
            f"{identity['instance_id']} {identity['instance_type']} in "
            f"{identity['availability_zone']}: {len(interfaces)} interfaces on "
            f"{len({i['network_card'] for i in interfaces})} cards, {prefixes} /28 prefixes "
            f"({imds['imds_requests']} IMDS requests)"
        )

    with progress.step("ipamd", "ultranet-ipamd up in the node (ENABLE_MULTI_NIC=true)") as step:
        daemon, cni_env = start_ipamd(
            lab, tmp / "ipamd", {"ENABLE_MULTI_NIC": "true"}, stack, report
        )
        status = daemon.wait_ready(timeout=60)
        managed = status.get("cards")
        count = len(managed) if isinstance(managed, list) else "?"
        source = (
            "after EC2 calls"
            if status.get("ec2_used")
            else "from IMDS alone (0 EC2 calls"
            + (", boto3 not even imported)" if not status.get("boto3_loaded") else ")")
        )
        step.note(
            f"ready in {float(str(status.get('ready_after_s', 0))):.2f} s {source}; "
            f"managing {count} network cards"
        )
        daemon.wait_cni_socket()  # as on a node: no conflist before the CNI socket answers
        shim, bin_dir, conf_dir, conf = install_cni(tmp / "cni", cni_env)
        step.note(f"CNI: shim {shim} (#!{shim.read_text().split(chr(10), 1)[0][2:]})")

    with progress.step("dns", "DNS: lab upstream + ultranet-dns node-local on the node") as step:
        records = {host_name(str(a)): str(a) for e in _enis(lab) for a in e.addresses[:1]}
        report.dns_names = len(records)
        upstream = Upstream(lab.node_ns, records, tmp / "upstream.log")
        stack.callback(upstream.stop)
        upstream.start()
        _session(upstream, report)
        workers = min(2, os.cpu_count() or 1)
        port = upstream.wait_ready()
        dns = NodeDns(lab.node_ns, f"127.0.0.1:{port}", workers, tmp)
        stack.callback(dns.stop)
        dns.start()
        _session(dns, report)
        dns.wait_ready()
        step.note(
            f"upstream (the VPC resolver's part): 127.0.0.1:{port} in the node, "
            f"{len(records)} names under us-west-2.compute.internal"
        )
        step.note(
            f"ultranet-dns: {workers} workers on {NODE_LOCAL_ADDRESS}:53 (its bridge + NOTRACK "
            f"rules), metrics {dns.metrics} in the node"
        )

    with progress.step(
        "containerd", "container runtime: containerd with its CRI plugin in the node"
    ) as step:
        runtime = start_runtime(
            lab, tmp, (bin_dir, conf_dir, conf), cni_env, options.containerd, stack, report, step
        )
        report.runtime = runtime.label
        report.runtime_calls = (runtime.add_call, runtime.del_call)

    multi = multi_nic_indexes(options.pods, options.multi_nic)
    how = (
        "RunPodSandbox via containerd CRI"
        if isinstance(runtime, CriPods)
        else "netns + CNI ADD via libcni (FALLBACK, containerd could not start)"
    )
    with progress.step("pods", f"{options.pods} pods ({len(multi)} multi-NIC): {how}") as step:
        for i in range(options.pods):
            pod = Pod(i, i in multi)
            report.pods.append(pod)
            try:
                runtime.add(pod)
            except DemoError as err:
                raise DemoError(f"{err}\nultranet-ipamd log:\n{daemon.log_tail()}") from err
            step.count(i + 1, options.pods, f"last {pod.add_ms:.0f} ms")
        singles = options.pods - len(multi)
        per_multi = len(report.pods[min(multi)].addresses) if multi else 0
        step.note(
            f"{singles} single-NIC pods: 1 address each; {len(multi)} multi-NIC pods: "
            f"{per_multi} each (one per managed card)"
        )
        retried = [p for p in report.pods if p.failures]
        if retried:
            failed = sum(len(p.failures) for p in retried)
            who = ", ".join(p.name for p in retried)
            step.note(
                f"{failed} failed ADD{'s' if failed > 1 else ''} ({who}) retried as the kubelet "
                f"does (back-off, then again); first error: {retried[0].failures[0]}"
            )

    with progress.step("warm", "ultranet-ipamd refills its warm pools through EC2") as step:
        report.warm_settled = wait_warm(daemon.socket, timeout=45, step=step)
        report.cards_now = cards(lab)
        report.nau_now = lab.cloud.nau_used(lab.vpc_id)
        report.ec2_calls = lab.cloud.requests.counts()
        calls = ", ".join(f"{a} {n}" for a, n in report.ec2_calls.most_common())
        step.note(f"EC2 calls: {sum(report.ec2_calls.values())} ({calls or 'none'})")
        if not report.warm_settled:
            step.note("warm pools still filling after 45 s; the figures below are as of now")

    with progress.step(
        "queries",
        f"pods resolve names: {options.queries_per_pod} each through {NODE_LOCAL_ADDRESS}",
    ) as step:
        names = sorted(records)
        for n, pod in enumerate(report.pods):
            wanted = [
                names[(pod.index * 7 + j * 3) % len(names)] for j in range(options.queries_per_pod)
            ]
            answers = query_from_pod(pod.ns, NODE_LOCAL_ADDRESS, wanted)
            for a in answers:
                if a.rcode != "NOERROR" or a.addresses != (records[a.name],):
                    raise DemoError(f"{pod.name} asked {a.name}: {a.rcode} {a.addresses}")
            report.answers += answers
            step.count(n + 1, len(report.pods))
        sample = names[0]
        dug = dig_from_pod(report.pods[0].ns, sample)
        if dug is not None:
            step.note(f"dig @{NODE_LOCAL_ADDRESS} {sample.rstrip('.')} from pod-000: {dug}")
            if dug != records[sample]:
                raise DemoError(f"dig answered {dug!r}, expected {records[sample]}")
        report.dns_metrics = dns.scrape()
        step.note(
            f"{len(report.answers)} answers, all NOERROR with the right address; client-side "
            f"p50 {median([a.ms for a in report.answers]):.2f} ms"
        )

    how = (
        "StopPodSandbox (CNI DEL) + RemovePodSandbox via containerd CRI"
        if isinstance(runtime, CriPods)
        else "CNI DEL via libcni (FALLBACK)"
    )
    with progress.step("del", f"{options.pods} pods stop: {how}") as step:
        for n, pod in enumerate(report.pods):
            runtime.delete(pod)
            step.count(n + 1, len(report.pods))
        report.network_timers = runtime.network_timers()
        held = asyncio.run(_allocations(daemon.socket))
        step.note(f"ultranet-ipamd holds {held} allocations after DEL")
        if held:
            raise DemoError(f"ultranet-ipamd still holds {held} allocations after every DEL")

    if options.ipv6_pods:
        from tools.demo.node6 import run_ipv6_node

        run_ipv6_node(options, progress, stack, report, tmp / "ipv6")


def _libcni(
    lab: Any, conf: Path, tmp: Path, bin_dir: Path, cni_env: dict[str, str], stack: ExitStack
) -> LibcniPods:
    from tools.bench.cni.driver import Driver

    driver_binary = build_driver()
    driver = Driver(lab.node_ns, conf, tmp / "cni" / "cache", [bin_dir], cni_env)
    stack.callback(_close_driver, driver)

    def make_namespace(suffix: str) -> str:
        with signals_held():
            name: str = lab.create_pod_namespace(suffix)
        return name

    return LibcniPods(driver, driver_binary, make_namespace)


def start_ipamd(
    lab: Any, state: Path, env: dict[str, str], stack: ExitStack, report: Report
) -> tuple[IpamdProcess, dict[str, str]]:
    """``ultranet-ipamd`` started in ``lab``'s node with ``env``, its stop on ``stack``:
    (the IpamdProcess, the CNI socket and spool environment the shim is given)."""
    from tools.lab.daemon import IpamdProcess

    cni_env = {
        "ULTRANET_CNI_SOCKET": str(state / "cni.sock"),
        "ULTRANET_CNI_SPOOL": str(state / "spool"),
    }
    daemon = IpamdProcess(lab, state, {**env, **cni_env})
    stack.callback(daemon.stop)
    daemon.start()
    assert daemon.process is not None
    report.sessions.append(daemon.process.pid)
    return daemon, cni_env


def install_cni(cni_dir: Path, cni_env: dict[str, str]) -> tuple[Path, Path, Path, Path]:
    """ultranet's shim and conflist under ``cni_dir``: (shim, bin dir, conf dir, conflist)."""
    from cni.install import conflist, install

    bin_dir, conf_dir = cni_dir / "bin", cni_dir / "net.d"
    (shim,) = install(
        bin_dir,
        None,
        python=sys.executable,
        socket_path=cni_env["ULTRANET_CNI_SOCKET"],
        spool_dir=cni_env["ULTRANET_CNI_SPOOL"],
    )
    conf_dir.mkdir(parents=True)
    body = conflist()
    body.pop("cniVersions")  # libcni 1.1 (Debian 12) reads cniVersion only
    conf = conf_dir / "10-ultranet.conflist"
    conf.write_text(json.dumps(body))
    return shim, bin_dir, conf_dir, conf


def start_runtime(
    lab: Any,
    base: Path,
    cni: tuple[Path, Path, Path],
    cni_env: dict[str, str],
    binary: str,
    stack: ExitStack,
    report: Report,
    step: Step,
) -> CriPods | LibcniPods:
    """containerd in ``lab``'s node with the CNI dirs ``cni`` (bin, conf, conflist), or,
    when it cannot start, the libcni driver; the step's notes say which and why."""
    bin_dir, conf_dir, conf = cni
    try:
        runtime = CriPods.start(lab.node_ns, base / "containerd", bin_dir, conf_dir, binary, stack)
    except RuntimeUnavailable as err:
        report.fallback_reason = str(err).splitlines()[0][:300]
        step.note(f"containerd cannot start here: {report.fallback_reason}")
        step.note(
            "FALLBACK: the pods go through the libcni driver (libcni's AddNetworkList on "
            "namespaces the demo makes): the plugin's path without a container runtime"
        )
        pods = _libcni(lab, conf, base, bin_dir, cni_env, stack)
        step.note(f"libcni driver: {pods.binary}")
        return pods
    _session_pid(runtime.pid, report)
    report.runtime_left_behind.append(runtime.left_behind)
    step.note(
        f"{runtime.version()}; CNI from {bin_dir} and {conf_dir}; pause image "
        "built here, imported with ctr (no registry)"
    )
    return runtime


def _session(child: Child, report: Report) -> None:
    assert child.proc is not None
    report.sessions.append(child.proc.pid)


def _session_pid(pid: int, report: Report) -> None:
    if pid:
        report.sessions.append(pid)


def _close_driver(driver: Any) -> None:
    with suppress(OSError):  # after a Ctrl-C it has already died of SIGINT
        driver.close()


def _enis(lab: Any) -> list[Any]:
    enis = lab.cloud.enis_of(lab.instance_id)
    return sorted(enis, key=lambda e: (e.attachment.network_card_index, e.attachment.device_index))


def cards(lab: Any) -> dict[int, Card]:
    """The instance's ENIs per network card, as the EC2 emulator holds them."""
    out: dict[int, list[Any]] = {}
    for eni in _enis(lab):
        out.setdefault(eni.attachment.network_card_index, []).append(eni)
    return {
        card: Card(
            len(enis),
            "+".join(sorted({str(e.interface_type) for e in enis})),
            tuple(p for e in enis for p in e.prefixes),
        )
        for card, enis in sorted(out.items())
    }


def multi_nic_indexes(pods: int, multi: int) -> set[int]:
    """Spread the multi-NIC pods evenly: with 100 and 10, pods 9, 19, ... 99."""
    if multi <= 0:
        return set()
    stride = pods / multi
    return {min(pods - 1, int(stride * (k + 1)) - 1) for k in range(multi)}


def wait_warm(socket_path: Path, timeout: float, step: Step) -> bool:
    """Until the daemon says every card meets its warm target (True), or ``timeout``."""
    from ipam.client import AsyncIpamClient

    async def poll() -> bool:
        deadline = time.monotonic() + timeout
        async with AsyncIpamClient(socket_path) as client:
            while True:
                status = await client.status()
                if status.get("reason") == "warm pool met":
                    return True
                if time.monotonic() > deadline:
                    return False
                short = str(status.get("reason", "")).count("card ")
                step.live(f"{short} cards below their warm target")
                await asyncio.sleep(0.2)

    return asyncio.run(poll())


async def _allocations(socket_path: Path) -> int:
    from ipam.client import AsyncIpamClient

    async with AsyncIpamClient(socket_path) as client:
        return len(await client.list())


def median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else 0.0


def p99(samples: list[float]) -> float:
    if len(samples) < 2:
        return samples[0] if samples else 0.0
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


# -- the summary -------------------------------------------------------------------------


def summary(report: Report, write: Callable[[str], None]) -> None:
    singles = [p for p in report.pods if not p.multi_nic]
    multis = [p for p in report.pods if p.multi_nic]
    add_call, del_call = report.runtime_calls
    if report.fallback_reason:
        write(
            f"\n== pod ADD latency: libcni {add_call} wall time (the shim's exec included); "
            f"FALLBACK: containerd could not start ({report.fallback_reason}) =="
        )
    else:
        write(
            f"\n== pod ADD latency: CRI {add_call} wall time through containerd (sandbox, "
            "pause container and CNI ADD) =="
        )
    rows: list[tuple[str, list[Pod], list[float]]] = [
        ("single-NIC", singles, [p.add_ms for p in singles]),
        ("multi-NIC", multis, [p.add_ms for p in multis]),
        (f"DEL ({del_call})", report.pods, [p.del_ms for p in report.pods]),
    ]
    if any(p.remove_ms for p in report.pods):
        rows.append(("RemovePodSandbox", report.pods, [p.remove_ms for p in report.pods]))
    width_label = max(len(row[0]) for row in rows)
    for label, group, ms in rows:
        if not group:
            continue
        top, slowest = max(zip(ms, (p.name for p in group), strict=True))
        width = len(group[0].addresses)
        shape = f"  {width} interface{'s' if width > 1 else ''} each" if "NIC" in label else ""
        write(
            f"{label:<{width_label}} {len(group):>4} pods  p50 {median(ms):7.1f} ms  "
            f"p99 {p99(ms):7.1f} ms  max {top:7.1f} ms ({slowest}){shape}"
        )
    for op, call in (("add", "CNI ADD"), ("del", "CNI DEL")):
        if op in report.network_timers:
            mean, count = report.network_timers[op]
            write(
                f"containerd's own {call} timer (containerd_cri_sandbox_"
                f"{'create' if op == 'add' else 'delete'}_network_seconds): mean {mean:.1f} ms "
                f"over {count} calls"
                + (
                    " (StopPodSandbox runs the DEL, RemovePodSandbox runs it again)"
                    if op == "del" and count == 2 * len(report.pods)
                    else ""
                )
            )
    retried = [p for p in report.pods if p.failures]
    if retried:
        failed = sum(len(p.failures) for p in retried)
        write(
            f"retried: {len(retried)} of {len(report.pods)} pods, after {failed} failed ADDs "
            "(no free address on card 0 yet); the latency above is the ADD that succeeded"
        )

    write("\n== pod addresses ==")
    every = [a for p in report.pods for _, a in p.addresses]
    prefixes = [p for card in report.cards_now.values() for p in card.prefixes]
    inside = sum(1 for a in every if any(IPv4Address(a) in p for p in prefixes))
    write(
        f"{len(every)} addresses on {len(report.pods)} pods "
        f"({len(singles)} x 1 + {len(multis)} x {len(multis[0].addresses) if multis else 0}); "
        f"{len(set(every))} distinct; {inside} inside the node's /28 prefixes"
    )
    for pod in singles[:3]:
        write(f"  {pod.name}  {pod.addresses[0][0]} {pod.addresses[0][1]}")
    if multis:
        pod = multis[0]
        shown = [f"{n} {a}" for n, a in pod.addresses]
        if len(shown) > 4:
            shown = [*shown[:3], "...", shown[-1]]
        card_of = {p: c for c, card in report.cards_now.items() for p in card.prefixes}
        on_cards = {c for _, a in pod.addresses for p, c in card_of.items() if IPv4Address(a) in p}
        write(f"  {pod.name}  {', '.join(shown)}  (one address on each of {len(on_cards)} cards)")

    write("\n== prefixes and NAU on the node (the EC2 emulator's view) ==")
    used: Counter[int] = Counter()
    card_of_prefix = {p: c for c, card in report.cards_now.items() for p in card.prefixes}
    for address in every:
        for prefix, card_index in card_of_prefix.items():
            if IPv4Address(address) in prefix:
                used[card_index] += 1
    write(f"{'cards':>6}  {'ENIs each':<14} {'/28s at launch -> now':<22} pod addresses")
    for first, last, row in _ranges(report, used):
        label = str(first) if first == last else f"{first}-{last}"
        each = "" if first == last else " each"
        write(f"{label:>6}  {row[0]:<14} {row[1]:<22} {row[2]}{each}")
    write(
        f"NAU used in the VPC: {report.nau_at_launch} at launch -> {report.nau_now} with "
        f"{len(report.pods)} pods, of a {report.nau_quota:,} quota (the node is the VPC's "
        "only NAU consumer)"
    )
    if report.nau_now:
        write(
            f"at {report.nau_now} NAU per node, 256,000 (the maximum quota) holds "
            f"{256_000 // report.nau_now:,} such nodes in one VPC"
        )

    write("\n== DNS (ultranet-dns /metrics) ==")
    m = report.dns_metrics
    requests = m.get("coredns_dns_requests_total", 0.0)
    hits = m.get("coredns_cache_hits_total", 0.0)
    misses = m.get("coredns_cache_misses_total", 0.0)
    upstream = m.get("ultranet_dns_upstream_queries_total", 0.0)
    rate = 100 * hits / (hits + misses) if hits + misses else 0.0
    write(
        f"queries {requests:.0f}, cache hits {hits:.0f}, misses {misses:.0f}: hit rate "
        f"{rate:.1f} %; upstream queries {upstream:.0f} (for {report.dns_names} distinct names)"
    )
    seen: set[str] = set()
    hit_ms: list[float] = []
    miss_ms: list[float] = []
    for a in report.answers:
        (hit_ms if a.name in seen else miss_ms).append(a.ms)
        seen.add(a.name)
    write(
        f"client-side p50: {median(hit_ms):.2f} ms from cache, {median(miss_ms):.2f} ms via "
        "the upstream (first ask of each name)"
    )
    if report.ipv6 is not None:
        from tools.demo.node6 import summary6

        summary6(report.ipv6, write)


def _ranges(report: Report, used: Counter[int]) -> Iterator[tuple[int, int, tuple[str, ...]]]:
    """Consecutive cards with identical rows, merged: (first, last, row)."""
    rows: list[tuple[int, tuple[str, ...]]] = []
    for index, now in report.cards_now.items():
        launch = report.cards_at_launch.get(index)
        before = len(launch.prefixes) if launch else 0
        row = (f"{now.enis} {now.kinds}", f"{before} -> {len(now.prefixes)}", str(used[index]))
        rows.append((index, row))
    start = 0
    while start < len(rows):
        end = start
        while end + 1 < len(rows) and rows[end + 1][1] == rows[start][1]:
            end += 1
        yield rows[start][0], rows[end][0], rows[start][1]
        start = end + 1
