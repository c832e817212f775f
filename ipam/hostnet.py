"""The host side of each ENI: link, address, route table and rule in the node's namespace.

What the VPC CNI's ``SetupENINetwork`` (``aws/amazon-vpc-cni-k8s``,
``pkg/networkutils/network.go``) does for a non-primary ENI: MTU, link up, the ENI's
primary address as the link's only global IPv4 address, a route table of its own
(``ipam.pool.route_table``) holding ``gw/32 scope link`` and ``default via gw``, no route
to the subnet in the main table (so the primary ENI's stays authoritative), and the rule
``from <ENI primary ip> lookup <table>`` at priority 32765. Traffic sourced from the ENI's
address then leaves by the ENI, as the VPC requires (it drops packets whose source is not
an address of the ENI they leave).

The primary ENI (card 0, device 0) belongs to the OS (DHCP configured it): it is only
checked. ENIs are found by MAC, never by name: interface names depend on udev and
on hot-plug order.

Where ultranet differs from the VPC CNI, on purpose: the address is added with
``IFA_F_NOPREFIXROUTE``, so the kernel never installs the subnet route to begin with,
not even when the link bounces (a link-up re-adds prefix routes of plain addresses);
a subnet route found there anyway is still removed.

Every call is idempotent (replace, or look then add), so the daemon can re-run setup
to repair drift. ``HostNetwork`` uses one pyroute2 ``IPRoute``; pyroute2 keeps its state
per thread, so use a ``HostNetwork`` from the thread that created it.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni.backend import MAIN_TABLE
from ipam.datastore_errors import InvalidEni
from ipam.errors import UltranetError
from ipam.pool import route_table

__all__ = [
    "ENI_RULE_PRIORITY",
    "EniLink",
    "HostNetwork",
    "HostNetworkError",
    "HostNetworkPort",
    "LinkNotFound",
]

ENI_RULE_PRIORITY = 32765  # the VPC CNI's, just above the main table's 32766
MTU_MIN, MTU_MAX = 576, 9001  # the VPC CNI's AWS_VPC_ENI_MTU range
NETNS_DIR = Path("/run/netns")

_SCOPE_UNIVERSE = 0
_SCOPE_LINK = 253
_IFA_F_NOPREFIXROUTE = 0x200
_ESRCH = 3
_ENOENT = 2
_EEXIST = 17
_EADDRNOTAVAIL = 99
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# Links that share their parent's MAC and are never the ENI itself.
_DERIVED_KINDS = frozenset({"vlan", "macvlan", "macvtap", "ipvlan", "ipvtap"})


class HostNetworkError(UltranetError):
    """A netlink operation on an ENI's host side failed; names the ENI and the operation.

    ``subject`` is the ENI id, or the namespace when the netlink socket cannot be opened;
    ``errno`` is netlink's error code when netlink answered one.
    """

    def __init__(self, subject: str, operation: str, detail: str, errno: int | None = None) -> None:
        super().__init__(f"{subject}: {operation} failed: {detail}")
        self.subject = subject
        self.operation = operation
        self.errno = errno


class LinkNotFound(HostNetworkError):
    """No link has the ENI's MAC: not hot-plugged yet, or already detached."""

    def __init__(self, eni_id: str, mac: str) -> None:
        super().__init__(eni_id, "find link", f"no link with MAC {mac}")
        self.eni_id = eni_id
        self.mac = mac


@dataclass(frozen=True, slots=True)
class EniLink:
    """What the host needs to know to plumb one attached ENI (efa-only ENIs have no IP
    and need no plumbing)."""

    eni_id: str
    mac: str  # lower case, as the kernel and IMDS print it
    card: int
    device: int
    primary_ip: IPv4Address
    subnet: IPv4Network
    mtu: int = 9001

    def __post_init__(self) -> None:
        if not self.eni_id.startswith("eni-"):
            raise InvalidEni("eni_id", self.eni_id, "must start with 'eni-'")
        if not _MAC.match(self.mac):
            raise InvalidEni("mac", self.mac, "must be 6 lower-case hex octets, ':'-separated")
        if self.card < 0 or self.device < 0:
            raise InvalidEni("card/device", (self.card, self.device), "must be >= 0")
        if not MTU_MIN <= self.mtu <= MTU_MAX:
            raise InvalidEni("mtu", self.mtu, f"must be {MTU_MIN}..{MTU_MAX}")
        hosts = self.subnet.num_addresses > 2
        if self.primary_ip not in self.subnet or (
            hosts and self.primary_ip in (self.subnet.network_address, self.gateway)
        ):
            raise InvalidEni("primary_ip", str(self.primary_ip), f"not a host of {self.subnet}")

    @property
    def is_primary(self) -> bool:
        return self.card == 0 and self.device == 0

    @property
    def gateway(self) -> IPv4Address:
        """The VPC router: the subnet's base address + 1."""
        return self.subnet.network_address + 1

    @property
    def table(self) -> int:
        return route_table(self.card, self.device)


