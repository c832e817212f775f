"""End to end: the installed CNI shim, exec'd as a runtime does, against the real
``ultranet-ipamd`` process in the lab's node namespace."""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from cni.install import install
from cni.keys import IpamKey
from cni.plumbing import host_ifname
from cni.spec import ANNOTATIONS_CAPABILITY, MULTI_NIC_ANNOTATION, MULTI_NIC_VALUE
from cni.transport import call
from ipam.client import AsyncIpamClient
from tests.cni.harness import NETWORK, conf, env, host_state, ns_path, pod_state
from tests.conftest import LabFactory
from tests.lab.helpers import python_in
from tools.lab import netns
from tools.lab.daemon import IpamdProcess
from tools.lab.lab import Lab, LabConfig

pytestmark = pytest.mark.netns

CONNECT = """
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
print("connected")
"""


@pytest.fixture
def node(lab_factory: LabFactory, tmp_path: Path) -> Iterator[tuple[Lab, IpamdProcess, Path]]:
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=1))
    daemon = IpamdProcess(
        lab,
        tmp_path / "d",
        {
            "ULTRANET_CNI_SOCKET": str(tmp_path / "d" / "cni.sock"),
            "ULTRANET_CNI_SPOOL": str(tmp_path / "d" / "spool"),
            "ULTRANET_METRICS_ADDR": f"127.0.0.1:{METRICS_PORT}",
        },
    )
    daemon.start()
    (shim,) = install(tmp_path / "bin", None, python=sys.executable)
    try:
        daemon.wait_ready()
        daemon.wait_cni_socket()  # bound after ready: the shim's first exec needs it
        yield lab, daemon, shim
    finally:
        daemon.stop()


def exec_shim(
    lab: Lab, shim: Path, daemon: IpamdProcess, variables: dict[str, str], stdin: bytes
) -> tuple[int, dict[str, Any]]:
    """Exec the shim in the node namespace, as the kubelet's runtime would."""
    done = subprocess.run(
        ["ip", "netns", "exec", lab.node_ns, str(shim)],
        env={
            "PATH": "/usr/bin:/bin",
            "ULTRANET_CNI_SOCKET": str(daemon.cni_socket),
            "ULTRANET_CNI_SPOOL": str(daemon.state_dir / "spool"),
            **variables,
        },
        input=stdin,
        capture_output=True,
        timeout=30,
    )
    body = json.loads(done.stdout) if done.stdout.strip() else {"stderr": done.stderr.decode()}
    return done.returncode, body


def test_pods_added_through_the_shim_reach_the_vpc_and_each_other(
    node: tuple[Lab, IpamdProcess, Path],
) -> None:
    lab, daemon, shim = node
    pods = [lab.create_pod_namespace(name) for name in ("a", "b")]
    addresses = []
    for n, pod in enumerate(pods):
        code, result = exec_shim(lab, shim, daemon, env("ADD", f"ctr{n}", ns_path(pod)), conf())
        assert code == 0, result
        addresses.append(result["ips"][0]["address"].split("/")[0])
    assert len(set(addresses)) == 2
    primary = lab.cloud.enis_of(lab.instance_id)[0]
    assert all(any(IPv4Address(a) in p for p in primary.prefixes) for a in addresses)
    # Pod a reaches its subnet's gateway in the vpc namespace, and pod b.
    gateway = lab.cloud.eni_view(primary.eni_id).gateway
    for target, where in ((str(gateway), lab.vpc_ns), (addresses[1], pods[1])):
        listener = netns.listening_socket(where, target, 0)
        try:
            done = python_in(pods[0], CONNECT, target, str(listener.getsockname()[1]))
        finally:
            listener.close()
        assert done.returncode == 0, done.stderr
    for n, pod in enumerate(pods):
        code, result = exec_shim(lab, shim, daemon, env("DEL", f"ctr{n}", ns_path(pod)), conf())
        assert code == 0, result
    state = host_state(lab)
    assert state["links"] == [] and state["rules"] == [] and state["routes"] == []
    # Each command the shim ran is one sample of the daemon's histogram, by its outcome.
    assert commands_answered(lab, "ADD", 0) == 2
    assert commands_answered(lab, "DEL", 0) == 2


