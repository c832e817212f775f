"""An IPv6 pod reaches an IPv4 host beyond the VPC router as the node's primary IPv4: the real
``ultranet-ipamd`` in IPv6 mode with ``ENABLE_V4_EGRESS`` (its node-local range 198.18.4.0/22
here, the lab's address space; 169.254.172.0/22 by default), the pod ADDed through the exec'd
shim, the packet seen by the internet host. Issue 17's bar: a packet that crosses the lab VPC
router with the expected source address."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from cni.egress_v4 import POD_IFNAME
from cni.keys import IpamKey
from cni.plumbing import v4_egress_ifname
from tests.cni.exec_harness import exec_shim, install_shim
from tests.cni.harness import conf, env
from tests.conftest import LabFactory
from tests.ipam.ipv6lab import give_primary_eni_an_ipv6_prefix
from tests.ipam.test_egress_lab import PORT, exchange
from tools.lab import netns
from tools.lab.daemon import IpamdProcess
from tools.lab.egress import add_internet
from tools.lab.lab import LabConfig

pytestmark = pytest.mark.netns

NODE_RANGE = IPv4Network("198.18.4.0/22")
ENV = {
    "ENABLE_IPv4": "false",
    "ENABLE_IPv6": "true",
    "ENABLE_PREFIX_DELEGATION": "true",
    "ULTRANET_V4_EGRESS_RANGE": str(NODE_RANGE),
}


@pytest.fixture
def daemons() -> Iterator[list[IpamdProcess]]:
    started: list[IpamdProcess] = []
    try:
        yield started
    finally:
        for daemon in started:
            daemon.stop()


def test_an_ipv6_pod_reaches_an_ipv4_host_as_the_nodes_primary_ipv4(
    lab_factory: LabFactory, daemons: list[IpamdProcess], tmp_path: Path
) -> None:
    lab = lab_factory(LabConfig(instance_type="m5.large"))
    give_primary_eni_an_ipv6_prefix(lab)
    (primary,) = lab.cloud.enis_of(lab.instance_id)
    primary_ip = lab.cloud.eni_view(primary.eni_id).primary_ip
    inet = add_internet(lab.vpc_ns, f"{netns.PREFIX}{lab.lab_id}-inet")
    netns.sysctl(lab.vpc_ns, "net.ipv4.conf.all.rp_filter", "1")  # the VPC drops foreign sources
    daemon = IpamdProcess(lab, tmp_path / "d", ENV)
    daemons.append(daemon)
    daemon.start()
    daemon.wait_ready(60)
    sock = daemon.wait_cni_socket()
    shim = install_shim(tmp_path)
    pod_ns = lab.create_pod_namespace("a")
    path = f"/run/netns/{pod_ns}"

    def cni(command: str, **extra: object) -> tuple[int, dict[str, object]]:
        return asyncio.run(exec_shim(shim, sock, env(command, "c1", path), conf("1.0.0", **extra)))

    code, result = cni("ADD")
    assert code == 0, result
    (ip,) = result["ips"]  # type: ignore[misc]
    assert ip["address"].endswith("/128")
    names = [i["name"] for i in result["interfaces"]]  # type: ignore[attr-defined]
    assert POD_IFNAME in names  # listed, its node-local address not among the pod's ips
    with IPRoute(netns=pod_ns) as ipr:
        (index,) = ipr.link_lookup(ifname=POD_IFNAME)
        (local,) = [a.get("address") for a in ipr.get_addr(family=2, index=index)]
    assert IPv4Address(local) in NODE_RANGE
    assert cni("CHECK", prevResult=result)[0] == 0

    with netns.listening_socket(inet.ns, str(inet.address), PORT) as listener:
        seen = exchange(listener, pod_ns, str(inet.address), PORT)
    assert seen == str(primary_ip)  # crossed the VPC router as the node's primary IPv4

    host_end = v4_egress_ifname(IpamKey("ultranet", "c1", "eth0"))
    assert host_end in links_of(lab.node_ns)
    assert cni("DEL", prevResult=result)[0] == 0
    # The DEL answers before its veths are gone (a reaper thread deletes them): wait, bounded.
    deadline = time.monotonic() + 10
    while host_end in links_of(lab.node_ns) or POD_IFNAME in links_of(pod_ns):
        assert time.monotonic() < deadline, "the egress veth outlived its DEL"
        time.sleep(0.01)  # polling the kernel's links, bounded


def links_of(ns: str) -> set[str]:
    with IPRoute(netns=ns) as ipr:
        return {str(link.get("ifname")) for link in ipr.get_links()}
