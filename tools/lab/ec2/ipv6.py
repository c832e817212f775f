"""IPv6 address space of the emulated VPC: the lab's /56s, and a subnet /64's addresses and /80s.

AWS gives a VPC an IPv6 /56 (from its own pool, or BYOIP / IPAM) and each subnet a /64 of
it; an interface takes single /128 addresses and, on Nitro types, delegated /80 prefixes
(EC2 User Guide, "Assign prefixes to Amazon EC2 network interfaces": IPv6 prefixes are
/80). The lab never uses global addresses: the "Amazon-provided" /56 is drawn from
fd00::/8, the unique-local range (RFC 4193), so nothing the lab configures can be routed
off the machine.

A subnet's space keeps the IPv4 rule for AWS's own addresses (the first four and the last
of the block are not handed out) and never lets an address and a prefix overlap, so an
address and a /80 of one subnet are always on one interface or the other, as EC2 keeps them.
Automatic picks are random (seeded), as EC2's are.
"""

from __future__ import annotations

import random
from ipaddress import IPv6Address, IPv6Network

from tools.lab.ec2.errors import Ec2Error, invalid

UNIQUE_LOCAL = IPv6Network("fd00::/8")
VPC_PREFIXLEN = 56
SUBNET_PREFIXLEN = 64
PREFIX_LEN = 80  # EC2's delegated IPv6 prefix
_PREFIXES_PER_SUBNET = 1 << (PREFIX_LEN - SUBNET_PREFIXLEN)
_RESERVED_LOW = 4  # as in IPv4: network, router, DNS, future use
_RANDOM_TRIES = 64


def random_vpc_block(rng: random.Random, taken: set[IPv6Network]) -> IPv6Network:
    """A /56 inside fd00::/8 that no other VPC of the lab has."""
    while True:
        bits = rng.getrandbits(VPC_PREFIXLEN - 8) << (128 - VPC_PREFIXLEN)
        block = IPv6Network((int(UNIQUE_LOCAL.network_address) | bits, VPC_PREFIXLEN))
        if block not in taken:
            return block


def parse_block(text: str, prefixlen: int, noun: str) -> IPv6Network:
    """A CIDR the lab accepts for a VPC (/56) or subnet (/64): unique-local only."""
    try:
        block = IPv6Network(text)
    except ValueError as err:
        raise invalid(f"The IPv6 CIDR '{text}' is invalid: {err}") from None
    if block.prefixlen != prefixlen:
        raise invalid(f"The IPv6 CIDR '{block}' is invalid: a {noun} takes a /{prefixlen}")
    if not block.subnet_of(UNIQUE_LOCAL):
        raise invalid(
            f"The IPv6 CIDR '{block}' is outside fd00::/8: the lab uses unique-local addresses only"
        )
    return block


def parse_address(text: str) -> IPv6Address:
    try:
        return IPv6Address(text)
    except ValueError:
        raise invalid(f"Invalid IPv6 address: {text}") from None


def parse_prefix(text: str) -> IPv6Network:
    try:
        prefix = IPv6Network(text)
    except ValueError as err:
        raise invalid(f"Invalid IPv6 prefix: {text} ({err})") from None
    if prefix.prefixlen != PREFIX_LEN:
        raise invalid(f"Invalid IPv6 prefix: {text}: EC2 delegates /{PREFIX_LEN} prefixes")
    return prefix