def test_a_restart_keeps_live_pods_and_drops_those_whose_veth_is_gone(
    node: tuple[Lab, IpamdProcess, Path],
) -> None:
    lab, daemon, shim = node
    keep, lose = lab.create_pod_namespace("keep"), lab.create_pod_namespace("lose")
    code, kept = exec_shim(lab, shim, daemon, env("ADD", "keep", ns_path(keep)), conf())
    assert code == 0, kept
    code, lost = exec_shim(lab, shim, daemon, env("ADD", "lose", ns_path(lose)), conf())
    assert code == 0, lost
    daemon.kill()
    netns.delete(lose)  # the pod goes away while the daemon is down: its veth goes too
    daemon.start()
    daemon.wait_ready()
    daemon.wait_cni_socket()

    async def held() -> list[str]:
        async with AsyncIpamClient(daemon.socket) as client:
            return [a["container_id"] for a in await client.list()]

    assert asyncio.run(held()) == ["keep"]
    # The lost pod's host rule went at start (no allocation, no route left); the kept
    # pod's stays. Before the sweep it stayed, and an ADD given the address met EEXIST.
    kept_address = kept["ips"][0]["address"].split("/")[0]
    assert [r[2] for r in host_state(lab)["rules"]] == [kept_address]
    assert "reaped 1 stray host rule(s)" in daemon.log_tail(40)
    assert strays_reaped(lab, "ultranet_ipamd_stray_rules_reaped_total") == 1
    code, again = exec_shim(
        lab, shim, daemon, env("CHECK", "keep", ns_path(keep)), conf(prevResult=kept)
    )
    assert code == 0, again


# -- kill -9 inside a DEL's windows (cni/pausepoint.py), then restart ------------------------

METRICS_PORT = 61678  # in the lab's node namespace: nothing else listens there
MULTI = {ANNOTATIONS_CAPABILITY: {MULTI_NIC_ANNOTATION: MULTI_NIC_VALUE}}
CLEAN = {"links": [], "rules": [], "routes": []}


def free_on_card_0(daemon: IpamdProcess) -> int:
    """What the daemon's status counts free on card 0: its prefixes' addresses less those
    assigned and those in cooldown, read once its warm pool is met. An ADD that takes a
    prefix's first address starts a grow; a count read before the new prefix lands
    changes under the test (15, then 31, on a loaded machine)."""

    async def settled() -> int:
        deadline = time.monotonic() + 60  # a failure guard, never a synchronisation
        async with AsyncIpamClient(daemon.socket) as client:
            while (status := await client.status())["reason"] != "warm pool met":
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.02)  # polling the daemon's own answer, bounded
        return int(status["free_addresses"]["0"])

    return asyncio.run(settled())


def test_failed_adds_take_no_address_and_put_none_in_cooldown(
    node: tuple[Lab, IpamdProcess, Path], tmp_path: Path
) -> None:
    # The shipped IP_COOLDOWN_PERIOD (30 s): an address that went into it would show as
    # one fewer free for the rest of the test.
    lab, daemon, shim = node
    pod = lab.create_pod_namespace("taken")
    code, first = exec_shim(lab, shim, daemon, env("ADD", "first", ns_path(pod)), conf())
    assert code == 0, first
    free, listed, host = free_on_card_0(daemon), held(daemon), host_state(lab)
    not_netns = tmp_path / "not-a-namespace"
    not_netns.write_bytes(b"")
    for netns_path, code_wanted in (
        ("/run/netns/ul-no-such-pod", 3),  # gone
        (str(not_netns), 4),  # no network namespace
        (ns_path(pod), 102),  # eth0 is the first container's
    ):
        code, out = exec_shim(lab, shim, daemon, env("ADD", "second", netns_path), conf())
        assert (code, out.get("code")) == (1, code_wanted), (netns_path, out)
        assert free_on_card_0(daemon) == free, (netns_path, out)
        assert held(daemon) == listed and host_state(lab) == host
    code, out = exec_shim(lab, shim, daemon, env("DEL", "first", ns_path(pod)), conf())
    assert code == 0, out
    # The daemon's histogram tells the refusals apart by their CNI code; the gone netns
    # never reached it (the shim, unable to open the path, answered 3 itself).
    answered = {code: commands_answered(lab, "ADD", code) for code in (0, 3, 4, 102)}
    assert answered == {0: 1, 3: 0, 4: 1, 102: 1}
    assert commands_answered(lab, "DEL", 0) == 1


