"""Through the runtime a node runs: Debian's containerd, its CRI plugin and ultranet's
conflist in a lab node, driven over the CRI as the kubelet drives it.

One p5.48xlarge node (32 network cards, ENABLE_MULTI_NIC) with the real ``ultranet-ipamd``,
the installed shim, and one containerd for the module (``tools/lab/containerd.py``);
containerds of other layouts start beside it on the same node for their own tests.
Every pod is checked from inside its sandbox's network namespace (entered through the
pause process), and every test ends with nothing left: no host veth, rule or /32 route,
no allocation in the daemon, no sandbox, no namespace file.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from pyroute2 import IPRoute

from cni.install import CONFLIST_NAME, install
from cni.spec import MULTI_NIC_ANNOTATION, MULTI_NIC_VALUE
from ipam.client import AsyncIpamClient
from tests.cni.harness import host_state
from tools.bench.cni import crash
from tools.lab.containerd import Containerd, mounts_under
from tools.lab.cri.client import RuntimeClient
from tools.lab.daemon import IpamdProcess
from tools.lab.lab import Lab, LabConfig

pytestmark = pytest.mark.netns

T = TypeVar("T")
CARDS = 32  # p5.48xlarge
CLEAN = {"links": [], "rules": [], "routes": []}
MULTI_NIC = {MULTI_NIC_ANNOTATION: MULTI_NIC_VALUE}
_CLONE_NEWNET = 0x40000000


@dataclass
class Node:
    lab: Lab
    daemon: IpamdProcess
    bin_dir: Path
    conf_dir: Path
    containerd: Containerd
    cri: RuntimeClient
    base: Path

    @property
    def spool(self) -> Path:
        return self.daemon.state_dir / "spool"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("cri")
    bin_dir, conf_dir = base / "bin", base / "net.d"
    with Lab(LabConfig(instance_type="p5.48xlarge", prefixes_per_card=1)) as lab:
        daemon = IpamdProcess(
            lab,
            base / "d",
            {
                "ENABLE_MULTI_NIC": "true",
                "ULTRANET_CNI_SPOOL": str(base / "d" / "spool"),
                # The daemon writes the conflist once its warm pool is met, as on a node.
                "ULTRANET_CNI_CONF_DIR": str(conf_dir),
            },
        )
        try:
            install(
                bin_dir,
                None,
                python=sys.executable,
                socket_path=str(daemon.cni_socket),
                spool_dir=str(daemon.state_dir / "spool"),
            )
            daemon.start()
            daemon.wait_ready()
            daemon.wait_cni_socket()
            with (
                Containerd(lab.node_ns, base / "containerd", bin_dir, conf_dir) as containerd,
                containerd.client() as cri,
            ):
                yield Node(lab, daemon, bin_dir, conf_dir, containerd, cri, base)
        finally:
            daemon.stop()


# -- looking inside a sandbox -----------------------------------------------------------------


def in_netns_of(pid: int, work: Callable[[IPRoute], T]) -> T:
    """``work(ipr)`` with a netlink socket inside the network namespace of ``pid``,
    entered on a throwaway thread (the namespace file may live in a mount namespace
    this process does not share; ``/proc/<pid>/ns/net`` reaches it anyway)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def enter() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into the netns of {pid}")
            finally:
                os.close(fd)
            made.append(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0))
        except BaseException as err:
            failed.append(err)

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    with made[0] as sock, IPRoute(fileno=os.dup(sock.fileno())) as ipr:
        return work(ipr)


def pod_network(pid: int) -> dict[str, Any]:
    """Interfaces with their IPv4 addresses, and each table's default gateway, as the
    pod sees them."""

    def read(ipr: IPRoute) -> dict[str, Any]:
        names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
        addrs: dict[str, list[str]] = {}
        for a in ipr.get_addr(family=socket.AF_INET):
            if names[a["index"]] != "lo":
                addrs.setdefault(names[a["index"]], []).append(
                    f"{a.get('address')}/{a['prefixlen']}"
                )
        defaults = {
            r.get("table"): (r.get("gateway"), names.get(r.get("oif")))
            for r in ipr.get_routes(family=socket.AF_INET)  # every table
            if r["dst_len"] == 0 and r.get("gateway")
        }
        return {"addrs": addrs, "defaults": defaults}

    return in_netns_of(pid, read)


