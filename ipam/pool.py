"""The node's address pool: ENIs, their /28 prefixes, and which pod holds which address.

Pure logic, no I/O and no clock of its own (every call that depends on time takes
``now``), so the daemon, the tests and the planner's simulator drive it the same way.
Durability is the datastore's job (``ipam.datastore``): it persists an allocation
before acknowledging it and replays records through ``restore``.

One ``CardPool`` per managed network card, as the VPC CNI keeps one datastore per card
(``aws/amazon-vpc-cni-k8s``, ``pkg/ipamd/datastore/data_store.go``). Where ultranet differs
from it, on purpose:

* **Bin-packing.** A new pod takes an address from the fullest prefix that still has a
  usable address (the VPC CNI scans prefixes in Go map order), so pods pack into few
  prefixes and whole prefixes empty out and can go back to the subnet.
* **Cooldown occupies.** A released address stays unusable for ``cooldown_s`` (the VPC
  CNI's ``IP_COOLDOWN_PERIOD``, for kube-proxy to catch up) and counts as used, both for
  packing and when sizing the warm pool (``usage``), so a pod never waits on cooldown.
* **A prefix is releasable only when it holds neither pods nor cooling addresses**;
  the VPC CNI frees prefixes with cooling addresses, which hands EC2 addresses that
  kube-proxy may still route.
* **Multi-NIC allocations are all or nothing**: one address on each requested card, or
  ``PoolExhausted`` naming the cards that had none, and nothing changes.

Each operation is O(log n) or better in the number of prefixes: prefixes are kept in
buckets by occupancy and cooling addresses in a heap by expiry.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from cni.backend import MAIN_TABLE, Allocation, Lease, PodAddress
from cni.keys import IpamKey, PodRef
from ipam.datastore_errors import (
    Conflict,
    DuplicateAddress,
    EniInUse,
    InvalidEni,
    InvalidPrefix,
    PoolExhausted,
    PrefixInUse,
    UnknownEni,
    UnknownPrefix,
    UnmanagedCard,
)
from ipam.records import AllocationRecord

PREFIX_LEN = 28
PREFIX_SIZE = 16


def route_table(card: int, device: int) -> int:
    """The VPC CNI's route table numbering (``pkg/networkutils/helper.go``,
    ``CalculateRouteTableId``, in ``aws/amazon-vpc-cni-k8s``).

    The primary ENI uses the main table; card 0, device d uses table d + 1; card c > 0
    uses 10000 + d + 100 c, so tables of different cards never collide (keying by
    device alone broke multi-card EFA: ``cilium/cilium`` #42600).
    """
    if card < 0 or device < 0:
        raise ValueError(f"card {card} and device {device} must be >= 0")
    if card == 0:
        return MAIN_TABLE if device == 0 else device + 1
    return 10000 + device + 100 * card


@dataclass(frozen=True, slots=True)
class EniInfo:
    """What the pool needs to know of an ENI that carries pod addresses."""

    eni_id: str
    card: int
    device: int
    subnet: IPv4Network
    primary_ip: IPv4Address
    max_prefixes: int  # Ipv4AddressesPerInterface - 1: the primary address takes a slot

    def __post_init__(self) -> None:
        if not self.eni_id.startswith("eni-"):
            raise InvalidEni("eni_id", self.eni_id, "must start with 'eni-'")
        if self.card < 0 or self.device < 0:
            raise InvalidEni("card/device", (self.card, self.device), "must be >= 0")
        if self.primary_ip not in self.subnet:
            raise InvalidEni("primary_ip", str(self.primary_ip), f"not in subnet {self.subnet}")
        if self.max_prefixes < 1:
            raise InvalidEni("max_prefixes", self.max_prefixes, "must be >= 1")

    @property
    def gateway(self) -> IPv4Address:
        """The VPC router of the subnet: its network address + 1."""
        return self.subnet.network_address + 1

    @property
    def route_table(self) -> int:
        return route_table(self.card, self.device)


@dataclass(frozen=True, slots=True)
class PoolUsage:
    """A card's numbers for the warm-pool arithmetic (``ipam.warm``)."""

    assigned: int
    cooldown: int
    prefixes: int
    releasable_prefixes: int
    slots_free: int  # prefixes the card's existing ENIs can still take
    enis: int


@dataclass(slots=True)
class _Prefix:
    network: IPv4Network
    eni_id: str
    base: int = 0  # int(network address): the hot path keys by it, not by IPv4Network
    free: set[int] = field(default_factory=lambda: set(range(PREFIX_SIZE)))
    assigned: dict[int, IpamKey] = field(default_factory=dict)
    cooling: dict[int, float] = field(default_factory=dict)  # offset -> usable again at

    @property
    def used(self) -> int:
        return len(self.assigned) + len(self.cooling)

    def address(self, offset: int) -> IPv4Address:
        return IPv4Address(self.base + offset)


class CardPool:
    """The ENIs and prefixes of one network card."""

    def __init__(self, card: int, cooldown_s: float) -> None:
        self.card = card
        self.cooldown_s = cooldown_s
        self._enis: dict[str, EniInfo] = {}
        self._eni_facts: dict[str, tuple[IPv4Address, int]] = {}  # gateway, route table
        self._prefixes: dict[IPv4Network, _Prefix] = {}
        self._by_base: dict[int, _Prefix] = {}
        # Prefixes with a usable address, by how many addresses they hold (0..15).
        self._by_used: list[set[int]] = [set() for _ in range(PREFIX_SIZE)]  # prefix bases
        self._cooling: list[tuple[float, int, int]] = []  # (until, base, offset), by expiry
        self._assigned = 0

    # -- ENIs and prefixes -----------------------------------------------------------

    @property
    def enis(self) -> list[EniInfo]:
        return sorted(self._enis.values(), key=lambda e: e.device)

    def prefixes_of(self, eni_id: str) -> list[IPv4Network]:
        self._eni(eni_id)
        return sorted(p.network for p in self._prefixes.values() if p.eni_id == eni_id)

    def add_eni(self, eni: EniInfo) -> None:
        if eni.card != self.card:
            raise InvalidEni("card", eni.card, f"this pool is card {self.card}")
        if eni.eni_id in self._enis:
            raise Conflict(f"ENI {eni.eni_id} is already in the pool of card {self.card}")
        for other in self._enis.values():
            if other.device == eni.device:
                raise Conflict(
                    f"card {self.card} device {eni.device} is already {other.eni_id}, "
                    f"not {eni.eni_id}"
                )
        self._enis[eni.eni_id] = eni
        self._eni_facts[eni.eni_id] = (eni.gateway, eni.route_table)

    def remove_eni(self, eni_id: str, *, force: bool = False) -> list[IpamKey]:
        """Drop an ENI and its prefixes; ``force`` also drops its pods' addresses.

        Returns the keys whose addresses were dropped (``force`` only): EC2 said the ENI
        is gone, so those pods have lost their addresses and the caller must say so.
        """
        self._eni(eni_id)
        prefixes = [p for p in self._prefixes.values() if p.eni_id == eni_id]
        held = sum(len(p.assigned) for p in prefixes)
        if held and not force:
            raise EniInUse(eni_id, held)
        lost = [key for p in prefixes for key in p.assigned.values()]
        for prefix in prefixes:
            self._drop_prefix(prefix)
        del self._enis[eni_id]
        del self._eni_facts[eni_id]
        return lost

    def add_prefix(self, eni_id: str, network: IPv4Network) -> None:
        eni = self._eni(eni_id)
        if network.prefixlen != PREFIX_LEN:
            raise InvalidPrefix(network, f"must be a /{PREFIX_LEN}")
        if not network.subnet_of(eni.subnet):
            raise InvalidPrefix(network, f"not in {eni_id}'s subnet {eni.subnet}")
        if network in self._prefixes:
            raise Conflict(f"prefix {network} is already on {self._prefixes[network].eni_id}")
        if len(self.prefixes_of(eni_id)) >= eni.max_prefixes:
            raise InvalidPrefix(network, f"{eni_id} already holds {eni.max_prefixes} prefixes")
        prefix = _Prefix(network, eni_id, int(network.network_address))
        self._prefixes[network] = prefix
        self._by_base[prefix.base] = prefix
        self._by_used[0].add(prefix.base)

    def remove_prefix(self, network: IPv4Network) -> None:
        """Drop a prefix that holds no pod (cooling addresses go with it)."""
        prefix = self._prefix(network)
        if prefix.assigned:
            raise PrefixInUse(network, len(prefix.assigned))
        self._drop_prefix(prefix)

    def releasable_prefixes(self, now: float) -> list[IPv4Network]:
        """Prefixes holding neither pods nor cooling addresses, newest ENI first.

        Emptying the highest device first lets a whole secondary ENI go eventually.
        """
        self._expire(now)
        empty = [p for p in self._prefixes.values() if p.used == 0]
        device = {e.eni_id: e.device for e in self._enis.values()}
        empty.sort(key=lambda p: (-device[p.eni_id], p.network))
        return [p.network for p in empty]

    # -- addresses -------------------------------------------------------------------

    def can_allocate(self, now: float) -> bool:
        self._expire(now)
        return any(self._by_used)

    def take(self, key: IpamKey, now: float) -> tuple[_Prefix, int]:
        """The lowest usable address of the fullest prefix with one."""
        self._expire(now)
        for used in range(PREFIX_SIZE - 1, -1, -1):
            bucket = self._by_used[used]
            if bucket:
                # min() keeps the choice deterministic across runs and restarts.
                prefix = self._by_base[min(bucket)]
                offset = min(prefix.free)
                self._occupy(prefix, offset, key)
                return prefix, offset
        raise PoolExhausted([self.card], self._exhausted_detail())

    def give_back(
        self, address: PodAddress, key: IpamKey, now: float, *, cooldown: bool = True
    ) -> None:
        """Release ``address`` held by ``key`` into cooldown (free at once without
        ``cooldown``); nothing if its prefix is gone (it went with a force-removed ENI)."""
        if address.version != 4:
            return  # never one of this pool's
        value = int(address)
        base = value & ~(PREFIX_SIZE - 1)
        prefix = self._by_base.get(base)
        if prefix is None:
            return
        offset = value - base
        if prefix.assigned.get(offset) != key:
            return  # not (or no longer) ``key``'s: release stays idempotent
        self._unbucket(prefix)
        self._vacate(prefix, offset, now, cooldown=cooldown)
        self._bucket(prefix)

    def claim(self, address: PodAddress, key: IpamKey) -> Lease:
        """Mark a specific address as ``key``'s (restore after a restart)."""
        prefix, offset = self._locate(address)
        owner = prefix.assigned.get(offset)
        if owner is not None and owner != key:
            raise DuplicateAddress(address, (owner, key))
        if owner is None:
            prefix.cooling.pop(offset, None)  # a restored pod beats a cooling entry
            prefix.free.add(offset)
            self._occupy(prefix, offset, key)
        return self.lease(prefix, offset)

    def lease(self, prefix: _Prefix, offset: int) -> Lease:
        eni = self._enis[prefix.eni_id]
        gateway, table = self._eni_facts[eni.eni_id]
        return Lease(
            self.card,
            prefix.address(offset),
            prefix.network,
            eni.eni_id,
            eni.device,
            table,
            gateway,
            eni.subnet,
        )

    def usage(self, now: float) -> PoolUsage:
        self._expire(now)
        releasable = sum(1 for p in self._prefixes.values() if p.used == 0)
        cooling = sum(len(p.cooling) for p in self._prefixes.values())
        slots = sum(e.max_prefixes for e in self._enis.values()) - len(self._prefixes)
        return PoolUsage(
            assigned=self._assigned,
            cooldown=cooling,
            prefixes=len(self._prefixes),
            releasable_prefixes=releasable,
            slots_free=slots,
            enis=len(self._enis),
        )

    def holds(self, address: PodAddress) -> bool:
        """Whether ``address`` is inside one of this card's prefixes."""
        try:
            self._locate(address)
        except UnknownPrefix:
            return False
        return True

    # -- internals -------------------------------------------------------------------

    def _eni(self, eni_id: str) -> EniInfo:
        try:
            return self._enis[eni_id]
        except KeyError:
            raise UnknownEni(eni_id) from None

    def _prefix(self, network: IPv4Network) -> _Prefix:
        try:
            return self._prefixes[network]
        except KeyError:
            raise UnknownPrefix(network) from None

    def _locate(self, address: PodAddress) -> tuple[_Prefix, int]:
        if address.version != 4:
            raise UnknownPrefix(address)
        value = int(address)
        base = value & ~(PREFIX_SIZE - 1)
        prefix = self._by_base.get(base)
        if prefix is None:
            raise UnknownPrefix(IPv4Network((base, PREFIX_LEN)))
        return prefix, value - base

    def _unbucket(self, prefix: _Prefix) -> None:
        if prefix.used < PREFIX_SIZE:
            self._by_used[prefix.used].discard(prefix.base)

    def _bucket(self, prefix: _Prefix) -> None:
        if prefix.free:
            self._by_used[prefix.used].add(prefix.base)

    def _occupy(self, prefix: _Prefix, offset: int, key: IpamKey) -> None:
        self._unbucket(prefix)
        prefix.free.discard(offset)
        prefix.assigned[offset] = key
        self._assigned += 1
        self._bucket(prefix)

    def _vacate(self, prefix: _Prefix, offset: int, now: float, *, cooldown: bool = True) -> None:
        del prefix.assigned[offset]
        self._assigned -= 1
        if cooldown and self.cooldown_s > 0:
            until = now + self.cooldown_s
            prefix.cooling[offset] = until
            heapq.heappush(self._cooling, (until, prefix.base, offset))
        else:
            prefix.free.add(offset)

    def _expire(self, now: float) -> None:
        while self._cooling and self._cooling[0][0] <= now:
            until, base, offset = heapq.heappop(self._cooling)
            prefix = self._by_base.get(base)
            if prefix is None or prefix.cooling.get(offset) != until:
                continue  # the prefix went away, or the address was claimed since
            self._unbucket(prefix)
            del prefix.cooling[offset]
            prefix.free.add(offset)
            self._bucket(prefix)

    def _drop_prefix(self, prefix: _Prefix) -> None:
        self._unbucket(prefix)
        self._assigned -= len(prefix.assigned)
        del self._prefixes[prefix.network]
        del self._by_base[prefix.base]

    def _exhausted_detail(self) -> str:
        cooling = sum(len(p.cooling) for p in self._prefixes.values())
        return (
            f"{self._assigned} assigned, {cooling} in cooldown, "
            f"{len(self._prefixes)} prefixes on {len(self._enis)} ENIs"
        )


class AddressPool:
    """Every managed card's pool, and the allocations keyed by (network, container, ifname)."""

    def __init__(self, cards: Iterable[int], *, cooldown_s: float) -> None:
        if cooldown_s < 0:
            raise ValueError(f"cooldown must be >= 0 s, not {cooldown_s}")
        self._cards = {card: CardPool(card, cooldown_s) for card in sorted(set(cards))}
        if not self._cards:
            raise ValueError("an address pool needs at least one managed card")
        self._allocations: dict[IpamKey, Allocation] = {}

    @property
    def cards(self) -> list[int]:
        return list(self._cards)

    def card(self, card: int) -> CardPool:
        try:
            return self._cards[card]
        except KeyError:
            raise UnmanagedCard(card, self._cards) from None

    def allocations(self) -> Iterator[Allocation]:
        return iter(list(self._allocations.values()))

    def get(self, key: IpamKey) -> Allocation | None:
        return self._allocations.get(key)

    def allocate(
        self,
        key: IpamKey,
        pod: PodRef,
        now: float,
        *,
        cards: Sequence[int] = (0,),
        origin: str = "api",
    ) -> Allocation:
        """An address on each of ``cards`` for ``key``; the same key gets the same answer.

        A runtime retries ADD after a timeout, so a key that already holds an allocation
        gets it back unchanged rather than a second address.
        """
        existing = self._allocations.get(key)
        if existing is not None:
            return existing
        wanted = list(dict.fromkeys(cards))
        if not wanted:
            raise ValueError("an allocation needs at least one card")
        pools = [self.card(card) for card in wanted]
        empty = [pool.card for pool in pools if not pool.can_allocate(now)]
        if empty:
            details = "; ".join(
                f"card {p.card}: {p._exhausted_detail()}" for p in pools if p.card in empty
            )
            raise PoolExhausted(empty, details)
        leases = []
        for pool in pools:
            prefix, offset = pool.take(key, now)
            leases.append(pool.lease(prefix, offset))
        allocation = Allocation(key, pod, tuple(leases), now, origin)
        self._allocations[key] = allocation
        return allocation

    def release(self, key: IpamKey, now: float, *, cooldown: bool = True) -> Allocation | None:
        """Put ``key``'s addresses in cooldown; None if it held nothing (DEL is idempotent).

        ``cooldown=False`` frees them at once: for an ADD that failed, whose address no
        one was told of, so no Service endpoint can still point at it."""
        allocation = self._allocations.pop(key, None)
        if allocation is None:
            return None
        self._give_back(allocation, now, cooldown=cooldown)
        return allocation

    def _give_back(self, allocation: Allocation, now: float, *, cooldown: bool = True) -> None:
        for lease in allocation.leases:
            pool = self._cards.get(lease.card)
            if pool is not None:
                pool.give_back(lease.address, allocation.key, now, cooldown=cooldown)

    def remove_eni(
        self, card: int, eni_id: str, now: float, *, force: bool = False
    ) -> list[Allocation]:
        """Drop an ENI; with ``force`` (EC2 says it is gone) also the pods that used it.

        Returns the allocations lost. A multi-NIC pod loses all its leases, because an
        allocation is all or nothing; those on other cards go into cooldown.
        """
        lost_keys = self.card(card).remove_eni(eni_id, force=force)
        lost = []
        for key in lost_keys:
            allocation = self._allocations.pop(key, None)
            if allocation is not None:
                self._give_back(allocation, now)
                lost.append(allocation)
        return lost

    def holds(self, card: int, address: PodAddress) -> bool:
        """Whether ``address`` is inside a prefix of the managed ``card``."""
        pool = self._cards.get(card)
        return pool is not None and pool.holds(address)

    def _missing_address(self, record: AllocationRecord) -> str:
        """Why a record cannot be restored ("" if it can): a card or prefix it needs is gone."""
        for recorded in record.addresses:
            pool = self._cards.get(recorded.card)
            if pool is None:
                return f"network card {recorded.card} is not managed"
            if not pool.holds(recorded.address):
                return f"address {recorded.address} is on no prefix of card {recorded.card}"
        return ""

    def restore(self, records: Iterable[AllocationRecord]) -> list[tuple[AllocationRecord, str]]:
        """Re-adopt persisted allocations after a restart; returns those dropped, and why.

        A record whose address is on no known prefix is dropped (its ENI or prefix is
        gone per EC2); two records claiming one address abort the restore, because
        handing either out again could duplicate an address.
        """
        dropped: list[tuple[AllocationRecord, str]] = []
        for record in records:
            if record.key in self._allocations:
                raise Conflict(f"two records for {record.key}")
            gone = self._missing_address(record)
            if gone:
                dropped.append((record, gone))
                continue
            leases = tuple(self.card(r.card).claim(r.address, record.key) for r in record.addresses)
            self._allocations[record.key] = Allocation(
                record.key, record.pod, leases, record.allocated_at, record.origin
            )
        return dropped