def test_a_netns_only_the_runtimes_mount_namespace_sees_travels_as_a_descriptor(
    node: tuple[Lab, IpamdProcess, Path], tmp_path: Path
) -> None:
    # The runtime's netns file is a bind mount in a mount namespace the daemon does not
    # share (containerd under `ip netns exec`, netns_mounts_under_state_dir): there the
    # daemon sees only the empty mount point. The shim, run in the runtime's mount
    # namespace, opens the file and sends the descriptor (UCN2); a request by path (UCN1,
    # a shim before UCN2) fails as the issue saw it.
    lab, daemon, shim = node
    pod = lab.create_pod_namespace("hidden")
    private = tmp_path / "runtime-netns"
    private.write_bytes(b"")  # the mount point: all the daemon can see
    variables = {
        "PATH": "/usr/bin:/bin",
        "ULTRANET_CNI_SOCKET": str(daemon.cni_socket),
        "ULTRANET_CNI_SPOOL": str(daemon.state_dir / "spool"),
    }
    mount_then_exec = (
        f"mount --bind {ns_path(pod)} {private} && exec ip netns exec {lab.node_ns} {shim}"
    )

    def in_runtime_mounts(command: str) -> tuple[int, dict[str, Any]]:
        done = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", mount_then_exec],
            env={**variables, **env(command, "hidden", str(private))},
            input=conf(),
            capture_output=True,
            timeout=30,
        )
        body = json.loads(done.stdout) if done.stdout.strip() else {"stderr": done.stderr.decode()}
        return done.returncode, body

    async def by_path() -> tuple[int, bytes]:
        return await call(daemon.cni_socket, env("ADD", "old-shim", str(private)), conf())

    code, out = asyncio.run(by_path())
    assert code == 1 and b"not a network namespace" in out, out
    code, added = in_runtime_mounts("ADD")
    assert code == 0, added
    assert len(held(daemon)) == 1
    assert "eth0" in pod_state(pod)["links"], pod_state(pod)  # in the pod, by descriptor
    code, out = in_runtime_mounts("DEL")
    assert code == 0, out
    state = host_state(lab)
    assert state["links"] == [] and state["rules"] == [] and state["routes"] == []
    assert pod_state(pod)["links"] == []


def test_a_del_whose_netns_the_shim_cannot_open_succeeds_and_cleans_the_host(
    node: tuple[Lab, IpamdProcess, Path],
) -> None:
    # CNI spec: DEL must not fail when the netns is gone. The shim sends UCN2 without a
    # descriptor, and the daemon tears down without the namespace (never by its path).
    lab, daemon, shim = node
    pod = lab.create_pod_namespace("gonebefore")
    code, added = exec_shim(lab, shim, daemon, env("ADD", "gonebefore", ns_path(pod)), conf())
    assert code == 0, added
    netns.delete(pod)
    code, out = exec_shim(lab, shim, daemon, env("DEL", "gonebefore", ns_path(pod)), conf())
    assert code == 0, out
    assert held(daemon) == []
    state = host_state(lab)
    assert state["links"] == [] and state["rules"] == [] and state["routes"] == []