def held(daemon: IpamdProcess) -> list[str]:
    """Container ids the daemon holds an allocation for."""

    async def listed() -> list[str]:
        async with AsyncIpamClient(daemon.socket) as client:
            return sorted(a["container_id"] for a in await client.list())

    return asyncio.run(listed())


def remove(node: Node, sandbox_id: str) -> None:
    node.cri.stop_pod_sandbox(sandbox_id)
    node.cri.remove_pod_sandbox(sandbox_id)


def assert_nothing_left(node: Node, netns_files: list[str]) -> None:
    node.daemon.wait_cni_socket()  # any spooled DEL replayed
    assert host_state(node.lab) == CLEAN
    assert held(node.daemon) == []
    assert node.cri.list_pod_sandbox() == []
    assert [p for p in netns_files if os.path.exists(p)] == []


def card_prefixes(lab: Lab) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for eni in lab.cloud.enis_of(lab.instance_id):
        assert eni.attachment is not None
        out.setdefault(eni.attachment.network_card_index, []).extend(eni.prefixes)
    return out


# -- tests --------------------------------------------------------------------------------------


def test_a_pod_gets_its_address_and_routes_and_leaves_nothing(node: Node) -> None:
    sandbox = node.cri.run_pod_sandbox("solo")
    netns_file = node.containerd.sandbox_netns(node.cri, sandbox)
    try:
        status = node.cri.pod_sandbox_status(sandbox).status
        address = status.network.ip
        seen = pod_network(node.containerd.sandbox_pid(node.cri, sandbox))
        assert held(node.daemon) == [sandbox]  # the CRI's sandbox id is CNI_CONTAINERID
    finally:
        remove(node, sandbox)
    assert seen["addrs"] == {"eth0": [f"{address}/32"]}
    assert seen["defaults"] == {254: ("169.254.1.1", "eth0")}
    assert any(IPv4Address(address) in p for p in card_prefixes(node.lab)[0])
    assert_nothing_left(node, [netns_file])


def test_a_multi_nic_pod_gets_one_interface_per_card_from_its_annotation(node: Node) -> None:
    sandbox = node.cri.run_pod_sandbox("multi", annotations=MULTI_NIC)
    netns_file = node.containerd.sandbox_netns(node.cri, sandbox)
    try:
        seen = pod_network(node.containerd.sandbox_pid(node.cri, sandbox))
        address = node.cri.pod_sandbox_status(sandbox).status.network.ip
    finally:
        remove(node, sandbox)
    names = ["eth0", *(f"mNicIf{i}" for i in range(1, CARDS))]
    assert sorted(seen["addrs"]) == sorted(names)
    assert seen["addrs"]["eth0"] == [f"{address}/32"]
    prefixes = card_prefixes(node.lab)
    for card, name in enumerate(names):
        (cidr,) = seen["addrs"][name]
        assert any(IPv4Address(cidr.split("/")[0]) in p for p in prefixes[card]), (name, cidr)
    # Interface i routes through 169.254.1.(i+1): main for eth0, table i for the others.
    assert seen["defaults"] == {
        (254 if i == 0 else i): (f"169.254.1.{i + 1}", name) for i, name in enumerate(names)
    }
    assert_nothing_left(node, [netns_file])


NO_FREE_ADDRESS = "no free pod address"  # code 11: the kubelet retries RunPodSandbox
KUBELET_ATTEMPTS = 5


def free_on_card_0(daemon: IpamdProcess) -> int:
    async def asked() -> int:
        async with AsyncIpamClient(daemon.socket) as client:
            return int((await client.status())["free_addresses"]["0"])

    return asyncio.run(asked())


def run_as_the_kubelet(node: Node, name: str) -> str:
    """RunPodSandbox, retried as the kubelet retries a sandbox whose ADD answered "try
    again later" (11, no free pod address); between attempts it waits until the daemon
    reports a free address on card 0, where the kubelet waits out a backoff. Any other
    error, or a refusal at the last attempt, fails the test."""
    for attempt in range(1, KUBELET_ATTEMPTS + 1):
        try:
            return node.cri.run_pod_sandbox(name)
        except grpc.RpcError as err:
            if NO_FREE_ADDRESS not in str(err.details()) or attempt == KUBELET_ATTEMPTS:
                raise
        wait_until(lambda: free_on_card_0(node.daemon) > 0, what="a free address on card 0")
    raise AssertionError("unreachable")


def wait_until(condition: Callable[[], bool], *, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.05)  # polling the condition, not standing in for it


