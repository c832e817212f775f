"""The pod plumbing in memory: a ``cni.handler.PlumbingPort`` that records what the CNI
handler asks for, for tests of the handler's logic without root or namespaces.

It keeps what ``cni.plumbing.Plumbing`` leaves, as sets a test can compare:

* ``pods``: per CNI_NETNS, the pod interfaces in it (name -> address);
* ``veths``: host veth name -> the ``PlumbedInterface`` it belongs to;
* ``routes``: the host's ``<address>/32 dev <host veth>``, address -> veth;
* ``rules``: the host's ``(priority, address, table)``: 512 to the pod via main, and
  1536 from the pod to its ENI's table for leases not on the primary ENI;
* ``calls``: every call in order, as (operation, key, netns).

Names and the errors the handler must map come out as ``Plumbing`` makes them: host
names from ``host_ifname``, pod names from ``pod_ifname``, gateways from ``gateway``;
``INTERFACE_EXISTS`` (102) when the pod already has the interface, ``UNKNOWN_CONTAINER``
(3) when the namespace is gone, ``INVALID_ENV`` (4) when it is no network namespace, all
three from ``enter``, before the handler allocates; a setup that fails undoes everything it did, as
``Plumbing``'s undo stack does (``tests/cni/test_commands.py`` checks that in namespaces).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from cni.backend import MAIN_TABLE
from cni.errors import CheckFailed, CniError, ErrorCode
from cni.keys import IpamKey
from cni.plumbing import (
    RULE_FROM_POD,
    RULE_TO_POD,
    PlumbedInterface,
    PodHandle,
    PodNetwork,
    gateway,
    host_ifname,
    pod_ifname,
)

__all__ = ["RecordingPlumbing"]

Rule = tuple[int, IPv4Address, int]


def _mac(name: str) -> str:
    digest = hashlib.sha1(name.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


@dataclass
class _Entered:
    """What ``enter`` hands out; closing it twice is a bug of the caller."""

    plumbing: RecordingPlumbing
    netns: str
    closed: bool = False

    def close(self) -> None:
        assert not self.closed, f"{self.netns} closed twice"
        self.closed = True
        self.plumbing.open_entries -= 1


@dataclass
class RecordingPlumbing:
    pods: dict[str, dict[str, IPv4Address]] = field(default_factory=dict)
    veths: dict[str, PlumbedInterface] = field(default_factory=dict)
    routes: dict[IPv4Address, str] = field(default_factory=dict)
    rules: set[Rule] = field(default_factory=set)
    calls: list[tuple[str, IpamKey, str]] = field(default_factory=list)
    open_entries: int = 0  # namespaces entered and not closed yet
    # What tests make go wrong: namespaces that are gone or no network namespace, a
    # setup that fails once it has plumbed this many interfaces, errors the next
    # teardown reports.
    gone: set[str] = field(default_factory=set)
    not_netns: set[str] = field(default_factory=set)
    fail_after: int | None = None
    teardown_errors: list[str] = field(default_factory=list)

    # -- the port ------------------------------------------------------------------------

    async def enter(
        self,
        netns: str,
        key: IpamKey,
        *,
        interfaces: int,
        veth_prefix: str,
        netns_fd: int | None = None,
    ) -> _Entered:
        self.calls.append(("enter", key, netns))
        ifnames = [pod_ifname(key, i) for i in range(interfaces)]
        if netns in self.gone:
            raise CniError(ErrorCode.UNKNOWN_CONTAINER, f"CNI_NETNS={netns!r}: gone")
        if netns in self.not_netns:
            raise CniError(ErrorCode.INVALID_ENV, f"CNI_NETNS={netns!r}: not a network namespace")
        for name in ifnames:
            if name in self.pods.get(netns, {}):
                raise CniError(
                    ErrorCode.INTERFACE_EXISTS,
                    f"CNI_IFNAME={name!r} already exists in CNI_NETNS={netns!r}",
                )
        self.open_entries += 1
        return _Entered(self, netns)

    async def setup(self, net: PodNetwork, pod: PodHandle) -> list[PlumbedInterface]:
        self.calls.append(("setup", net.key, net.netns))
        if not isinstance(pod, _Entered) or pod.closed or pod.netns != net.netns:
            raise AssertionError(f"setup of {net.netns} without entering it: {pod!r}")
        done: list[PlumbedInterface] = []
        try:
            for index, lease in enumerate(net.leases):
                if self.fail_after == index:
                    raise CniError(ErrorCode.PLUMBING_FAILED, f"injected at interface {index}")
                done.append(self._plumb(net, index, lease.address, lease.route_table))
        except CniError:
            for iface in reversed(done):
                self._unplumb(iface)
            raise
        return done

    async def check(self, net: PodNetwork) -> None:
        self.calls.append(("check", net.key, net.netns))
        for index, lease in enumerate(net.leases):
            name = host_ifname(net.key, index, net.veth_prefix)
            pod_name = pod_ifname(net.key, index)
            if name not in self.veths:
                raise CheckFailed(f"host veth {name} of {pod_name} is missing")
            if self.pods.get(net.netns, {}).get(pod_name) != lease.address:
                raise CheckFailed(f"{pod_name} lacks its address {lease.address}/32")
            if self.routes.get(lease.address) != name:
                raise CheckFailed(f"host route {lease.address}/32 dev {name} is missing")
            if (RULE_TO_POD, lease.address, MAIN_TABLE) not in self.rules:
                raise CheckFailed(f"host rule to {lease.address} lookup main (prio 512) is missing")

    async def teardown(
        self,
        key: IpamKey,
        addresses: Mapping[int, IPv4Address],
        *,
        veth_prefix: str,
        netns: str,
        interfaces: int = 1,
        netns_fd: int | None = None,
        v4_egress: bool = False,  # IPv6 pods' egress veth: not modelled (IPv4 pods only)
    ) -> list[str]:
        self.calls.append(("teardown", key, netns))
        # As Plumbing: an index without an address whose veth is there has the address
        # the host routes to that veth.
        indexes = sorted(set(addresses) | set(range(interfaces)) | {0})
        routed = {a: v for a, v in self.routes.items()}
        found = {
            i: a
            for i in indexes
            if i not in addresses
            for a, v in routed.items()
            if v == host_ifname(key, i, veth_prefix)
        }
        addresses = {**found, **addresses}
        # As Plumbing: first the routing of each address given (its /32 and rules), unless
        # its veth is gone and the address routes to another veth now (a newer pod's) ...
        for index, address in sorted(addresses.items()):
            name = host_ifname(key, index, veth_prefix)
            if name not in self.veths and address in self.routes:
                continue
            if self.routes.get(address) == name:
                del self.routes[address]
            self.rules = {r for r in self.rules if r[1] != address}
        # ... then the veths, by name, of the indexes given and of 0..interfaces-1: a veth
        # takes its pod end and its routes along, but not the rules of its address.
        for index in indexes:
            iface = self.veths.get(host_ifname(key, index, veth_prefix))
            if iface is not None:
                self._unplumb(iface, rules=False)
        errors, self.teardown_errors = self.teardown_errors, []
        return errors

    # -- what tests read -------------------------------------------------------------------

    def state(self) -> tuple[object, ...]:
        """Everything plumbed, for before/after comparisons."""
        return (
            {ns: dict(ifaces) for ns, ifaces in self.pods.items() if ifaces},
            set(self.veths),
            dict(self.routes),
            set(self.rules),
        )

    def addresses(self) -> set[IPv4Address]:
        return set(self.routes)

    # -- internals ---------------------------------------------------------------------------

    def _plumb(
        self, net: PodNetwork, index: int, address: IPv4Address, table: int
    ) -> PlumbedInterface:
        pod_name = pod_ifname(net.key, index)
        in_pod = self.pods.setdefault(net.netns, {})
        if pod_name in in_pod:
            raise CniError(
                ErrorCode.INTERFACE_EXISTS,
                f"CNI_IFNAME={pod_name!r} already exists in CNI_NETNS={net.netns!r}",
            )
        host_name = host_ifname(net.key, index, net.veth_prefix)
        iface = PlumbedInterface(
            index,
            host_name,
            _mac(host_name),
            pod_name,
            _mac(f"{net.netns}/{pod_name}"),
            address,
            gateway(index),
            table,
        )
        in_pod[pod_name] = address
        self.veths[host_name] = iface
        self.routes[address] = host_name
        self.rules.add((RULE_TO_POD, address, MAIN_TABLE))
        if table != MAIN_TABLE:
            self.rules.add((RULE_FROM_POD, address, table))
        return iface

    def _unplumb(self, iface: PlumbedInterface, *, rules: bool = True) -> None:
        del self.veths[iface.host_ifname]
        # The pod end goes with the veth, whichever namespace the runtime names now.
        for ifaces in self.pods.values():
            if ifaces.get(iface.pod_ifname) == iface.address:
                del ifaces[iface.pod_ifname]
                break
        if self.routes.get(iface.address) == iface.host_ifname:
            del self.routes[iface.address]
        if rules:
            self.rules = {r for r in self.rules if r[1] != iface.address}