def test_an_old_shims_request_by_path_still_works(node: tuple[Lab, IpamdProcess, Path]) -> None:
    # A rolling upgrade: a shim installed before UCN2 sends UCN1 frames (CNI_NETNS by
    # path, which this daemon can see); the daemon answers them in UCN1.
    lab, daemon, _ = node
    pod = lab.create_pod_namespace("oldshim")

    async def old_shim(command: str) -> tuple[int, bytes]:
        return await call(daemon.cni_socket, env(command, "oldshim", ns_path(pod)), conf())

    code, out = asyncio.run(old_shim("ADD"))
    assert code == 0, out
    assert json.loads(out)["interfaces"][1]["sandbox"] == ns_path(pod)
    assert len(held(daemon)) == 1
    code, out = asyncio.run(old_shim("DEL"))
    assert code == 0, out
    assert held(daemon) == [] and host_state(lab)["rules"] == []


class PausePoint:
    """The FIFO the daemon names a pause point on when it reaches it; opened read-write
    here, so the daemon's open never blocks and a read waits only for its line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)

    def env(self, point: str) -> dict[str, str]:
        return {"ULTRANET_PAUSE_AT": point, "ULTRANET_PAUSE_SIGNAL": str(self.path)}

    def wait(self, daemon: IpamdProcess, timeout: float = 60) -> str:
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no pause point reached in {timeout} s: {daemon.log_tail()}")
        return os.read(self._fd, 4096).decode()

    def close(self) -> None:
        os.close(self._fd)


CrashNode = tuple[Lab, IpamdProcess, Path, PausePoint]


@pytest.fixture
def crash_node(
    lab_factory: LabFactory, tmp_path: Path
) -> Iterator[Callable[[LabConfig, dict[str, str], str], CrashNode]]:
    """A lab, the daemon started to pause at a point, the shim, and the pause FIFO."""
    started: list[tuple[IpamdProcess, PausePoint]] = []

    def start(config: LabConfig, extra: dict[str, str], point: str) -> CrashNode:
        lab = lab_factory(config)
        pause = PausePoint(tmp_path / "pause")
        base = {
            "ULTRANET_CNI_SPOOL": str(tmp_path / "d" / "spool"),
            "ULTRANET_METRICS_ADDR": f"127.0.0.1:{METRICS_PORT}",
            **extra,
        }
        daemon = IpamdProcess(lab, tmp_path / "d", {**base, **pause.env(point)})
        started.append((daemon, pause))
        daemon.start()
        (shim,) = install(tmp_path / "bin", None, python=sys.executable)
        daemon.wait_ready()
        daemon.wait_cni_socket()
        return lab, daemon, shim, pause

    try:
        yield start
    finally:
        for daemon, pause in started:
            daemon.stop()
            pause.close()


def restart_without_pause(daemon: IpamdProcess) -> None:
    daemon.kill()
    for name in ("ULTRANET_PAUSE_AT", "ULTRANET_PAUSE_SIGNAL"):
        daemon.env.pop(name)
    daemon.start()
    daemon.wait_ready()
    daemon.wait_cni_socket()  # served once spooled DELs are replayed and strays reaped


def held(daemon: IpamdProcess) -> list[dict[str, Any]]:
    async def listed() -> list[dict[str, Any]]:
        async with AsyncIpamClient(daemon.socket) as client:
            return await client.list()

    return asyncio.run(listed())


def strays_reaped(lab: Lab, metric: str = "ultranet_ipamd_stray_veths_reaped_total") -> float:
    value = scraped(lab, metric)
    assert value is not None, f"{metric} is not exported"
    return value


def scraped(lab: Lab, sample: str) -> float | None:
    """The value of ``sample`` (a name, with its labels as the exposition writes them) in
    the daemon's /metrics; None if it is not there."""
    fetch = f"""
import urllib.request
body = urllib.request.urlopen("http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read()
lines = [l for l in body.decode().splitlines() if l.startswith({sample + " "!r})]
print(lines[0].split()[-1] if lines else "absent")
"""
    done = python_in(lab.node_ns, fetch)
    assert done.returncode == 0, done.stderr
    return None if done.stdout.strip() == "absent" else float(done.stdout)


