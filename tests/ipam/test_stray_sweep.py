"""The periodic stray sweep of the real ``ultranet-ipamd`` (ULTRANET_STRAY_SWEEP_INTERVAL):
what a pod leaves behind while the daemon runs goes without a restart."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from cni.install import install
from cni.keys import IpamKey
from cni.plumbing import HOST_VETH_ALIAS, host_ifname, v4_egress_ifname
from tests.cni.harness import NETWORK, conf, env, host_state, ns_path
from tests.conftest import LabFactory
from tests.ipam.ipv6lab import give_primary_eni_an_ipv6_prefix
from tests.ipam.test_daemon_cni import METRICS_PORT, exec_shim, held, scraped
from tools.lab import netns
from tools.lab.daemon import IpamdProcess
from tools.lab.lab import Lab, LabConfig

pytestmark = pytest.mark.netns

RELEASED = "ultranet_ipamd_stray_allocations_released_total"
VETHS = "ultranet_ipamd_stray_veths_reaped_total"
RULES = "ultranet_ipamd_stray_rules_reaped_total"
SWEEPS = "ultranet_ipamd_stray_sweeps_total"


@pytest.fixture
def sweeping(lab_factory: LabFactory, tmp_path: Path) -> Iterator[tuple[Lab, IpamdProcess, Path]]:
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=1))
    daemon = IpamdProcess(
        lab,
        tmp_path / "d",
        {
            "ULTRANET_CNI_SPOOL": str(tmp_path / "d" / "spool"),
            "ULTRANET_METRICS_ADDR": f"127.0.0.1:{METRICS_PORT}",
            "ULTRANET_STRAY_SWEEP_INTERVAL": "1",
        },
    )
    daemon.start()
    (shim,) = install(tmp_path / "bin", None, python=sys.executable)
    try:
        daemon.wait_ready()
        daemon.wait_cni_socket()
        yield lab, daemon, shim
    finally:
        daemon.stop()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.1)  # polling the daemon's work, bounded by the deadline


def counted(lab: Lab, sample: str) -> float:
    value = scraped(lab, sample)
    return 0.0 if value is None else value


def test_the_periodic_sweep_cleans_after_a_pod_gone_without_a_del_and_a_stray_veth(
    sweeping: tuple[Lab, IpamdProcess, Path],
) -> None:
    lab, daemon, shim = sweeping
    kept_pod, gone_pod = lab.create_pod_namespace("kept"), lab.create_pod_namespace("gone")
    for container, pod in (("kept", kept_pod), ("gone", gone_pod)):
        code, out = exec_shim(lab, shim, daemon, env("ADD", container, ns_path(pod)), conf())
        assert code == 0, out
    kept = host_state(lab)
    kept_veth = host_ifname(IpamKey(NETWORK, "kept", "eth0"), 0, "eni")
    # A veth of ours no allocation accounts for (a deletion the kernel refused, say).
    stray = host_ifname(IpamKey(NETWORK, "never-added", "eth0"), 0, "eni")
    node = ["ip", "-n", lab.node_ns, "link"]
    subprocess.run([*node, "add", stray, "type", "veth", "peer", "name", "ul-peer"], check=True)
    subprocess.run([*node, "set", stray, "alias", HOST_VETH_ALIAS], check=True)
    # The runtime removes the pod's namespace and never sends its DEL: the kernel takes
    # its veth and host route; its allocation and host rule stay.
    netns.delete(gone_pod)

    def only_kept_left() -> bool:
        state = host_state(lab)
        return [a["container_id"] for a in held(daemon)] == ["kept"] and state["links"] == [
            kept_veth
        ]

    wait_until(only_kept_left, "sweep")
    wait_until(lambda: counted(lab, RULES) == 1, "rule reaped")
    kept_address = next(r[2] for r in kept["rules"] if r[2])
    assert [r[2] for r in host_state(lab)["rules"]] == [kept_address]
    assert counted(lab, RELEASED) == 1
    assert counted(lab, VETHS) == 1
    assert counted(lab, f'{SWEEPS}{{outcome="ok"}}') >= 1
    assert counted(lab, f'{SWEEPS}{{outcome="failed"}}') == 0
    assert "released 1 allocation(s) whose pod's host veths are gone" in daemon.log_tail(80)
    code, out = exec_shim(lab, shim, daemon, env("DEL", "kept", ns_path(kept_pod)), conf())
    assert code == 0, out
    wait_until(lambda: host_state(lab) == {"links": [], "rules": [], "routes": []}, "clean host")
    assert held(daemon) == []


def test_a_restart_keeps_the_pods_of_a_node_with_another_veth_prefix(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    # AWS_VPC_K8S_CNI_VETHPREFIX: the daemon's conflist names host veths pod<hash>. A
    # restart drops the allocations whose host veth is gone, and must look for that name,
    # not eni<hash>, or it drops every live pod (and the sweep then reaps their rules).
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=1))
    daemon = IpamdProcess(
        lab,
        tmp_path / "d",
        {
            "ULTRANET_CNI_SPOOL": str(tmp_path / "d" / "spool"),
            "AWS_VPC_K8S_CNI_VETHPREFIX": "pod",
            "ULTRANET_STRAY_SWEEP_INTERVAL": "1",
        },
    )
    (shim,) = install(tmp_path / "bin", None, python=sys.executable)
    daemon.start()
    try:
        daemon.wait_ready()
        daemon.wait_cni_socket()
        pod = lab.create_pod_namespace("prefixed")
        code, out = exec_shim(
            lab, shim, daemon, env("ADD", "prefixed", ns_path(pod)), conf(vethPrefix="pod")
        )
        assert code == 0, out
        daemon.kill()
        daemon.start()
        daemon.wait_ready()
        daemon.wait_cni_socket()
        assert [a["container_id"] for a in held(daemon)] == ["prefixed"]
        host = host_ifname(IpamKey(NETWORK, "prefixed", "eth0"), 0, "pod")
        assert subprocess.run(["ip", "-n", lab.node_ns, "link", "show", host]).returncode == 0
        code, out = exec_shim(
            lab, shim, daemon, env("DEL", "prefixed", ns_path(pod)), conf(vethPrefix="pod")
        )
        assert code == 0, out
        assert held(daemon) == []
    finally:
        daemon.stop()


IPV6_ENV = {
    "ENABLE_IPv4": "false",
    "ENABLE_IPv6": "true",
    "ENABLE_PREFIX_DELEGATION": "true",
    "ULTRANET_V4_EGRESS_RANGE": "198.18.4.0/22",  # the lab's address space, not 169.254.172/22
}


def alias_of(lab: Lab, name: str) -> str | None:
    """The link's alias ("" for none), None if there is no such link."""
    with IPRoute(netns=lab.node_ns) as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        alias = ipr.get_links(found[0])[0].get("ifalias")
        return "" if alias is None else str(alias)