class Ipv6SubnetSpace:
    """The addresses and /80 prefixes handed out of one subnet's /64."""

    def __init__(self, cidr: IPv6Network, rng: random.Random) -> None:
        if cidr.prefixlen != SUBNET_PREFIXLEN:
            raise ValueError(f"a subnet's IPv6 block is a /{SUBNET_PREFIXLEN}, not {cidr}")
        self.cidr = cidr
        self._rng = rng
        self._addresses: set[IPv6Address] = set()
        self._prefix_indexes: set[int] = set()
        # How many taken addresses fall in each /80: a prefix is free only when none does.
        self._addresses_in: dict[int, int] = {}

    @property
    def addresses_used(self) -> int:
        return len(self._addresses)

    @property
    def prefixes_used(self) -> int:
        return len(self._prefix_indexes)

    def _index(self, address: IPv6Address) -> int:
        return (int(address) - int(self.cidr.network_address)) >> (128 - PREFIX_LEN)

    def _prefix(self, index: int) -> IPv6Network:
        base = int(self.cidr.network_address) + (index << (128 - PREFIX_LEN))
        return IPv6Network((base, PREFIX_LEN))

    def is_aws_reserved(self, address: IPv6Address) -> bool:
        offset = int(address) - int(self.cidr.network_address)
        return offset < _RESERVED_LOW or address == self.cidr.broadcast_address

    def _usable(self, address: IPv6Address) -> bool:
        return (
            address not in self._addresses
            and not self.is_aws_reserved(address)
            and self._index(address) not in self._prefix_indexes
        )

    def allocate_address(self) -> IPv6Address:
        base = int(self.cidr.network_address)
        for _ in range(_RANDOM_TRIES):
            address = IPv6Address(base + self._rng.getrandbits(128 - SUBNET_PREFIXLEN))
            if self._usable(address):
                return self._take(address)
        # 64 misses in a /64 means nearly every /80 is delegated: look in the free ones.
        for index in range(_PREFIXES_PER_SUBNET):
            if index in self._prefix_indexes:
                continue
            start = int(self._prefix(index).network_address)
            for offset in range(_RANDOM_TRIES):
                address = IPv6Address(start + offset)
                if self._usable(address):
                    return self._take(address)
        raise Ec2Error(
            "InsufficientFreeAddressesInSubnet",
            f"There are not enough free IPv6 addresses in subnet block {self.cidr}",
        )

    def claim_address(self, address: IPv6Address) -> IPv6Address:
        if address not in self.cidr:
            raise invalid(f"Address {address} is not in the subnet's IPv6 block {self.cidr}")
        if self.is_aws_reserved(address):
            raise invalid(f"Address {address} is in {self.cidr}'s reserved address range")
        if address in self._addresses or self._index(address) in self._prefix_indexes:
            raise Ec2Error("InvalidIPAddress.InUse", f"Address {address} is already in use")
        return self._take(address)

    def _take(self, address: IPv6Address) -> IPv6Address:
        self._addresses.add(address)
        index = self._index(address)
        self._addresses_in[index] = self._addresses_in.get(index, 0) + 1
        return address

    def release_address(self, address: IPv6Address) -> None:
        self._addresses.discard(address)
        index = self._index(address)
        left = self._addresses_in.get(index, 0) - 1
        if left > 0:
            self._addresses_in[index] = left
        else:
            self._addresses_in.pop(index, None)

    def _prefix_free(self, index: int) -> bool:
        # The first and last /80 hold AWS's reserved addresses.
        return (
            0 < index < _PREFIXES_PER_SUBNET - 1
            and index not in self._prefix_indexes
            and index not in self._addresses_in
        )

    def allocate_prefix(self) -> IPv6Network:
        for _ in range(_RANDOM_TRIES):
            index = self._rng.randrange(_PREFIXES_PER_SUBNET)
            if self._prefix_free(index):
                self._prefix_indexes.add(index)
                return self._prefix(index)
        for index in range(_PREFIXES_PER_SUBNET):
            if self._prefix_free(index):
                self._prefix_indexes.add(index)
                return self._prefix(index)
        raise Ec2Error(
            "InsufficientCidrBlocks",
            f"There are not enough free /{PREFIX_LEN} blocks in subnet block {self.cidr}",
        )

    def claim_prefix(self, prefix: IPv6Network) -> IPv6Network:
        if not prefix.subnet_of(self.cidr):
            raise invalid(f"Prefix {prefix} is not in the subnet's IPv6 block {self.cidr}")
        index = self._index(prefix.network_address)
        if not self._prefix_free(index):
            raise Ec2Error(
                "InvalidParameterValue",
                f"Prefix {prefix} overlaps an address or prefix already in use, or AWS's "
                "reserved addresses",
            )
        self._prefix_indexes.add(index)
        return prefix

    def release_prefix(self, prefix: IPv6Network) -> None:
        self._prefix_indexes.discard(self._index(prefix.network_address))
