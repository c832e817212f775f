"""Egress as the VPC CNI does it, proven with packets in the lab.

The lab: a node namespace with its primary ENI (eth0) and a secondary ENI (eth1, plumbed
by ``ipam.hostnet``), a pod on the secondary ENI's prefix (plumbed by the CNI handler),
the VPC router namespace, and an "internet" host beyond the router (198.18.0.2, and
198.19.0.2 on its loopback) that routes the VPC's addresses back through the router.
The router filters sources strictly (rp_filter 1): a packet an ENI's link carries from an
address routed to another ENI is dropped, as the VPC drops what an ENI sends from an
address that is not its own. The node filters strictly too (a distribution default).
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from pyroute2 import IPRoute

from ipam.egress import Backend, Egress, EgressConfig, NodeFacts
from ipam.hostnet import EniLink, HostNetwork
from tests.cni.harness import node as cni_node
from tests.conftest import LabFactory
from tests.lab.helpers import ec2_client
from tools.lab import netns
from tools.lab.egress import Internet, NetnsEgressHost, add_internet
from tools.lab.lab import Lab, LabConfig
from tools.lab.pool_backend import PoolBackend, pool_from_enis

pytestmark = pytest.mark.netns

PAYLOAD = 256 * 1024
PORT = 8080
NODE_PORT = 30080
VPC = IPv4Network("100.64.0.0/16")  # LabConfig's default VPC CIDR


@dataclass
class EgressLab:
    lab: Lab
    primary_ip: IPv4Address
    pod_ns: str
    pod_ip: IPv4Address
    inet: Internet

    def facts(self, *extra_vpc: IPv4Network) -> NodeFacts:
        return NodeFacts("eth0", self.primary_ip, (VPC, *extra_vpc))

    def egress(self, backend: Backend = "nft", **knobs: Any) -> Egress:
        return Egress(EgressConfig(**knobs), NetnsEgressHost(self.lab.node_ns), backend=backend)

    def iptables(self, backend: str, *args: str) -> None:
        self.lab.node_exec([f"iptables-{backend}", "-w", *args])

    def save(self, backend: str = "nft") -> str:
        """The node's rules without comments and counters, for comparison."""
        text = self.lab.node_exec([f"iptables-{backend}-save"]).stdout
        return "\n".join(
            re.sub(r" \[\d+:\d+\]$", "", line)
            for line in text.splitlines()
            if not line.startswith("#")
        )

    def mark_rules(self) -> list[str]:
        out = self.lab.node_exec(["ip", "-4", "rule", "list", "priority", "1024"]).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def tx_bytes(self, ifname: str) -> int:
        with IPRoute(netns=self.lab.node_ns) as ipr:
            (link,) = ipr.get_links(ifname=ifname)
            return int(link.get("stats64")["tx_bytes"])

    def source_seen(self, dst: IPv4Address, server_ns: str | None = None) -> str | None:
        """Connect from the pod to ``dst``; the source address the server saw."""
        server = server_ns or self.inet.ns
        with netns.listening_socket(server, str(dst), PORT) as listener:
            return exchange(listener, self.pod_ns, str(dst), PORT)


def exchange(
    listener: socket.socket, client_ns: str, dst: str, port: int, timeout: float = 30.0
) -> str | None:
    """A connection from ``client_ns`` to ``dst:port``, accepted on ``listener``: each side
    sends PAYLOAD bytes and reads the other's. The peer address the server saw, or None
    when no connection arrived within ``timeout``. A connection let through arrives in
    milliseconds, so the default is only a failure guard; a caller expecting None passes
    a short ``timeout``, which then bounds the wait."""
    received: list[int] = []
    failed: list[OSError] = []

    def client() -> None:
        with socket.create_connection((dst, port), timeout=timeout) as sock:
            sock.sendall(bytes(PAYLOAD))
            sock.shutdown(socket.SHUT_WR)
            received.append(_drain(sock))

    def run_client() -> None:
        try:
            netns.run_in(client_ns, client)
        except OSError as err:
            failed.append(err)

    thread = threading.Thread(target=run_client)
    thread.start()
    listener.settimeout(timeout)
    try:
        conn, (peer, _) = listener.accept()
    except TimeoutError:
        thread.join()
        return None
    with conn:
        conn.settimeout(timeout)
        assert _drain(conn) == PAYLOAD
        conn.sendall(bytes(PAYLOAD))
    thread.join()
    assert not failed, failed
    assert received == [PAYLOAD]
    return str(peer)


