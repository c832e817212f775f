"""Pod network plumbing, as the VPC CNI does it (``aws/amazon-vpc-cni-k8s``,
``cmd/routed-eni-cni-plugin/driver/driver.go``: ``SetupPodNetwork``, ``TeardownPodNetwork``).

For each pod interface i (one per lease; i > 0 only for multi-NIC pods):

* a veth pair: host end ``<vethPrefix><11 hex>`` in the host namespace with a random
  locally administered MAC (set here, so udev's MAC policy never rewrites it: VPC CNI
  #3354); pod end ``CNI_IFNAME`` for i = 0 and ``mNicIf<i>`` otherwise;
* in the pod: the lease's address as a /32, gateway ``169.254.1.(i+1)`` as a
  scope-link route, ``default via`` it, and a permanent neighbour entry for the gateway
  pointing at the host end's MAC (no ARP, no proxy ARP). i = 0 uses the main table;
  i > 0 uses table i and the rule ``from <address> lookup i`` (priority 1), so traffic
  from interface k leaves through interface k;
* on the host: ``<address>/32 dev <host end>`` in main, rule ``to <address> lookup main``
  (priority 512), and, when the lease's ENI has its own table (every ENI but the
  primary), ``from <address> lookup <ENI table>`` (priority 1536). Card k's ENI table
  sends the traffic out of card k's ENI.

IPv6 pods (``ENABLE_IPv6``) get the same shape with the VPC CNI's IPv6 values (the same
``driver.go``, ``createVethPairContext.run`` and ``setupVeth``): the /128 on the pod end,
gateway ``fe80::(i+1)`` as a scope-link route with ``default via`` it and a permanent
neighbour entry, ``<address>/128 dev <host end>`` and the priority-512 rule on the host,
and ``accept_ra=0`` on the host end, so a pod cannot install routes on the node with a
router advertisement. The pod's address is added with ``nodad``: usable at once, where
the VPC CNI waits for DAD to finish (``WaitForAddressesToBeStable``, up to 10 s); the
address is the pod's alone by its allocation, so there is nothing for DAD to find.

Where we differ from the VPC CNI, on purpose:

* The host name hashes the CNI attachment key (network, container id, ifname) and i,
  not the pod's namespace/name: DEL finds it without pod arguments, and two sandboxes
  of one pod never share a name (the VPC CNI deletes a same-named host veth, which can
  cut an old sandbox that is still running).
* DEL deletes the veth (the VPC CNI leaves it to the namespace's removal), but on a
  reaper thread after the routing is gone: the kernel takes 15-25 ms per deletion, so the
  reaper deletes what is queued in one request (``cni.netlink.LinkReaper``). The host
  end carries the alias ``ultranet-cni``, so a restarted daemon can tell its own veths
  from everyone else's and reap those no allocation accounts for (:meth:`Plumbing.reap_strays`):
  a DEL answered before its veth went, then a crash, leaves nothing behind.

Every ADD step registers its undo; a failure undoes them all, in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import re
import socket
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address
from typing import Any, Protocol

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni import egress_v4, rtnl
from cni.backend import MAIN_TABLE, Lease, PodAddress
from cni.errors import CheckFailed, CniError, ErrorCode
from cni.keys import IpamKey
from cni.netlink import (
    LinkReaper,
    NamespaceError,
    PendingSocket,
    iproute_in,
    same_namespace,
    socket_in,
    write_sysctls,
)
from cni.pausepoint import pause_point
from cni.rtnl import Rtnl, RtnlError

__all__ = [
    "HOST_VETH_ALIAS",
    "RULE_FROM_POD",
    "RULE_POD_TABLE",
    "RULE_TO_POD",
    "V4_EGRESS_PREFIX",
    "PlumbedInterface",
    "Plumbing",
    "PodEntry",
    "PodHandle",
    "PodNetwork",
    "gateway",
    "host_ifname",
    "pod_ifname",
    "v4_egress_ifname",
]

log = logging.getLogger("ultranet.cni")

RULE_TO_POD = 512  # to <pod> lookup main
RULE_FROM_POD = 1536  # from <pod> lookup <ENI table>
RULE_POD_TABLE = 1  # inside the pod: from <address k> lookup k
HOST_VETH_ALIAS = "ultranet-cni"  # marks the host ends this plugin made
V4_EGRESS_PREFIX = "v4e"  # host ends of IPv6 pods' IPv4 egress veths
_HASH_DIGITS = 11
_NUD_PERMANENT = 0x80
_AF_INET = socket.AF_INET
_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def host_ifname(key: IpamKey, index: int, prefix: str) -> str:
    digest = hashlib.sha1(f"{key.network}/{key.container_id}/{key.ifname}/{index}".encode())
    return prefix + digest.hexdigest()[:_HASH_DIGITS]


def v4_egress_ifname(key: IpamKey) -> str:
    """The host end of an IPv6 pod's IPv4 egress veth: not the pods' ``eni`` prefix, so
    another CNI's ``eni*`` match never takes it (the stray sweep looks for both)."""
    return host_ifname(key, 0, V4_EGRESS_PREFIX)


def pod_ifname(key: IpamKey, index: int) -> str:
    return key.ifname if index == 0 else f"mNicIf{index}"