def commands_answered(lab: Lab, command: str, code: int) -> float:
    """The daemon's count of ``command`` answered with ``code`` (0 before the first)."""
    name = "ultranet_ipamd_cni_command_seconds_count"
    value = scraped(lab, f'{name}{{code="{code}",command="{command}"}}')  # labels sorted
    return 0.0 if value is None else value


def test_kill_9_after_a_del_answered_before_its_veth_went_leaves_the_host_clean(
    crash_node: Callable[[LabConfig, dict[str, str], str], CrashNode],
) -> None:
    lab, daemon, shim, pause = crash_node(
        LabConfig(instance_type="m5.large", prefixes_per_card=1), {}, "reaper-before-delete"
    )
    pod = lab.create_pod_namespace("w1")
    code, added = exec_shim(lab, shim, daemon, env("ADD", "w1", ns_path(pod)), conf())
    assert code == 0, added
    code, out = exec_shim(lab, shim, daemon, env("DEL", "w1", ns_path(pod)), conf(prevResult=added))
    assert code == 0, out  # answered...
    assert pause.wait(daemon) == "reaper-before-delete\n"  # ...and the reaper has not run
    veth = host_ifname(IpamKey(NETWORK, "w1", "eth0"), 0, "eni")
    assert host_state(lab) == {**CLEAN, "links": [veth]}
    assert held(daemon) == []

    restart_without_pause(daemon)

    assert host_state(lab) == CLEAN
    assert pod_state(pod) == {"links": [], "addrs": [], "rules": []}
    assert held(daemon) == []
    assert strays_reaped(lab) == 1
    # The address is free again, once: a new pod gets one, and the old DEL repeats fine.
    code, again = exec_shim(lab, shim, daemon, env("ADD", "w1b", ns_path(pod)), conf())
    assert code == 0, again
    assert [a["container_id"] for a in held(daemon)] == ["w1b"]
    code, out = exec_shim(lab, shim, daemon, env("DEL", "w1", ns_path(pod)), conf())
    assert code == 0, out


P5 = LabConfig(instance_type="p5.48xlarge", prefixes_per_card=1)
CARDS = 32


def add_multi_nic(
    lab: Lab, shim: Path, daemon: IpamdProcess, container: str
) -> tuple[str, dict[str, Any]]:
    pod = lab.create_pod_namespace(container)
    code, added = exec_shim(
        lab, shim, daemon, env("ADD", container, ns_path(pod)), conf(runtimeConfig=MULTI)
    )
    assert code == 0, added
    assert len(added["ips"]) == CARDS
    return pod, added


