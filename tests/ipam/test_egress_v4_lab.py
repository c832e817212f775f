"""IPv4 egress for IPv6 pods (the pod's side as the ADD plumbs it, ``Plumbing.setup_v4_egress``;
the node's, ``ipam.egress.v4_egress_ruleset``), proven with packets in the lab: a pod with only
a node-local IPv4 (from 198.18.4.0/22 here, 169.254.172.0/22 by default) reaches the internet
host beyond the VPC router as the node's primary IPv4, and other pods cannot open connections
to that node-local address."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest
from pyroute2 import IPRoute

from cni.egress_v4 import POD_IFNAME, gateway
from cni.errors import CniError
from cni.keys import IpamKey
from cni.plumbing import Plumbing, PodNetwork, v4_egress_ifname
from ipam.egress import V4_EGRESS_CHAIN, Egress, EgressConfig
from tests.conftest import LabFactory
from tests.ipam.test_egress_lab import PORT, exchange
from tools.lab import netns
from tools.lab.egress import Internet, NetnsEgressHost, add_internet
from tools.lab.lab import Lab, LabConfig

pytestmark = pytest.mark.netns

NODE_RANGE = IPv4Network("198.18.4.0/22")
FIRST = gateway(NODE_RANGE) + 1
BLOCKED_S = 2.0  # no connection this long: blocked (one let through takes ms)


@dataclass
class V4Lab:
    lab: Lab
    primary_ip: IPv4Address
    inet: Internet
    runner: asyncio.Runner
    plumbing: Plumbing  # the daemon's, in the lab's node namespace

    def setup(self, ns: str, key: IpamKey, address: IPv4Address) -> str:
        """What an IPv6 pod's ADD does for its egress: enter the pod, plumb ``v4if0``."""
        path = f"/run/netns/{ns}"

        async def plumb() -> str:
            entry = await self.plumbing.enter(path, key, veth_prefix="eni")
            try:
                net = PodNetwork(key, path, (), 9001, "eni")
                return await self.plumbing.setup_v4_egress(net, address, NODE_RANGE, entry)
            finally:
                entry.close()

        return self.runner.run(plumb())

    def pod(self, name: str, address: IPv4Address) -> tuple[str, IpamKey]:
        ns = self.lab.create_pod_namespace(name)
        key = IpamKey("ultranet", name, "eth0")
        self.setup(ns, key, address)
        return ns, key

    def teardown(self, key: IpamKey) -> None:
        self.runner.run(self.plumbing.teardown_v4_egress(key))
        self.runner.run(self.plumbing.settle())

    def egress(self) -> Egress:
        return Egress(EgressConfig(), NetnsEgressHost(self.lab.node_ns), backend="nft")

    def seen_by(
        self, server_ns: str, listen: IPv4Address, client_ns: str, timeout: float = 30.0
    ) -> str | None:
        """The source the server saw (None: no connection within ``timeout``)."""
        with netns.listening_socket(server_ns, str(listen), PORT) as listener:
            return exchange(listener, client_ns, str(listen), PORT, timeout=timeout)

    def host_links(self) -> list[str]:
        with IPRoute(netns=self.lab.node_ns) as ipr:
            return [str(link.get("ifname")) for link in ipr.get_links()]


@pytest.fixture
def v4lab(lab_factory: LabFactory) -> Iterator[V4Lab]:
    lab = lab_factory(LabConfig(instance_type="m5.large"))
    inet = add_internet(lab.vpc_ns, f"{netns.PREFIX}{lab.lab_id}-inet")
    netns.sysctl(lab.vpc_ns, "net.ipv4.conf.all.rp_filter", "1")
    (primary,) = lab.cloud.enis_of(lab.instance_id)
    primary_ip = lab.cloud.eni_view(primary.eni_id).primary_ip
    assert primary_ip is not None
    with asyncio.Runner() as runner:
        plumbing = runner.run(Plumbing.open(f"/run/netns/{lab.node_ns}"))
        try:
            yield V4Lab(lab, primary_ip, inet, runner, plumbing)
        finally:
            runner.run(plumbing.close())


