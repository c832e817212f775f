"""The address space of one VPC subnet, allocated the way EC2 allocates it.

One implementation serves the cloud emulator (`tools/lab`) and the NAU planner's
simulator (`ipam.nau.simulate`), so a simulated fragmentation failure is the same
failure the emulator would answer to boto3.

EC2 rules modelled (VPC User Guide, "Subnet CIDR blocks" and "Assign prefixes to
network interfaces"; facts in shared/research/nau.md §2):

* the first four addresses and the last one are reserved by AWS;
* an IPv4 prefix is an aligned /28 whose sixteen addresses are all free, so a subnet
  can answer ``InsufficientCidrBlocks`` while it still has free addresses;
* automatic prefix assignment draws from ``prefix`` CIDR reservations first, and
  automatic address assignment never draws from a reservation; ``explicit``
  reservations are only ever used by naming the address;
* automatic choices are spread over the subnet (EC2 does not fill from the bottom),
  which is what fragments real subnets. The choice is random with a seedable
  generator so simulations and tests are reproducible.

Pure logic: no I/O. Sets of free addresses and free blocks are kept as index sets
over flat arrays, so every operation is O(1) and a /16 costs about 1 MB.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address, IPv4Network

from ipam.errors import (
    AddressUnavailable,
    InsufficientCidrBlocks,
    InsufficientFreeAddresses,
    NoRoomForPrefix,
    ReservationConflict,
)

PREFIX_LEN = 28
BLOCK = 1 << (32 - PREFIX_LEN)  # 16 addresses in a /28
AWS_RESERVED_HEAD = 4  # network, VPC router, DNS, future use


class ReservationKind(IntEnum):
    NONE = 0
    PREFIX = 1
    EXPLICIT = 2


class _Slot(IntEnum):
    FREE = 0
    AWS = 1  # reserved by AWS, never assignable
    ADDRESS = 2  # assigned as a single address
    PREFIX = 3  # part of an assigned /28


class _IndexSet:
    """A set of integers in ``range(capacity)`` with O(1) add, remove and random pick."""

    __slots__ = ("_items", "_pos")

    def __init__(self, capacity: int, *, full: bool = False) -> None:
        if full:
            self._items = array("l", range(capacity))
            self._pos = array("l", range(capacity))
        else:
            self._items = array("l")
            self._pos = array("l", [-1]) * capacity

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, value: int) -> bool:
        return self._pos[value] >= 0

    def add(self, value: int) -> None:
        if self._pos[value] < 0:
            self._pos[value] = len(self._items)
            self._items.append(value)

    def discard(self, value: int) -> None:
        pos = self._pos[value]
        if pos < 0:
            return
        last = self._items.pop()
        if last != value:
            self._items[pos] = last
            self._pos[last] = pos
        self._pos[value] = -1

    def pick(self, rng: random.Random) -> int:
        return self._items[rng.randrange(len(self._items))]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._items))


@dataclass(frozen=True, slots=True)
class Reservation:
    cidr: IPv4Network
    kind: ReservationKind


@dataclass(frozen=True, slots=True)
class SpaceStats:
    usable: int  # addresses minus the five AWS reserves
    used: int  # assigned addresses, prefixes counted as 16
    free: int  # what DescribeSubnets calls AvailableIpAddressCount
    free_blocks: int  # aligned /28s that could still become prefixes
    prefixes: int  # /28 prefixes assigned
    addresses: int  # single addresses assigned

    @property
    def stranded(self) -> int:
        """Free addresses that can never be part of a prefix: fragmentation's cost."""
        return self.free - self.free_blocks * BLOCK