class HostNetworkPort(Protocol):
    """What the node agent asks of the host's network, and nothing more: ``HostNetwork``
    does it with netlink; tests of the agent's logic plug in a recording one.

    Every call comes from the one thread that created the port (the agent's netlink
    thread); the setup and teardown calls are idempotent and raise ``HostNetworkError``
    (``LinkNotFound`` when no link has the ENI's MAC).
    """

    def find_link(self, mac: str) -> str | None: ...

    def setup_eni(self, eni: EniLink) -> None: ...

    def setup_enis(self, enis: Sequence[EniLink]) -> None: ...

    def teardown_eni(self, eni: EniLink) -> None: ...

    def close(self) -> None: ...


class HostNetwork:
    """Plumbs ENIs in one network namespace: the current one, or ``netns`` (tests)."""

    def __init__(self, ipr: IPRoute | None = None, *, netns: str | None = None) -> None:
        if ipr is not None and netns is not None:
            raise ValueError("pass an IPRoute or a netns name, not both")
        self._owned = ipr is None
        self._snapshot: dict[str, list[Any]] | None = None  # see setup_enis
        if ipr is None:
            ipr = _open(netns)
        self._ipr: Any = ipr

    def close(self) -> None:
        """Close the netlink socket if this object opened it; idempotent."""
        if self._owned and self._ipr is not None:
            self._ipr.close()
        self._ipr = None

    def __enter__(self) -> HostNetwork:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- public operations -------------------------------------------------------

    def find_link(self, mac: str) -> str | None:
        """The name of the link with this MAC, or None."""
        found = self._lookup(mac)
        return None if found is None else found[1]

    def setup_enis(self, enis: Sequence[EniLink]) -> None:
        """``setup_eni`` for many ENIs with one dump of links, addresses, routes and rules.

        At start a p5.48xlarge has 31 secondary ENIs; dumping every table once per ENI
        made set-up quadratic. The ENIs' states are independent (own link, own table,
        own source rule), so one snapshot taken before the batch serves all of them.
        """
        self._snapshot = {}
        try:
            for eni in enis:
                self.setup_eni(eni)
        finally:
            self._snapshot = None

    def _dump(self, what: str, eni: EniLink | None, fetch: Callable[[], Any]) -> list[Any]:
        if self._snapshot is None:
            with _netlink(eni, f"list {what}"):
                return list(fetch())
        if what not in self._snapshot:
            with _netlink(eni, f"list {what}"):
                self._snapshot[what] = list(fetch())
        return self._snapshot[what]

    def setup_eni(self, eni: EniLink) -> None:
        """Plumb the ENI as the VPC CNI does; idempotent. Raises ``LinkNotFound`` if the
        ENI is not hot-plugged (yet), ``HostNetworkError`` if netlink refuses a step."""
        found = self._lookup(eni.mac, eni)
        if found is None:
            raise LinkNotFound(eni.eni_id, eni.mac)
        index, ifname = found
        if eni.is_primary:
            self._verify_primary(eni, index, ifname)
            return
        with _netlink(eni, f"set {ifname} mtu {eni.mtu} up"):
            self._ipr.link("set", index=index, mtu=eni.mtu, state="up")
        self._ensure_address(eni, index, ifname)
        for spec in _table_routes(eni, index):
            with _netlink(eni, f"replace route {_describe(spec)}"):
                self._ipr.route("replace", **spec)
        self._remove_subnet_route(eni, index)
        self._ensure_rule(eni)

    def teardown_eni(self, eni: EniLink) -> None:
        """Remove the ENI's rule and its table's routes; idempotent. The link and its
        address stay (EC2 removes the link on detach); a link already gone is fine."""
        if eni.is_primary:
            return
        if eni.table in self._rule_tables(eni):
            self._delete_rule(eni, eni.table)
        found = self._lookup(eni.mac, eni)
        index = None if found is None else found[0]
        for spec in _table_routes(eni, index):
            with _netlink(eni, f"delete route {_describe(spec)}", ignore=(_ESRCH,)):
                self._ipr.route("del", **spec)

    # -- steps ---------------------------------------------------------------------

    def _lookup(self, mac: str, eni: EniLink | None = None) -> tuple[int, str] | None:
        wanted = mac.lower()
        links = self._dump("links", eni, self._ipr.get_links)
        matches = sorted(
            (link["index"], link.get("ifname"))
            for link in links
            if str(link.get("address", "")).lower() == wanted and _kind(link) not in _DERIVED_KINDS
        )
        return matches[0] if matches else None

    def _verify_primary(self, eni: EniLink, index: int, ifname: str) -> None:
        if str(eni.primary_ip) not in self._addresses(eni, index):
            raise HostNetworkError(
                eni.eni_id, "verify primary ENI", f"{eni.primary_ip} is not on {ifname}"
            )

    def _addresses(self, eni: EniLink, index: int) -> dict[str, int]:
        """Global IPv4 addresses of the link: address -> prefix length."""
        found = self._dump("addresses", eni, lambda: self._ipr.get_addr(family=socket.AF_INET))
        return {
            str(a.get("local") or a.get("address")): int(a["prefixlen"])
            for a in found
            if a["scope"] == _SCOPE_UNIVERSE and a["index"] == index
        }

    def _ensure_address(self, eni: EniLink, index: int, ifname: str) -> None:
        ours = (str(eni.primary_ip), eni.subnet.prefixlen)
        for address, prefixlen in self._addresses(eni, index).items():
            if (address, prefixlen) != ours:
                # Deleting a primary address also deletes its secondaries: hence the ignore.
                with _netlink(
                    eni, f"delete {address}/{prefixlen} from {ifname}", (_EADDRNOTAVAIL,)
                ):
                    self._ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
        if self._snapshot is not None:
            self._snapshot.pop("addresses", None)  # it changed, if anything was deleted
        if self._addresses(eni, index).get(ours[0]) != ours[1]:
            with _netlink(eni, f"add {ours[0]}/{ours[1]} to {ifname}"):
                self._ipr.addr(
                    "add",
                    index=index,
                    address=ours[0],
                    prefixlen=ours[1],
                    flags=_IFA_F_NOPREFIXROUTE,
                )

    def _remove_subnet_route(self, eni: EniLink, index: int) -> None:
        """Drop the main table's route to the ENI's subnet through this link."""
        subnet = eni.subnet
        found = self._dump(
            "main routes",
            eni,
            lambda: self._ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE),
        )
        for route in found:
            if (
                route.get("dst") == str(subnet.network_address)
                and route["dst_len"] == subnet.prefixlen
                and route.get("oif") == index
            ):
                spec = {
                    "dst": str(subnet),
                    "oif": index,
                    "table": MAIN_TABLE,
                    "scope": route["scope"],
                    "proto": route["proto"],
                }
                with _netlink(eni, f"delete main route to {subnet}", ignore=(_ESRCH,)):
                    self._ipr.route("del", **spec)

    def _rule_tables(self, eni: EniLink) -> set[int]:
        """Tables of the rules at ``ENI_RULE_PRIORITY`` that select the ENI's address."""
        found = self._dump("rules", eni, lambda: self._ipr.get_rules(family=socket.AF_INET))
        return {
            int(rule.get("FRA_TABLE") or rule["table"])
            for rule in found
            if rule.get("priority") == ENI_RULE_PRIORITY
            and rule.get("src") == str(eni.primary_ip)
            and rule["src_len"] == 32
        }

    def _ensure_rule(self, eni: EniLink) -> None:
        have = self._rule_tables(eni)
        for stale in have - {eni.table}:  # left by an earlier ENI with this address
            self._delete_rule(eni, stale)
        if eni.table not in have:
            with _netlink(eni, f"add rule from {eni.primary_ip} lookup {eni.table}", (_EEXIST,)):
                self._ipr.rule("add", **_rule(eni, eni.table))

    def _delete_rule(self, eni: EniLink, table: int) -> None:
        with _netlink(eni, f"delete rule from {eni.primary_ip} lookup {table}", (_ENOENT,)):
            self._ipr.rule("del", **_rule(eni, table))


