"""IPv6 prefix mode's pool (``ENABLE_IPv6``): pods take /128s from one /80 on the
primary ENI.

As in the VPC CNI (``aws/amazon-vpc-cni-k8s``, ``pkg/ipamd/ipamd.go``: in IPv6 mode the
pool manager returns at once, "the prefix used for the primary ENI is more than enough
for all pods"), there is no warm pool: a /80 holds 2^48 addresses, so there is nothing
to grow or shrink once the node has it. The pool answers the datastore's calls
(``ipam.datastore.AllocationPool``) like :class:`ipam.pool.AddressPool`, whose key
bookkeeping it shares.

Addresses are handed out in order through the /80 and never again before the order
wraps (after 2^48 - 1 of them), which keeps a released address out of use far longer
than ``IP_COOLDOWN_PERIOD``; the cooldown is still kept and counted, so an address is
never reused sooner even after a wrap. After a restart the order resumes past the
highest restored address. Offset 0 (the /80's own address) is never used.

With ``egress_range`` (``ENABLE_V4_EGRESS``) an allocation also takes a node-local IPv4 of
that range for the pod's egress-only interface (``cni.egress_v4``; the VPC CNI's
``egress-cni`` takes it from host-local IPAM): in order as well, never the range's own
address, its first (the gateway on every host end) nor its last, with the same cooldown,
journaled with the allocation and restored with it.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from cni.backend import MAIN_TABLE, Allocation, Lease, PodAddress
from cni.keys import IpamKey, PodRef
from ipam.datastore_errors import (
    Conflict,
    DuplicateAddress,
    InvalidPrefix,
    PoolExhausted,
    UnmanagedCard,
)
from ipam.pool import AddressPool
from ipam.records import AllocationRecord

IPV6_PREFIX_LEN = 80  # what EC2 delegates: AssignIpv6Addresses Ipv6PrefixCount
IPV6_SUBNET_LEN = 64  # every VPC subnet's IPv6 block is a /64
OFFSETS = 1 << (128 - IPV6_PREFIX_LEN)


@dataclass(frozen=True, slots=True)
class Ipv6Usage:
    assigned: int
    cooldown: int
    prefixes: int  # 0 until the node has its /80, then 1

    @property
    def free(self) -> int:
        return self.prefixes * (OFFSETS - 1) - self.assigned - self.cooldown


class Ipv6PrefixPool(AddressPool):
    """The primary ENI's /80 and the pods' /128s in it (network card 0 only)."""

    def __init__(
        self, eni_id: str, *, cooldown_s: float, egress_range: IPv4Network | None = None
    ) -> None:
        super().__init__([0], cooldown_s=cooldown_s)
        self.egress_range = egress_range
        self._egress = _Sequence(
            egress_range.num_addresses - 1 if egress_range is not None else 0, first=2
        )
        self.eni_id = eni_id
        self.cooldown_s = cooldown_s
        self.prefix: IPv6Network | None = None
        self._base = 0
        self._assigned: dict[int, IpamKey] = {}
        self._cooling: dict[int, float] = {}  # offset -> usable again at
        self._expiry: list[tuple[float, int]] = []
        self._next = 1

    # -- the prefix ------------------------------------------------------------------

    def set_prefix(self, prefix: IPv6Network) -> None:
        if prefix.prefixlen != IPV6_PREFIX_LEN:
            raise InvalidPrefix(prefix, f"must be a /{IPV6_PREFIX_LEN}")
        if self.prefix is not None and self.prefix != prefix:
            raise Conflict(f"{self.eni_id} already has {self.prefix}, not {prefix}")
        self.prefix = prefix
        self._base = int(prefix.network_address)

    def drop_prefix(self, now: float) -> list[Allocation]:
        """EC2 says the /80 is gone: it and every pod's address with it."""
        lost = list(self._allocations.values())
        self._allocations.clear()
        self._egress.clear()
        self._assigned.clear()
        self._cooling.clear()
        self._expiry.clear()
        self.prefix = None
        self._next = 1
        return lost

    # -- the datastore's calls ---------------------------------------------------------

    def holds(self, card: int, address: PodAddress) -> bool:
        return card == 0 and self.prefix is not None and address in self.prefix

    def allocate(
        self,
        key: IpamKey,
        pod: PodRef,
        now: float,
        *,
        cards: Sequence[int] = (0,),
        origin: str = "api",
    ) -> Allocation:
        existing = self._allocations.get(key)
        if existing is not None:
            return existing
        unmanaged = [c for c in cards if c != 0]
        if unmanaged:
            raise UnmanagedCard(unmanaged[0], [0])
        offset = self._take(key, now)
        egress = None
        if self.egress_range is not None:
            taken = self._egress.take(key, now)
            if taken is None:
                del self._assigned[offset]
                raise PoolExhausted(
                    [0], f"every node-local IPv4 of {self.egress_range} is taken or cooling"
                )
            egress = self._egress_address(taken)
        allocation = Allocation(key, pod, (self._lease(offset),), now, origin, egress)
        self._allocations[key] = allocation
        return allocation

    def _give_back(self, allocation: Allocation, now: float, *, cooldown: bool = True) -> None:
        egress = self._egress_offset(allocation.egress_v4)
        if egress is not None:
            self._egress.give_back(egress, allocation.key, now, self.cooldown_s if cooldown else 0)
        for lease in allocation.leases:
            if not self.holds(lease.card, lease.address):
                continue  # the /80 went meanwhile
            offset = int(lease.address) - self._base
            if self._assigned.get(offset) != allocation.key:
                continue
            del self._assigned[offset]
            if cooldown and self.cooldown_s > 0:
                until = now + self.cooldown_s
                self._cooling[offset] = until
                heapq.heappush(self._expiry, (until, offset))

    def restore(self, records: Iterable[AllocationRecord]) -> list[tuple[AllocationRecord, str]]:
        dropped: list[tuple[AllocationRecord, str]] = []
        for record in records:
            if record.key in self._allocations:
                raise Conflict(f"two records for {record.key}")
            outside = [a for a in record.addresses if not self.holds(a.card, a.address)]
            if outside:
                where = self.prefix or "no IPv6 prefix yet"
                dropped.append((record, f"address {outside[0].address} is not in {where}"))
                continue
            offsets = [int(a.address) - self._base for a in record.addresses]
            for offset in offsets:
                owner = self._assigned.get(offset)
                if owner is not None and owner != record.key:
                    raise DuplicateAddress(self._address(offset), (owner, record.key))
            egress = self._egress_offset(record.egress_v4)
            if egress is not None:
                owner = self._egress.claim(egress, record.key)
                if owner is not None:
                    raise DuplicateAddress(record.egress_v4, (owner, record.key))
            for offset in offsets:
                self._assigned[offset] = record.key
                self._cooling.pop(offset, None)  # a restored pod beats a cooling entry
                self._next = max(self._next, offset + 1) % OFFSETS or 1
            leases = tuple(self._lease(o) for o in offsets)
            # A node-local IPv4 outside today's range (ULTRANET_V4_EGRESS_RANGE changed) is
            # no longer tracked; the pod's DEL still removes its veth by name.
            kept = record.egress_v4 if egress is not None else None
            self._allocations[record.key] = Allocation(
                record.key, record.pod, leases, record.allocated_at, record.origin, kept
            )
        return dropped

    # -- numbers -----------------------------------------------------------------------

    def usage(self, now: float) -> Ipv6Usage:
        self._expire(now)
        return Ipv6Usage(len(self._assigned), len(self._cooling), int(self.prefix is not None))

    # -- internals ---------------------------------------------------------------------

    def _take(self, key: IpamKey, now: float) -> int:
        if self.prefix is None:
            raise PoolExhausted([0], f"{self.eni_id} has no IPv6 /{IPV6_PREFIX_LEN} yet")
        self._expire(now)
        if len(self._assigned) + len(self._cooling) >= OFFSETS - 1:
            raise PoolExhausted([0], f"every address of {self.prefix} is taken or cooling")
        while True:
            offset = self._next
            self._next = offset + 1 if offset + 1 < OFFSETS else 1
            if offset not in self._assigned and offset not in self._cooling:
                self._assigned[offset] = key
                return offset

    def _expire(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            until, offset = heapq.heappop(self._expiry)
            if self._cooling.get(offset) == until:
                del self._cooling[offset]

    def _egress_offset(self, address: IPv4Address | None) -> int | None:
        """``address``'s place in the egress range; None if there is none or it is outside."""
        if address is None or self.egress_range is None or address not in self.egress_range:
            return None
        offset = int(address) - int(self.egress_range.network_address)
        return offset if 2 <= offset < self.egress_range.num_addresses - 1 else None

    def _egress_address(self, offset: int) -> IPv4Address:
        assert self.egress_range is not None
        return self.egress_range.network_address + offset

    def _address(self, offset: int) -> IPv6Address:
        return IPv6Address(self._base + offset)

    def _lease(self, offset: int) -> Lease:
        assert self.prefix is not None
        subnet = self.prefix.supernet(new_prefix=IPV6_SUBNET_LEN)
        return Lease(
            card=0,
            address=self._address(offset),
            prefix=self.prefix,
            eni_id=self.eni_id,
            device=0,
            route_table=MAIN_TABLE,
            gateway=subnet.network_address + 1,
            subnet=subnet,
        )


class _Sequence:
    """Offsets ``first``..``end-1`` handed out in order, each back only after a cooldown:
    the node-local IPv4s of IPv6 pods."""

    def __init__(self, end: int, *, first: int) -> None:
        self.first, self.end = first, end
        self._next = first
        self._owner: dict[int, IpamKey] = {}
        self._cooling: dict[int, float] = {}
        self._expiry: list[tuple[float, int]] = []

    def clear(self) -> None:
        self._owner.clear()
        self._cooling.clear()
        self._expiry.clear()

    def take(self, key: IpamKey, now: float) -> int | None:
        while self._expiry and self._expiry[0][0] <= now:
            until, offset = heapq.heappop(self._expiry)
            if self._cooling.get(offset) == until:
                del self._cooling[offset]
        if len(self._owner) + len(self._cooling) >= self.end - self.first:
            return None
        while True:
            offset = self._next
            self._next = offset + 1 if offset + 1 < self.end else self.first
            if offset not in self._owner and offset not in self._cooling:
                self._owner[offset] = key
                return offset

    def give_back(self, offset: int, key: IpamKey, now: float, cooldown_s: float) -> None:
        if self._owner.get(offset) != key:
            return
        del self._owner[offset]
        if cooldown_s > 0:
            self._cooling[offset] = now + cooldown_s
            heapq.heappush(self._expiry, (now + cooldown_s, offset))

    def claim(self, offset: int, key: IpamKey) -> IpamKey | None:
        """Mark ``offset`` as ``key``'s (a restore); the other owner if it has one."""
        owner = self._owner.get(offset)
        if owner is not None and owner != key:
            return owner
        self._owner[offset] = key
        self._cooling.pop(offset, None)
        if offset >= self._next:
            self._next = offset + 1 if offset + 1 < self.end else self.first
        return None