def rule_lines(saved: str) -> list[str]:
    return [line for line in saved.splitlines() if line.startswith("-A ")]


def _drain(sock: socket.socket) -> int:
    total = 0
    while chunk := sock.recv(65536):
        total += len(chunk)
    return total


async def _add_pod(lab: Lab, backend: PoolBackend, pod_ns: str) -> dict[str, Any]:
    async with cni_node(lab, backend) as node:
        return await node.add("egress", pod_ns)


@pytest.fixture
def egress_lab(lab_factory: LabFactory) -> Iterator[EgressLab]:
    lab = lab_factory(LabConfig(instance_type="m5.large"))
    ec2 = ec2_client(lab)
    created = ec2.create_network_interface(SubnetId=lab.subnet_ids[1], Ipv4PrefixCount=1)
    eni_id = created["NetworkInterface"]["NetworkInterfaceId"]
    ec2.attach_network_interface(
        NetworkInterfaceId=eni_id, InstanceId=lab.instance_id, DeviceIndex=1
    )
    view = lab.cloud.eni_view(eni_id)
    assert view.primary_ip is not None
    with HostNetwork(netns=lab.node_ns) as host:
        host.setup_eni(
            EniLink(eni_id, view.mac, 0, 1, view.primary_ip, view.subnet)  # eth1, table 2
        )
    pod_ns = lab.create_pod_namespace("egress")
    result = asyncio.run(_add_pod(lab, PoolBackend(pool_from_enis([view])), pod_ns))
    pod_ip = IPv4Address(result["ips"][0]["address"].split("/")[0])
    assert any(pod_ip in prefix for prefix in view.prefixes)  # on the secondary ENI
    inet = add_internet(lab.vpc_ns, f"{netns.PREFIX}{lab.lab_id}-inet", vpc_cidrs=(VPC,))
    netns.sysctl(lab.vpc_ns, "net.ipv4.conf.all.rp_filter", "1")
    netns.sysctl(lab.node_ns, "net.ipv4.conf.all.rp_filter", "1")
    (primary,) = [e for e in lab.cloud.enis_of(lab.instance_id) if e.eni_id != eni_id]
    primary_ip = lab.cloud.eni_view(primary.eni_id).primary_ip
    assert primary_ip is not None
    yield EgressLab(lab, primary_ip, pod_ns, pod_ip, inet)


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_a_pod_on_a_secondary_eni_reaches_the_internet_as_the_node(
    egress_lab: EgressLab, backend: Backend
) -> None:
    lab = egress_lab
    # Without egress the pod's own address goes out by its ENI (a public subnet's internet
    # gateway would drop it: the address has no public one).
    assert lab.source_seen(lab.inet.address) == str(lab.pod_ip)

    changed = lab.egress(backend).apply(lab.facts())
    assert "net.ipv4.conf.eth0.rp_filter=2" in changed
    eth0, eth1 = lab.tx_bytes("eth0"), lab.tx_bytes("eth1")

    assert lab.source_seen(lab.inet.address) == str(lab.primary_ip)
    assert lab.tx_bytes("eth0") - eth0 >= PAYLOAD  # out by the primary ENI
    assert lab.tx_bytes("eth1") - eth1 < PAYLOAD // 4
    assert "AWS-SNAT-CHAIN-0" in lab.save(backend)


def test_nodeport_replies_from_a_pod_on_a_secondary_eni_leave_by_the_primary_eni(
    egress_lab: EgressLab,
) -> None:
    lab = egress_lab
    # kube-proxy's part: the NodePort on the node's primary address, DNAT'd to the pod.
    lab.iptables(
        "nft",
        *("-t", "nat", "-A", "PREROUTING", "-d", str(lab.primary_ip), "-p", "tcp"),
        *("--dport", str(NODE_PORT), "-j", "DNAT", "--to-destination", f"{lab.pod_ip}:{PORT}"),
    )
    with netns.listening_socket(lab.pod_ns, "0.0.0.0", PORT) as listener:
        # Without the marks the reply leaves by eth1 from the node's address: dropped.
        assert exchange(listener, lab.inet.ns, str(lab.primary_ip), NODE_PORT, 2.0) is None

        lab.egress().apply(lab.facts())
        eth0, eth1 = lab.tx_bytes("eth0"), lab.tx_bytes("eth1")
        seen = exchange(listener, lab.inet.ns, str(lab.primary_ip), NODE_PORT)

    assert seen == str(lab.inet.address)  # inbound: DNAT only, no SNAT
    assert lab.tx_bytes("eth0") - eth0 >= PAYLOAD
    assert lab.tx_bytes("eth1") - eth1 < PAYLOAD // 4