def test_the_sweep_reaps_an_ipv6_pods_stray_ipv4_egress_veth_and_keeps_the_live_ones(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    # An IPv6 pod has a second host veth, v4e<hash> (its IPv4 egress). A DEL answered before
    # a crash took its queued deletion leaves it with no allocation: the sweep must take it
    # as it takes a stray eni<hash>, and leave a live pod's and anyone else's alone.
    lab = lab_factory(LabConfig(instance_type="m5.large"))
    give_primary_eni_an_ipv6_prefix(lab)
    daemon = IpamdProcess(
        lab,
        tmp_path / "d",
        {
            **IPV6_ENV,
            "ULTRANET_CNI_SPOOL": str(tmp_path / "d" / "spool"),
            "ULTRANET_METRICS_ADDR": f"127.0.0.1:{METRICS_PORT}",
            "ULTRANET_STRAY_SWEEP_INTERVAL": "1",
        },
    )
    (shim,) = install(tmp_path / "bin", None, python=sys.executable)
    daemon.start()
    try:
        daemon.wait_ready(60)
        daemon.wait_cni_socket()
        pod = lab.create_pod_namespace("kept")
        code, out = exec_shim(lab, shim, daemon, env("ADD", "kept", ns_path(pod)), conf())
        assert code == 0, out
        kept = IpamKey(NETWORK, "kept", "eth0")
        kept_links = [host_ifname(kept, 0, "eni"), v4_egress_ifname(kept)]
        # The ADD marks its egress veth as ours, or a crash would leave it unsweepable.
        assert alias_of(lab, v4_egress_ifname(kept)) == HOST_VETH_ALIAS
        stray = v4_egress_ifname(IpamKey(NETWORK, "never-added", "eth0"))
        foreign = v4_egress_ifname(IpamKey(NETWORK, "someone-elses", "eth0"))
        node = ["ip", "-n", lab.node_ns, "link"]
        for name, peer in ((stray, "ul-peer"), (foreign, "ul-peer2")):
            subprocess.run([*node, "add", name, "type", "veth", "peer", "name", peer], check=True)
        subprocess.run([*node, "set", stray, "alias", HOST_VETH_ALIAS], check=True)

        wait_until(lambda: alias_of(lab, stray) is None, "stray v4e veth reaped")
        # Counted once the reaper's deletion has come back to the sweep, after the link went.
        wait_until(lambda: counted(lab, VETHS) >= 1, "the reap counted")
        assert counted(lab, VETHS) == 1
        assert all(alias_of(lab, name) == HOST_VETH_ALIAS for name in kept_links)
        assert alias_of(lab, foreign) == ""  # no alias of ours: not ours to take
        assert [a["container_id"] for a in held(daemon)] == ["kept"]
        assert "reaped 1 stray veth(s)" in daemon.log_tail(80)
        wait_until(lambda: counted(lab, f'{SWEEPS}{{outcome="ok"}}') >= 2, "a later sweep")
        assert all(alias_of(lab, name) == HOST_VETH_ALIAS for name in kept_links)
        code, out = exec_shim(lab, shim, daemon, env("DEL", "kept", ns_path(pod)), conf())
        assert code == 0, out
        wait_until(lambda: all(alias_of(lab, n) is None for n in kept_links), "DEL's veths gone")
        assert held(daemon) == []
    finally:
        daemon.stop()