def gateway(index: int, version: int = 4) -> PodAddress:
    """The pod's next hop on interface ``index``: a link-local address no one has, which
    the pod reaches through a permanent neighbour entry (the host end's MAC)."""
    if version == 6:
        return IPv6Address("fe80::1") + index
    return IPv4Address("169.254.1.1") + index


def _random_mac() -> str:
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFE) | 0x02  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in octets)


@dataclass(frozen=True, slots=True)
class PodNetwork:
    """What to plumb: one interface per lease, in order."""

    key: IpamKey
    netns: str
    leases: tuple[Lease, ...]
    mtu: int
    veth_prefix: str
    netns_fd: int | None = None  # an open descriptor of ``netns`` to use instead of its path


@dataclass(frozen=True, slots=True)
class PlumbedInterface:
    index: int
    host_ifname: str
    host_mac: str
    pod_ifname: str
    pod_mac: str
    address: PodAddress
    gateway: PodAddress
    host_table: int  # the ENI table of the lease (main for the primary ENI)


def _ignore(err: NetlinkError, *codes: int) -> None:
    if err.code not in codes:
        raise err


def _plumbing_error(step: str, err: BaseException) -> CniError:
    return CniError(ErrorCode.PLUMBING_FAILED, f"{step} failed", str(err))


# Entering a namespace failed for a reason of the daemon's, not of CNI_NETNS: try again.
_OURS_TO_RETRY = frozenset((errno.EAGAIN, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS))


def _open_namespace(netns: str, netns_fd: int | None = None) -> int:
    """A descriptor of the namespace ``netns``, this function's to close: a copy of
    ``netns_fd`` when given (the path is then never opened), else the path opened;
    CniError 3 if it is gone."""
    try:
        if netns_fd is not None:
            return os.dup(netns_fd)
        return os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        why = NamespaceError(err.errno, f"cannot open network namespace {netns}: {err.strerror}")
        raise _namespace_error(netns, why) from err


def _namespace_error(netns: str, err: NamespaceError) -> CniError:
    if err.errno == errno.ENOENT:
        return CniError(ErrorCode.UNKNOWN_CONTAINER, f"CNI_NETNS={netns!r}: gone")
    if err.errno in _OURS_TO_RETRY:  # the daemon's trouble (its thread, fds, memory)
        return CniError(ErrorCode.TRY_AGAIN_LATER, f"CNI_NETNS={netns!r}: {err.strerror}")
    return CniError(ErrorCode.INVALID_ENV, f"CNI_NETNS={netns!r}: {err.strerror}")


class PodHandle(Protocol):
    """A pod namespace entered for an ADD (:meth:`Plumbing.enter`); its owner closes it."""

    def close(self) -> None: ...


class PodEntry:
    """The pod's namespace, entered and checked: an open descriptor of it (the veth's pod
    end is created into it by descriptor) and a netlink socket inside it."""

    def __init__(
        self, netns: str, fd: int, pod: Rtnl, done: Callable[[], None] = lambda: None
    ) -> None:
        self.netns = netns
        self.fd = fd
        self.pod = pod
        self._done = done  # the ADD is no longer in flight (its veths may be swept)

    def close(self) -> None:
        self._done()
        self.pod.close()
        os.close(self.fd)