def test_kill_9_mid_multi_nic_teardown_then_the_spooled_del_finishes_it(
    crash_node: Callable[[LabConfig, dict[str, str], str], CrashNode],
) -> None:
    lab, daemon, shim, pause = crash_node(
        P5, {"ENABLE_MULTI_NIC": "true"}, "del-between-interfaces@3"
    )
    pod, added = add_multi_nic(lab, shim, daemon, "w2")
    plumbed = host_state(lab)
    with subprocess.Popen(
        ["ip", "netns", "exec", lab.node_ns, str(shim)],
        env={
            "PATH": "/usr/bin:/bin",
            "ULTRANET_CNI_SOCKET": str(daemon.cni_socket),
            "ULTRANET_CNI_SPOOL": str(daemon.state_dir / "spool"),
            **env("DEL", "w2", ns_path(pod)),
        },
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as shim_del:
        try:
            assert shim_del.stdin is not None
            shim_del.stdin.write(conf(prevResult=added, runtimeConfig=MULTI))
            shim_del.stdin.close()
            assert pause.wait(daemon) == "del-between-interfaces\n"
            daemon.kill()  # four interfaces' routing gone, 28 to go, no veth deleted yet
            shim_del.wait(timeout=30)  # its answers are a few bytes: no pipe fills
        finally:
            if shim_del.poll() is None:
                shim_del.kill()
        assert shim_del.stdout is not None and shim_del.stderr is not None
        stdout, stderr = shim_del.stdout.read(), shim_del.stderr.read()
    assert shim_del.returncode == 0, (stdout, stderr)  # the shim spooled the DEL
    midway = host_state(lab)
    assert len(midway["links"]) == CARDS
    # Interfaces 0-3 lost their rules: "to" for each, "from" for 1-3 (0's ENI uses main).
    assert len(midway["rules"]) == len(plumbed["rules"]) - (4 + 3)

    restart_without_pause(daemon)

    assert host_state(lab) == CLEAN
    assert pod_state(pod) == {"links": [], "addrs": [], "rules": []}
    assert held(daemon) == []
    assert strays_reaped(lab) == 0  # the replayed DEL deleted them, not the sweep
    code, out = exec_shim(lab, shim, daemon, env("DEL", "w2", ns_path(pod)), conf())  # a retry
    assert code == 0, out
    assert host_state(lab) == CLEAN


def test_kill_9_between_two_reaper_batches_leaves_the_host_clean(
    crash_node: Callable[[LabConfig, dict[str, str], str], CrashNode],
) -> None:
    """The reaper deletes a batch (a DEL's veths, with whatever else is queued) in one
    request; killed after one multi-NIC pod's batch went and while the next pod's veths
    sit in the reaper's device group, not yet deleted, the restart leaves nothing."""
    lab, daemon, shim, pause = crash_node(
        P5, {"ENABLE_MULTI_NIC": "true"}, "reaper-before-delete@1"
    )
    pods = {c: add_multi_nic(lab, shim, daemon, c) for c in ("w3", "w4")}
    veths = {
        c: sorted(host_ifname(IpamKey(NETWORK, c, "eth0"), i, "eni") for i in range(CARDS))
        for c in pods
    }

    def delete(container: str) -> None:
        pod, added = pods[container]
        code, out = exec_shim(
            lab,
            shim,
            daemon,
            env("DEL", container, ns_path(pod)),
            conf(prevResult=added, runtimeConfig=MULTI),
        )
        assert code == 0, out

    delete("w3")
    deadline = time.monotonic() + 60
    while set(veths["w3"]) & set(host_state(lab)["links"]):  # the first batch, let through
        assert time.monotonic() < deadline, "w3's veths were not deleted"
        time.sleep(0.05)  # polling the daemon's work, bounded by the deadline
    delete("w4")
    assert pause.wait(daemon) == "reaper-before-delete\n"
    daemon.kill()
    assert host_state(lab) == {**CLEAN, "links": veths["w4"]}
    (group,) = set(link_groups(lab, veths["w4"]))  # all in the batch being deleted
    assert group != 0

    restart_without_pause(daemon)

    assert host_state(lab) == CLEAN
    for pod, _ in pods.values():
        assert pod_state(pod) == {"links": [], "addrs": [], "rules": []}
    assert held(daemon) == []
    assert strays_reaped(lab) == CARDS
    for container, (pod, _) in pods.items():
        code, out = exec_shim(lab, shim, daemon, env("DEL", container, ns_path(pod)), conf())
        assert code == 0, out
    assert host_state(lab) == CLEAN


def link_groups(lab: Lab, names: list[str]) -> list[int]:
    """Each link's device group (IFLA_GROUP), in the node's namespace."""
    with IPRoute(netns=lab.node_ns) as ipr:
        return [ipr.link("get", ifname=name)[0].get("IFLA_GROUP") for name in names]
