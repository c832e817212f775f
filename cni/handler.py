"""The CNI commands, hosted by ultranet-ipamd: ``CniHandler.handle(env, stdin)``.

The shim hands over ``CNI_*`` and stdin unchanged; this module answers them as the
plugin itself would (CNI spec 1.1.0 §"Plugin operations"), using the daemon's
:class:`~cni.backend.IpamBackend` for addresses and :class:`~cni.plumbing.Plumbing`
for netlink:

* ADD: check the namespace and the interface names, allocate, plumb; a failure before
  the allocation takes nothing, one after it undoes the plumbing and releases the
  allocation without cooldown (unless it predates this ADD: a repeated ADD must not free
  a live pod's address).
  With ``prevResult`` (we are chained after another plugin) the output extends it.
* DEL: tear down from the allocation, else from ``prevResult``; a missing netns, a
  missing prevResult, a missing allocation are all success. Without the allocation the
  veths are found by name (``HandlerConfig.max_interfaces`` indexes), so a repeated DEL
  of a multi-NIC pod misses none. If the backend is unavailable the plumbing still goes
  and the release is spooled (``cni.transport``).
* CHECK: the prevResult's addresses are ours, and everything ADD made is in place.
* STATUS: 50 if ADD cannot succeed (backend not ready, or no address on card 0), 51 if
  existing pods may have lost connectivity.
* GC: release this network's allocations not in ``cni.dev/valid-attachments`` and their
  host plumbing; without the key there is nothing to compare against and nothing goes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_interface
from pathlib import Path
from typing import Protocol

from cni import shim
from cni.backend import (
    Allocation,
    BackendError,
    BackendUnavailable,
    IpamBackend,
    NoFreeAddress,
    PodAddress,
)
from cni.egress_v4 import POD_IFNAME as V4_EGRESS_IFNAME
from cni.errors import CheckFailed, CniError, ErrorCode
from cni.keys import InvalidKey, IpamKey, PodRef
from cni.plumbing import PlumbedInterface, PodHandle, PodNetwork, pod_ifname
from cni.result import IpConfig, PodInterface, Result, Route, chain, render_result
from cni.spec import (
    CniEnv,
    Command,
    NetConf,
    declared_version,
    error_json,
    parse_conf,
    parse_env,
    render,
    version_json,
)

__all__ = ["CniHandler", "HandlerConfig", "PlumbingPort"]

log = logging.getLogger("ultranet.cni")
_DEFAULT_ROUTES: dict[int, IPv4Network | IPv6Network] = {
    4: IPv4Network("0.0.0.0/0"),
    6: IPv6Network("::/0"),
}


class PlumbingPort(Protocol):
    async def enter(
        self,
        netns: str,
        key: IpamKey,
        *,
        interfaces: int,
        veth_prefix: str,
        netns_fd: int | None = None,
    ) -> PodHandle:
        """The pod's namespace, checked for an ADD of ``key`` with that many interfaces
        before it takes an address (CniError 3, 4, 11 or 102 otherwise); the caller
        closes it."""
        ...

    async def setup(self, net: PodNetwork, pod: PodHandle) -> list[PlumbedInterface]: ...

    async def check(self, net: PodNetwork) -> None: ...

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
    ) -> list[str]: ...

    async def setup_v4_egress(
        self, net: PodNetwork, address: IPv4Address, node_range: IPv4Network, pod: PodHandle
    ) -> str: ...

    async def check_v4_egress(self, net: PodNetwork, address: IPv4Address) -> None: ...


@dataclass(frozen=True, slots=True)
class HandlerConfig:
    enable_multi_nic: bool = False  # the node's ENABLE_MULTI_NIC
    spool_dir: Path | None = None  # where DELs wait for the backend (the shim's SPOOL_DIR)
    # The most interfaces one attachment can have here (the node's managed cards): a DEL
    # that has no allocation to go by looks for that many veths by name.
    max_interfaces: int = 1
    # An IPv6 node's ENABLE_V4_EGRESS range: a pod whose allocation holds a node-local
    # IPv4 also gets v4if0 (cni.egress_v4), and every DEL removes that veth. None: off.
    v4_egress_range: IPv4Network | None = None


class CniHandler:
    def __init__(
        self, backend: IpamBackend, plumbing: PlumbingPort, config: HandlerConfig | None = None
    ) -> None:
        self.backend = backend
        self.plumbing = plumbing
        self.config = config or HandlerConfig()

    async def handle(self, env: Mapping[str, str], stdin: bytes) -> tuple[int, bytes]:
        """(exit code, stdout) for one CNI invocation."""
        version = ""
        try:
            cni = parse_env(env)
            if cni.command is Command.VERSION:
                return 0, version_json(stdin)
            conf = parse_conf(stdin, cni.command)
            version = conf.cni_version
            return 0, await self._dispatch(cni, conf, stdin)
        except CniError as err:
            log.info("cni: %s failed: %s", env.get("CNI_COMMAND"), err)
            return 1, error_json(err, version or declared_version(stdin))

    async def _dispatch(self, cni: CniEnv, conf: NetConf, stdin: bytes) -> bytes:
        if cni.command is Command.ADD:
            return await self._add(cni, conf)
        if cni.command is Command.DEL:
            await self._del(cni, conf, stdin)
        elif cni.command is Command.CHECK:
            await self._check(cni, conf)
        elif cni.command is Command.STATUS:
            await self._status()
        elif cni.command is Command.GC:
            await self._gc(conf)
        return b""

    # -- ADD ------------------------------------------------------------------------------

    async def _add(self, cni: CniEnv, conf: NetConf) -> bytes:
        key = _key(conf.name, cni)
        pod = _pod(cni)
        await self._replay_spooled(cni)
        multi_nic = self.config.enable_multi_nic and conf.wants_multi_nic()
        existing = self._lookup(key)
        # Everything that can be checked before an address is taken: a failed ADD leaves
        # the pool as it was. The multi-NIC count is the node's card count, as allocated.
        sandbox = await self.plumbing.enter(
            cni.netns,
            key,
            interfaces=self.config.max_interfaces if multi_nic else 1,
            veth_prefix=conf.veth_prefix,
            netns_fd=_netns_fd(cni),
        )
        try:
            # The journal syncs the allocation while the netlink work runs; the answer
            # waits for both.
            allocation, durable = self._allocate(key, pod, multi_nic)
            net = PodNetwork(
                key, cni.netns, allocation.leases, conf.mtu, conf.veth_prefix, _netns_fd(cni)
            )
            try:
                plumbed = await self.plumbing.setup(net, sandbox)
                if allocation.egress_v4 is not None:
                    await self._setup_v4_egress(net, allocation.egress_v4, sandbox)
            except BaseException:
                await _settled(durable)  # then the release follows the allocation
                if existing is None:
                    await self._release_after_failure(key)
                raise
            await self._durable(net, durable)
        finally:
            sandbox.close()
        egress = allocation.egress_v4 is not None
        ours = render_result(_result(plumbed, cni.netns, conf.mtu, egress), conf.cni_version)
        if conf.prev_raw is not None:
            ours = chain(conf.prev_raw, ours, conf.cni_version)
        return render(ours)

    def _allocate(
        self, key: IpamKey, pod: PodRef, multi_nic: bool
    ) -> tuple[Allocation, Awaitable[None]]:
        try:
            return self.backend.allocate_staged(key, pod, multi_nic=multi_nic)
        except NoFreeAddress as err:
            raise CniError(ErrorCode.TRY_AGAIN_LATER, "no free pod address", str(err)) from err
        except BackendUnavailable as err:
            raise CniError(ErrorCode.TRY_AGAIN_LATER, "IPAM not ready", str(err)) from err
        except BackendError as err:
            raise CniError(
                ErrorCode.IPAM_FAILED, f"allocation for {key} refused", str(err)
            ) from err

    async def _setup_v4_egress(self, net: PodNetwork, address: IPv4Address, pod: PodHandle) -> None:
        """The pod's IPv4 egress veth, after its own interfaces; if it fails, those go too
        (the caller then releases the allocation)."""
        node_range = self.config.v4_egress_range
        try:
            if node_range is None:
                raise CniError(
                    ErrorCode.PLUMBING_FAILED,
                    f"the allocation of {net.key} holds a node-local IPv4 ({address}) but "
                    "this node has no IPv4 egress range",
                )
            await self.plumbing.setup_v4_egress(net, address, node_range, pod)
        except BaseException:
            left = await self.plumbing.teardown(
                net.key,
                {i: lease.address for i, lease in enumerate(net.leases)},
                veth_prefix=net.veth_prefix,
                netns=net.netns,
                interfaces=len(net.leases),
                netns_fd=net.netns_fd,
            )
            if left:
                log.error("cni: undoing the ADD of %s left: %s", net.key, "; ".join(left))
            raise

    async def _durable(self, net: PodNetwork, durable: Awaitable[None]) -> None:
        """Wait for the allocation to be durable; if it never will be (the journal
        refused it, so it is not held), take the plumbing back and fail the ADD."""
        try:
            await durable
        except BackendError as err:
            addresses = {i: lease.address for i, lease in enumerate(net.leases)}
            left = await self.plumbing.teardown(
                net.key,
                addresses,
                veth_prefix=net.veth_prefix,
                netns=net.netns,
                interfaces=len(net.leases),
                netns_fd=net.netns_fd,
                v4_egress=self.config.v4_egress_range is not None,
            )
            if left:
                log.error("cni: undoing the ADD of %s left: %s", net.key, "; ".join(left))
            raise CniError(
                ErrorCode.IPAM_FAILED, f"allocation for {net.key} refused", str(err)
            ) from err

    async def _release_after_failure(self, key: IpamKey) -> None:
        # No cooldown: the address was never reported to the runtime, so no Service
        # endpoint, no kube-proxy rule, nothing can still route to it.
        try:
            await self.backend.release(key, cooldown=False)
        except (BackendUnavailable, BackendError) as err:
            # The runtime DELs after a failed ADD (spec §"Lifecycle"), which retries this.
            log.error("cni: ADD of %s failed and its release failed too: %s", key, err)

    # -- DEL ------------------------------------------------------------------------------

    async def _del(self, cni: CniEnv, conf: NetConf, stdin: bytes) -> None:
        key = _key(conf.name, cni)
        addresses, recorded = self._held(key, conf)
        # The shim could not open CNI_NETNS (-1): it is gone for this DEL, never its path.
        netns, netns_fd = ("", None) if cni.netns_fd == -1 else (cni.netns, cni.netns_fd)
        errors = await self.plumbing.teardown(
            key,
            addresses,
            veth_prefix=conf.veth_prefix,
            netns=netns,
            interfaces=len(addresses) if recorded else self.config.max_interfaces,
            netns_fd=netns_fd,
            # An IPv6 pod's v4e* veth goes in the same reaper batch as its eni* veth.
            v4_egress=self.config.v4_egress_range is not None,
        )
        try:
            await self.backend.release(key)
        except BackendUnavailable as err:
            self._spool(cni, stdin, err)
        except BackendError as err:
            errors.append(f"release of {key}: {err}")
        if errors:
            raise CniError(ErrorCode.PLUMBING_FAILED, f"DEL of {key} incomplete", "; ".join(errors))

    def _held(self, key: IpamKey, conf: NetConf) -> tuple[dict[int, PodAddress], bool]:
        """Interface index -> address, from the backend, else from prevResult; and
        whether it came from the backend (then it lists every interface)."""
        try:
            allocation = self.backend.lookup(key)
        except BackendUnavailable:
            allocation = None
        if allocation is not None:
            return {i: lease.address for i, lease in enumerate(allocation.leases)}, True
        return _from_prev_result(key, conf.prev_result), False

    def _spool(self, cni: CniEnv, stdin: bytes, why: BackendUnavailable) -> None:
        if self.config.spool_dir is None:
            raise CniError(ErrorCode.TRY_AGAIN_LATER, "IPAM not ready to release", str(why))
        env = {
            b"CNI_COMMAND": b"DEL",
            b"CNI_CONTAINERID": cni.container_id.encode(),
            b"CNI_IFNAME": cni.ifname.encode(),
            b"CNI_NETNS": cni.netns.encode(),
        }
        shim.spool(str(self.config.spool_dir).encode(), env, stdin)
        log.warning("cni: release of %s spooled: %s", cni.container_id, why)

    async def _replay_spooled(self, cni: CniEnv) -> None:
        """A DEL spooled for this attachment predates this ADD: run it first."""
        if self.config.spool_dir is None:
            return
        env = {b"CNI_CONTAINERID": cni.container_id.encode(), b"CNI_IFNAME": cni.ifname.encode()}
        path = self.config.spool_dir / shim.spool_name(env).decode()
        if not path.exists():
            return
        raw_env, stdin = shim.decode_request(shim.decode_frame(path.read_bytes(), shim.REQUEST))
        text_env = {k.decode(): v.decode() for k, v in raw_env.items()}
        code, out = await self.handle(text_env, stdin)
        if code != 0:
            raise CniError(ErrorCode.TRY_AGAIN_LATER, "an earlier DEL is pending", out.decode())
        path.unlink(missing_ok=True)

    # -- CHECK ----------------------------------------------------------------------------

    async def _check(self, cni: CniEnv, conf: NetConf) -> None:
        key = _key(conf.name, cni)
        if conf.prev_result is None:
            raise CniError(ErrorCode.INVALID_CONFIG, "prevResult: required for CHECK")
        allocation = self._lookup(key)
        if allocation is None:
            raise CniError(ErrorCode.UNKNOWN_CONTAINER, f"no allocation for {key}")
        listed = {ip.address.ip for ip in conf.prev_result.ips}
        for lease in allocation.leases:
            if lease.address not in listed:
                raise CheckFailed(f"prevResult lacks {lease.address}, allocated to {key}")
        net = PodNetwork(
            key, cni.netns, allocation.leases, conf.mtu, conf.veth_prefix, _netns_fd(cni)
        )
        await self.plumbing.check(net)
        if allocation.egress_v4 is not None:
            await self.plumbing.check_v4_egress(net, allocation.egress_v4)

    def _lookup(self, key: IpamKey) -> Allocation | None:
        try:
            return self.backend.lookup(key)
        except BackendUnavailable as err:
            raise CniError(ErrorCode.TRY_AGAIN_LATER, "IPAM not ready", str(err)) from err

    # -- STATUS and GC --------------------------------------------------------------------

    async def _status(self) -> None:
        try:
            status = await self.backend.status()
        except BackendUnavailable as err:
            raise CniError(ErrorCode.NOT_AVAILABLE, "IPAM not ready", str(err)) from err
        if status.connectivity_limited:
            raise CniError(
                ErrorCode.LIMITED_CONNECTIVITY, "pod connectivity limited", status.reason
            )
        if not status.ready:
            raise CniError(ErrorCode.NOT_AVAILABLE, "IPAM not ready", status.reason)
        if status.free_addresses.get(0, 1) == 0:
            free = ", ".join(f"card {c}: {n}" for c, n in sorted(status.free_addresses.items()))
            raise CniError(ErrorCode.NOT_AVAILABLE, "no free pod address on card 0", free)

    async def _gc(self, conf: NetConf) -> None:
        if conf.valid_attachments is None:
            log.info("cni: GC of %s without cni.dev/valid-attachments: nothing to do", conf.name)
            return
        valid = []
        for i, item in enumerate(conf.valid_attachments):
            try:
                valid.append(IpamKey(conf.name, item.container_id, item.ifname))
            except InvalidKey as err:
                raise CniError(
                    ErrorCode.INVALID_CONFIG, f"cni.dev/valid-attachments[{i}]: {err}"
                ) from err
        if not valid:
            # IpamBackend.gc scopes by the keys' network; an empty list names none.
            log.warning("cni: GC of %s with no valid attachment: not scoped, skipped", conf.name)
            return
        try:
            released = await self.backend.gc(valid)
        except (BackendUnavailable, BackendError) as err:
            raise CniError(ErrorCode.TRY_AGAIN_LATER, "IPAM could not GC", str(err)) from err
        errors = []
        for allocation in released:
            addresses = {i: lease.address for i, lease in enumerate(allocation.leases)}
            errors += await self.plumbing.teardown(
                allocation.key,
                addresses,
                veth_prefix=conf.veth_prefix,
                netns="",
                v4_egress=allocation.egress_v4 is not None,
            )
        if errors:
            raise CniError(ErrorCode.GC_INCOMPLETE, "GC left stale plumbing", "; ".join(errors))


# -- pure helpers -------------------------------------------------------------------------------


async def _settled(durable: Awaitable[None]) -> None:
    """Wait for ``durable`` whatever its outcome (the ADD is failing anyway)."""
    try:
        await durable
    except BackendError as err:
        log.info("cni: the failed ADD's allocation was not made durable either: %s", err)


def _key(network: str, cni: CniEnv) -> IpamKey:
    try:
        return IpamKey(network, cni.container_id, cni.ifname)
    except InvalidKey as err:
        if err.field == "network":
            raise CniError(ErrorCode.INVALID_CONFIG, f"name={network!r}: {err}") from err
        var = "CNI_CONTAINERID" if err.field == "container_id" else "CNI_IFNAME"
        raise CniError(ErrorCode.INVALID_ENV, f"{var}={err.value!r}: invalid", str(err)) from err


def _netns_fd(cni: CniEnv) -> int | None:
    """The descriptor to use for CNI_NETNS (None: its path). A shim that could not open
    the path answers ADD and CHECK itself; a request that says so anyway is refused."""
    if cni.netns_fd == -1:
        raise CniError(
            ErrorCode.INVALID_ENV, f"CNI_NETNS={cni.netns!r}: the shim could not open it"
        )
    return cni.netns_fd


def _pod(cni: CniEnv) -> PodRef:
    args = cni.pod
    missing = [
        k for k, v in (("K8S_POD_NAMESPACE", args.namespace), ("K8S_POD_NAME", args.name)) if not v
    ]
    if missing:
        raise CniError(ErrorCode.INVALID_ENV, f"CNI_ARGS lacks {', '.join(missing)}")
    return PodRef(args.namespace, args.name)


def _result(plumbed: list[PlumbedInterface], netns: str, mtu: int, egress: bool = False) -> Result:
    interfaces: list[PodInterface] = []
    ips, routes = [], []
    for iface in plumbed:
        interfaces.append(PodInterface(iface.host_ifname, iface.host_mac, "", mtu))
        interfaces.append(PodInterface(iface.pod_ifname, iface.pod_mac, netns, mtu))
        address = ip_interface(f"{iface.address}/{iface.address.max_prefixlen}")
        ips.append(IpConfig(address, iface.gateway, len(interfaces) - 1))
        table = None if iface.index == 0 else iface.index
        routes.append(Route(_DEFAULT_ROUTES[address.version], iface.gateway, table))
    if egress:
        # Listed without its node-local address, as the VPC CNI's egress-cni leaves its
        # IPv4 out of the result: the pod's address is its /128.
        interfaces.append(PodInterface(V4_EGRESS_IFNAME, "", netns, mtu))
    return Result(tuple(interfaces), tuple(ips), tuple(routes))


def _from_prev_result(key: IpamKey, prev: Result | None) -> dict[int, PodAddress]:
    """Our interfaces' addresses in a prevResult, by pod interface name (the host names
    are derived from the key, so only the pod side is needed)."""
    if prev is None:
        return {}
    names = {pod_ifname(key, 0): 0}
    names.update({pod_ifname(key, i): i for i in range(1, len(prev.interfaces) + 1)})
    found: dict[int, PodAddress] = {}
    for ip in prev.ips:
        if ip.interface is None or not 0 <= ip.interface < len(prev.interfaces):
            continue
        iface = prev.interfaces[ip.interface]
        if iface.sandbox and iface.name in names:
            found[names[iface.name]] = ip.address.ip
    return found