def test_twenty_pods_at_once(node: Node) -> None:
    # A node the scheduler has just filled: 20 ADDs outrun the warm pool (16 addresses on
    # card 0 at launch, WARM_PREFIX_TARGET=1), and those beyond it are answered 11 while
    # the pool grows. That is the daemon's contract, and on a node the kubelet retries the
    # sandbox; holding the burst back until the pool had room for 20 would test a node
    # nobody runs. So the burst goes at once and each refused sandbox is retried.
    names = [f"burst{i}" for i in range(20)]
    with ThreadPoolExecutor(len(names)) as pool:
        runs = [pool.submit(run_as_the_kubelet, node, name) for name in names]
        sandboxes = [run.result() for run in runs]
        netns_files = [node.containerd.sandbox_netns(node.cri, s) for s in sandboxes]
        try:
            addresses = [node.cri.pod_sandbox_status(s).status.network.ip for s in sandboxes]
            views = [pod_network(node.containerd.sandbox_pid(node.cri, s)) for s in sandboxes]
            assert held(node.daemon) == sorted(sandboxes)
        finally:
            list(pool.map(lambda s: remove(node, s), sandboxes))
    assert len(set(addresses)) == len(names)
    assert [v["addrs"] for v in views] == [{"eth0": [f"{a}/32"]} for a in addresses]
    assert_nothing_left(node, netns_files)


def stop_while_the_daemon_is_down(node: Node) -> str:
    """Run a pod, kill -9 the daemon, see an ADD refused and the pod's DEL spooled,
    restart the daemon; returns the pod's address."""
    before = node.cri.run_pod_sandbox("survivor")
    netns_file = node.containerd.sandbox_netns(node.cri, before)
    address = node.cri.pod_sandbox_status(before).status.network.ip
    node.daemon.kill()
    try:
        with pytest.raises(grpc.RpcError) as refused:
            node.cri.run_pod_sandbox("while-down")
        # containerd passes on the plugin's text, not its code (11, try again later).
        assert "ultranet-ipamd is not reachable" in str(refused.value.details())
        remove(node, before)  # the DEL is spooled: StopPodSandbox succeeds
        assert f"{before}:eth0.del" in [p.name for p in node.spool.iterdir()]
        # The sandbox's namespace went, and its veth with it; its host rule and its
        # allocation wait for the daemon.
        assert [r[2] for r in host_state(node.lab)["rules"]] == [address]
    finally:
        node.daemon.start()
        node.daemon.wait_ready()
        node.daemon.wait_cni_socket()  # served once the spool is replayed
    assert list(node.spool.iterdir()) == []
    assert held(node.daemon) == []
    assert not os.path.exists(netns_file)
    return address


def test_daemon_killed_add_fails_retryably_and_the_spooled_del_is_replayed(node: Node) -> None:
    stop_while_the_daemon_is_down(node)
    assert host_state(node.lab)["links"] == []
    again = node.cri.run_pod_sandbox("after-restart")
    netns_file = node.containerd.sandbox_netns(node.cri, again)
    address = node.cri.pod_sandbox_status(again).status.network.ip
    seen = pod_network(node.containerd.sandbox_pid(node.cri, again))
    remove(node, again)
    assert seen["addrs"] == {"eth0": [f"{address}/32"]}
    assert held(node.daemon) == [] and not os.path.exists(netns_file)
    assert host_state(node.lab) == CLEAN


def test_a_pod_stopped_while_the_daemon_was_down_leaves_no_host_rule(node: Node) -> None:
    address = stop_while_the_daemon_is_down(node)
    assert address not in [r[2] for r in host_state(node.lab)["rules"]]
    assert host_state(node.lab) == CLEAN


