"""The host network in memory: an ``ipam.hostnet.HostNetworkPort`` that records what the
node agent asks for, for tests of the agent's logic without root or namespaces.

``RecordedHost`` is the node's kernel as far as the agent's ENI plumbing goes, and
outlives any one agent (a restarted daemon finds what the last one left). It keeps:

* links by MAC: hot-plugged when the emulated cloud attaches an ENI to the instance (it
  is a ``CloudListener``, as the lab's namespaced node is) and unplugged on detach,
  taking their address and routes with them, as the kernel does;
* per link its MTU once set up, and its one global IPv4 address;
* routes as ``HostRoute`` (table, destination, gateway, link) and the source rules at
  ``ENI_RULE_PRIORITY`` as ``HostRule``;
* ``calls``: every port call in order, and ``foreign_calls``: those made off the thread
  that opened the port.

``open()`` is the factory the agent gets (``NodeAgent(hostnet=host.open)``); the state it
leaves mirrors what ``HostNetwork`` leaves in a namespace, which
``tests/ipam/test_hostnet.py`` checks against the kernel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from ipam.hostnet import ENI_RULE_PRIORITY, EniLink, HostNetworkError, LinkNotFound
from tools.lab.events import EniView

__all__ = ["HostRoute", "HostRule", "RecordedHost", "RecordingHostPort"]


@dataclass(frozen=True, slots=True)
class HostRoute:
    table: int
    dst: IPv4Network
    link: str
    gateway: IPv4Address | None = None  # None: scope link


@dataclass(frozen=True, slots=True)
class HostRule:
    priority: int
    src: IPv4Address
    table: int


@dataclass
class RecordedHost:
    instance_id: str = ""  # whose attachments hot-plug links; set once launched
    links: dict[str, str] = field(default_factory=dict)  # MAC -> link name
    mtu: dict[str, int] = field(default_factory=dict)  # link -> MTU, once set up
    addresses: dict[str, IPv4Interface] = field(default_factory=dict)  # link -> address
    routes: set[HostRoute] = field(default_factory=set)
    rules: set[HostRule] = field(default_factory=set)
    calls: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    # Calls made off the thread that opened the port: HostNetwork's pyroute2 socket
    # keeps state per thread, so the agent must make none.
    foreign_calls: list[str] = field(default_factory=list)
    ports: list[RecordingHostPort] = field(default_factory=list)
    # Hooks for tests: called with the MAC before each find_link (a hot-plug that is
    # late), and errors that the next setup/teardown calls raise, in order.
    on_find_link: Callable[[str], None] | None = None
    failures: list[HostNetworkError] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _plugged: int = 0

    # -- the cloud's side: attachments come and go (tools.lab.events.CloudListener) -----

    def eni_attached(self, eni: EniView) -> None:
        with self._lock:
            if not self.instance_id:  # the first launch heard of is this node's
                self.instance_id = eni.instance_id
            if eni.instance_id != self.instance_id:
                return
            self._plugged += 1
            self.links[eni.mac] = f"ens{4 + self._plugged}"

    def eni_detached(self, eni: EniView) -> None:
        with self._lock:
            name = self.links.pop(eni.mac, None)
            if name is None:
                return
            self.mtu.pop(name, None)
            self.addresses.pop(name, None)
            self.routes = {r for r in self.routes if r.link != name}

    def eni_addresses_changed(self, eni: EniView) -> None:
        pass  # pod addresses are the CNI's business; the ENI's own address never changes

    # -- what tests read -------------------------------------------------------------

    def open(self) -> RecordingHostPort:
        port = RecordingHostPort(self)
        self.ports.append(port)
        return port

    def table(self, table: int) -> set[HostRoute]:
        return {r for r in self.routes if r.table == table}

    def rule_tables(self, src: IPv4Address) -> set[int]:
        return {r.table for r in self.rules if r.src == src}

    def called(self, operation: str) -> list[tuple[str, ...]]:
        return [args for op, args in self.calls if op == operation]

    def expected_routes(self, eni: EniLink) -> set[HostRoute]:
        """What ``HostNetwork.setup_eni`` leaves in the ENI's table."""
        name = self.links[eni.mac]
        return {
            HostRoute(eni.table, IPv4Network(f"{eni.gateway}/32"), name),
            HostRoute(eni.table, IPv4Network("0.0.0.0/0"), name, eni.gateway),
        }


class RecordingHostPort:
    """One agent's handle on a ``RecordedHost``: the ``HostNetworkPort`` it gets."""

    def __init__(self, host: RecordedHost) -> None:
        self.host = host
        self.owner = threading.get_ident()
        self.closed = False

    def _record(self, operation: str, args: Iterable[str]) -> None:
        if self.closed:
            raise AssertionError(f"{operation} on a closed host network port")
        if threading.get_ident() != self.owner:
            self.host.foreign_calls.append(operation)
        self.host.calls.append((operation, tuple(args)))

    def _fail_if_told(self) -> None:
        if self.host.failures:
            raise self.host.failures.pop(0)

    def find_link(self, mac: str) -> str | None:
        self._record("find_link", [mac])
        if self.host.on_find_link is not None:
            self.host.on_find_link(mac)
        with self.host._lock:
            return self.host.links.get(mac.lower())

    def setup_enis(self, enis: Sequence[EniLink]) -> None:
        self._record("setup_enis", [e.eni_id for e in enis])
        for eni in enis:
            self._setup(eni)

    def setup_eni(self, eni: EniLink) -> None:
        self._record("setup_eni", [eni.eni_id])
        self._setup(eni)

    def _setup(self, eni: EniLink) -> None:
        self._fail_if_told()
        host = self.host
        with host._lock:
            name = host.links.get(eni.mac)
            if name is None:
                raise LinkNotFound(eni.eni_id, eni.mac)
            if eni.is_primary:
                return  # the OS's: HostNetwork only checks it
            host.mtu[name] = eni.mtu
            host.addresses[name] = IPv4Interface(f"{eni.primary_ip}/{eni.subnet.prefixlen}")
            host.routes |= host.expected_routes(eni)
            host.rules = {r for r in host.rules if r.src != eni.primary_ip}
            host.rules.add(HostRule(ENI_RULE_PRIORITY, eni.primary_ip, eni.table))

    def teardown_eni(self, eni: EniLink) -> None:
        self._record("teardown_eni", [eni.eni_id])
        self._fail_if_told()
        if eni.is_primary:
            return
        host = self.host
        with host._lock:
            host.rules.discard(HostRule(ENI_RULE_PRIORITY, eni.primary_ip, eni.table))
            host.routes = {r for r in host.routes if r.table != eni.table}

    def close(self) -> None:
        self._record("close", [])
        self.closed = True
