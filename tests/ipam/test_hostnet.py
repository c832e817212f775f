"""ENI host plumbing in the lab's node namespace: links, tables, rules and real traffic."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ipam.datastore_errors import InvalidEni
from ipam.hostnet import ENI_RULE_PRIORITY, EniLink, HostNetwork, HostNetworkError, LinkNotFound
from tests.conftest import LabFactory
from tests.lab.helpers import ec2_client, python_in
from tools.lab import netns
from tools.lab.lab import Lab, LabConfig

pytestmark = pytest.mark.netns

PAYLOAD = 64 * 1024

# Bound to the source address, so the kernel picks the route by the rules as it would
# for a pod's traffic through this ENI; sends PAYLOAD bytes so the counters show it.
CONNECT_FROM = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.settimeout(5)
try:
    sock.bind((sys.argv[1], 0))
    sock.connect((sys.argv[2], int(sys.argv[3])))
    sock.sendall(bytes(int(sys.argv[4])))
except OSError as err:
    print(f"failed: {err}")
    sys.exit(1)
sock.close()
print("connected")
"""


def eni_link(lab: Lab, eni_id: str) -> EniLink:
    view = lab.cloud.eni_view(eni_id)
    assert view.primary_ip is not None
    return EniLink(
        eni_id=view.eni_id,
        mac=view.mac,
        card=view.network_card,
        device=view.device_index,
        primary_ip=view.primary_ip,
        subnet=view.subnet,
    )


@dataclass
class Secondary:
    lab: Lab
    eni: EniLink
    attachment_id: str
    host: HostNetwork


@pytest.fixture
def secondary(lab: Lab) -> Iterator[Secondary]:
    """A secondary ENI hot-plugged at device 1 of card 0 (DOWN, unconfigured)."""
    ec2 = ec2_client(lab)
    created = ec2.create_network_interface(SubnetId=lab.subnet_ids[0], Ipv4PrefixCount=1)
    eni_id = created["NetworkInterface"]["NetworkInterfaceId"]
    attachment = ec2.attach_network_interface(
        NetworkInterfaceId=eni_id, InstanceId=lab.instance_id, DeviceIndex=1
    )["AttachmentId"]
    with HostNetwork(netns=lab.node_ns) as host:
        yield Secondary(lab, eni_link(lab, eni_id), attachment, host)


def table_routes(ns: str, table: int) -> set[tuple[str, str | None, str, int]]:
    """(dst, gateway, link name, scope) of a table's IPv4 routes."""
    with IPRoute(netns=ns) as ipr:
        names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
        return {
            (
                f"{r.get('dst') or '0.0.0.0'}/{r['dst_len']}",
                r.get("gateway"),
                names.get(r.get("oif"), "?"),
                r["scope"],
            )
            for r in ipr.get_routes(family=socket.AF_INET, table=table)
        }


def main_routes(ns: str) -> set[tuple[str, str | None, str, int]]:
    return table_routes(ns, 254)


def rules(ns: str) -> set[tuple[int, str | None, int, int]]:
    """(priority, source, source length, table) of the IPv4 rules."""
    with IPRoute(netns=ns) as ipr:
        return {
            (r.get("priority", 0), r.get("src"), r["src_len"], r.get("FRA_TABLE") or r["table"])
            for r in ipr.get_rules(family=socket.AF_INET)
        }


def link_info(ns: str, ifname: str) -> dict[str, Any]:
    with IPRoute(netns=ns) as ipr:
        (link,) = ipr.get_links(ifname=ifname)
        return {
            "state": link.get("state"),
            "mtu": link.get("mtu"),
            "tx_bytes": link.get("stats64")["tx_bytes"],
        }


