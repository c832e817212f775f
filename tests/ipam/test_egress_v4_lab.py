"""IPv4 egress for IPv6 pods (``cni.egress_v4`` per pod, ``ipam.egress.v4_egress_ruleset`` per
node), proven with packets in the lab: a pod with only a node-local IPv4 (from 198.18.4.0/22
here, 169.254.172.0/22 by default) reaches the internet host beyond the VPC router as the
node's primary IPv4, and other pods cannot open connections to that node-local address."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest
from pyroute2 import IPRoute

from cni.egress_v4 import POD_IFNAME, V4EgressError, V4EgressLink, gateway, pick_address, setup
from cni.egress_v4 import teardown as teardown_v4
from ipam.egress import V4_EGRESS_CHAIN, Egress, EgressConfig
from tests.conftest import LabFactory
from tests.ipam.test_egress_lab import PORT, exchange
from tools.lab import netns
from tools.lab.egress import Internet, NetnsEgressHost, add_internet
from tools.lab.lab import Lab, LabConfig

pytestmark = pytest.mark.netns

NODE_RANGE = IPv4Network("198.18.4.0/22")


@dataclass
class V4Lab:
    lab: Lab
    primary_ip: IPv4Address
    inet: Internet

    @property
    def node_path(self) -> str:
        return f"/run/netns/{self.lab.node_ns}"

    def pod(self, name: str, taken: list[IPv4Address]) -> tuple[str, V4EgressLink]:
        ns = self.lab.create_pod_namespace(name)
        address = pick_address(NODE_RANGE, taken)
        link = V4EgressLink(f"/run/netns/{ns}", f"egr{name}", address, NODE_RANGE)
        setup(link, self.node_path)
        taken.append(link.address)
        return ns, link

    def egress(self) -> Egress:
        return Egress(EgressConfig(), NetnsEgressHost(self.lab.node_ns), backend="nft")

    def seen_by(self, server_ns: str, listen: IPv4Address, client_ns: str) -> str | None:
        with netns.listening_socket(server_ns, str(listen), PORT) as listener:
            return exchange(listener, client_ns, str(listen), PORT, timeout=2.0)


@pytest.fixture
def v4lab(lab_factory: LabFactory) -> Iterator[V4Lab]:
    lab = lab_factory(LabConfig(instance_type="m5.large"))
    inet = add_internet(lab.vpc_ns, f"{netns.PREFIX}{lab.lab_id}-inet")
    netns.sysctl(lab.vpc_ns, "net.ipv4.conf.all.rp_filter", "1")
    (primary,) = lab.cloud.enis_of(lab.instance_id)
    primary_ip = lab.cloud.eni_view(primary.eni_id).primary_ip
    assert primary_ip is not None
    yield V4Lab(lab, primary_ip, inet)


def test_an_ipv6_pods_node_local_ipv4_leaves_as_the_nodes_primary_ipv4(v4lab: V4Lab) -> None:
    pod_ns, link = v4lab.pod("a", [])
    with IPRoute(netns=pod_ns) as ipr:
        (index,) = ipr.link_lookup(ifname=POD_IFNAME)
        routes = {
            (f"{r.get('dst') or '0.0.0.0'}/{r['dst_len']}", r.get("gateway"))
            for r in ipr.get_routes(family=2, oif=index, table=254)
        }
    gw = str(gateway(NODE_RANGE))
    assert routes == {(f"{gw}/32", None), (str(NODE_RANGE), gw), ("0.0.0.0/0", gw)}
    # Without the node's SNAT the router has no way back to the node-local address.
    assert v4lab.seen_by(v4lab.inet.ns, v4lab.inet.address, pod_ns) is None

    assert v4lab.egress().apply_v4_egress(NODE_RANGE, v4lab.primary_ip)

    assert v4lab.seen_by(v4lab.inet.ns, v4lab.inet.address, pod_ns) == str(v4lab.primary_ip)
    assert v4lab.egress().apply_v4_egress(NODE_RANGE, v4lab.primary_ip) == []


def test_other_pods_cannot_open_connections_to_a_node_local_address(v4lab: V4Lab) -> None:
    taken: list[IPv4Address] = []
    server_ns, server = v4lab.pod("a", taken)
    client_ns, client = v4lab.pod("b", taken)
    assert client.address != server.address
    assert v4lab.seen_by(server_ns, server.address, client_ns) == str(client.address)

    v4lab.egress().apply_v4_egress(NODE_RANGE, v4lab.primary_ip)

    assert v4lab.seen_by(server_ns, server.address, client_ns) is None


def test_teardown_and_uninstall_leave_nothing(v4lab: V4Lab) -> None:
    pod_ns, link = v4lab.pod("a", [])
    egress = v4lab.egress()
    egress.apply_v4_egress(NODE_RANGE, v4lab.primary_ip)
    assert V4_EGRESS_CHAIN in v4lab.lab.node_exec(["iptables-nft-save"]).stdout

    teardown_v4(link.host_ifname, v4lab.node_path)
    teardown_v4(link.host_ifname, v4lab.node_path)  # idempotent
    assert egress.remove()

    with IPRoute(netns=pod_ns) as ipr:
        assert ipr.link_lookup(ifname=POD_IFNAME) == []
    with IPRoute(netns=v4lab.lab.node_ns) as ipr:
        assert ipr.link_lookup(ifname=link.host_ifname) == []
    assert "ULTRANET" not in v4lab.lab.node_exec(["iptables-nft-save"]).stdout


def test_a_failed_setup_removes_its_veth_and_names_the_step(v4lab: V4Lab) -> None:
    _, link = v4lab.pod("a", [])
    ns = v4lab.lab.create_pod_namespace("b")
    again = V4EgressLink(f"/run/netns/{ns}", link.host_ifname, link.address, NODE_RANGE)
    with pytest.raises(V4EgressError, match="veth"):
        setup(again, v4lab.node_path)  # the host end's name is taken
    with IPRoute(netns=v4lab.lab.node_ns) as ipr:  # not ours to remove: pod a's stays
        assert ipr.link_lookup(ifname=link.host_ifname) != []
    with IPRoute(netns=ns) as ipr:
        assert ipr.link_lookup(ifname=POD_IFNAME) == []
    # A failure once the veth exists (the pod has a default route already) removes it.
    other = v4lab.lab.create_pod_namespace("c")
    with IPRoute(netns=other) as ipr:
        ipr.route("add", dst="0.0.0.0/0", oif=ipr.link_lookup(ifname="lo")[0])
    address = pick_address(NODE_RANGE, [link.address])
    clash = V4EgressLink(f"/run/netns/{other}", "egrc", address, NODE_RANGE)
    with pytest.raises(V4EgressError, match="pod side"):
        setup(clash, v4lab.node_path)
    with IPRoute(netns=v4lab.lab.node_ns) as ipr:
        assert ipr.link_lookup(ifname="egrc") == []
    with pytest.raises(V4EgressError, match="not a pod address"):
        V4EgressLink(link.pod_netns, "egrx", gateway(NODE_RANGE), NODE_RANGE)
    full = [*IPv4Network("198.18.8.0/30").hosts()]
    with pytest.raises(V4EgressError, match="is full"):
        pick_address(IPv4Network("198.18.8.0/30"), full)