class SubnetSpace:
    """Addresses and /28 prefixes of one subnet. Raises ``SubnetSpaceError`` subclasses."""

    def __init__(self, cidr: IPv4Network | str, *, rng: random.Random | None = None) -> None:
        net = IPv4Network(cidr)
        if not 16 <= net.prefixlen <= PREFIX_LEN:
            raise ValueError(f"subnet {net} must be between /16 and /28")
        self.cidr = net
        self._rng = rng if rng is not None else random.Random(int(net.network_address))
        self._base = int(net.network_address)
        size = net.num_addresses
        self._slot = bytearray(size)
        self._resv = bytearray(size)
        self._block_used = array("H", [0]) * (size // BLOCK)
        self._block_resv = array("H", [0]) * (size // BLOCK)  # addresses reserved in the block
        self._free_addresses = _IndexSet(size, full=True)  # free and not in any reservation
        self._free_blocks = _IndexSet(size // BLOCK, full=True)  # fully free, no reservation
        self._free_resv_blocks = _IndexSet(size // BLOCK)  # fully free, inside prefix reservations
        self._reservations: list[Reservation] = []
        self._prefixes = 0
        self._addresses = 0
        for offset in [*range(AWS_RESERVED_HEAD), size - 1]:
            self._take(offset, _Slot.AWS)

    # -- queries -----------------------------------------------------------------

    @property
    def gateway(self) -> IPv4Address:
        """The VPC router's address: the network address plus one."""
        return IPv4Address(self._base + 1)

    @property
    def reservations(self) -> tuple[Reservation, ...]:
        return tuple(self._reservations)

    def stats(self) -> SpaceStats:
        usable = self.cidr.num_addresses - AWS_RESERVED_HEAD - 1
        used = self._addresses + self._prefixes * BLOCK
        return SpaceStats(
            usable=usable,
            used=used,
            free=usable - used,
            free_blocks=len(self._free_blocks) + len(self._free_resv_blocks),
            prefixes=self._prefixes,
            addresses=self._addresses,
        )

    def is_aws_reserved(self, address: IPv4Address) -> bool:
        """One of the five addresses AWS keeps: never assignable."""
        return self._slot[self._offset(address)] == _Slot.AWS

    def is_free(self, address: IPv4Address) -> bool:
        return self._slot[self._offset(address)] == _Slot.FREE

    # -- single addresses --------------------------------------------------------

    def allocate_address(self) -> IPv4Address:
        """An address chosen as EC2 does for SecondaryPrivateIpAddressCount."""
        if not self._free_addresses:
            raise InsufficientFreeAddresses(f"no free IPv4 address left in subnet {self.cidr}")
        offset = self._free_addresses.pick(self._rng)
        self._take(offset, _Slot.ADDRESS)
        self._addresses += 1
        return IPv4Address(self._base + offset)

    def claim_address(self, address: IPv4Address | str) -> IPv4Address:
        """Assign a named address (PrivateIpAddresses); explicit reservations allow this."""
        addr = IPv4Address(address)
        offset = self._offset(addr)
        if self._slot[offset] != _Slot.FREE:
            raise AddressUnavailable(f"address {addr} is in use or reserved in subnet {self.cidr}")
        self._take(offset, _Slot.ADDRESS)
        self._addresses += 1
        return addr

    def release_address(self, address: IPv4Address | str) -> None:
        offset = self._offset(IPv4Address(address))
        if self._slot[offset] != _Slot.ADDRESS:
            raise AddressUnavailable(f"address {address} is not assigned in subnet {self.cidr}")
        self._give(offset)
        self._addresses -= 1

    # -- /28 prefixes ------------------------------------------------------------

    def allocate_prefix(self) -> IPv4Network:
        """A /28 chosen as EC2 does for Ipv4PrefixCount: prefix reservations first."""
        pool = self._free_resv_blocks if self._free_resv_blocks else self._free_blocks
        if not pool and self.stats().free < BLOCK:
            raise NoRoomForPrefix(
                f"There aren't sufficient free Ipv4 addresses or prefixes in subnet {self.cidr} "
                f"({self.stats().free} addresses free)"
            )
        if not pool:
            raise InsufficientCidrBlocks(
                f"There are not enough free cidr blocks in the specified subnet {self.cidr} "
                f"to satisfy the request ({self.stats().free} addresses free, none of them "
                "an aligned, fully free /28)"
            )
        block = pool.pick(self._rng)
        self._take_block(block)
        return self._block_network(block)

    def claim_prefix(self, prefix: IPv4Network | str) -> IPv4Network:
        """Assign a named /28 (Ipv4Prefixes)."""
        net = IPv4Network(prefix)
        if net.prefixlen != PREFIX_LEN:
            raise AddressUnavailable(f"prefix {net} is not a /{PREFIX_LEN}")
        first = self._offset(net.network_address)
        block = first // BLOCK
        if self._block_used[block] or any(
            self._slot[o] != _Slot.FREE for o in range(first, first + BLOCK)
        ):
            raise AddressUnavailable(f"prefix {net} overlaps assigned or reserved addresses")
        self._take_block(block)
        return net

    def release_prefix(self, prefix: IPv4Network | str) -> None:
        net = IPv4Network(prefix)
        first = self._offset(net.network_address)
        if net.prefixlen != PREFIX_LEN or self._slot[first] != _Slot.PREFIX:
            raise AddressUnavailable(f"prefix {net} is not assigned in subnet {self.cidr}")
        for offset in range(first, first + BLOCK):
            self._give(offset)
        self._prefixes -= 1

    # -- reservations (CreateSubnetCidrReservation) -------------------------------

    def reserve(self, cidr: IPv4Network | str, kind: ReservationKind) -> Reservation:
        net = IPv4Network(cidr)
        if not net.subnet_of(self.cidr):
            raise ReservationConflict(f"reservation {net} is not inside subnet {self.cidr}")
        if kind is ReservationKind.NONE:
            raise ReservationConflict("reservation kind must be prefix or explicit")
        for existing in self._reservations:
            if existing.cidr.overlaps(net):
                raise ReservationConflict(f"reservation {net} overlaps {existing.cidr}")
        first = self._offset(net.network_address)
        for offset in range(first, first + net.num_addresses):
            self._set_reservation(offset, kind)
        reservation = Reservation(net, kind)
        self._reservations.append(reservation)
        return reservation

    def unreserve(self, cidr: IPv4Network | str) -> None:
        """Drop a reservation. Addresses in use stay in use, as in EC2."""
        net = IPv4Network(cidr)
        match = [r for r in self._reservations if r.cidr == net]
        if not match:
            raise ReservationConflict(f"no reservation {net} in subnet {self.cidr}")
        self._reservations.remove(match[0])
        first = self._offset(net.network_address)
        for offset in range(first, first + net.num_addresses):
            self._set_reservation(offset, ReservationKind.NONE)

    # -- internals ---------------------------------------------------------------

    def _offset(self, address: IPv4Address) -> int:
        offset = int(address) - self._base
        if not 0 <= offset < len(self._slot):
            raise AddressUnavailable(f"address {address} is not in subnet {self.cidr}")
        return offset

    def _block_network(self, block: int) -> IPv4Network:
        return IPv4Network((self._base + block * BLOCK, PREFIX_LEN))

    def _take(self, offset: int, slot: _Slot) -> None:
        self._slot[offset] = slot
        self._free_addresses.discard(offset)
        block = offset // BLOCK
        self._block_used[block] += 1
        if self._block_used[block] == 1:
            self._free_blocks.discard(block)
            self._free_resv_blocks.discard(block)

    def _give(self, offset: int) -> None:
        self._slot[offset] = _Slot.FREE
        if self._resv[offset] == ReservationKind.NONE:
            self._free_addresses.add(offset)
        block = offset // BLOCK
        self._block_used[block] -= 1
        if self._block_used[block] == 0:
            self._file_free_block(block)

    def _take_block(self, block: int) -> None:
        first = block * BLOCK
        for offset in range(first, first + BLOCK):
            self._take(offset, _Slot.PREFIX)
        self._prefixes += 1

    def _set_reservation(self, offset: int, kind: ReservationKind) -> None:
        block = offset // BLOCK
        was = self._resv[offset]
        self._resv[offset] = kind
        self._block_resv[block] += (kind != ReservationKind.NONE) - (was != ReservationKind.NONE)
        if self._slot[offset] == _Slot.FREE:
            if kind == ReservationKind.NONE:
                self._free_addresses.add(offset)
            else:
                self._free_addresses.discard(offset)
        if self._block_used[block] == 0:
            self._file_free_block(block)

    def _file_free_block(self, block: int) -> None:
        """Put a fully free block in the pool its reservations allow, if any."""
        self._free_blocks.discard(block)
        self._free_resv_blocks.discard(block)
        first = block * BLOCK
        if self._block_resv[block] == 0:
            self._free_blocks.add(block)
        elif self._block_resv[block] == BLOCK and all(
            self._resv[o] == ReservationKind.PREFIX for o in range(first, first + BLOCK)
        ):
            self._free_resv_blocks.add(block)
