"""IPv4 egress for an IPv6 pod, the pod's side, as the VPC CNI's ``egress-cni`` plugin does it.

On an IPv6 node a pod has only its /128, yet must reach IPv4-only endpoints. The VPC CNI
chains its ``egress-cni`` plugin after its own (``aws/amazon-vpc-cni-k8s``,
``cmd/egress-cni-plugin``: ``egressContext.go`` ``setupContainerVethV4`` and
``setupHostVethV4``; ``snat/snat.go``): a second veth, ``v4if0`` in the pod, holding an
address from a node-local IPv4 range (its conflist's host-local IPAM subnet,
169.254.172.0/22), whose first address is the gateway on the host end; the node then
SNATs the range to its own primary IPv4, so the packet leaves as the node's.

What this module does, per pod (:func:`setup`, :func:`teardown`):

* pod: ``v4if0`` with ``<address>/<range prefix>``, the connected route the kernel added
  replaced by ``<gateway>/32 scope link src <address>`` and ``<range> via <gateway> src
  <address>`` (the VPC CNI's point-to-point trick: everything goes through the gateway),
  and ``default via <gateway>``;
* host: the other end ``host_ifname`` up, holding ``<gateway>/32`` scope link (every such
  veth holds the same one, so each pod finds its gateway on its own link), and the route
  ``<address>/32 dev <host_ifname> scope link``.

The node-wide part, one SNAT rule for the whole range rather than the VPC CNI's chain per
pod, and the rule that keeps other pods from opening connections to a pod's node-local
address, is :func:`ipam.egress.v4_egress_ruleset`; the daemon applies it with
:class:`ipam.egress.Egress`. Address choice: :func:`pick_address` (the caller keeps what
is taken, e.g. in its journal, as the VPC CNI's host-local IPAM keeps files).

For the IPv6 plugin to chain: call :func:`setup` after the pod's own interface is plumbed
(from a worker thread: it blocks on netlink), :func:`teardown` on DEL (idempotent; the
pod end goes with the host end), and report ``v4if0`` in the result's interfaces without
its IP, as the VPC CNI's plugin passes the previous result through.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Collection
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni.netlink import socket_in

DEFAULT_RANGE = IPv4Network("169.254.172.0/22")  # the VPC CNI's egress-v4 IPAM subnet
POD_IFNAME = "v4if0"  # the VPC CNI's EgressIPv4InterfaceName
_SCOPE_LINK = 253


class V4EgressError(RuntimeError):
    """The pod's IPv4 egress could not be set up; the message names the step."""


def gateway(node_range: IPv4Network) -> IPv4Address:
    """The host end's address: the range's first, as host-local IPAM's default gateway."""
    return node_range.network_address + 1


def pick_address(node_range: IPv4Network, taken: Collection[IPv4Address]) -> IPv4Address:
    """The lowest address of ``node_range`` that is not the gateway nor ``taken``."""
    used = set(taken) | {gateway(node_range)}
    for address in node_range.hosts():
        if address not in used:
            return address
    raise V4EgressError(f"the node-local IPv4 range {node_range} is full ({len(used)} taken)")


@dataclass(frozen=True, slots=True)
class V4EgressLink:
    """One pod's node-local IPv4: its namespace (a path, as ``CNI_NETNS``), the host end's
    name, the address and the range it is from."""

    pod_netns: str
    host_ifname: str
    address: IPv4Address
    node_range: IPv4Network = DEFAULT_RANGE
    mtu: int = 9001

    def __post_init__(self) -> None:
        if self.address not in self.node_range or self.address == gateway(self.node_range):
            raise V4EgressError(f"{self.address} is not a pod address of {self.node_range}")


def _iproute(netns: str | None) -> Any:
    sock = socket_in(netns)
    try:
        return IPRoute(fileno=os.dup(sock.fileno()))
    finally:
        sock.close()


def setup(link: V4EgressLink, host_netns: str | None = None) -> None:
    """Plumb ``link`` (host side in ``host_netns``, a path; None: this namespace). On
    failure the veth it made is removed (one already there under that name is not ours
    and stays) and V4EgressError says which step failed."""
    gw, addr = str(gateway(link.node_range)), str(link.address)
    step, created = "veth", False
    try:
        fd = os.open(link.pod_netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with _iproute(host_netns) as host:
                host.link(
                    "add",
                    ifname=link.host_ifname,
                    kind="veth",
                    mtu=link.mtu,
                    peer={"ifname": POD_IFNAME, "net_ns_fd": fd, "mtu": link.mtu},
                )
        finally:
            os.close(fd)
        created = True
        step = "pod side"
        with _iproute(link.pod_netns) as pod:
            (index,) = pod.link_lookup(ifname=POD_IFNAME)
            pod.link("set", index=index, state="up")
            pod.addr("add", index=index, address=addr, prefixlen=link.node_range.prefixlen)
            pod.route("del", dst=str(link.node_range), oif=index, scope=_SCOPE_LINK)
            pod.route("add", dst=f"{gw}/32", oif=index, scope=_SCOPE_LINK, prefsrc=addr)
            pod.route("add", dst=str(link.node_range), gateway=gw, oif=index, prefsrc=addr)
            pod.route("add", dst="0.0.0.0/0", gateway=gw, oif=index)
        step = "host side"
        with _iproute(host_netns) as host:
            (index,) = host.link_lookup(ifname=link.host_ifname)
            host.link("set", index=index, state="up")
            host.addr("add", index=index, address=gw, prefixlen=32, scope=_SCOPE_LINK)
            host.route("replace", dst=f"{addr}/32", oif=index, scope=_SCOPE_LINK)
    except (OSError, NetlinkError, ValueError) as err:
        rollback = ""
        try:
            if created:
                teardown(link.host_ifname, host_netns)
        except V4EgressError as undo:
            rollback = f"; removing the veth failed too: {undo}"
        raise V4EgressError(f"v4 egress {step} of {link.host_ifname}: {err}{rollback}") from err


def teardown(host_ifname: str, host_netns: str | None = None) -> None:
    """Remove the veth (both ends, and the routes through it); an absent one is fine."""
    try:
        with _iproute(host_netns) as host:
            found = host.link_lookup(ifname=host_ifname)
            if found:
                host.link("del", index=found[0])
    except NetlinkError as err:
        if err.code != errno.ENODEV:
            raise V4EgressError(f"v4 egress teardown of {host_ifname}: {err}") from err
    except OSError as err:
        raise V4EgressError(f"v4 egress teardown of {host_ifname}: {err}") from err
