"""The node agent: discovers the instance, owns the address pool, keeps it warm.

Start-up reads the instance from IMDS alone (identity, every interface's card, device,
subnet, addresses and prefixes), builds one pool per managed network card, restores the
journal, and is ready as soon as every card meets its warm target. EC2 is called, and
boto3 imported, only when it must be: to grow or shrink a pool, or when IMDS and the
journal disagree (IMDS lags EC2; EC2 wins, as in the VPC CNI's reconcile in
``aws/amazon-vpc-cni-k8s`` ``pkg/ipamd/ipamd.go``, and its issues #3019, #1967).

Allocation is an in-memory operation plus one journal line; the reply waits for the
group commit that makes it durable (``ipam.datastore``). Growing and shrinking run in a
background task, with EC2 calls on worker threads so the event loop keeps allocating.

Everything EC2 or IMDS might say wrongly is handled in one place:

* ``InsufficientCidrBlocks`` (fragmented subnet) or a subnet too full for a prefix: the
  subnet sits out 120 s (the VPC CNI's ``insufficientCidrErrorCooldown``), the metric
  and a log line name it, and the next eligible subnet of the AZ (tag
  ``kubernetes.io/role/cni``, as the VPC CNI discovers them) gets a new ENI;
* a prefix released here is not adopted again from a stale IMDS for 60 s (the VPC CNI's
  ``ipReconcileCooldown``); the list survives restarts in the state directory;
* an allocation in the journal whose prefix IMDS does not show is checked against EC2
  before it is dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cni.backend import Allocation
from cni.keys import IpamKey, PodRef
from cni.pausepoint import pause_point
from ipam import warm
from ipam.config import IpamdConfig
from ipam.datastore import Batch, Datastore, DatastoreWriteError, Journal
from ipam.datastore_errors import PoolExhausted
from ipam.ec2 import Ec2Error
from ipam.errors import SubnetSpaceError, UltranetError
from ipam.imds import ImdsClient, ImdsInterface
from ipam.instance_types import InstanceType, lookup
from ipam.metrics import IpamdMetrics
from ipam.pool import AddressPool, CardPool, EniInfo

if TYPE_CHECKING:
    from ipam.ec2 import Ec2Client, EniState
    from ipam.egress import Egress
    from ipam.hostnet import EniLink, HostNetworkPort

log = logging.getLogger("ultranet.ipamd")
T = TypeVar("T")

SUBNET_COOLDOWN_S = 120.0  # after InsufficientCidrBlocks, as the VPC CNI waits
FREED_PREFIX_COOLDOWN_S = 60.0  # a released prefix is not re-adopted from IMDS sooner
MANAGE_INTERVAL_S = 5.0  # the pool is also re-planned at least this often
# After an allocation or release wakes the manager, it waits this long before re-planning,
# so a burst is judged once, not once per loop pass (re-planning every card that often
# cost 5-10% of the daemon's CPU at saturation). A pool that ran dry skips the wait.
MANAGE_DEBOUNCE_S = 0.02
RECONCILE_INTERVAL_S = 60.0  # IMDS is compared with the pool this often, as the VPC CNI does
ERROR_BACKOFF_S = (1.0, 60.0)  # after a failed grow/shrink step: first and longest wait
# A group commit runs inline on the event loop: a worker thread costs each request a GIL
# hand-off or two (measured: a third of the daemon's CPU per request at saturation). But
# an inline sync stalls every listener, so once one takes longer than SLOW_SYNC_S (a
# congested EBS volume), commits move to a worker thread for THREADED_SYNC_S.
SLOW_SYNC_S = 0.1
THREADED_SYNC_S = 30.0
# An ENI this daemon created that has held no prefix this long is detached and deleted, as
# the VPC CNI frees unused ENIs: it still costs one NAU, one subnet address and one of
# the card's attachment slots. The wait keeps a pod burst's ENI from churning.
IDLE_ENI_S = 60.0
DELETE_AFTER_DETACH = (0.5, 8)  # first wait and tries for DeleteNetworkInterface after detach
LINK_WAIT_S = 30.0  # a hot-plugged ENI's link appears within this on EC2
ENI_DESCRIPTION = "ultranet pod addresses"
INSTANCE_TAG = "node.k8s.amazonaws.com/instance_id"  # the VPC CNI's tag, so its GC knows ours
CREATED_BY_TAG = "ultranet.io/created-by"
FREED_FILE = "freed-prefixes.json"
# Present while an ENI is between CreateNetworkInterface and the pool, or between detach
# and delete: a crash there leaves an ENI EC2 bills and no journal knows, which the next
# start looks for (``_sweep_enis``), as the VPC CNI deletes its leaked ENIs.
ENI_WORK_FILE = "eni-work-in-progress"


class AgentError(UltranetError):
    """The agent cannot do what was asked; the message says why."""


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    instance_id: str
    instance_type: InstanceType
    availability_zone: str
    vpc_id: str
    vpc_cidrs: tuple[IPv4Network, ...]
    primary_subnet_id: str
    security_groups: tuple[str, ...]

    @property
    def region(self) -> str:
        return self.availability_zone[:-1]


@dataclass(slots=True)
class _Eni:
    """What the agent keeps of an ENI beyond the pool's view."""

    info: EniInfo
    subnet_id: str
    mac: str


@dataclass(slots=True)
class CardState:
    card: int
    max_enis: int
    devices_taken: set[int] = field(default_factory=set)  # every interface, efa-only included
    last_plan: warm.Plan | None = None


@dataclass(frozen=True, slots=True)
class AgentStatus:
    ready: bool
    reason: str
    free_addresses: dict[int, int]
    cards: tuple[int, ...]