def test_excluded_cidrs_and_the_vpc_are_reached_untranslated(egress_lab: EgressLab) -> None:
    lab = egress_lab
    excluded = IPv4Network(f"{lab.inet.extra}/24", strict=False)
    lab.egress(exclude_snat_cidrs=(excluded,)).apply(lab.facts())

    assert lab.source_seen(lab.inet.extra) == str(lab.pod_ip)
    gateway = IPv4Address("100.64.0.1")  # the VPC router's address in the primary's subnet
    assert lab.source_seen(gateway, server_ns=lab.lab.vpc_ns) == str(lab.pod_ip)
    assert lab.source_seen(lab.inet.address) == str(lab.primary_ip)  # the rest is


def test_external_snat_installs_no_snat_and_removes_it(egress_lab: EgressLab) -> None:
    lab = egress_lab
    lab.egress().apply(lab.facts())
    assert lab.source_seen(lab.inet.address) == str(lab.primary_ip)

    lab.egress(external_snat=True).apply(lab.facts())

    saved = lab.save()
    assert "AWS-SNAT-CHAIN-0" not in saved and "AWS-CONNMARK-CHAIN-0" not in saved
    assert saved.count('"AWS, primary ENI"') == 2  # NodePort support keeps the marks
    assert lab.mark_rules() == ["1024:\tfrom all fwmark 0x80/0x80 lookup main"]
    assert lab.source_seen(lab.inet.address) == str(lab.pod_ip)


def test_reapply_changes_nothing_a_new_vpc_cidr_updates_and_uninstall_removes_all(
    egress_lab: EgressLab,
) -> None:
    lab = egress_lab
    before = rule_lines(lab.save())
    egress = lab.egress()
    assert egress.apply(lab.facts())
    applied = lab.save()
    assert lab.egress().apply(lab.facts()) == []  # a restarted daemon: not one write
    assert lab.save() == applied
    assert len(lab.mark_rules()) == 1

    # A secondary VPC CIDR block now holds the "internet" host: no longer translated.
    grown = lab.facts(IPv4Network("198.18.0.0/24"))
    assert egress.apply(grown)
    assert "-d 198.18.0.0/24" in lab.save()
    assert lab.source_seen(lab.inet.address) == str(lab.pod_ip)
    assert lab.source_seen(lab.inet.extra) == str(lab.primary_ip)

    assert egress.remove()
    assert rule_lines(lab.save()) == before == []
    assert "AWS" not in lab.save()
    assert lab.mark_rules() == []
    assert egress.remove() == []
    assert lab.source_seen(lab.inet.extra) == str(lab.pod_ip)


RP_FILTER_UNDER_READ_ONLY_PROC_SYS = """
import errno
from pathlib import Path
from ipam.egress import LocalHost
path = Path("/proc/sys/net/ipv4/conf/eth0/rp_filter")
try:
    path.write_text("2\\n")
except OSError as err:
    print("read-only" if err.errno == errno.EROFS else f"failed: {err}")
else:
    print("writable")
LocalHost().set_rp_filter("eth0", 2)
print(path.read_text().strip())
"""


def test_rp_filter_is_set_where_proc_sys_is_read_only(egress_lab: EgressLab) -> None:
    # What a container runtime gives a non-privileged container: /proc/sys read-only.
    lab = egress_lab.lab
    netns.sysctl(lab.node_ns, "net.ipv4.conf.eth0.rp_filter", "1")
    script = (
        "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys"
        f' && exec "{sys.executable}" -c "$0"'
    )
    done = lab.node_exec(
        ["unshare", "--mount", "sh", "-c", script, RP_FILTER_UNDER_READ_ONLY_PROC_SYS]
    )
    assert done.stdout.split() == ["read-only", "2"], done.stderr
