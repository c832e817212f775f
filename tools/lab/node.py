"""The VPC fabric and one instance, built from two network namespaces.

* ``vpc`` namespace: the VPC router. Each attached ENI has a veth here holding its
  subnet's gateway address (/32, so several ENIs of one subnet can share it) and
  routes for every address and prefix EC2 assigned to that ENI, pointing at the ENI's
  primary IP, as the VPC fabric delivers a prefix to the ENI that owns it.
* ``node`` namespace: the instance. Each ENI is the peer veth, with the ENI's MAC,
  named ``eth<n>`` in device order (n = card * max interfaces per card + device).
  As on EC2, only the primary ENI comes up configured (address and default route,
  what the OS's DHCP client would do); other ENIs appear down and unconfigured for
  the node agent to set up.

IPv6 (a subnet with a /64): the VPC router is ``fe80::1`` on every vpc-side veth, as an
instance sees the VPC router only by a link-local address; the primary ENI comes up with
its first IPv6 address as a /128 and a default route via ``fe80::1`` (what DHCPv6 and
the router advertisement give an instance). The vpc namespace routes each /128 and /80
EC2 assigned to an ENI via the ENI's own link-local address (EUI-64 from its MAC), bound
to its MAC by a permanent neighbour entry, as the VPC fabric delivers to an ENI by its
MAC. Only unique-local addresses (fd00::/8) are used, and the vpc namespace has no
route out, so no IPv6 packet leaves the lab's namespaces.

The node reacts to the emulator's events (``tools/lab/events.py``), so
AttachNetworkInterface and DetachNetworkInterface through boto3 hot-plug links.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD
from pyroute2.netlink.rtnl.ndmsg import NUD_PERMANENT

from tools.lab import netns
from tools.lab.events import EniView
from tools.lab.netns import Netlink

log = logging.getLogger("ultranet.lab")

_ESRCH = 3
_EEXIST = 17
VPC_ROUTER_IPV6 = "fe80::1"  # the VPC router as an instance's IPv6 stack sees it


def link_local(mac: str) -> IPv6Address:
    """The EUI-64 link-local address the kernel derives from ``mac`` (RFC 4291, App. A)."""
    octets = [int(part, 16) for part in mac.split(":")]
    octets[0] ^= 0x02
    eui = octets[:3] + [0xFF, 0xFE] + octets[3:]
    return IPv6Address(b"\xfe\x80" + bytes(6) + bytes(eui))


class LabNode:
    """Applies EC2 state changes for one instance to the vpc and node namespaces.

    Netlink work goes through ``netlink``, which holds both namespaces' sockets open
    and runs it on its own thread; events may come from any thread (the emulator's
    HTTP handlers), and ``_lock`` makes each one apply whole, one at a time.
    """

    def __init__(
        self,
        instance_id: str | None,
        vpc_ns: str,
        node_ns: str,
        interfaces_per_card: int,
        *,
        netlink: Netlink,
    ) -> None:
        # None: adopt the first instance an event names (the lab launches exactly one).
        self.instance_id = instance_id
        self.vpc_ns = vpc_ns
        self.node_ns = node_ns
        self._per_card = interfaces_per_card
        self._netlink = netlink
        self._lock = threading.Lock()
        self._closed = False
        self._vpc_links: dict[str, str] = {}  # eni id -> veth name in the vpc namespace
        self._vpc_index: dict[str, int] = {}  # eni id -> that veth's ifindex
        self._routes: dict[str, set[IPv4Network]] = {}  # eni id -> destinations routed
        self._routes6: dict[str, set[IPv6Network]] = {}  # the same for IPv6
        self._seq = 0

    def node_ifname(self, eni: EniView) -> str:
        return f"eth{eni.network_card * self._per_card + eni.device_index}"

    def close(self) -> None:
        """Stop applying events: waits for one in progress; later ones are ignored."""
        with self._lock:
            self._closed = True

    # -- CloudListener -----------------------------------------------------------

    def eni_attached(self, eni: EniView) -> None:
        if self.instance_id is None:
            self.instance_id = eni.instance_id
        if eni.instance_id != self.instance_id:
            return
        with self._lock:
            if not self._closed:
                self._netlink.run(lambda ipr: self._plug(ipr, eni))

    def eni_detached(self, eni: EniView) -> None:
        if eni.instance_id != self.instance_id:
            return
        with self._lock:
            if self._closed:
                return
            vpc_link = self._vpc_links.pop(eni.eni_id, None)
            self._vpc_index.pop(eni.eni_id, None)
            self._routes.pop(eni.eni_id, None)
            self._routes6.pop(eni.eni_id, None)
            if vpc_link is None:
                return
            self._netlink.run(lambda ipr: self._unplug(ipr[self.vpc_ns], vpc_link))

    def eni_addresses_changed(self, eni: EniView) -> None:
        if eni.instance_id != self.instance_id:
            return
        with self._lock:
            if not self._closed and eni.eni_id in self._vpc_links:
                self._netlink.run(lambda ipr: self._sync_routes(ipr[self.vpc_ns], eni))

    # -- internals: these run on the netlink worker, with _lock held by the caller --

    def _plug(self, ipr: Mapping[str, IPRoute], eni: EniView) -> None:
        vpc, node = ipr[self.vpc_ns], ipr[self.node_ns]
        if eni.eni_id in self._vpc_links:
            self._sync_routes(vpc, eni)
            return
        self._seq += 1
        vpc_link = f"v{self._seq}"
        node_link = self.node_ifname(eni)
        temp = f"new{self._seq}"
        vpc.link(
            "add",
            ifname=vpc_link,
            kind="veth",
            peer={"ifname": temp, "net_ns_fd": self.node_ns, "address": eni.mac},
        )
        vpc_index = vpc.link_lookup(ifname=vpc_link)[0]
        vpc.link("set", index=vpc_index, state="up")
        vpc.addr("add", index=vpc_index, address=str(eni.gateway), prefixlen=32)
        if eni.ipv6_subnet is not None:
            vpc.addr(
                "add", index=vpc_index, address=VPC_ROUTER_IPV6, prefixlen=64, flags=IFA_F_NODAD
            )
            vpc.neigh(
                "replace",
                dst=str(link_local(eni.mac)),
                lladdr=eni.mac,
                ifindex=vpc_index,
                state=NUD_PERMANENT,
                family=socket.AF_INET6,
            )
        index = node.link_lookup(ifname=temp)[0]
        node.link("set", index=index, ifname=node_link)
        if eni.ipv6_subnet is not None:
            # The VPC, not the link, keeps addresses unique; without duplicate address
            # detection the ENI's link-local is usable as soon as the link is up, so the
            # node's first packet does not wait on it (it is the source of its NDP).
            netns.sysctl(self.node_ns, f"net.ipv6.conf.{node_link}.accept_dad", "0")
        if eni.network_card == 0 and eni.device_index == 0 and eni.primary_ip is not None:
            self._configure_primary(node, index, eni)
        self._vpc_links[eni.eni_id] = vpc_link
        self._vpc_index[eni.eni_id] = vpc_index
        self._routes[eni.eni_id] = set()
        self._routes6[eni.eni_id] = set()
        self._sync_routes(vpc, eni)
        log.info("lab: %s attached as %s (vpc side %s)", eni.eni_id, node_link, vpc_link)

    @staticmethod
    def _unplug(vpc: IPRoute, vpc_link: str) -> None:
        found = vpc.link_lookup(ifname=vpc_link)
        if found:
            vpc.link("del", index=found[0])  # removes the node-side peer too

    def _configure_primary(self, node: IPRoute, index: int, eni: EniView) -> None:
        assert eni.primary_ip is not None
        node.link("set", index=index, state="up")
        node.addr("add", index=index, address=str(eni.primary_ip), prefixlen=eni.subnet.prefixlen)
        node.route("add", dst="0.0.0.0/0", gateway=str(eni.gateway), oif=index)
        if eni.ipv6_addresses:
            node.addr(
                "add",
                index=index,
                address=str(eni.ipv6_addresses[0]),
                prefixlen=128,
                flags=IFA_F_NODAD,
            )
        if eni.ipv6_subnet is not None:
            node.route(
                "add", dst="::/0", gateway=VPC_ROUTER_IPV6, oif=index, family=socket.AF_INET6
            )

    def _sync_routes(self, vpc: IPRoute, eni: EniView) -> None:
        """Make the vpc namespace route exactly what EC2 assigned to this ENI."""
        self._sync_routes6(vpc, eni)
        if eni.primary_ip is None:
            return  # efa-only: no IP, nothing to route
        primary = IPv4Network(f"{eni.primary_ip}/32")
        wanted = {IPv4Network(f"{ip}/32") for ip in eni.secondary_ips} | set(eni.prefixes)
        wanted.add(primary)
        have = self._routes[eni.eni_id]
        index = self._vpc_index[eni.eni_id]
        # The primary's link route first: every other route goes through it.
        for dst in sorted(wanted - have, key=lambda d: (d != primary, d)):
            via = None if dst == primary else eni.primary_ip
            self._route(vpc, "replace", dst, index, via)
        for dst in sorted(have - wanted):
            self._route(vpc, "del", dst, index, eni.primary_ip)
        self._routes[eni.eni_id] = wanted

    def _sync_routes6(self, vpc: IPRoute, eni: EniView) -> None:
        wanted = {IPv6Network(f"{a}/128") for a in eni.ipv6_addresses} | set(eni.ipv6_prefixes)
        have = self._routes6[eni.eni_id]
        if not wanted and not have:
            return
        index = self._vpc_index[eni.eni_id]
        via = str(link_local(eni.mac))
        for dst in sorted(wanted - have):
            vpc.route("replace", dst=str(dst), gateway=via, oif=index, family=socket.AF_INET6)
        for dst in sorted(have - wanted):
            try:
                vpc.route("del", dst=str(dst), gateway=via, oif=index, family=socket.AF_INET6)
            except NetlinkError as err:
                if err.code != _ESRCH:
                    raise
        self._routes6[eni.eni_id] = wanted

    @staticmethod
    def _route(
        vpc: IPRoute, command: str, dst: IPv4Network, index: int, via: IPv4Address | None
    ) -> None:
        kwargs: dict[str, object] = {"dst": str(dst), "oif": index}
        if via is not None:
            kwargs["gateway"] = str(via)
        else:
            kwargs["scope"] = 253  # link
        try:
            vpc.route(command, **kwargs)
        except NetlinkError as err:
            if not (command == "del" and err.code == _ESRCH):
                raise
