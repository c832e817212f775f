"""The namespaced node with IPv6: a dual-stack primary, /80s routed to the ENI by the VPC
router, packets crossing it both ways, and only unique-local addresses, only in the lab."""

from __future__ import annotations

import threading
from ipaddress import IPv6Address, IPv6Network, ip_address

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from tests.conftest import LabFactory
from tests.lab.helpers import ec2_client, python_in
from tools.lab import netns
from tools.lab.lab import Lab

pytestmark = pytest.mark.netns

AF_INET6 = 10
UNIQUE_LOCAL = IPv6Network("fd00::/8")
LINK_LOCAL = IPv6Network("fe80::/10")

CONNECT_FROM = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.settimeout(5)
s.bind((sys.argv[1], 0))
s.connect((sys.argv[2], int(sys.argv[3])))
print(s.recv(64).decode())
"""


def ipv6_routes(ns: str) -> set[str]:
    found = set()
    with IPRoute(netns=ns) as ipr:
        for route in ipr.get_routes(family=AF_INET6, table=254):
            if route.get("dst"):
                found.add(f"{route.get('dst')}/{route['dst_len']}")
    return found


def ipv6_addresses(ns: str | None) -> set[IPv6Address]:
    with IPRoute(netns=ns) if ns else IPRoute() as ipr:
        return {IPv6Address(a.get("address")) for a in ipr.get_addr(family=AF_INET6)}


def add_address(ns: str, ifname: str, address: str) -> None:
    with IPRoute(netns=ns) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.addr("add", index=index, address=address, prefixlen=128, flags=IFA_F_NODAD)


class OneShotServer:
    """A TCP listener in a namespace that answers one connection and notes its peer."""

    def __init__(self, ns: str, address: str, reply: bytes) -> None:
        self.listener = netns.listening_socket(ns, address, 0)
        self.port: int = self.listener.getsockname()[1]
        self.peer = ""
        self._reply = reply
        self._thread = threading.Thread(target=self._answer, daemon=True)
        self._thread.start()

    def _answer(self) -> None:
        conn, peer = self.listener.accept()
        with conn:
            self.peer = peer[0]
            conn.sendall(self._reply)

    def close(self) -> None:
        self._thread.join(10)
        self.listener.close()


@pytest.fixture
def lab6(lab_factory: LabFactory) -> Lab:
    return lab_factory(ipv6=True)


def test_ipv6_node_is_dual_stack(lab6: Lab) -> None:
    eni = lab6.cloud.eni_view(lab6.cloud.enis_of(lab6.instance_id)[0].eni_id)
    assert eni.ipv6_subnet is not None and eni.ipv6_subnet.subnet_of(UNIQUE_LOCAL)
    (address,) = eni.ipv6_addresses  # the subnet's AssignIpv6AddressOnCreation
    (prefix,) = eni.ipv6_prefixes  # the launch template's Ipv6PrefixCount=1
    assert prefix.prefixlen == 80
    assert address in ipv6_addresses(lab6.node_ns)
    assert eni.primary_ip is not None  # still dual-stack: EKS IPv6 nodes keep an IPv4
    assert {f"{address}/128", str(prefix)} <= ipv6_routes(lab6.vpc_ns)
    assert "::/0" not in ipv6_routes(lab6.vpc_ns)  # the VPC router has no way out


def test_a_packet_from_the_80_crosses_the_vpc_router_and_comes_back(lab6: Lab) -> None:
    """What a pod's /128 from the node's /80 relies on: the VPC routes the /80 to the ENI."""
    eni = lab6.cloud.eni_view(lab6.cloud.enis_of(lab6.instance_id)[0].eni_id)
    assert eni.ipv6_subnet is not None
    pod_like = str(eni.ipv6_prefixes[0].network_address + 5)
    add_address(lab6.node_ns, "lo", pod_like)  # as a pod's address is reached through the node
    vpc_host = str(eni.ipv6_subnet.network_address + 0x10)  # a VPC address at the router
    add_address(lab6.vpc_ns, "lo", vpc_host)
    server = OneShotServer(lab6.vpc_ns, vpc_host, b"hello")
    try:
        done = python_in(lab6.node_ns, CONNECT_FROM, pod_like, vpc_host, str(server.port))
    finally:
        server.close()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hello"
    assert ip_address(server.peer) == IPv6Address(pod_like)  # the /80 address, not the node's


def test_prefixes_assigned_and_unassigned_through_boto3_are_routed(lab6: Lab) -> None:
    ec2 = ec2_client(lab6)
    eni_id = lab6.cloud.enis_of(lab6.instance_id)[0].eni_id
    (prefix,) = ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6PrefixCount=1)[
        "AssignedIpv6Prefixes"
    ]
    assert prefix in ipv6_routes(lab6.vpc_ns)
    ec2.unassign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6Prefixes=[prefix])
    assert prefix not in ipv6_routes(lab6.vpc_ns)


def test_only_unique_local_addresses_and_only_inside_the_lab(lab_factory: LabFactory) -> None:
    before = ipv6_addresses(None)
    lab = lab_factory(ipv6=True)
    for ns in (lab.vpc_ns, lab.node_ns):
        for address in ipv6_addresses(ns):
            assert address in UNIQUE_LOCAL or address in LINK_LOCAL or address.is_loopback, (
                ns,
                address,
            )
    assert ipv6_addresses(None) == before  # nothing added to the root namespace