class NodeAgent:
    """The IPAM side of ``ultranet-ipamd``; also the CNI handler's backend."""

    def __init__(
        self,
        config: IpamdConfig,
        *,
        imds: ImdsClient | None = None,
        ec2_factory: Callable[[NodeIdentity, IpamdMetrics], Ec2Client] | None = None,
        hostnet: Callable[[], HostNetworkPort] | None = None,
        pod_alive: Callable[[Allocation], bool] | None = None,
        egress: Egress | None = None,
        metrics: IpamdMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.metrics = metrics or IpamdMetrics()
        self._imds = imds or ImdsClient(config.imds_endpoint)
        self._imds_reads: set[asyncio.Future[list[ImdsInterface]]] = set()  # on threads
        self._ec2_factory = ec2_factory or _default_ec2_factory(config)
        self._ec2_client: Ec2Client | None = None
        # pyroute2's IPRoute runs an event loop of its own and keeps state per thread, so
        # all netlink work happens on one worker thread that owns the HostNetwork.
        self._hostnet_factory = hostnet
        self._hostnet: HostNetworkPort | None = None
        self._netlink = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="netlink")
        self._pending_hosts: list[tuple[EniInfo, str]] = []
        self._pod_alive = pod_alive
        # SNAT and connection marks (ipam/egress.py), set up for these VPC CIDRs.
        self._egress = egress
        self._egress_vpc: tuple[IPv4Network, ...] | None = None
        self._clock = clock
        self._wall = wall
        self.node: NodeIdentity | None = None
        self.pool: AddressPool | None = None
        self.datastore: Datastore | None = None
        self.cards: dict[int, CardState] = {}
        self._enis: dict[str, _Eni] = {}
        self._subnet_cooling: dict[str, float] = {}  # subnet id -> usable again at
        self._freed: dict[IPv4Network, float] = {}  # prefix -> wall time it was released
        self._wake = asyncio.Event()
        self._urgent = False  # a pool ran dry, or the node just started: no debounce
        self._next_commit: asyncio.Future[None] | None = None  # the batch being filled
        self._committing: asyncio.Future[None] | None = None  # the batch being synced
        self._threaded_sync_until = 0.0  # time.monotonic(): commit on a thread until then
        self._idle_since: dict[str, float] = {}  # ENI id -> when it was first seen empty
        self._kept_enis: set[str] = set()  # empty but not ours to delete (launch template's)
        self._manager: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._busy = asyncio.Lock()  # one grow/shrink at a time
        self._latency = {
            op: self.metrics.allocation_seconds.labels(op) for op in ("allocate", "release")
        }
        self._exhausted = self.metrics.allocation_errors.labels("exhausted")
        self._sync_seconds = {
            mode: self.metrics.journal_sync_seconds.labels(mode) for mode in ("inline", "thread")
        }
        self.started_at = 0.0
        self.ready_at: float | None = None
        self._reconciled_at = 0.0
        self._sweep_pending = False  # an ENI create or delete may have been cut short

    # -- start and stop --------------------------------------------------------------

    async def start(self, *, manage: bool = True) -> None:
        """Discover, restore, and (unless ``manage`` is False, for tests that drive
        ``step`` themselves) keep the pool warm in the background."""
        self.started_at = self._clock()
        self._load_freed()
        self._sweep_pending = self._eni_work_path().exists()
        # Open netlink (and import pyroute2, the slowest import) on the netlink thread
        # while this one waits on IMDS: the two overlap.
        netlink_ready = asyncio.get_running_loop().run_in_executor(self._netlink, self._host)
        identity, interfaces = self._discover()
        await netlink_ready
        self.node = identity
        self._build_pool(identity, interfaces)
        assert self.pool is not None
        await self._setup_pending_hosts()
        await self._apply_egress(identity.vpc_cidrs)
        self.datastore = Datastore(self.pool, Journal(self.config.state_dir / "journal"))
        await self._restore()
        self._update_metrics()
        if self._plan_all_steady():
            self._mark_ready()
        else:
            self._urgent = True  # grow at once: pods are waiting for this node
            self._wake.set()
        if manage:
            self._manager = asyncio.create_task(self._manage(), name="pool-manager")

    async def stop(self) -> None:
        if self._manager is not None:
            self._manager.cancel()
            await asyncio.gather(self._manager, return_exceptions=True)
            self._manager = None
        # A read cancelled with the manager still runs on its thread and would reopen the
        # IMDS connection after close(): let it finish first.
        await asyncio.gather(*self._imds_reads, return_exceptions=True)
        if self._committing is not None:
            await asyncio.gather(self._committing, return_exceptions=True)
        if self.datastore is not None:
            self.datastore.close()
        self._imds.close()
        if self._hostnet is not None:
            await self._on_netlink(self._hostnet.close)
        self._netlink.shutdown(wait=True)

    async def wait_ready(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        except TimeoutError:
            return False
        return True

    @property
    def ec2_used(self) -> bool:
        return self._ec2_client is not None

    # -- discovery -------------------------------------------------------------------

    def _discover(self) -> tuple[NodeIdentity, list[ImdsInterface]]:
        identity = self._imds.identity()
        interfaces = self._imds.interfaces(primary_mac=identity.primary_mac)
        primary = next((i for i in interfaces if i.mac == identity.primary_mac), None)
        if primary is None:
            raise AgentError(f"IMDS lists no interface with the primary MAC {identity.primary_mac}")
        itype = lookup(identity.instance_type)
        if not itype.nitro:
            log.warning(
                "%s is not a Nitro instance: EC2 refuses prefix delegation on it", itype.name
            )
        node = NodeIdentity(
            instance_id=identity.instance_id,
            instance_type=itype,
            availability_zone=identity.availability_zone,
            vpc_id=primary.vpc_id,
            vpc_cidrs=primary.vpc_cidrs,
            primary_subnet_id=primary.subnet_id,
            security_groups=primary.security_group_ids,
        )
        log.info(
            "node %s (%s) in %s: %d interfaces on %d network cards, from %d IMDS requests",
            node.instance_id,
            itype.name,
            node.availability_zone,
            len(interfaces),
            len({i.network_card for i in interfaces}),
            self._imds.requests,
        )
        return node, interfaces

    def _managed_cards(self, itype: InstanceType, interfaces: Iterable[ImdsInterface]) -> list[int]:
        if not self.config.enable_multi_nic:
            return [0]
        with_ips = {i.network_card for i in interfaces if not i.maybe_efa_only}
        return sorted({0} | ({c.index for c in itype.network_cards} & with_ips))

    def _build_pool(self, node: NodeIdentity, interfaces: list[ImdsInterface]) -> None:
        itype = node.instance_type
        managed = self._managed_cards(itype, interfaces)
        self.pool = AddressPool(managed, cooldown_s=float(self.config.ip_cooldown_period))
        now = self._wall()
        for card in managed:
            limit = itype.card(card).max_interfaces
            if card == 0 and self.config.max_eni is not None:
                limit = min(limit, self.config.max_eni)
            self.cards[card] = CardState(card, limit)
        for interface in interfaces:
            state = self.cards.get(interface.network_card)
            if state is None:
                continue
            state.devices_taken.add(interface.device_number)
            if interface.maybe_efa_only or interface.subnet_cidr is None:
                continue  # efa-only: no IP, never used for pods
            assert interface.primary_ip is not None
            self._adopt(interface, skip_freed_after=now - FREED_PREFIX_COOLDOWN_S)

    def _adopt(self, interface: ImdsInterface, *, skip_freed_after: float) -> None:
        assert self.pool is not None and self.node is not None and interface.subnet_cidr
        assert interface.primary_ip is not None
        info = EniInfo(
            eni_id=interface.interface_id,
            card=interface.network_card,
            device=interface.device_number,
            subnet=interface.subnet_cidr,
            primary_ip=interface.primary_ip,
            max_prefixes=self.node.instance_type.max_prefixes_per_eni,
        )
        card = self.pool.card(info.card)
        if info.eni_id not in {e.eni_id for e in card.enis}:
            card.add_eni(info)
            self._enis[info.eni_id] = _Eni(info, interface.subnet_id, interface.mac)
            self._pending_hosts.append((info, interface.mac))
        held = set(card.prefixes_of(info.eni_id))
        for prefix in interface.ipv4_prefixes:
            freed_at = self._freed.get(prefix)
            if freed_at is not None and freed_at > skip_freed_after:
                log.info(
                    "ignoring %s on %s: released here %.0f s ago, IMDS may be stale",
                    prefix,
                    info.eni_id,
                    self._wall() - freed_at,
                )
                continue
            if prefix not in held:
                card.add_prefix(info.eni_id, prefix)

    async def _on_netlink(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._netlink, functools.partial(fn, *args))

    def _host(self) -> HostNetworkPort | None:
        """The host network port, created on the netlink thread that will use it."""
        if self._hostnet is None and self._hostnet_factory is not None:
            self._hostnet = self._hostnet_factory()
        return self._hostnet

    @staticmethod
    def _link(info: EniInfo, mac: str) -> EniLink:
        from ipam.hostnet import EniLink  # on the netlink thread: hostnet imports pyroute2

        return EniLink(info.eni_id, mac, info.card, info.device, info.primary_ip, info.subnet)

    def _setup_host_blocking(self, info: EniInfo, mac: str) -> None:
        host = self._host()
        if host is None or (info.card, info.device) == (0, 0):
            return  # the OS configured the primary ENI
        host.setup_eni(self._link(info, mac))

    async def _setup_host(self, info: EniInfo, mac: str) -> None:
        await self._on_netlink(self._setup_host_blocking, info, mac)

    def _setup_hosts_blocking(self, pending: list[tuple[EniInfo, str]]) -> None:
        host = self._host()
        if host is None:
            return
        host.setup_enis(
            [
                self._link(info, mac)
                for info, mac in pending
                if (info.card, info.device) != (0, 0)  # the OS configured the primary ENI
            ]
        )

    async def _setup_pending_hosts(self) -> None:
        pending, self._pending_hosts = self._pending_hosts, []
        await self._on_netlink(self._setup_hosts_blocking, pending)

    # -- egress ----------------------------------------------------------------------

    async def _apply_egress(self, vpc_cidrs: tuple[IPv4Network, ...]) -> None:
        """The VPC CNI's SNAT and connection marks for these VPC CIDRs (at start, and when
        IMDS shows the VPC's blocks changed); idempotent, and a no-op without ``egress``."""
        if self._egress is None:
            return
        if not vpc_cidrs:
            raise AgentError("IMDS lists no vpc-ipv4-cidr-blocks: SNAT would take VPC traffic")
        from ipam.egress import NodeFacts

        primary = next(
            (e for e in self._enis.values() if (e.info.card, e.info.device) == (0, 0)), None
        )
        if primary is None:
            raise AgentError("egress: the primary ENI (card 0, device 0) is not in the pool")
        host = await self._on_netlink(self._host)
        ifname = None if host is None else await self._on_netlink(host.find_link, primary.mac)
        if ifname is None:
            raise AgentError(f"egress: no link has the primary ENI's MAC {primary.mac}")
        facts = NodeFacts(ifname, primary.info.primary_ip, vpc_cidrs)
        changed = await asyncio.to_thread(self._egress.apply, facts)
        if changed:
            log.info("egress for VPC %s: %d change(s)", ",".join(map(str, vpc_cidrs)), len(changed))
        self._egress_vpc = vpc_cidrs

    async def _follow_vpc_cidrs(self, interfaces: Iterable[ImdsInterface]) -> None:
        """Re-apply egress when the VPC's CIDR blocks IMDS shows differ (a block was
        associated or removed), as the VPC CNI's ``updateCIDRsRulesOnChange`` does."""
        if self._egress is None:
            return
        primary = next((i for i in interfaces if (i.network_card, i.device_number) == (0, 0)), None)
        if primary is None or set(primary.vpc_cidrs) == set(self._egress_vpc or ()):
            return
        if not primary.vpc_cidrs:
            log.error("IMDS lists no vpc-ipv4-cidr-blocks now; egress rules kept as they are")
            return
        await self._apply_egress(primary.vpc_cidrs)

    # -- restore ---------------------------------------------------------------------

    async def _restore(self) -> None:
        assert self.datastore is not None and self.pool is not None
        records, _ = self.datastore.journal.load()
        unknown = [
            r
            for r in records
            for a in r.addresses
            if a.card in self.pool.cards and not self.pool.holds(a.card, a.address)
        ]
        if unknown:
            # IMDS does not show a prefix the journal uses: IMDS may lag, so ask EC2.
            log.warning(
                "%d journal allocation(s) are on prefixes IMDS does not list; asking EC2",
                len(unknown),
            )
            await self._reconcile_with_ec2()
        report = self.datastore.restore()
        lost = list(report.dropped)
        if lost:
            self.metrics.force_removed.inc(len(lost))
        if self._pod_alive is not None:
            gone = [
                a for a in self.pool.allocations() if a.origin == "cni" and not self._pod_alive(a)
            ]
            for allocation in gone:
                log.info("dropping %s: its pod's namespace and host veth are gone", allocation.key)
                self.datastore.release(allocation.key, self._clock())
            if gone:
                self.datastore.commit(self._clock())
                self.metrics.stray_allocations_released.inc(len(gone))
        log.info(
            "restored %d allocation(s), dropped %d whose prefix is gone",
            report.restored,
            len(lost),
        )

    async def _reconcile_with_ec2(self) -> None:
        """Adopt what EC2 says our ENIs hold (EC2 wins over a lagging IMDS)."""
        assert self.node is not None and self.pool is not None
        ec2 = await self._ec2()
        states = await asyncio.to_thread(ec2.describe_instance_enis, self.node.instance_id)
        for state in states:
            if state.card not in self.pool.cards or state.primary_ip is None:
                continue
            known = self._enis.get(state.eni_id)
            if known is None:
                continue  # an ENI IMDS does not show yet: the periodic reconcile adopts it
            card = self.pool.card(known.info.card)
            held = set(card.prefixes_of(state.eni_id))
            for prefix in state.prefixes:
                if prefix not in held:
                    log.info("EC2 says %s holds %s, which IMDS did not list", state.eni_id, prefix)
                    card.add_prefix(state.eni_id, prefix)
                    self._freed.pop(prefix, None)

    # -- the backend API (CNI handler and socket) --------------------------------------

    def _require(self) -> tuple[AddressPool, Datastore]:
        if self.pool is None or self.datastore is None:
            raise AgentError("the agent has not started")
        return self.pool, self.datastore

    async def allocate(
        self, key: IpamKey, pod: PodRef, *, multi_nic: bool, origin: str = "api"
    ) -> Allocation:
        started = self._clock()
        allocation, durable = self.allocate_staged(key, pod, multi_nic=multi_nic, origin=origin)
        await asyncio.shield(durable)
        self.observe("allocate", started)
        return allocation

    def allocate_overlapped(
        self, key: IpamKey, pod: PodRef, *, multi_nic: bool, origin: str = "api"
    ) -> tuple[Allocation, Awaitable[None]]:
        """Allocate now, and start the commit now on a worker thread; await the second
        value (durable, or DatastoreError) before acknowledging. For a caller with work of
        its own to do meanwhile: a CNI ADD plumbs while the journal syncs."""
        started = self._clock()
        allocation, durable = self.allocate_staged(
            key, pod, multi_nic=multi_nic, origin=origin, overlap=True
        )

        async def acknowledged() -> None:
            await asyncio.shield(durable)
            self.observe("allocate", started)

        return allocation, acknowledged()

    def allocate_staged(
        self,
        key: IpamKey,
        pod: PodRef,
        *,
        multi_nic: bool,
        origin: str = "api",
        overlap: bool = False,
    ) -> tuple[Allocation, asyncio.Future[None]]:
        """Allocate in memory; the future resolves once the allocation is durable, and
        only then may it be acknowledged. The socket server uses this directly, with a
        callback instead of a coroutine per request. ``overlap``: the caller has work of
        its own before it waits (a CNI ADD's netlink), so the commit starts now on a
        worker thread, beside that work, instead of after this loop pass."""
        pool, store = self._require()
        if multi_nic and not self.config.enable_multi_nic:
            raise AgentError("a multi-NIC allocation needs ENABLE_MULTI_NIC=true on the node")
        cards = pool.cards if multi_nic else [0]
        try:
            allocation = store.allocate(key, pod, self._clock(), cards=cards, origin=origin)
        except PoolExhausted:
            self._exhausted.inc()
            self._urgent = True
            self._wake.set()
            raise
        self._wake.set()
        return allocation, self._durable(overlap=overlap)

    async def release(self, key: IpamKey, *, cooldown: bool = True) -> Allocation | None:
        """Give ``key``'s addresses back, into IP_COOLDOWN_PERIOD unless ``cooldown`` is
        false (an ADD rolled back: its address was never reported); journaled either way."""
        started = self._clock()
        allocation, durable = self.release_staged(key, cooldown=cooldown)
        if durable is not None:
            await asyncio.shield(durable)
        self.observe("release", started)
        return allocation

    def release_staged(
        self, key: IpamKey, *, cooldown: bool = True
    ) -> tuple[Allocation | None, asyncio.Future[None] | None]:
        _, store = self._require()
        allocation = store.release(key, self._clock(), cooldown=cooldown)
        if allocation is None:
            return None, None
        self._wake.set()
        return allocation, self._durable()

    def observe(self, op: str, started: float) -> None:
        self._latency[op].observe(self._clock() - started)

    async def gc(self, network: str, valid: Collection[IpamKey]) -> list[Allocation]:
        """Release this network's allocations that the runtime no longer knows."""
        pool, store = self._require()
        keep = set(valid)
        stale = [a for a in pool.allocations() if a.key.network == network and a.key not in keep]
        now = self._clock()
        for allocation in stale:
            store.release(allocation.key, now)
        if stale:
            await asyncio.shield(self._durable())
            self._wake.set()
        return stale

    def allocations(self) -> list[Allocation]:
        pool, _ = self._require()
        return list(pool.allocations())

    def lookup(self, key: IpamKey) -> Allocation | None:
        pool, _ = self._require()
        return pool.get(key)

    async def status(self) -> AgentStatus:
        pool, _ = self._require()
        now = self._clock()
        free = {}
        for card in pool.cards:
            usage = pool.card(card).usage(now)
            free[card] = usage.prefixes * 16 - usage.assigned - usage.cooldown
        steady = self._plan_all_steady()
        reason = "warm pool met" if steady else self._not_ready_reason()
        return AgentStatus(self._ready.is_set(), reason, free, tuple(pool.cards))

    def _durable(self, *, overlap: bool = False) -> asyncio.Future[None]:
        """The group commit that will cover what was just staged.

        It starts once this loop pass has applied every request it read, so throughput is
        one fsync per batch, not per request; while a commit runs on a worker thread (see
        SLOW_SYNC_S) the loop keeps applying requests into the next batch. With
        ``overlap`` (and no commit running) it starts now, on a worker thread.
        """
        if self._next_commit is None:
            loop = asyncio.get_running_loop()
            self._next_commit = loop.create_future()
            if self._committing is None:
                # call_soon: requests already read in this loop iteration join the batch.
                loop.call_soon(self._start_commit)
        waiter = self._next_commit
        if overlap and self._committing is None:
            self._start_commit(now_on_thread=True)  # the call_soon above finds nothing
        return waiter

    def _start_commit(self, *, now_on_thread: bool = False) -> None:
        assert self.datastore is not None
        waiter, self._next_commit = self._next_commit, None
        if waiter is None:
            return
        batch = self.datastore.take_batch()
        if now_on_thread:
            started = time.monotonic()
            write = asyncio.get_running_loop().run_in_executor(None, self._write_beside, batch)
            self._committing = asyncio.ensure_future(
                self._commit_on_thread(batch, waiter, (write, started))
            )
            return
        if time.monotonic() < self._threaded_sync_until:
            self._committing = asyncio.ensure_future(self._commit_on_thread(batch, waiter))
            return
        started = time.monotonic()
        error = self._write(batch)
        took = time.monotonic() - started
        self._sync_seconds["inline"].observe(took)
        if took > SLOW_SYNC_S:
            self._threaded_sync_until = started + took + THREADED_SYNC_S
            log.warning(
                "journal sync took %.0f ms; committing on a worker thread for the next %.0f s",
                took * 1000,
                THREADED_SYNC_S,
            )
        self._finish_commit(batch, waiter, error)

    def _write_beside(self, batch: Batch) -> DatastoreWriteError | None:
        """:meth:`_write`, on a worker thread while the caller plumbs (a crash test stops
        here: the ADD's plumbing is in place, its allocation not yet synced)."""
        pause_point("sync-beside-add")
        return self._write(batch)

    def _write(self, batch: Batch) -> DatastoreWriteError | None:
        assert self.datastore is not None
        try:
            self.datastore.write_batch(batch)
        except DatastoreWriteError as err:
            return err
        return None

    async def _commit_on_thread(
        self,
        batch: Batch,
        waiter: asyncio.Future[None],
        writing: tuple[asyncio.Future[DatastoreWriteError | None], float] | None = None,
    ) -> None:
        """Sync ``batch`` on a worker thread (``writing``: already submitted, and when)."""
        if writing is None:
            started = time.monotonic()
            error = await asyncio.to_thread(self._write, batch)
        else:
            write, started = writing
            error = await write
        self._sync_seconds["thread"].observe(time.monotonic() - started)
        self._committing = None
        self._finish_commit(batch, waiter, error)
        if self._next_commit is not None:
            self._start_commit()  # the batch that filled up meanwhile

    def _finish_commit(
        self, batch: Batch, waiter: asyncio.Future[None], error: DatastoreWriteError | None
    ) -> None:
        assert self.datastore is not None
        self.datastore.finish_batch(batch, error, self._clock())
        if error is None:
            waiter.set_result(None)
        else:
            log.error("journal write failed; %d allocation(s) refused: %s", len(batch.adds), error)
            waiter.set_exception(error)

    # -- the warm pool ---------------------------------------------------------------

    def _usage(self, card: int) -> warm.CardUsage:
        assert self.pool is not None and self.node is not None
        pool_usage = self.pool.card(card).usage(self._clock())
        state = self.cards[card]
        return warm.CardUsage(
            assigned=pool_usage.assigned,
            cooldown=pool_usage.cooldown,
            prefixes=pool_usage.prefixes,
            releasable_prefixes=pool_usage.releasable_prefixes,
            slots_free=pool_usage.slots_free,
            enis=pool_usage.enis,
            max_enis=max(pool_usage.enis, state.max_enis - self._non_pod_interfaces(card)),
            slots_per_eni=self.node.instance_type.max_prefixes_per_eni,
        )

    def _non_pod_interfaces(self, card: int) -> int:
        """Interfaces on the card that carry no pod addresses (efa-only, say)."""
        assert self.pool is not None
        return len(self.cards[card].devices_taken) - len(self.pool.card(card).enis)

    def plan(self, card: int) -> warm.Plan:
        # Every card gets the node's targets: a multi-NIC pod takes one address on each,
        # so each card's pool must be as warm as card 0's. (The VPC CNI hard-codes
        # WARM_IP_TARGET=1 on cards > 0, which makes every multi-NIC pod start wait.)
        return warm.plan(self._usage(card), self.config.warm_targets())

    def _plan_all_steady(self) -> bool:
        assert self.pool is not None
        steady = True
        for card in self.pool.cards:
            plan = self.plan(card)
            self.cards[card].last_plan = plan
            steady = steady and not plan.add_prefixes
        return steady

    def _not_ready_reason(self) -> str:
        reasons = [
            f"card {c}: {s.last_plan.reason}"
            for c, s in self.cards.items()
            if s.last_plan is not None and s.last_plan.add_prefixes
        ]
        return "; ".join(reasons) or "starting"

    def _mark_ready(self) -> None:
        if not self._ready.is_set():
            self._ready.set()
            self.ready_at = self._clock()
            self.metrics.ready.set(1)
            log.info(
                "ready: warm pool met %.3f s after start, %s",
                self.ready_at - self.started_at,
                "with EC2 calls" if self.ec2_used else "with no EC2 call",
            )

    async def _manage(self) -> None:
        failures = 0
        while True:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancellation that lands as the event fires, and stop() would wait forever.
                async with asyncio.timeout(MANAGE_INTERVAL_S):
                    await self._wake.wait()
                    if not self._urgent:
                        await asyncio.sleep(MANAGE_DEBOUNCE_S)  # let the burst finish
            except TimeoutError:
                pass
            self._wake.clear()
            self._urgent = False
            try:
                async with self._busy:
                    if self._sweep_pending:
                        await self._sweep_enis()
                    if self._clock() - self._reconciled_at >= RECONCILE_INTERVAL_S:
                        await self._reconcile()
                    await self._step()
                failures = 0
            except (UltranetError, OSError) as err:
                failures += 1
                delay = min(ERROR_BACKOFF_S[1], ERROR_BACKOFF_S[0] * 2 ** (failures - 1))
                log.error("pool step failed (%s); next try in %.0f s", err, delay)
                await asyncio.sleep(delay)

    async def _read_imds_interfaces(self) -> list[ImdsInterface]:
        """IMDS's interfaces, read on a worker thread that ``stop`` waits for."""
        read = asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self._imds.interfaces, primary_mac=None)
        )
        self._imds_reads.add(read)
        read.add_done_callback(self._imds_reads.discard)
        # shield: a cancelled caller must leave the future for stop() to wait on.
        return await asyncio.shield(read)

    async def reconcile(self) -> None:
        """Compare the pool with IMDS now (tests drive this directly)."""
        async with self._busy:
            await self._reconcile()

    async def _reconcile(self) -> None:
        """Follow changes made behind the daemon's back, trusting EC2 over IMDS.

        IMDS is read every time (it is free); EC2 is asked only when IMDS and the pool
        disagree, because IMDS lags: a prefix it lists may have been released, an ENI it
        no longer lists may only be slow to show. EC2's answer is applied: ENIs it says
        are gone are force-removed with their pods (counted in
        ``ultranet_ipamd_force_removed_allocations_total``), prefixes it says are ours are
        adopted, prefixes it says are not are dropped.
        """
        assert self.pool is not None and self.node is not None and self.datastore is not None
        self._reconciled_at = self._clock()
        interfaces = await self._read_imds_interfaces()
        await self._follow_vpc_cidrs(interfaces)
        seen = {i.interface_id: i for i in interfaces if i.network_card in self.pool.cards}
        freed_after = self._wall() - FREED_PREFIX_COOLDOWN_S
        disagree = False
        for card in self.pool.cards:
            pool = self.pool.card(card)
            for info in pool.enis:
                listed = seen.get(info.eni_id)
                if listed is None:
                    disagree = True
                    continue
                imds_prefixes = {
                    p for p in listed.ipv4_prefixes if self._freed.get(p, 0.0) <= freed_after
                }
                if imds_prefixes != set(pool.prefixes_of(info.eni_id)):
                    disagree = True
        for interface in seen.values():
            if interface.interface_id not in self._enis and not interface.maybe_efa_only:
                disagree = True
        if not disagree:
            return
        ec2 = await self._ec2()
        states = await asyncio.to_thread(ec2.describe_instance_enis, self.node.instance_id)
        attached = {s.eni_id: s for s in states if s.card in self.pool.cards}
        now = self._clock()
        for card in self.pool.cards:
            pool = self.pool.card(card)
            for info in list(pool.enis):
                state = attached.get(info.eni_id)
                if state is None:
                    lost = self.pool.remove_eni(card, info.eni_id, now, force=True)
                    self._enis.pop(info.eni_id, None)
                    self.cards[card].devices_taken.discard(info.device)
                    self.datastore.drop(lost)
                    self.metrics.force_removed.inc(len(lost))
                    log.warning(
                        "EC2 says %s is no longer attached: removed it and %d allocation(s)",
                        info.eni_id,
                        len(lost),
                    )
                    continue
                held = set(pool.prefixes_of(info.eni_id))
                for prefix in set(state.prefixes) - held:
                    log.info("EC2 says %s holds %s: adopting it", info.eni_id, prefix)
                    pool.add_prefix(info.eni_id, prefix)
                    self._freed.pop(prefix, None)
                for prefix in held - set(state.prefixes):
                    lost = self._drop_prefix(card, prefix, now)
                    log.warning(
                        "EC2 says %s no longer holds %s: dropped it and %d allocation(s)",
                        info.eni_id,
                        prefix,
                        len(lost),
                    )
        for interface in seen.values():
            state = attached.get(interface.interface_id)
            if state is None or interface.interface_id in self._enis:
                continue
            if state.primary_ip is None or interface.subnet_cidr is None:
                continue  # efa-only: never used for pods
            self.cards[interface.network_card].devices_taken.add(interface.device_number)
            self._adopt(interface, skip_freed_after=self._wall() - FREED_PREFIX_COOLDOWN_S)
            log.info("adopted %s, attached behind our back", interface.interface_id)
        adopted = list(self._pending_hosts)
        try:
            await self._setup_pending_hosts()
        except (UltranetError, OSError):
            # Out of the pool again until their host side is set up: the next reconcile
            # adopts them anew. They hold no pod yet: they were adopted just now.
            for info, _ in adopted:
                self.pool.remove_eni(info.card, info.eni_id, now, force=True)
                self._enis.pop(info.eni_id, None)
            raise
        if self.datastore.journal.staged:
            await asyncio.shield(self._durable())
        self._update_metrics()

    def _drop_prefix(self, card: int, prefix: IPv4Network, now: float) -> list[Allocation]:
        """Remove a prefix EC2 took back, and the allocations that were on it."""
        assert self.pool is not None and self.datastore is not None
        lost = [
            a
            for a in self.pool.allocations()
            if any(lease.card == card and lease.prefix == prefix for lease in a.leases)
        ]
        for allocation in lost:
            self.datastore.release(allocation.key, now)
        self.metrics.force_removed.inc(len(lost))
        self.pool.card(card).remove_prefix(prefix)
        return lost

    async def step(self) -> None:
        """One grow-or-shrink pass over every card (tests drive this directly)."""
        async with self._busy:
            await self._step()

    async def _step(self) -> None:
        """Grow or shrink the cards that need it, most urgent first, re-judged after each.

        With 32 cards behind one EC2 rate limit, topping them up in index order let card 0
        (every pod's card) run dry while cards 1-31 waited their turn; so each turn goes to
        the growing card with the fewest usable addresses, and a card that ran low again
        meanwhile gets another turn.
        """
        assert self.pool is not None
        turns = 2 * len(self.pool.cards)
        shrunk: set[int] = set()
        stuck: set[int] = set()  # grew nothing this step (no slot, no subnet): retried next step
        while turns:
            turns -= 1
            plans = {card: self.plan(card) for card in self.pool.cards}
            for card, plan in plans.items():
                self.cards[card].last_plan = plan
            growing = [c for c, p in plans.items() if p.add_prefixes and c not in stuck]
            if growing:
                card = min(growing, key=lambda c: (self._usage(c).available, c))
                plan = plans[card]
                log.info(
                    "card %d: growing by %d prefix(es): %s", card, plan.add_prefixes, plan.reason
                )
                before = self._usage(card).prefixes
                await self._grow(card, plan.add_prefixes)
                if self._usage(card).prefixes == before:
                    stuck.add(card)
                continue
            shrinking = [c for c, p in plans.items() if p.release_prefixes and c not in shrunk]
            if not shrinking:
                break
            card = shrinking[0]
            plan = plans[card]
            log.info(
                "card %d: releasing %d prefix(es): %s", card, plan.release_prefixes, plan.reason
            )
            await self._shrink(card, plan.release_prefixes)
            shrunk.add(card)
        await self._release_idle_enis(plans)
        self._update_metrics()
        if self._plan_all_steady():
            self._mark_ready()

    def _idle_enis(self, plans: dict[int, warm.Plan]) -> list[tuple[int, EniInfo]]:
        """ENIs that have held no prefix for IDLE_ENI_S on cards that need no growth.

        Never the primary ENI, never a card's last pod ENI (a multi-NIC pod needs one on
        every card), never one seen to come from the launch template.
        """
        assert self.pool is not None
        now = self._clock()
        idle = []
        for card in self.pool.cards:
            pool = self.pool.card(card)
            enis = pool.enis
            for info in enis:
                if pool.prefixes_of(info.eni_id) or (card, info.device) == (0, 0):
                    self._idle_since.pop(info.eni_id, None)
                    continue
                since = self._idle_since.setdefault(info.eni_id, now)
                plan = plans.get(card)
                if (
                    now - since >= IDLE_ENI_S
                    and plan is not None
                    and not plan.add_prefixes
                    and len(enis) > 1
                    and info.eni_id not in self._kept_enis
                ):
                    idle.append((card, info))
        return idle

    async def _release_idle_enis(self, plans: dict[int, warm.Plan]) -> None:
        idle = self._idle_enis(plans)
        if not idle:
            return
        assert self.node is not None and self.pool is not None
        ec2 = await self._ec2()
        states = {
            s.eni_id: s
            for s in await asyncio.to_thread(ec2.describe_instance_enis, self.node.instance_id)
        }
        for card, info in idle:
            state = states.get(info.eni_id)
            if state is None or state.attachment_id is None:
                continue  # detached behind our back: the reconcile removes it
            if state.tags.get(CREATED_BY_TAG) != "ultranet-ipamd":
                self._kept_enis.add(info.eni_id)
                log.info(
                    "card %d: %s holds no prefix but was not created here: kept", card, info.eni_id
                )
                continue
            if state.prefixes or state.secondary_ips:
                continue  # EC2 says it holds addresses: the reconcile adopts them
            await asyncio.to_thread(self._mark_eni_work)
            await asyncio.to_thread(ec2.detach_eni, state.attachment_id)
            self.pool.remove_eni(card, info.eni_id, self._clock())
            eni = self._enis.pop(info.eni_id)
            self._idle_since.pop(info.eni_id, None)
            self.cards[card].devices_taken.discard(info.device)
            await self._on_netlink(self._teardown_host_blocking, info, eni.mac)
            if await self._delete_detached(ec2, info.eni_id):
                await asyncio.to_thread(self._clear_eni_work)
            log.info(
                "card %d: released %s (device %d): no prefix for %.0f s",
                card,
                info.eni_id,
                info.device,
                IDLE_ENI_S,
            )

    async def _delete_detached(self, ec2: Ec2Client, eni_id: str) -> bool:
        """DeleteNetworkInterface once EC2 has finished detaching (it answers InUse until
        then). An ENI that cannot be deleted stays detached, tagged as ours: say so, and
        return False (the next start's sweep tries again)."""
        delay, tries = DELETE_AFTER_DETACH
        for attempt in range(tries):
            try:
                await asyncio.to_thread(ec2.delete_eni, eni_id)
                return True
            except Ec2Error as err:
                if err.code != "InvalidNetworkInterface.InUse" or attempt == tries - 1:
                    log.error(
                        "%s is detached but could not be deleted (%s): delete it by hand "
                        "(tag %s=ultranet-ipamd)",
                        eni_id,
                        err,
                        CREATED_BY_TAG,
                    )
                    return False
            await asyncio.sleep(delay)  # EC2 is still detaching; it gives no event
            delay *= 2
        return False

    async def _sweep_enis(self) -> None:
        """After a crash inside ENI set-up or tear-down: delete the ENIs this daemon made for
        this instance that are attached nowhere, and have the attached ones deleted with
        the instance (a crash before ModifyNetworkInterfaceAttribute left that unset).
        Attached ones are adopted from IMDS at start, or by the reconcile."""
        assert self.node is not None
        ec2 = await self._ec2()
        ours = await asyncio.to_thread(
            ec2.describe_network_interfaces,
            filters={
                f"tag:{INSTANCE_TAG}": [self.node.instance_id],
                f"tag:{CREATED_BY_TAG}": ["ultranet-ipamd"],
            },
        )
        for state in ours:
            if state.attachment_id is None:
                log.warning("deleting %s: created here but never attached (a crash)", state.eni_id)
                if not await self._delete_detached(ec2, state.eni_id):
                    return  # logged; the marker stays for the next start
            elif state.instance_id == self.node.instance_id:
                await asyncio.to_thread(
                    ec2.set_delete_on_termination, state.eni_id, state.attachment_id
                )
        await asyncio.to_thread(self._clear_eni_work)
        self._sweep_pending = False

    def _eni_work_path(self) -> Path:
        return self.config.state_dir / ENI_WORK_FILE

    def _mark_eni_work(self) -> None:
        """Durably, before the EC2 call it covers: a crash may come right after."""
        path = self._eni_work_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _clear_eni_work(self) -> None:
        self._eni_work_path().unlink(missing_ok=True)

    def _teardown_host_blocking(self, info: EniInfo, mac: str) -> None:
        host = self._host()
        if host is not None:
            host.teardown_eni(self._link(info, mac))

    async def _grow(self, card: int, need: int) -> None:
        assert self.pool is not None and self.node is not None
        ec2 = await self._ec2()
        pool = self.pool.card(card)
        for info in pool.enis:
            if need <= 0:
                return
            room = info.max_prefixes - len(pool.prefixes_of(info.eni_id))
            subnet_id = self._enis[info.eni_id].subnet_id
            if room <= 0 or self._cooling(subnet_id):
                continue
            count = min(room, need)
            try:
                prefixes = await asyncio.to_thread(
                    ec2.assign_prefixes, info.eni_id, count, subnet_id=subnet_id
                )
            except SubnetSpaceError as err:
                self._subnet_exhausted(subnet_id, err)
                continue
            for prefix in prefixes:
                pool.add_prefix(info.eni_id, prefix)
            need -= len(prefixes)
            self._update_metrics()
        while need > 0:
            state = self.cards[card]
            if len(pool.enis) + self._non_pod_interfaces(card) >= state.max_enis:
                log.warning("card %d: %d more prefix(es) wanted, no ENI slot left", card, need)
                return
            eni = await self._new_eni(card, min(need, self.node.instance_type.max_prefixes_per_eni))
            if eni is None:
                return
            need -= len(eni.prefixes)
            self._update_metrics()

    async def _new_eni(self, card: int, prefixes: int) -> EniState | None:
        """Create and attach an ENI with prefixes, in the first subnet that can hold them."""
        assert self.node is not None and self.pool is not None
        ec2 = await self._ec2()
        for subnet_id in await self._eligible_subnets():
            await asyncio.to_thread(self._mark_eni_work)
            try:
                created = await asyncio.to_thread(
                    ec2.create_eni,
                    subnet_id,
                    groups=list(self.node.security_groups),
                    prefix_count=prefixes,
                    description=ENI_DESCRIPTION,
                    tags={INSTANCE_TAG: self.node.instance_id, CREATED_BY_TAG: "ultranet-ipamd"},
                )
            except SubnetSpaceError as err:
                self._subnet_exhausted(subnet_id, err)
                continue
            except UltranetError:
                self._sweep_pending = True  # an attempt that timed out may have made one
                raise
            state = self.cards[card]
            device = min(set(range(64)) - state.devices_taken)
            try:
                attachment = await asyncio.to_thread(
                    ec2.attach_eni, created.eni_id, self.node.instance_id, device, card
                )
                await asyncio.to_thread(ec2.set_delete_on_termination, created.eni_id, attachment)
            except UltranetError:
                self._sweep_pending = True  # if this delete fails too, the sweep retries
                await asyncio.to_thread(ec2.delete_eni, created.eni_id)
                self._sweep_pending = False
                raise
            state.devices_taken.add(device)
            assert created.primary_ip is not None
            subnet = await self._subnet_cidr(subnet_id)
            info = EniInfo(
                created.eni_id,
                card,
                device,
                subnet,
                created.primary_ip,
                self.node.instance_type.max_prefixes_per_eni,
            )
            await self._wait_link(created.mac)
            # Plumbed before the pool knows it, so no pod can get an address on an ENI whose
            # host rules are missing. If the set-up fails, the ENI stays attached and unknown
            # here: the next reconcile finds it in IMDS, adopts it and sets it up again.
            await self._setup_host(info, created.mac)
            self.pool.card(card).add_eni(info)
            self._enis[info.eni_id] = _Eni(info, subnet_id, created.mac)
            for prefix in created.prefixes:
                self.pool.card(card).add_prefix(info.eni_id, prefix)
            await asyncio.to_thread(self._clear_eni_work)
            log.info(
                "card %d: attached %s at device %d in %s with %d prefix(es)",
                card,
                created.eni_id,
                device,
                subnet_id,
                len(created.prefixes),
            )
            return created
        log.error(
            "card %d: no eligible subnet in %s can hold %d more prefix(es); pods will wait "
            "(carve a prefix reservation with create-subnet-cidr-reservation)",
            card,
            self.node.availability_zone,
            prefixes,
        )
        return None

    def _find_link(self, mac: str) -> str | None:
        host = self._host()
        return host.find_link(mac) if host is not None else mac

    async def _wait_link(self, mac: str) -> None:
        deadline = self._clock() + LINK_WAIT_S
        delay = 0.05
        while await self._on_netlink(self._find_link, mac) is None:
            if self._clock() > deadline:
                raise AgentError(f"the link with MAC {mac} did not appear in {LINK_WAIT_S:.0f} s")
            await asyncio.sleep(delay)  # the kernel hot-plugs it; EC2 gives no event
            delay = min(1.0, delay * 2)

    async def _eligible_subnets(self) -> list[str]:
        assert self.node is not None
        ec2 = await self._ec2()
        found = await asyncio.to_thread(
            ec2.subnets_in, self.node.vpc_id, self.node.availability_zone, self.config.subnet_tag
        )
        ordered = [self.node.primary_subnet_id] + [
            s.subnet_id
            for s in sorted(found, key=lambda s: -s.available_ips)
            if s.subnet_id != self.node.primary_subnet_id
        ]
        return [s for s in ordered if not self._cooling(s)]

    async def _subnet_cidr(self, subnet_id: str) -> IPv4Network:
        for eni in self._enis.values():
            if eni.subnet_id == subnet_id:
                return eni.info.subnet
        ec2 = await self._ec2()
        (subnet,) = await asyncio.to_thread(ec2.describe_subnets, [subnet_id])
        return subnet.cidr

    def _cooling(self, subnet_id: str) -> bool:
        until = self._subnet_cooling.get(subnet_id)
        return until is not None and self._clock() < until

    def _subnet_exhausted(self, subnet_id: str, err: Exception) -> None:
        self._subnet_cooling[subnet_id] = self._clock() + SUBNET_COOLDOWN_S
        self.metrics.insufficient_cidr.labels(subnet_id).inc()
        log.warning(
            "subnet %s cannot give a /28 prefix (%s); trying other subnets, back to it in %.0f s",
            subnet_id,
            err,
            SUBNET_COOLDOWN_S,
        )

    async def _shrink(self, card: int, count: int) -> None:
        assert self.pool is not None
        ec2 = await self._ec2()
        pool = self.pool.card(card)
        chosen = pool.releasable_prefixes(self._clock())[:count]
        by_eni: dict[str, list[IPv4Network]] = {}
        for prefix in chosen:
            eni_id = next(e.eni_id for e in pool.enis if prefix in pool.prefixes_of(e.eni_id))
            by_eni.setdefault(eni_id, []).append(prefix)
        for eni_id, prefixes in by_eni.items():
            # Out of the pool first: no pod may take them while EC2 is being asked.
            for prefix in prefixes:
                pool.remove_prefix(prefix)
            try:
                await asyncio.to_thread(ec2.unassign_prefixes, eni_id, prefixes)
            except UltranetError:
                for prefix in prefixes:
                    pool.add_prefix(eni_id, prefix)
                raise
            now = self._wall()
            for prefix in prefixes:
                self._freed[prefix] = now
            self._save_freed()

    # -- EC2, lazily ----------------------------------------------------------------

    async def _ec2(self) -> Ec2Client:
        if self._ec2_client is None:
            assert self.node is not None
            log.info("first EC2 call: creating the EC2 client")
            # Importing boto3 and building a client takes ~0.5 s of CPU: on a worker
            # thread, so allocations keep being answered meanwhile.
            client = await asyncio.to_thread(self._ec2_factory, self.node, self.metrics)
            if self._ec2_client is None:
                self._ec2_client = client
        return self._ec2_client

    # -- recently freed prefixes, kept across restarts --------------------------------

    def _freed_path(self) -> Path:
        return self.config.state_dir / FREED_FILE

    def _load_freed(self) -> None:
        path = self._freed_path()
        if not path.exists():
            return
        try:
            raw = json.loads(path.read_text())
            self._freed = {IPv4Network(k): float(v) for k, v in raw.items()}
        except (ValueError, TypeError, AttributeError) as err:
            # Losing this list only risks re-adopting a prefix EC2 took back, which the
            # EC2 reconcile then drops: say so, and start without it.
            log.error("ignoring unreadable %s: %s", path, err)
            self._freed = {}

    def _save_freed(self) -> None:
        horizon = self._wall() - FREED_PREFIX_COOLDOWN_S
        self._freed = {p: t for p, t in self._freed.items() if t > horizon}
        path = self._freed_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({str(p): t for p, t in self._freed.items()}))
        os.replace(tmp, path)

    # -- metrics and introspection ---------------------------------------------------

    def _update_metrics(self) -> None:
        if self.pool is None:
            return
        now = self._clock()
        for card in self.pool.cards:
            usage = self.pool.card(card).usage(now)
            label = str(card)
            self.metrics.assigned.labels(label).set(usage.assigned)
            self.metrics.total.labels(label).set(usage.prefixes * 16)
            self.metrics.cooldown.labels(label).set(usage.cooldown)
            self.metrics.prefixes.labels(label).set(usage.prefixes)
            self.metrics.enis.labels(label).set(usage.enis)

    def introspect(self) -> dict[str, Any]:
        """Everything an operator asks first: ENIs, prefixes, allocations, config, plans."""
        pool, _ = self._require()
        assert self.node is not None
        now = self._clock()
        cards: dict[str, Any] = {}
        for card in pool.cards:
            card_pool: CardPool = pool.card(card)
            usage = card_pool.usage(now)
            plan = self.cards[card].last_plan
            cards[str(card)] = {
                "assigned": usage.assigned,
                "cooldown": usage.cooldown,
                "prefixes": usage.prefixes,
                "releasable_prefixes": usage.releasable_prefixes,
                "plan": plan.reason if plan else None,
                "enis": [
                    {
                        "eni_id": e.eni_id,
                        "device": e.device,
                        "route_table": e.route_table,
                        "subnet": str(e.subnet),
                        "primary_ip": str(e.primary_ip),
                        "prefixes": [str(p) for p in card_pool.prefixes_of(e.eni_id)],
                    }
                    for e in card_pool.enis
                ],
            }
        return {
            "instance_id": self.node.instance_id,
            "instance_type": self.node.instance_type.name,
            "ready": self._ready.is_set(),
            "ec2_used": self.ec2_used,
            "cards": cards,
            "allocations": [
                {
                    "key": str(a.key),
                    "pod": str(a.pod),
                    "addresses": [f"{lease.card}:{lease.address}" for lease in a.leases],
                }
                for a in pool.allocations()
            ],
            "subnets_cooling": sorted(s for s in self._subnet_cooling if self._cooling(s)),
            "recently_freed": sorted(str(p) for p in self._freed),
            "config": self.config.effective(),
        }


def _default_ec2_factory(config: IpamdConfig) -> Callable[[NodeIdentity, IpamdMetrics], Ec2Client]:
    def build(node: NodeIdentity, metrics: IpamdMetrics) -> Ec2Client:
        from ipam.ec2 import Ec2Client  # boto3 comes with it: only when EC2 is needed

        return Ec2Client(
            node.region,
            endpoint_url=config.ec2_endpoint,
            rate_per_s=config.ec2_rate,
            burst=config.ec2_burst,
            stats=metrics,
        )

    return build
