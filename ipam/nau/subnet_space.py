"""The address space of one VPC subnet, allocated the way EC2 allocates it.

One implementation serves the cloud emulator (`tools/lab`) and the NAU planner's
simulator (`ipam.nau.simulate`), so a simulated fragmentation failure is the same
failure the emulator would answer to boto3.

EC2 rules modelled (VPC User Guide, "Subnet CIDR blocks" and "Subnet CIDR reservations";
EC2 User Guide, "Prefix delegation for Amazon EC2 network interfaces"; links in
``ipam/nau/README.md``, Sources):

* the first four addresses and the last one are reserved by AWS;
* an IPv4 prefix is an aligned /28 whose sixteen addresses are all free, so a subnet
  can answer ``InsufficientCidrBlocks`` while it still has free addresses;
* automatic prefix assignment draws from ``prefix`` CIDR reservations first, and
  automatic address assignment never draws from a reservation; ``explicit``
  reservations are only ever used by naming the address;
* automatic choices are spread over the subnet (EC2 does not fill from the bottom),
  which is what fragments real subnets. The choice is uniform over what the rules
  allow, random with a seedable generator so simulations and tests are reproducible.

Pure logic: no I/O. State is kept per address in byte arrays and per aligned /28
("block") in counters and index sets, so an address or a prefix costs O(1) and a
reservation costs O(blocks it covers) plus a bulk byte copy; a /16 costs about 350 KB.
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


# What each address is, in ``SubnetSpace._slot``. Plain ints rather than an enum: the hot
# paths read them millions of times and an enum member costs a lookup each time.
_FREE = 0
_AWS = 1  # reserved by AWS, never assignable
_ADDRESS = 2  # assigned as a single address
_PREFIX = 3  # part of an assigned /28
_UNRESERVED = int(ReservationKind.NONE)  # in ``SubnetSpace._resv``

_MAX_DRAWS = 1000  # see SubnetSpace._pick_open_address

_FREE_BLOCK = bytes([_FREE]) * BLOCK
_PREFIX_BLOCK = bytes([_PREFIX]) * BLOCK
_PREFIX_RESERVED_BLOCK = bytes([ReservationKind.PREFIX]) * BLOCK


class _IndexSet:
    """A set of integers in ``range(capacity)`` with O(1) add, remove and random pick.

    ``items`` holds the members in storage order (read it, never write it): hot paths
    test ``len(s.items)`` rather than ``len(s)``, which costs a Python call.
    """

    __slots__ = ("items", "_pos")

    def __init__(self, capacity: int, *, full: bool = False) -> None:
        if full:
            self.items = array("l", range(capacity))
            self._pos = array("l", range(capacity))
        else:
            self.items = array("l")
            self._pos = array("l", [-1]) * capacity

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, value: int) -> bool:
        return self._pos[value] >= 0

    def add(self, value: int) -> None:
        if self._pos[value] < 0:
            self._pos[value] = len(self.items)
            self.items.append(value)

    def discard(self, value: int) -> None:
        pos = self._pos[value]
        if pos < 0:
            return
        last = self.items.pop()
        if last != value:
            self.items[pos] = last
            self._pos[last] = pos
        self._pos[value] = -1

    def pick(self, rng: random.Random) -> int:
        """A member, each equally likely (``len(self)`` > 0)."""
        items = self.items
        # random() scaled is randrange's distribution to within 2**-37 for a /16's 65,536
        # members, at half its cost.
        return items[int(rng.random() * len(items))]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.items))


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
    """Addresses and /28 prefixes of one subnet. Raises ``SubnetSpaceError`` subclasses.

    The ``*_block`` methods are the same operations on a /28's index in the subnet
    (``block * 16`` is its first address's offset); the simulator uses them to skip
    building ``ipaddress`` objects it does not need.
    """

    def __init__(self, cidr: IPv4Network | str, *, rng: random.Random | None = None) -> None:
        net = IPv4Network(cidr)
        if not 16 <= net.prefixlen <= PREFIX_LEN:
            raise ValueError(f"subnet {net} must be between /16 and /28")
        self.cidr = net
        self._name = str(net)
        self._rng = rng if rng is not None else random.Random(int(net.network_address))
        self._base = int(net.network_address)
        self._size = size = net.num_addresses
        self._usable = size - AWS_RESERVED_HEAD - 1
        blocks = size // BLOCK
        self._slot = bytearray(size)  # _FREE, _AWS, _ADDRESS or _PREFIX per address
        self._resv = bytearray(size)  # ReservationKind per address
        self._block_used = array("H", [0]) * blocks  # addresses not FREE in the block
        self._block_resv = array("H", [0]) * blocks  # addresses reserved in the block
        # free addresses in no reservation: what allocate_address may pick from
        self._block_open = array("H", [BLOCK]) * blocks
        self._open_blocks = _IndexSet(blocks, full=True)  # blocks whose _block_open > 0
        self._free_blocks = _IndexSet(blocks, full=True)  # fully free, no reservation
        self._free_resv_blocks = _IndexSet(blocks)  # fully free, inside prefix reservations
        self._reservations: list[Reservation] = []
        self._prefixes = 0
        self._addresses = 0
        for offset in [*range(AWS_RESERVED_HEAD), size - 1]:
            self._take(offset, _AWS)

    # -- queries -----------------------------------------------------------------

    @property
    def gateway(self) -> IPv4Address:
        """The VPC router's address: the network address plus one."""
        return IPv4Address(self._base + 1)

    @property
    def reservations(self) -> tuple[Reservation, ...]:
        return tuple(self._reservations)

    def stats(self) -> SpaceStats:
        used = self._addresses + self._prefixes * BLOCK
        return SpaceStats(
            usable=self._usable,
            used=used,
            free=self._usable - used,
            free_blocks=len(self._free_blocks) + len(self._free_resv_blocks),
            prefixes=self._prefixes,
            addresses=self._addresses,
        )

    def is_aws_reserved(self, address: IPv4Address) -> bool:
        """One of the five addresses AWS keeps: never assignable."""
        return self._slot[self._offset(address)] == _AWS

    def is_free(self, address: IPv4Address) -> bool:
        return self._slot[self._offset(address)] == _FREE

    # -- single addresses --------------------------------------------------------

    def allocate_address(self) -> IPv4Address:
        """An address chosen as EC2 does for SecondaryPrivateIpAddressCount."""
        return IPv4Address(self._base + self.allocate_address_offset())

    def allocate_address_offset(self) -> int:
        """:meth:`allocate_address`, answered as the address's offset in the subnet."""
        if not self._open_blocks.items:
            raise InsufficientFreeAddresses(f"no free IPv4 address left in subnet {self._name}")
        offset = self._pick_open_address()
        self._take(offset, _ADDRESS)
        self._addresses += 1
        return offset

    def claim_address(self, address: IPv4Address | str) -> IPv4Address:
        """Assign a named address (PrivateIpAddresses); explicit reservations allow this."""
        addr = IPv4Address(address)
        offset = self._offset(addr)
        if self._slot[offset] != _FREE:
            raise AddressUnavailable(f"address {addr} is in use or reserved in subnet {self.cidr}")
        self._take(offset, _ADDRESS)
        self._addresses += 1
        return addr

    def release_address(self, address: IPv4Address | str) -> None:
        self.release_address_offset(self._offset(IPv4Address(address)))

    def release_address_offset(self, offset: int) -> None:
        """:meth:`release_address` of the address at ``offset`` in the subnet."""
        if not 0 <= offset < self._size:
            raise AddressUnavailable(f"offset {offset} is not in subnet {self.cidr}")
        if self._slot[offset] != _ADDRESS:
            address = IPv4Address(self._base + offset)
            raise AddressUnavailable(f"address {address} is not assigned in subnet {self.cidr}")
        self._give(offset)
        self._addresses -= 1

    # -- /28 prefixes ------------------------------------------------------------

    def allocate_prefix(self) -> IPv4Network:
        """A /28 chosen as EC2 does for Ipv4PrefixCount: prefix reservations first."""
        return self._block_network(self.allocate_block())

    def allocate_block(self) -> int:
        """:meth:`allocate_prefix`, answered as the /28's index in the subnet."""
        pool = self._free_resv_blocks if self._free_resv_blocks.items else self._free_blocks
        if not pool.items:
            free = self._usable - self._addresses - self._prefixes * BLOCK
            if free < BLOCK:
                raise NoRoomForPrefix(
                    "There aren't sufficient free Ipv4 addresses or prefixes in subnet "
                    f"{self._name} ({free} addresses free)"
                )
            raise InsufficientCidrBlocks(
                f"There are not enough free cidr blocks in the specified subnet {self._name} "
                f"to satisfy the request ({free} addresses free, none of them "
                "an aligned, fully free /28)"
            )
        block = pool.pick(self._rng)
        self._take_block(block)
        return block

    def claim_prefix(self, prefix: IPv4Network | str) -> IPv4Network:
        """Assign a named /28 (Ipv4Prefixes)."""
        net = IPv4Network(prefix)
        if net.prefixlen != PREFIX_LEN:
            raise AddressUnavailable(f"prefix {net} is not a /{PREFIX_LEN}")
        block = self._offset(net.network_address) // BLOCK
        if self._block_used[block]:  # counts every address not FREE, AWS's included
            raise AddressUnavailable(f"prefix {net} overlaps assigned or reserved addresses")
        self._take_block(block)
        return net

    def release_prefix(self, prefix: IPv4Network | str) -> None:
        net = IPv4Network(prefix)
        first = self._offset(net.network_address)
        if net.prefixlen != PREFIX_LEN:
            raise AddressUnavailable(f"prefix {net} is not assigned in subnet {self.cidr}")
        self.release_block(first // BLOCK)

    def release_block(self, block: int) -> None:
        """:meth:`release_prefix` of the /28 at index ``block`` in the subnet."""
        if not 0 <= block < self._size // BLOCK:
            raise AddressUnavailable(f"block {block} is not in subnet {self.cidr}")
        if self._slot[block * BLOCK] != _PREFIX:
            raise AddressUnavailable(
                f"prefix {self._block_network(block)} is not assigned in subnet {self.cidr}"
            )
        self._give_block(block)

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
        self._mark(net, kind)
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
        self._mark(net, ReservationKind.NONE)

    # -- internals ---------------------------------------------------------------

    def _offset(self, address: IPv4Address) -> int:
        offset = int(address) - self._base
        if not 0 <= offset < self._size:
            raise AddressUnavailable(f"address {address} is not in subnet {self.cidr}")
        return offset

    def _block_network(self, block: int) -> IPv4Network:
        return IPv4Network((self._base + block * BLOCK, PREFIX_LEN))

    def _pick_open_address(self) -> int:
        """A free address in no reservation, every one equally likely.

        Rejection sampling: draw one of the 16 addresses of one of the blocks holding
        such an address and retry when the draw is taken or reserved. Each candidate is
        drawn with the same chance, so the answer is uniform; at most 16 draws are
        expected (a block in the set holds at least one candidate), and the chance of
        needing more than ``_MAX_DRAWS`` is below (15/16)**1000, about 1e-28: running out
        means the counters are wrong, which is reported rather than looped on.
        """
        blocks, slot, resv = self._open_blocks.items, self._slot, self._resv
        random_ = self._rng.random
        draws = len(blocks) * BLOCK
        for _ in range(_MAX_DRAWS):
            draw = int(random_() * draws)  # as in _IndexSet.pick
            offset = blocks[draw // BLOCK] * BLOCK + draw % BLOCK
            if slot[offset] == _FREE and resv[offset] == _UNRESERVED:
                return offset
        raise RuntimeError(f"subnet {self._name}: free-address counters out of step")

    def _take(self, offset: int, slot: int) -> None:
        """One address stops being FREE."""
        self._slot[offset] = slot
        block = offset // BLOCK
        if self._resv[offset] == _UNRESERVED:
            self._block_open[block] -= 1
            if self._block_open[block] == 0:
                self._open_blocks.discard(block)
        self._block_used[block] += 1
        if self._block_used[block] == 1:
            self._free_blocks.discard(block)
            self._free_resv_blocks.discard(block)

    def _give(self, offset: int) -> None:
        """One address becomes FREE again."""
        self._slot[offset] = _FREE
        block = offset // BLOCK
        if self._resv[offset] == _UNRESERVED:
            self._block_open[block] += 1
            if self._block_open[block] == 1:
                self._open_blocks.add(block)
        self._block_used[block] -= 1
        if self._block_used[block] == 0:
            self._file_free_block(block)

    def _take_block(self, block: int) -> None:
        """A fully free block becomes a prefix."""
        first = block * BLOCK
        self._slot[first : first + BLOCK] = _PREFIX_BLOCK
        self._block_used[block] = BLOCK
        if self._block_open[block]:
            self._block_open[block] = 0
            self._open_blocks.discard(block)
        self._free_blocks.discard(block)
        self._free_resv_blocks.discard(block)
        self._prefixes += 1

    def _give_block(self, block: int) -> None:
        """A prefix's block becomes fully free again."""
        first = block * BLOCK
        self._slot[first : first + BLOCK] = _FREE_BLOCK
        self._block_used[block] = 0
        open_ = BLOCK - self._block_resv[block]
        self._block_open[block] = open_
        if open_:
            self._open_blocks.add(block)
        self._file_free_block(block)
        self._prefixes -= 1

    def _mark(self, net: IPv4Network, kind: ReservationKind) -> None:
        """Set the reservation of every address of ``net``, which all had another kind.

        ``kind`` is the new one: reserving moves ``NONE`` to a kind, unreserving a kind to
        ``NONE``; reservations never overlap, so no address changes between two kinds.
        One byte copy for the addresses, then one step per block.
        """
        first = self._offset(net.network_address)
        count = net.num_addresses
        self._resv[first : first + count] = bytes([kind]) * count
        sign = 1 if kind != ReservationKind.NONE else -1
        if count < BLOCK:  # a /29 to /32: part of one block
            self._mark_span(first // BLOCK, first, count, sign)
            return
        for block in range(first // BLOCK, (first + count) // BLOCK):  # aligned, whole blocks
            self._mark_span(block, block * BLOCK, BLOCK, sign)

    def _mark_span(self, block: int, lo: int, count: int, sign: int) -> None:
        """Counters and pools of ``block`` after its addresses ``lo``.. were (un)reserved."""
        used = self._block_used[block]
        free = count if used == 0 else self._slot.count(_FREE, lo, lo + count)
        self._block_resv[block] += sign * count
        if free:
            open_ = self._block_open[block] - sign * free
            self._block_open[block] = open_
            if open_ == 0:
                self._open_blocks.discard(block)
            elif open_ == free and sign < 0:
                self._open_blocks.add(block)
        if used == 0:
            self._free_blocks.discard(block)
            self._free_resv_blocks.discard(block)
            self._file_free_block(block)

    def _file_free_block(self, block: int) -> None:
        """Put a block that just became fully free (in no pool) where its reservations allow."""
        first = block * BLOCK
        if self._block_resv[block] == 0:
            self._free_blocks.add(block)
        elif (
            self._block_resv[block] == BLOCK
            and self._resv[first : first + BLOCK] == _PREFIX_RESERVED_BLOCK
        ):
            self._free_resv_blocks.add(block)