def test_the_fixture_cleans_up_after_a_killed_containerd(node: Node) -> None:
    """containerd killed with a sandbox running: close() still leaves no process, mount,
    runc container or namespace file; a DEL retried through the shim, as the kubelet
    would, then frees the pod's address."""
    crashed = Containerd(node.lab.node_ns, node.base / "killed", node.bin_dir, node.conf_dir)
    try:
        crashed.start()
        with crashed.client() as cri:
            sandbox = cri.run_pod_sandbox("orphan")
            netns_file = crashed.sandbox_netns(cri, sandbox)
            pause_pid = crashed.sandbox_pid(cri, sandbox)
        assert crashed.process is not None
        os.killpg(crashed.process.pid, signal.SIGKILL)
        crashed.process.wait()
        assert os.path.exists(netns_file) and mounts_under([crashed.root, crashed.state])
    finally:
        crashed.close()
    assert mounts_under([crashed.root, crashed.state]) == []
    assert not os.path.exists(netns_file)
    assert not Path(f"/proc/{pause_pid}").exists()
    assert crashed._shim_pids() == []
    assert not any((crashed.runc_root / "k8s.io").iterdir())
    assert held(node.daemon) == [sandbox]  # no DEL ran: the runtime died first
    env = {
        "PATH": "/usr/bin:/bin",
        "CNI_COMMAND": "DEL",
        "CNI_CONTAINERID": sandbox,
        "CNI_NETNS": netns_file,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=orphan",
        "CNI_PATH": str(node.bin_dir),
    }
    conflist = json.loads((node.conf_dir / CONFLIST_NAME).read_text())
    plugin = {**conflist["plugins"][0], "name": conflist["name"], "cniVersion": "1.0.0"}
    done = subprocess.run(
        ["ip", "netns", "exec", node.lab.node_ns, str(node.bin_dir / "ultranet")],
        env=env,
        input=json.dumps(plugin).encode(),
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert_nothing_left(node, [netns_file])


def run_in_other_layout(node: Node, name: str, **layout: bool) -> None:
    """A pod through a second containerd on the node with another netns layout: it gets
    its address and leaves nothing."""
    with (
        Containerd(
            node.lab.node_ns, node.base / name, node.bin_dir, node.conf_dir, **layout
        ) as other,
        other.client() as cri,
    ):
        sandbox = cri.run_pod_sandbox(name)
        netns_file = other.sandbox_netns(cri, sandbox)
        try:
            address = cri.pod_sandbox_status(sandbox).status.network.ip
            seen = pod_network(other.sandbox_pid(cri, sandbox))
        finally:
            cri.stop_pod_sandbox(sandbox)
            cri.remove_pod_sandbox(sandbox)
        assert seen["addrs"] == {"eth0": [f"{address}/32"]}
        assert seen["defaults"] == {254: ("169.254.1.1", "eth0")}
        assert cri.list_pod_sandbox() == []
    assert_nothing_left(node, [netns_file])


def test_netns_mounts_under_state_dir(node: Node) -> None:
    run_in_other_layout(node, "understate", netns_mounts_under_state_dir=True)


def test_containerd_in_a_mount_namespace_of_its_own(node: Node) -> None:
    run_in_other_layout(node, "ownmnt", own_mount_namespace=True)


# -- crash during a burst of StopPodSandbox (tools/bench/cni/crash.py) --------------------------

CRASH_TRIALS = 2  # per instance type here; `python -m tools.bench.cni.crash` runs more


def crash_seeds() -> list[int]:
    """ULTRANET_CRASH_SEED reproduces a run; otherwise a random first seed, printed (pytest
    shows it with a failure) and named in every assertion."""
    first = int(os.environ.get("ULTRANET_CRASH_SEED") or random.SystemRandom().randrange(1 << 31))
    print(f"crash trials: seeds {first}..{first + CRASH_TRIALS - 1}")
    return [first + i for i in range(CRASH_TRIALS)]


def assert_crash_trials_clean(trials: list[crash.Trial]) -> None:
    for trial in trials:
        assert trial.clean, crash.describe(trial) + f": {trial.left}"


def test_kill_9_during_30_concurrent_stops_leaves_nothing_on_a_p5_with_multi_nic_pods(
    node: Node,
) -> None:
    crash_node = crash.CrashNode(node.lab, node.daemon, node.containerd, node.cri)
    window = crash.kill_window(*crash.calibrate(crash_node, pods=30, multi_nic=6))
    trials = [
        crash.run_trial(crash_node, seed, pods=30, multi_nic=6, window_s=window)
        for seed in crash_seeds()
    ]
    assert [t.interfaces for t in trials] == [24 + 6 * CARDS] * CRASH_TRIALS
    assert_crash_trials_clean(trials)


def test_kill_9_during_30_concurrent_stops_leaves_nothing_on_an_m5() -> None:
    trials = crash.soak("m5.large", crash_seeds(), pods=30, multi_nic=0)
    assert [t.interfaces for t in trials] == [30] * CRASH_TRIALS
    assert_crash_trials_clean(trials)