def ipv4_addrs(ns: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Links by name: (state, IPv4 addresses). IPv6 link-local addresses are left out:
    the kernel adds them on its own, some time after a link comes up."""
    out = {}
    with IPRoute(netns=ns) as ipr:
        for link in ipr.get_links():
            found = ipr.get_addr(family=socket.AF_INET, index=link["index"])
            out[link.get("ifname")] = (link.get("state"), tuple(a.get("address") for a in found))
    return out


def snapshot(ns: str, table: int) -> tuple[object, ...]:
    return ipv4_addrs(ns), table_routes(ns, table), main_routes(ns), rules(ns)


def connect_from(lab: Lab, source: IPv4Address, payload: int = 1) -> tuple[str, str | None]:
    """Connect from ``source`` in the node to a listener on the subnet gateway in the vpc
    namespace: (client output, the peer address the listener saw)."""
    gateway = str(lab.cloud.eni_view(lab.cloud.enis_of(lab.instance_id)[0].eni_id).gateway)
    listener = netns.listening_socket(lab.vpc_ns, gateway, 0)
    try:
        port = listener.getsockname()[1]
        done = python_in(lab.node_ns, CONNECT_FROM, str(source), gateway, str(port), str(payload))
        if done.returncode != 0:
            return done.stdout.strip() + done.stderr.strip(), None
        listener.settimeout(5)
        conn, peer = listener.accept()
        conn.close()
    finally:
        listener.close()
    return done.stdout.strip(), peer[0]


# -- EniLink ------------------------------------------------------------------------

GOOD = {
    "eni_id": "eni-0a",
    "mac": "02:00:00:00:00:01",
    "card": 0,
    "device": 1,
    "primary_ip": IPv4Address("100.64.0.10"),
    "subnet": IPv4Network("100.64.0.0/18"),
}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("eni_id", "i-123", "must start with 'eni-'"),
        ("mac", "02-00-00-00-00-01", "hex octets"),
        ("mac", "02:00:00:00:00:0A", "lower-case"),
        ("card", -1, "must be >= 0"),
        ("mtu", 575, "576..9001"),
        ("mtu", 9002, "576..9001"),
        ("primary_ip", IPv4Address("100.65.0.10"), "not a host of 100.64.0.0/18"),
        ("primary_ip", IPv4Address("100.64.0.1"), "not a host"),  # the gateway
    ],
)
def test_eni_link_rejects_impossible_values(field: str, value: object, message: str) -> None:
    with pytest.raises(InvalidEni, match=message):
        EniLink(**{**GOOD, field: value})  # type: ignore[arg-type]


def test_eni_link_derives_gateway_and_table() -> None:
    link = EniLink(**GOOD)  # type: ignore[arg-type]
    assert link.gateway == IPv4Address("100.64.0.1")
    assert link.table == 2
    assert EniLink(**{**GOOD, "card": 3, "device": 1}).table == 10301  # type: ignore[arg-type]


# -- setup -----------------------------------------------------------------------------


def test_setup_plumbs_a_secondary_eni_like_the_vpc_cni(secondary: Secondary) -> None:
    lab, eni, host = secondary.lab, secondary.eni, secondary.host
    ifname = host.find_link(eni.mac)
    assert ifname == "eth1"
    primary_main = main_routes(lab.node_ns)

    host.setup_eni(eni)

    info = link_info(lab.node_ns, ifname)
    assert (info["state"], info["mtu"]) == ("up", 9001)
    assert ipv4_addrs(lab.node_ns)[ifname] == ("up", (str(eni.primary_ip),))
    gw = str(eni.gateway)
    assert table_routes(lab.node_ns, 2) == {
        (f"{gw}/32", None, "eth1", 253),
        ("0.0.0.0/0", gw, "eth1", 0),
    }
    assert (ENI_RULE_PRIORITY, str(eni.primary_ip), 32, 2) in rules(lab.node_ns)
    # No route to the subnet through eth1: the primary ENI's stays the only one.
    assert main_routes(lab.node_ns) == primary_main
    assert all(link != "eth1" for _, _, link, _ in main_routes(lab.node_ns))


def test_setup_twice_changes_nothing(secondary: Secondary) -> None:
    lab, eni, host = secondary.lab, secondary.eni, secondary.host
    host.setup_eni(eni)
    before = snapshot(lab.node_ns, 2)
    host.setup_eni(eni)
    assert snapshot(lab.node_ns, 2) == before
    with HostNetwork(netns=lab.node_ns) as other:  # a restarted daemon
        other.setup_eni(eni)
    assert snapshot(lab.node_ns, 2) == before


def test_setup_leaves_only_the_eni_address_and_replaces_a_stale_rule(
    secondary: Secondary,
) -> None:
    lab, eni, host = secondary.lab, secondary.eni, secondary.host
    prefix = lab.cloud.eni_view(eni.eni_id).prefixes[0]
    stray = str(prefix.network_address + 1)  # an address EC2 gave this ENI, not the primary
    with IPRoute(netns=lab.node_ns) as ipr:
        (index,) = ipr.link_lookup(ifname="eth1")
        ipr.addr("add", index=index, address=stray, prefixlen=32)
        ipr.rule("add", priority=ENI_RULE_PRIORITY, src=str(eni.primary_ip), src_len=32, table=7)

    host.setup_eni(eni)

    assert ipv4_addrs(lab.node_ns)["eth1"][1] == (str(eni.primary_ip),)
    mine = {r for r in rules(lab.node_ns) if r[1] == str(eni.primary_ip)}
    assert mine == {(ENI_RULE_PRIORITY, str(eni.primary_ip), 32, 2)}


def test_setup_removes_the_subnet_route_of_an_address_configured_before(
    secondary: Secondary,
) -> None:
    lab, eni, host = secondary.lab, secondary.eni, secondary.host
    with IPRoute(netns=lab.node_ns) as ipr:  # as cloud-init or an older agent leaves it
        (index,) = ipr.link_lookup(ifname="eth1")
        ipr.link("set", index=index, state="up")
        ipr.addr("add", index=index, address=str(eni.primary_ip), prefixlen=18)
    subnet_via_eth1 = (str(eni.subnet), None, "eth1", 253)
    assert subnet_via_eth1 in main_routes(lab.node_ns)

    host.setup_eni(eni)

    assert subnet_via_eth1 not in main_routes(lab.node_ns)
    assert (str(eni.subnet), None, "eth0", 253) in main_routes(lab.node_ns)


def test_traffic_from_the_eni_address_leaves_by_the_eni(secondary: Secondary) -> None:
    lab, eni, host = secondary.lab, secondary.eni, secondary.host
    out, _ = connect_from(lab, eni.primary_ip)
    assert out.startswith("failed"), out  # before setup the node cannot use the address

    host.setup_eni(eni)
    eth0, eth1 = link_info(lab.node_ns, "eth0"), link_info(lab.node_ns, "eth1")
    out, peer = connect_from(lab, eni.primary_ip, PAYLOAD)

    assert out == "connected"
    assert peer == str(eni.primary_ip)
    sent_eth1 = link_info(lab.node_ns, "eth1")["tx_bytes"] - eth1["tx_bytes"]
    sent_eth0 = link_info(lab.node_ns, "eth0")["tx_bytes"] - eth0["tx_bytes"]
    assert sent_eth1 >= PAYLOAD
    assert sent_eth0 < PAYLOAD


def test_setup_of_an_eni_not_hot_plugged_names_it(lab: Lab) -> None:
    created = ec2_client(lab).create_network_interface(SubnetId=lab.subnet_ids[0])
    raw = created["NetworkInterface"]
    eni = EniLink(
        eni_id=raw["NetworkInterfaceId"],
        mac=raw["MacAddress"],
        card=0,
        device=1,
        primary_ip=IPv4Address(raw["PrivateIpAddress"]),
        subnet=IPv4Network("100.64.0.0/18"),
    )
    with HostNetwork(netns=lab.node_ns) as host:
        assert host.find_link(eni.mac) is None
        with pytest.raises(LinkNotFound) as caught:
            host.setup_eni(eni)
        host.teardown_eni(eni)  # nothing to remove: fine
    assert caught.value.eni_id == eni.eni_id
    assert eni.eni_id in str(caught.value) and eni.mac in str(caught.value)


def test_primary_eni_is_only_verified(lab: Lab) -> None:
    primary = eni_link(lab, lab.cloud.enis_of(lab.instance_id)[0].eni_id)
    assert primary.is_primary
    before = snapshot(lab.node_ns, 254)
    with HostNetwork(netns=lab.node_ns) as host:
        host.setup_eni(primary)
        host.teardown_eni(primary)
        assert snapshot(lab.node_ns, 254) == before
        wrong = EniLink(**{**_fields(primary), "primary_ip": primary.primary_ip + 1})
        with pytest.raises(HostNetworkError, match=f"{wrong.primary_ip} is not on eth0"):
            host.setup_eni(wrong)


def _fields(eni: EniLink) -> dict[str, Any]:
    return {name: getattr(eni, name) for name in EniLink.__slots__}


# -- teardown --------------------------------------------------------------------------


def test_teardown_removes_the_table_routes_and_rule_and_is_idempotent(
    secondary: Secondary,
) -> None:
    lab, eni, host = secondary.lab, secondary.eni, secondary.host
    before = rules(lab.node_ns)
    host.setup_eni(eni)
    host.teardown_eni(eni)
    assert table_routes(lab.node_ns, 2) == set()
    assert rules(lab.node_ns) == before
    assert ipv4_addrs(lab.node_ns)["eth1"][1] == (str(eni.primary_ip),)  # the link stays
    host.teardown_eni(eni)
    assert rules(lab.node_ns) == before
    host.setup_eni(eni)  # and it can be set up again
    assert ("0.0.0.0/0", str(eni.gateway), "eth1", 0) in table_routes(lab.node_ns, 2)


def test_teardown_after_detach_removes_the_rule(secondary: Secondary) -> None:
    lab, eni, host = secondary.lab, secondary.eni, secondary.host
    before = rules(lab.node_ns)
    host.setup_eni(eni)
    ec2_client(lab).detach_network_interface(AttachmentId=secondary.attachment_id)
    assert host.find_link(eni.mac) is None
    host.teardown_eni(eni)
    host.teardown_eni(eni)
    assert rules(lab.node_ns) == before
    assert table_routes(lab.node_ns, 2) == set()


# -- errors ------------------------------------------------------------------------------


class _RefusingIPRoute:
    """Has the ENI's link; refuses every change as an unprivileged caller would be."""

    def __init__(self, mac: str) -> None:
        self.mac = mac

    def get_links(self) -> list[dict[str, Any]]:
        return [{"index": 7, "ifname": "eth1", "address": self.mac}]

    def link(self, *args: object, **kwargs: object) -> None:
        raise NetlinkError(1, "Operation not permitted")


def test_netlink_errors_name_the_eni_and_the_operation() -> None:
    eni = EniLink(**GOOD)  # type: ignore[arg-type]
    host = HostNetwork(_RefusingIPRoute(eni.mac))
    with pytest.raises(HostNetworkError) as caught:
        host.setup_eni(eni)
    host.close()  # not ours to close: a no-op
    assert caught.value.errno == 1
    assert str(caught.value).startswith("eni-0a: set eth1 mtu 9001 up failed:")
    assert isinstance(caught.value.__cause__, NetlinkError)


def test_a_missing_namespace_is_an_error_not_created() -> None:
    name = f"{netns.PREFIX}hostnet-missing-{secrets.token_hex(3)}"
    with pytest.raises(HostNetworkError, match="no such network namespace"):
        HostNetwork(netns=name)
    assert not netns.exists(name)


# -- multi-card ------------------------------------------------------------------------------


def test_p5_every_card_gets_its_own_table(lab_factory: LabFactory) -> None:
    lab = lab_factory(
        LabConfig(instance_type="p5.48xlarge", prefixes_per_card=1, other_cards="efa")
    )
    enis = [eni_link(lab, e.eni_id) for e in lab.cloud.enis_of(lab.instance_id)]
    others = [e for e in enis if e.card > 0]
    assert len(others) == 31
    with HostNetwork(netns=lab.node_ns) as host:
        for eni in enis:
            host.setup_eni(eni)
        names = {eni.eni_id: host.find_link(eni.mac) for eni in others}
    tables = [eni.table for eni in others]
    assert tables == [10000 + 1 + 100 * eni.card for eni in others]
    assert len(set(tables)) == len(tables)
    have = rules(lab.node_ns)
    for eni in others:
        routes = table_routes(lab.node_ns, eni.table)
        assert ("0.0.0.0/0", str(eni.gateway), names[eni.eni_id], 0) in routes
        assert (ENI_RULE_PRIORITY, str(eni.primary_ip), 32, eni.table) in have
