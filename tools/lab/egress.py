"""Egress in a lab namespace: :class:`ipam.egress.Egress`'s host port for a named network
namespace, and an "internet" host beyond the lab's VPC router.

The daemon applies egress in its own namespace (``ipam.egress.LocalHost``); a test drives
the same code against the lab's node namespace: commands run under ``ip netns exec``, and
sysctls are read and written from a thread inside the namespace (``tools.lab.netns``).
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from pyroute2 import IPRoute

from ipam.egress import IPV4_DEVCONF_RP_FILTER, set_ipv4_devconf
from tools.lab import netns

INTERNET_LINK = IPv4Network("198.18.0.0/24")
INTERNET_EXTRA = IPv4Address("198.19.0.2")
LAB_SPACE = (IPv4Network("100.64.0.0/10"),)


class NetnsEgressHost:
    """``ipam.egress.EgressHost`` for namespace ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(
        self, argv: Sequence[str], stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def read_sysctl(self, key: str) -> str:
        path = Path("/proc/sys", *key.split("."))
        return netns.run_in(self.name, lambda: path.read_text().strip())

    def set_rp_filter(self, interface: str, value: int) -> None:
        netns.run_in(self.name, lambda: set_ipv4_devconf(interface, IPV4_DEVCONF_RP_FILTER, value))


@dataclass(frozen=True, slots=True)
class Internet:
    """A host beyond the VPC router: ``address`` on the link to the router, ``extra`` on its
    loopback (a second destination, routed by the router through ``address``)."""

    ns: str
    address: IPv4Address
    router_address: IPv4Address
    extra: IPv4Address


def add_internet(
    vpc_ns: str,
    name: str,
    *,
    link: IPv4Network = INTERNET_LINK,
    extra: IPv4Address = INTERNET_EXTRA,
    vpc_cidrs: Sequence[IPv4Network] = LAB_SPACE,
) -> Internet:
    """Create namespace ``name`` linked to the VPC router ``vpc_ns`` by a veth: the router
    gets the link's first address, the host its second, and routes ``vpc_cidrs`` back
    through the router. The caller removes the namespace (a lab removes every namespace
    named after it)."""
    router_address, address = link.network_address + 1, link.network_address + 2
    netns.create(name)
    with netns.iproute(vpc_ns) as vpc, netns.iproute(name) as host:
        host.link("set", index=host.link_lookup(ifname="lo")[0], state="up")
        vpc.link("add", ifname="inet0", kind="veth", peer={"ifname": "wan0", "net_ns_fd": name})
        (vpc_index,) = vpc.link_lookup(ifname="inet0")
        vpc.addr("add", index=vpc_index, address=str(router_address), prefixlen=link.prefixlen)
        vpc.link("set", index=vpc_index, state="up")
        vpc.route("add", dst=f"{extra}/32", gateway=str(address))
        (index,) = host.link_lookup(ifname="wan0")
        host.addr("add", index=index, address=str(address), prefixlen=link.prefixlen)
        host.link("set", index=index, state="up")
        _add_lo(host, extra)
        for cidr in vpc_cidrs:
            host.route("add", dst=str(cidr), gateway=str(router_address))
    return Internet(name, address, router_address, extra)


def _add_lo(ipr: IPRoute, address: IPv4Address) -> None:
    (lo,) = ipr.link_lookup(ifname="lo")
    ipr.addr("add", index=lo, address=str(address), prefixlen=32)