def _open(netns: str | None) -> Any:
    where = "the current namespace" if netns is None else f"netns {netns}"
    if netns is not None and not (NETNS_DIR / netns).exists():
        # Checked first: pyroute2 would create a missing namespace (O_CREAT) or leak
        # its event loop when told not to.
        raise HostNetworkError(where, "open netlink", "no such network namespace")
    try:
        return IPRoute() if netns is None else IPRoute(netns=netns, flags=0)
    except (NetlinkError, OSError) as err:
        raise HostNetworkError(where, "open netlink", str(err)) from err


@contextmanager
def _netlink(eni: EniLink | None, operation: str, ignore: tuple[int, ...] = ()) -> Iterator[None]:
    """Translate NetlinkError at the boundary; the errnos in ``ignore`` mean done."""
    try:
        yield
    except NetlinkError as err:
        if err.code in ignore:
            return
        name = "host network" if eni is None else eni.eni_id
        raise HostNetworkError(name, operation, str(err), err.code) from err


def _kind(link: Any) -> str | None:
    info = link.get("IFLA_LINKINFO")
    return None if info is None else info.get("IFLA_INFO_KIND")


def _table_routes(eni: EniLink, index: int | None) -> list[dict[str, Any]]:
    """The ENI table's routes, gateway first (the default route resolves through it)."""
    link: dict[str, Any] = {} if index is None else {"oif": index}
    gw = str(eni.gateway)
    return [
        {"dst": f"{gw}/32", "scope": _SCOPE_LINK, "table": eni.table, **link},
        {"dst": "0.0.0.0/0", "gateway": gw, "table": eni.table, **link},
    ]


def _rule(eni: EniLink, table: int) -> dict[str, Any]:
    return {
        "family": socket.AF_INET,
        "priority": ENI_RULE_PRIORITY,
        "src": str(eni.primary_ip),
        "src_len": 32,
        "table": table,
    }


def _describe(spec: dict[str, Any]) -> str:
    via = f" via {spec['gateway']}" if "gateway" in spec else ""
    return f"{spec['dst']}{via} table {spec['table']}"