class Plumbing:
    """Netlink work for pods, from the host namespace (``host_netns``, None: ours)."""

    def __init__(self, host: Any, rtnl: Rtnl, reaper: LinkReaper, host_netns: str | None) -> None:
        self._host = host  # pyroute2, for CHECK and dumps
        self._rtnl = rtnl  # raw batches, for ADD and DEL
        self._reaper = reaper
        self._host_netns = host_netns
        # Host veth names of ADDs in flight (from enter() to their entry's close()), and
        # the sets of the sweeps looking now, which every such name is added to: a sweep
        # never takes a veth, or an attachment, an ADD is plumbing or plumbed meanwhile.
        self._adding: dict[str, int] = {}
        self._sweeps: list[set[str]] = []

    @classmethod
    async def open(
        cls, host_netns: str | None = None, *, max_pending_deletions: int = 256
    ) -> Plumbing:
        """Sockets in ``host_netns`` (a path; None: this process's namespace)."""
        with contextlib.ExitStack() as opened:
            host = await iproute_in(host_netns)
            opened.callback(host.close)
            rtnl = Rtnl(socket_in(host_netns))
            opened.callback(rtnl.close)
            reaper = LinkReaper(host_netns, max_pending=max_pending_deletions)
            opened.pop_all()
        return cls(host, rtnl, reaper, host_netns)

    async def close(self) -> None:
        await self._reaper.settle()
        self._reaper.close()
        self._rtnl.close()
        self._host.close()

    async def settle(self) -> None:
        """Wait for background link deletions (tests, shutdown)."""
        await self._reaper.settle()

    # -- ADD ------------------------------------------------------------------------------

    async def enter(
        self,
        netns: str,
        key: IpamKey | None = None,
        *,
        interfaces: int = 1,
        veth_prefix: str = "",
        netns_fd: int | None = None,
    ) -> PodEntry:
        """Open and check the pod's namespace before an ADD of ``key`` takes an address:
        CniError 3 if it is gone, 4 if it is no network namespace or the host's own, 11 if
        the daemon could not enter it for a reason of its own, 102 if the pod end of one
        of the ``interfaces`` is in it already. A veth of ``key`` the reaper is still
        deleting (a DEL of the same attachment answered just before) goes first: its pod
        end is not a live interface. ``netns_fd`` (borrowed), when given, is the namespace
        and ``netns`` only names it: the daemon may not see the runtime's mounts."""
        names = [] if key is None else [pod_ifname(key, i) for i in range(interfaces)]
        hosts = [] if key is None else [host_ifname(key, i, veth_prefix) for i in range(interfaces)]
        # The IPv4 egress veth (an IPv6 pod's, made after these) is the ADD's too.
        egress = [] if key is None else [v4_egress_ifname(key)]
        done = self._adding_now([*hosts, *egress])  # before any wait: a sweep skips them
        try:
            for host in hosts:
                waiting = self._reaper.pending(host)
                if waiting is not None:
                    await _wait_quietly(waiting)
            fd = _open_namespace(netns, netns_fd)
        except BaseException:
            done()
            raise
        try:
            pod = Rtnl(self._pod_socket(netns, fd))
        except BaseException:
            os.close(fd)
            done()
            raise
        entry = PodEntry(netns, fd, pod, done)
        try:
            for name in names:
                if self._index_or_none(pod, name) is not None:
                    raise CniError(
                        ErrorCode.INTERFACE_EXISTS,
                        f"CNI_IFNAME={name!r} already exists in CNI_NETNS={netns!r}",
                    )
        except BaseException:
            entry.close()
            raise
        return entry

    def _adding_now(self, names: Sequence[str]) -> Callable[[], None]:
        """Mark ``names`` as an ADD's until the returned callable runs (once)."""
        for name in names:
            self._adding[name] = self._adding.get(name, 0) + 1
        for seen in self._sweeps:
            seen.update(names)
        finished = False

        def done() -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            for name in names:
                left = self._adding[name] - 1
                if left:
                    self._adding[name] = left
                else:
                    del self._adding[name]

        return done

    @contextlib.contextmanager
    def _adds_meanwhile(self) -> Iterator[set[str]]:
        """The host veth names of ADDs in flight now or at any point until the block
        ends: a sweep lists the links, then decides with no await in between, and an
        ADD that finished while it listed is as untouchable as one still running."""
        seen = set(self._adding)
        self._sweeps.append(seen)
        try:
            yield seen
        finally:
            self._sweeps.remove(seen)

    def _pod_socket(self, netns: str, fd: int) -> socket.socket:
        """A netlink socket in the namespace ``fd`` (``netns`` names it in errors)."""
        try:
            if same_namespace(fd, self._host_netns):
                raise CniError(
                    ErrorCode.INVALID_ENV, f"CNI_NETNS={netns!r} is the host's own namespace"
                )
            return PendingSocket(netns, fd).result()
        except NamespaceError as err:
            raise _namespace_error(netns, err) from err

    def _enter_pod(self, netns: str, netns_fd: int | None = None) -> socket.socket:
        """A netlink socket in the pod's namespace; CniError 3 if it is gone."""
        fd = _open_namespace(netns, netns_fd)
        try:
            return self._pod_socket(netns, fd)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _pod(self, netns: str, netns_fd: int | None) -> Iterator[Rtnl]:
        pod = Rtnl(self._enter_pod(netns, netns_fd))
        try:
            yield pod
        finally:
            pod.close()

    @contextlib.asynccontextmanager
    async def _pod_iproute(self, netns: str, netns_fd: int | None) -> AsyncIterator[Any]:
        sock = self._enter_pod(netns, netns_fd)
        try:
            ipr = AsyncIPRoute(fileno=sock.detach(), groups=0)
            await ipr.setup_endpoint()
        finally:
            sock.close()
        try:
            yield ipr
        finally:
            ipr.close()

    async def setup(self, net: PodNetwork, pod: PodHandle | None = None) -> list[PlumbedInterface]:
        """Plumb every interface into ``pod`` (the namespace :meth:`enter` checked; None:
        enter ``net.netns`` here); on any failure undo every step taken, then raise."""
        entry = pod if pod is not None else await self.enter(net.netns, netns_fd=net.netns_fd)
        if not isinstance(entry, PodEntry):
            raise TypeError(f"{entry!r} is not a PodEntry of Plumbing.enter")
        try:
            async with contextlib.AsyncExitStack() as undo:
                done = []
                for index, lease in enumerate(net.leases):
                    done.append(await self._setup_one(net, index, lease, entry, undo))
                undo.pop_all()
                return done
        finally:
            if pod is None:
                entry.close()

    async def _setup_one(
        self,
        net: PodNetwork,
        index: int,
        lease: Lease,
        entry: PodEntry,
        undo: contextlib.AsyncExitStack,
    ) -> PlumbedInterface:
        host_name = host_ifname(net.key, index, net.veth_prefix)
        pod_name = pod_ifname(net.key, index)
        host_mac, pod_mac = _random_mac(), _random_mac()
        waiting = self._reaper.pending(host_name)
        if waiting is not None:  # a DEL of the same attachment is still deleting it
            await _wait_quietly(waiting)
        pod = entry.pod
        try:
            self._rtnl.batch([rtnl.veth(host_name, host_mac, pod_name, pod_mac, entry.fd, net.mtu)])
        except RtnlError as err:
            if err.errno == errno.EEXIST and self._index_or_none(pod, pod_name) is not None:
                raise CniError(
                    ErrorCode.INTERFACE_EXISTS,
                    f"CNI_IFNAME={pod_name!r} already exists in CNI_NETNS={net.netns!r}",
                ) from err
            raise _plumbing_error(err.what, err) from err
        undo.push_async_callback(self._delete_link_now, host_name)
        gw = gateway(index, lease.address.version)
        self._run(pod, self._pod_side(pod, pod_name, index, lease.address, gw, host_mac, undo))
        self._run(self._rtnl, self._host_side(host_name, lease, pod_mac, undo))
        if lease.address.version == 6:
            self._host_ipv6_sysctls(host_name)
        return PlumbedInterface(
            index, host_name, host_mac, pod_name, pod_mac, lease.address, gw, lease.route_table
        )

    def _pod_side(
        self,
        pod: Rtnl,
        name: str,
        index: int,
        address: PodAddress,
        gw: PodAddress,
        host_mac: str,
        undo: contextlib.AsyncExitStack,
    ) -> list[rtnl.Message]:
        link = self._index(pod, name, "in the pod")
        table = MAIN_TABLE if index == 0 else index
        where = f"in the pod ({name})"
        messages = [
            rtnl.link_up(link, f"set {name} up {where}"),
            rtnl.address(link, address, f"add {address}/{address.max_prefixlen} {where}"),
            rtnl.route(link, gw, table=table, what=f"route {gw} scope link {where}"),
            rtnl.route(link, None, table=table, gateway=gw, what=f"default via {gw} {where}"),
            rtnl.neighbour(link, gw, host_mac, f"neighbour {gw} lladdr {host_mac} {where}"),
        ]
        if index > 0:
            undo.callback(
                self._quiet, pod, [rtnl.rule("src", address, RULE_POD_TABLE, None, delete=True)]
            )
            messages.append(rtnl.rule("src", address, RULE_POD_TABLE, table))
        return messages

    def _host_side(
        self, name: str, lease: Lease, pod_mac: str, undo: contextlib.AsyncExitStack
    ) -> list[rtnl.Message]:
        link = self._index(self._rtnl, name, "on the host")
        address = lease.address
        undo.callback(self._quiet, self._rtnl, _rule_deletes(address))
        messages = [
            rtnl.link_alias(link, HOST_VETH_ALIAS, f"alias {HOST_VETH_ALIAS} on {name}"),
            rtnl.route(
                link,
                address,
                table=MAIN_TABLE,
                what=f"route {address}/{address.max_prefixlen} dev {name}",
            ),
            rtnl.rule("dst", address, RULE_TO_POD, MAIN_TABLE),
        ]
        if lease.route_table != MAIN_TABLE:
            messages.append(rtnl.rule("src", address, RULE_FROM_POD, lease.route_table))
        if address.version == 6:
            # Without it the node resolves the pod's /128 by neighbour discovery, whose
            # solicitation needs the host end's link-local, tentative for DAD's first
            # second or two: a new pod's first reply waited 1-2 s (seen by the demo).
            what = f"neighbour {address} lladdr {pod_mac} on {name}"
            messages.append(rtnl.neighbour(link, address, pod_mac, what))
        return messages

    def _host_ipv6_sysctls(self, name: str) -> None:
        """``accept_ra=0`` on the host end, as the VPC CNI's ``setupVeth`` sets it: a
        pod must not be able to give the node routes by router advertisement. Written
        from a thread in the host namespace (``host_netns``), never this process's own
        when that is another one (the lab)."""
        try:
            write_sysctls(self._host_netns, {f"net/ipv6/conf/{name}/accept_ra": "0"})
        except OSError as err:
            raise _plumbing_error(f"accept_ra=0 on {name}", err) from err

    def _index_or_none(self, sock: Rtnl, name: str) -> int | None:
        try:
            return sock.link_index(name)
        except RtnlError as err:
            raise _plumbing_error(err.what, err) from err

    def _index(self, sock: Rtnl, name: str, where: str) -> int:
        try:
            index = sock.link_index(name)
        except RtnlError as err:
            raise _plumbing_error(err.what, err) from err
        if index is None:
            raise CniError(ErrorCode.PLUMBING_FAILED, f"{name} vanished {where}")
        return index

    def _run(self, sock: Rtnl, messages: list[rtnl.Message]) -> None:
        try:
            sock.batch(messages)
        except RtnlError as err:
            raise _plumbing_error(err.what, err) from err

    def _quiet(self, sock: Rtnl, messages: list[rtnl.Message]) -> None:
        """Undo steps: what is already gone is fine; other errors are logged (the undo
        continues, and the runtime's DEL after a failed ADD tries again)."""
        try:
            sock.batch(messages)
        except RtnlError as err:
            log.error("cni: undo step %s failed: %s", err.what, err)

    # -- IPv4 egress of an IPv6 pod (cni.egress_v4) -------------------------------------

    async def setup_v4_egress(
        self, net: PodNetwork, address: IPv4Address, node_range: IPv4Network, pod: PodHandle
    ) -> str:
        """The pod's ``v4if0`` with its node-local IPv4, as the VPC CNI's ``egress-cni``
        (``cni.egress_v4``), in two rtnetlink batches into ``pod`` (the namespace the ADD
        entered; pyroute2 took 6-40 ms for the same): a veth whose host end is
        :func:`v4_egress_ifname` (alias ``HOST_VETH_ALIAS``, for the stray sweep); in the
        pod ``<address>/32``, ``<gateway>/32`` scope link, ``default via <gateway>`` and a
        permanent neighbour for the gateway (the host end's MAC); on the host end
        ``<gateway>/32`` scope link and the route ``<address>/32`` to it. The address is a
        /32, so the kernel adds no route of the range to undo (the VPC CNI adds the range's
        prefix and replaces that route). Returns the host end's name; CniError 7 naming the
        step on failure, with the veth removed."""
        if not isinstance(pod, PodEntry):
            raise TypeError(f"{pod!r} is not a PodEntry of Plumbing.enter")
        name = v4_egress_ifname(net.key)
        gw = egress_v4.gateway(node_range)
        host_mac, pod_mac = _random_mac(), _random_mac()
        waiting = self._reaper.pending(name)
        if waiting is not None:  # a DEL of the same attachment is still deleting it
            await _wait_quietly(waiting)
        veth = rtnl.veth(name, host_mac, egress_v4.POD_IFNAME, pod_mac, pod.fd, net.mtu)
        try:
            self._rtnl.batch([veth])
        except RtnlError as err:
            raise _plumbing_error(f"IPv4 egress: {err.what}", err) from err
        try:
            where = f"in the pod ({egress_v4.POD_IFNAME})"
            link = self._index(pod.pod, egress_v4.POD_IFNAME, "in the pod")
            self._run(
                pod.pod,
                [
                    rtnl.link_up(link, f"set {egress_v4.POD_IFNAME} up {where}"),
                    rtnl.address(link, address, f"add {address}/32 {where}"),
                    rtnl.route(link, gw, table=MAIN_TABLE, what=f"route {gw} scope link {where}"),
                    rtnl.route(
                        link, None, table=MAIN_TABLE, gateway=gw, what=f"default via {gw} {where}"
                    ),
                    rtnl.neighbour(link, gw, host_mac, f"neighbour {gw} lladdr {host_mac} {where}"),
                ],
            )
            host = self._index(self._rtnl, name, "on the host")
            self._run(
                self._rtnl,
                [
                    rtnl.link_alias(host, HOST_VETH_ALIAS, f"alias {HOST_VETH_ALIAS} on {name}"),
                    rtnl.address(
                        host, gw, f"add {gw}/32 scope link on {name}", scope=rtnl.SCOPE_LINK
                    ),
                    rtnl.route(
                        host, address, table=MAIN_TABLE, what=f"route {address}/32 dev {name}"
                    ),
                ],
            )
        except BaseException:
            await self._delete_link_now(name)
            raise
        return name

    async def teardown_v4_egress(self, key: IpamKey) -> None:
        """Remove the egress veth of ``key`` (its pod end goes with it) on a reaper
        thread; nothing if there is none. A DEL uses ``teardown(..., v4_egress=True)``
        instead, so this veth goes in one batch with the pod's others."""
        await self._reaper.reserve(1)
        self._reaper.delete(v4_egress_ifname(key))

    async def check_v4_egress(self, net: PodNetwork, address: IPv4Address) -> None:
        name = v4_egress_ifname(net.key)
        if await self._link_or_none(self._host, name) is None:
            raise CheckFailed(f"the IPv4 egress veth {name} is missing")
        async with self._pod_iproute(net.netns, net.netns_fd) as pod:
            link = await self._link_or_none(pod, egress_v4.POD_IFNAME)
            if link is None:
                raise CheckFailed(f"{egress_v4.POD_IFNAME} is missing from CNI_NETNS")
            addrs = {
                a.get("IFA_ADDRESS")
                async for a in await pod.addr("dump", index=link["index"], family=_AF_INET)
            }
        if str(address) not in addrs:
            raise CheckFailed(f"{egress_v4.POD_IFNAME} lacks its node-local address {address}")

    # -- CHECK ----------------------------------------------------------------------------

    async def check(self, net: PodNetwork) -> None:
        """Raise ``CheckFailed`` naming the first thing an ADD made that is not there."""
        host_rules = await self._rules(self._host)
        async with self._pod_iproute(net.netns, net.netns_fd) as pod:
            pod_routes = {
                (r.get("RTA_DST"), r.get("RTA_GATEWAY"), r.get("RTA_TABLE"), r.get("RTA_OIF"))
                for family in {lease.address.version for lease in net.leases}
                async for r in await pod.route("dump", family=_family(family))
            }
            for index, lease in enumerate(net.leases):
                await self._check_one(net, index, lease, pod, pod_routes, host_rules)

    async def _check_one(
        self,
        net: PodNetwork,
        index: int,
        lease: Lease,
        pod: Any,
        pod_routes: set[tuple[Any, ...]],
        host_rules: set[tuple[int, str, str, int]],
    ) -> None:
        address, gw = str(lease.address), gateway(index, lease.address.version)
        length = lease.address.max_prefixlen
        any_address = "0.0.0.0" if lease.address.version == 4 else "::"
        host_name, pod_name = (
            host_ifname(net.key, index, net.veth_prefix),
            pod_ifname(net.key, index),
        )
        host_link = await self._link_or_none(self._host, host_name)
        if host_link is None:
            raise CheckFailed(f"host veth {host_name} of {pod_name} is missing")
        pod_link = await self._link_or_none(pod, pod_name)
        if pod_link is None:
            raise CheckFailed(f"{pod_name} is missing from CNI_NETNS={net.netns!r}")
        pod_index = pod_link["index"]
        addrs = {a.get("IFA_ADDRESS") async for a in await pod.addr("dump", index=pod_index)}
        if address not in addrs:
            raise CheckFailed(f"{pod_name} lacks its address {address}/{length}")
        table = MAIN_TABLE if index == 0 else index
        if (any_address, str(gw), table, pod_index) not in {
            (dst or any_address, g, t, o) for dst, g, t, o in pod_routes if g is not None
        }:
            raise CheckFailed(f"{pod_name}: default route via {gw} (table {table}) is missing")
        neigh = {
            (n.get("NDA_DST"), n.get("NDA_LLADDR"), n["state"])
            async for n in await pod.neigh("dump", ifindex=pod_index)
        }
        host_mac = host_link.get("IFLA_ADDRESS")
        if (str(gw), host_mac, _NUD_PERMANENT) not in neigh:
            raise CheckFailed(f"{pod_name}: permanent neighbour {gw} -> {host_mac} is missing")
        host_routes = {
            (r.get("RTA_DST"), r["dst_len"], r.get("RTA_OIF"))
            async for r in await self._host.route(
                "dump", family=_family(lease.address.version), table=MAIN_TABLE
            )
        }
        if (address, length, host_link["index"]) not in host_routes:
            raise CheckFailed(f"host route {address}/{length} dev {host_name} is missing")
        if (RULE_TO_POD, "dst", address, MAIN_TABLE) not in host_rules:
            raise CheckFailed(f"host rule to {address} lookup main (prio 512) is missing")
        wanted = (RULE_FROM_POD, "src", address, lease.route_table)
        if lease.route_table != MAIN_TABLE and wanted not in host_rules:
            raise CheckFailed(
                f"host rule from {address} lookup {lease.route_table} (prio 1536) is missing"
            )

    # -- DEL --------------------------------------------------------------------------------

    async def teardown(
        self,
        key: IpamKey,
        addresses: Mapping[int, PodAddress],
        *,
        veth_prefix: str,
        netns: str,
        interfaces: int = 1,
        netns_fd: int | None = None,
        v4_egress: bool = False,
    ) -> list[str]:
        """Remove the host routing of ``addresses`` (interface index -> address) and the
        veths of indexes ``addresses`` and ``0..interfaces-1`` (their names derive from
        the key, so a DEL that lost the addresses still finds every veth); with
        ``v4_egress``, the IPv4 egress veth of an IPv6 pod too, in the same reaper batch
        as the others (one kernel request for all of one DEL's veths); idempotent.
        Returns the errors met (every step is still tried).

        Rules of an address are removed only while this attachment still holds it: its
        veth exists, or no other veth routes the address (it may belong to a newer pod
        now, whose identical rules must stay). An index with no address given whose veth
        still exists gets its address from the host route to that veth.

        The veths go on the reaper's threads and the call returns before they are gone
        (once the reaper has room for them): see ``cni/README.md`` for why that is safe.
        """
        errors: list[str] = []
        indexes = sorted(set(addresses) | set(range(interfaces)) | {0})
        unknown = [i for i in indexes if i not in addresses]
        # Host veths seen to exist (or not looked up): only those go to the reaper, so a
        # repeated DEL (containerd sends one more from RemovePodSandbox, the kubelet
        # retries) hands no thread a deletion that can only answer ENODEV.
        present: set[str] = set()
        if unknown:  # no allocation and no prevResult for these: ask the host's routes
            routed = await self._routed_addresses(key, unknown, veth_prefix, present)
            addresses = {**routed, **addresses}
        for index, address in sorted(addresses.items()):
            name = host_ifname(key, index, veth_prefix)
            try:
                if await self._teardown_one(name, str(address)):
                    present.add(name)
            except (NetlinkError, OSError) as err:
                errors.append(f"{name} ({address}): {err}")
                present.add(name)
            pause_point("del-between-interfaces")
        secondary = [address for index, address in addresses.items() if index > 0]
        if secondary and netns:
            errors += await self._teardown_pod_rules(netns, secondary, netns_fd)
        names = [host_ifname(key, index, veth_prefix) for index in indexes]
        if v4_egress:
            egress = v4_egress_ifname(key)  # by name: no allocation needed
            names.append(egress)
            if self._rtnl.link_index(egress) is not None:
                present.add(egress)
        doomed = [n for n in names if n in present or self._reaper.pending(n) is not None]
        await self._reaper.reserve(len(doomed))
        self._reaper.delete_all(doomed)  # one batch: one kernel request for the pod's veths
        return errors

    async def reap_strays(
        self, veth_prefix: str, accounted: Callable[[], Collection[str]]
    ) -> list[str]:
        """Delete the host veths this plugin made (``veth_prefix`` or, an IPv6 pod's IPv4
        egress, ``V4_EGRESS_PREFIX``, + 11 hex digits, kind veth, alias ``HOST_VETH_ALIAS``)
        whose names ``accounted()`` lacks; returns
        their names once they are gone. Nothing else is touched: not the ENIs' links, not
        another plugin's veths (the VPC CNI names its own ``eni`` + 11 hex too).

        ``accounted`` is called after the links are listed, and the deletions are queued
        without an await in between: an attachment allocates before it creates its veth,
        and an ADD waits for a pending deletion of its name, so no veth of a live
        allocation is taken even if ADDs run meanwhile. The veths of an ADD in flight,
        or of one that ran while the links were listed, are kept whatever ``accounted``
        says (a repeated ADD, an ADD rolling back): the next sweep decides.
        """
        prefixes = "|".join(re.escape(p) for p in (veth_prefix, V4_EGRESS_PREFIX))
        pattern = re.compile(f"(?:{prefixes})[0-9a-f]{{{_HASH_DIGITS}}}")
        ours = []
        with self._adds_meanwhile() as adding:
            async for link in await self._host.link("dump"):
                name = link.get("IFLA_IFNAME")
                info = link.get("IFLA_LINKINFO")
                kind = info.get("IFLA_INFO_KIND") if info is not None else None
                if (
                    kind == "veth"
                    and link.get("IFLA_IFALIAS") == HOST_VETH_ALIAS
                    and pattern.fullmatch(name or "")
                ):
                    ours.append(name)
            await self._reaper.reserve(len(ours))
            keep = set(accounted()) | adding
        # A name being deleted already (a DEL replayed from the spool) is not a stray.
        strays = [n for n in ours if n not in keep and self._reaper.pending(n) is None]
        outcomes = await asyncio.gather(*self._reaper.delete_all(strays), return_exceptions=True)
        reaped = []
        for name, outcome in zip(strays, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.error("cni: stray veth %s stays: %s", name, outcome)
            elif outcome == 0:  # not ENODEV: gone meanwhile, with its pod's namespace
                log.warning("cni: reaped stray veth %s (no allocation accounts for it)", name)
                reaped.append(name)
        return reaped

    async def release_vanished(
        self,
        veth_prefix: str,
        held: Callable[[], Iterable[tuple[IpamKey, int]]],
        release: Callable[[IpamKey], object],
    ) -> list[IpamKey]:
        """Call ``release(key)`` for each attachment ``held()`` lists (key, interface
        count) none of whose host veths exists: its pod's namespace went without a DEL (a
        runtime that never sent it, or crashed first), and the kernel took the veths
        with it. Returns those keys. An attachment an ADD is plumbing, or plumbed while
        the links were listed, is kept: its veths may not exist yet. ``held`` and
        ``release`` run with no await between them and the check."""
        with self._adds_meanwhile() as adding:
            present = set()
            async for link in await self._host.link("dump"):
                present.add(link.get("IFLA_IFNAME"))
            busy = present | adding
            gone = [
                key
                for key, count in held()
                if busy.isdisjoint(host_ifname(key, i, veth_prefix) for i in range(count))
            ]
        for key in gone:
            release(key)
        return gone

    async def reap_stray_rules(
        self, accounted: Callable[[], Collection[PodAddress]]
    ) -> list[tuple[int, PodAddress]]:
        """Delete the host rules of pod addresses no pod has any more: rules of exactly
        the shapes an ADD makes (priority 512 ``to <addr>/32 lookup main``, 1536 ``from
        <addr>/32 lookup <table>``, /128 for an IPv6 pod, nothing else set) whose address
        ``accounted()`` lacks and that no host route of the main table reaches (no veth,
        ours or another's).
        They are left when a pod's veth went while the daemon was down: the restart drops
        its allocation, and the spooled DEL then finds neither allocation nor veth to
        read the address from. Returns (priority, address) of each rule deleted.

        ADDs may run meanwhile (the periodic sweep): ``accounted`` is read after the
        dumps and the deletions are sent with no await in between, and an ADD allocates
        before it creates its route and rules, so a rule dumped is either accounted for
        or already deleted by whoever released its address."""
        found: list[tuple[int, PodAddress, int]] = []
        routed: set[PodAddress] = set()
        for family in _FAMILIES:
            async for rule in await self._host.rule("dump", family=family):
                shaped = _pod_rule(rule)
                if shaped is not None:
                    found.append(shaped)
            async for route in await self._host.route("dump", family=family, table=MAIN_TABLE):
                if _is_host_route(route) and route.get("RTA_DST") is not None:
                    routed.add(ip_address(route.get("RTA_DST")))
        keep = set(accounted())
        strays = [(p, a, t) for p, a, t in found if a not in keep and a not in routed]
        if not strays:
            return []
        messages = [
            rtnl.rule("dst" if p == RULE_TO_POD else "src", a, p, t, delete=True)
            for p, a, t in strays
        ]
        try:
            codes = self._rtnl.batch(messages)
        except RtnlError as err:
            log.error("cni: stray host rules stay: %s", err)
            return []
        reaped = [(p, a) for (p, a, _), code in zip(strays, codes, strict=True) if code == 0]
        for priority, address in reaped:
            log.warning("cni: reaped stray host rule %s of %s (no pod has it)", priority, address)
        return reaped

    async def _teardown_one(self, name: str, address: str) -> bool:
        """The host routing of one interface; whether its veth ``name`` exists."""
        addr = ip_address(address)
        link = self._rtnl.link_index(name)
        if link is None and await self._routed_elsewhere(address):
            log.info("cni: %s now routes to another veth; its rules stay", address)
            return False
        messages = _rule_deletes(addr)
        if link is not None:
            what = f"delete route {address}/{addr.max_prefixlen} dev {name}"
            messages.insert(0, rtnl.route(link, addr, table=MAIN_TABLE, delete=True, what=what))
        self._rtnl.batch(messages)
        return link is not None

    async def _teardown_pod_rules(
        self, netns: str, addresses: Sequence[PodAddress], netns_fd: int | None
    ) -> list[str]:
        """The pod-side rules of interfaces > 0 (they outlive the veth if the namespace
        does)."""
        try:
            with self._pod(netns, netns_fd) as pod:
                pod.batch(
                    [rtnl.rule("src", a, RULE_POD_TABLE, None, delete=True) for a in addresses]
                )
        except CniError as err:
            if err.code == ErrorCode.UNKNOWN_CONTAINER:
                return []  # the namespace is gone, and its rules with it
            return [f"pod rules in {netns}: {err.msg}"]
        except RtnlError as err:
            return [f"pod rules in {netns}: {err}"]
        return []

    async def _routed_addresses(
        self, key: IpamKey, indexes: Sequence[int], veth_prefix: str, present: set[str]
    ) -> dict[int, PodAddress]:
        """The addresses the host routes to the veths of ``indexes`` (``<addr>/32 dev
        <veth>`` in main), for a DEL that has neither the allocation nor prevResult: while
        that route exists no other pod can have the address plumbed, so its rules are
        this attachment's. The names of those veths that exist go into ``present``."""
        links = {}
        for index in indexes:
            name = host_ifname(key, index, veth_prefix)
            link = self._rtnl.link_index(name)
            if link is not None:
                links[link] = index
                present.add(name)
        if not links:
            return {}
        found: dict[int, PodAddress] = {}
        for family in _FAMILIES:
            async for route in await self._host.route("dump", family=family, table=MAIN_TABLE):
                oif, dst = route.get("RTA_OIF"), route.get("RTA_DST")
                if oif in links and dst is not None and _is_host_route(route):
                    found[links[oif]] = ip_address(dst)
        return found

    async def _routed_elsewhere(self, address: str) -> bool:
        family = _family(ip_address(address).version)
        async for route in await self._host.route("dump", family=family, table=MAIN_TABLE):
            if route.get("RTA_DST") == address and _is_host_route(route):
                return True
        return False

    # -- helpers ------------------------------------------------------------------------------

    async def _delete_link_now(self, name: str) -> None:
        await self._reaper.delete(name)

    async def _link_or_none(self, ipr: Any, name: str) -> Any:
        try:
            (link,) = await ipr.link("get", ifname=name)
        except NetlinkError as err:
            _ignore(err, errno.ENODEV)
            return None
        return link

    async def _rules(self, ipr: Any) -> set[tuple[int, str, str, int]]:
        found = set()
        for family in _FAMILIES:
            async for rule in await ipr.rule("dump", family=family):
                table = rule.get("FRA_TABLE") or rule["table"]
                full = 32 if family == _AF_INET else 128
                for side in ("src", "dst"):
                    value = rule.get(f"FRA_{side.upper()}")
                    if value is not None and rule[f"{side}_len"] == full:
                        found.add((rule.get("FRA_PRIORITY", 0), side, value, table))
        return found


# Attributes the kernel reports on every rule, whoever made it.
_ALWAYS_DUMPED = {"FRA_PROTOCOL", "FRA_SUPPRESS_PREFIXLEN"}
_FR_ACT_TO_TBL = 1
_NO_SUPPRESS = 0xFFFFFFFF


def _pod_rule(rule: Any) -> tuple[int, PodAddress, int] | None:
    """(priority, address, table) of a host rule of exactly an ADD's shape, else None."""
    priority = rule.get("FRA_PRIORITY")
    full = 32 if rule["family"] == _AF_INET else 128
    if priority == RULE_TO_POD:
        side, lengths = "FRA_DST", (full, 0)
    elif priority == RULE_FROM_POD:
        side, lengths = "FRA_SRC", (0, full)
    else:
        return None
    table = rule.get("FRA_TABLE") or rule["table"]
    names = {name for name, _ in rule["attrs"]}
    if (
        (rule["dst_len"], rule["src_len"]) != lengths
        or rule["action"] != _FR_ACT_TO_TBL
        or rule["tos"]
        or rule["flags"]
        or names - _ALWAYS_DUMPED != {"FRA_PRIORITY", "FRA_TABLE", side}
        or rule.get("FRA_SUPPRESS_PREFIXLEN", _NO_SUPPRESS) not in (_NO_SUPPRESS, -1)
        or (priority == RULE_TO_POD and table != MAIN_TABLE)
    ):
        return None
    return priority, ip_address(rule.get(side)), table


def _family(version: int) -> int:
    return _AF_INET if version == 4 else socket.AF_INET6


def _is_host_route(route: Any) -> bool:
    """A route to one address: /32 or /128."""
    return bool(route["dst_len"] == (32 if route["family"] == _AF_INET else 128))


def _rule_deletes(address: PodAddress) -> list[rtnl.Message]:
    """Both host rules of ``address``, twice each: an older agent may have left a
    duplicate, and the second delete answers ENOENT when there was none."""
    to_pod = rtnl.rule("dst", address, RULE_TO_POD, None, delete=True)
    from_pod = rtnl.rule("src", address, RULE_FROM_POD, None, delete=True)
    return [to_pod, to_pod, from_pod, from_pod]


async def _wait_quietly(future: Any) -> None:
    """Wait for a reaper deletion, whatever its outcome (the ADD retries the name)."""
    with contextlib.suppress(OSError):
        await future