def test_an_ipv6_pods_node_local_ipv4_leaves_as_the_nodes_primary_ipv4(v4lab: V4Lab) -> None:
    pod_ns, _ = v4lab.pod("a", FIRST)
    with IPRoute(netns=pod_ns) as ipr:
        (index,) = ipr.link_lookup(ifname=POD_IFNAME)
        routes = {
            (f"{r.get('dst') or '0.0.0.0'}/{r['dst_len']}", r.get("gateway"))
            for r in ipr.get_routes(family=2, oif=index, table=254)
        }
    gw = str(gateway(NODE_RANGE))
    assert routes == {(f"{gw}/32", None), ("0.0.0.0/0", gw)}
    # Without the node's SNAT the router has no way back to the node-local address.
    assert v4lab.seen_by(v4lab.inet.ns, v4lab.inet.address, pod_ns, BLOCKED_S) is None

    assert v4lab.egress().apply_v4_egress(NODE_RANGE, v4lab.primary_ip)

    assert v4lab.seen_by(v4lab.inet.ns, v4lab.inet.address, pod_ns) == str(v4lab.primary_ip)
    assert v4lab.egress().apply_v4_egress(NODE_RANGE, v4lab.primary_ip) == []


def test_other_pods_cannot_open_connections_to_a_node_local_address(v4lab: V4Lab) -> None:
    server_ns, _ = v4lab.pod("a", FIRST)
    client_ns, _ = v4lab.pod("b", FIRST + 1)
    assert v4lab.seen_by(server_ns, FIRST, client_ns) == str(FIRST + 1)

    v4lab.egress().apply_v4_egress(NODE_RANGE, v4lab.primary_ip)

    assert v4lab.seen_by(server_ns, FIRST, client_ns, BLOCKED_S) is None


def test_teardown_and_uninstall_leave_nothing(v4lab: V4Lab) -> None:
    pod_ns, key = v4lab.pod("a", FIRST)
    egress = v4lab.egress()
    egress.apply_v4_egress(NODE_RANGE, v4lab.primary_ip)
    assert V4_EGRESS_CHAIN in v4lab.lab.node_exec(["iptables-nft-save"]).stdout
    assert v4_egress_ifname(key) in v4lab.host_links()

    v4lab.teardown(key)
    v4lab.teardown(key)  # idempotent
    assert egress.remove()

    with IPRoute(netns=pod_ns) as ipr:
        assert ipr.link_lookup(ifname=POD_IFNAME) == []
    assert v4_egress_ifname(key) not in v4lab.host_links()
    assert "ULTRANET" not in v4lab.lab.node_exec(["iptables-nft-save"]).stdout


def test_a_failed_setup_removes_its_veth_and_names_the_step(v4lab: V4Lab) -> None:
    _, key = v4lab.pod("a", FIRST)
    ns = v4lab.lab.create_pod_namespace("b")
    with pytest.raises(CniError, match="IPv4 egress"):
        v4lab.setup(ns, key, FIRST)  # the host end's name is taken
    assert v4_egress_ifname(key) in v4lab.host_links()  # not ours to remove: pod a's stays
    with IPRoute(netns=ns) as ipr:
        assert ipr.link_lookup(ifname=POD_IFNAME) == []
    # A failure once the veth exists (the pod has a default route already) removes it.
    other = v4lab.lab.create_pod_namespace("c")
    with IPRoute(netns=other) as ipr:
        ipr.route("add", dst="0.0.0.0/0", oif=ipr.link_lookup(ifname="lo")[0])
    clash = IpamKey("ultranet", "c", "eth0")
    with pytest.raises(CniError, match="default via .* in the pod"):
        v4lab.setup(other, clash, FIRST + 1)
    assert v4_egress_ifname(clash) not in v4lab.host_links()
    assert v4_egress_ifname(key) in v4lab.host_links()
    with IPRoute(netns=other) as ipr:
        assert ipr.link_lookup(ifname=POD_IFNAME) == []
