"""The shared aligned-/28 allocator: EC2's subnet rules."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from ipam.errors import (
    AddressUnavailable,
    InsufficientCidrBlocks,
    InsufficientFreeAddresses,
    ReservationConflict,
)
from ipam.subnet_space import BLOCK, ReservationKind, SubnetSpace


def test_five_addresses_are_reserved_by_aws() -> None:
    space = SubnetSpace("100.64.0.0/24")
    assert space.stats().usable == 256 - 5
    assert space.gateway == IPv4Address("100.64.0.1")
    for reserved in ("100.64.0.0", "100.64.0.1", "100.64.0.2", "100.64.0.3", "100.64.0.255"):
        assert not space.is_free(IPv4Address(reserved))
        with pytest.raises(AddressUnavailable, match=reserved):
            space.claim_address(reserved)


def test_prefixes_never_come_from_blocks_holding_reserved_addresses() -> None:
    space = SubnetSpace("100.64.0.0/24", rng=random.Random(1))
    prefixes = [space.allocate_prefix() for _ in range(14)]
    assert len(set(prefixes)) == 14
    for prefix in prefixes:
        assert prefix.prefixlen == 28
        assert prefix not in (IPv4Network("100.64.0.0/28"), IPv4Network("100.64.0.240/28"))
    with pytest.raises(InsufficientCidrBlocks, match="100.64.0.0/24"):
        space.allocate_prefix()


def test_fragmented_subnet_refuses_prefixes_while_addresses_remain() -> None:
    space = SubnetSpace("100.64.1.0/24")
    for block in range(16):
        space.claim_address(IPv4Address(int(IPv4Address("100.64.1.0")) + block * BLOCK + 8))
    stats = space.stats()
    assert stats.free > 200
    assert stats.free_blocks == 0
    assert stats.stranded == stats.free
    with pytest.raises(InsufficientCidrBlocks, match="not enough free cidr blocks"):
        space.allocate_prefix()
    space.release_address("100.64.1.40")
    assert space.allocate_prefix() == IPv4Network("100.64.1.32/28")


def test_prefix_reservation_is_used_first_and_cures_fragmentation() -> None:
    space = SubnetSpace("100.64.2.0/24", rng=random.Random(7))
    space.reserve("100.64.2.128/26", ReservationKind.PREFIX)
    got = {space.allocate_prefix() for _ in range(4)}
    assert got == set(IPv4Network("100.64.2.128/26").subnets(new_prefix=28))
    # Single addresses never land in a reservation.
    for _ in range(150):
        assert space.allocate_address() not in IPv4Network("100.64.2.128/26")


def test_explicit_reservation_only_by_name() -> None:
    space = SubnetSpace("100.64.3.0/28")
    space.reserve("100.64.3.8/29", ReservationKind.EXPLICIT)
    taken = {space.allocate_address() for _ in range(4)}
    assert taken == {IPv4Address(f"100.64.3.{i}") for i in (4, 5, 6, 7)}
    with pytest.raises(InsufficientFreeAddresses, match="100.64.3.0/28"):
        space.allocate_address()
    assert space.claim_address("100.64.3.9") == IPv4Address("100.64.3.9")


def test_overlapping_reservations_are_refused() -> None:
    space = SubnetSpace("100.64.4.0/24")
    space.reserve("100.64.4.0/26", ReservationKind.PREFIX)
    with pytest.raises(ReservationConflict, match="overlaps"):
        space.reserve("100.64.4.32/27", ReservationKind.EXPLICIT)
    with pytest.raises(ReservationConflict, match="not inside"):
        space.reserve("100.64.5.0/28", ReservationKind.PREFIX)


def test_claim_and_release_round_trip_keeps_counts() -> None:
    space = SubnetSpace("198.18.0.0/20", rng=random.Random(3))
    before = space.stats()
    prefix = space.claim_prefix("198.18.0.16/28")
    with pytest.raises(AddressUnavailable, match="overlaps"):
        space.claim_prefix("198.18.0.16/28")
    with pytest.raises(AddressUnavailable, match="in use"):
        space.claim_address("198.18.0.20")
    addresses = [space.allocate_address() for _ in range(100)]
    assert len(set(addresses)) == 100
    assert space.stats().used == 100 + BLOCK
    for address in addresses:
        space.release_address(address)
    space.release_prefix(prefix)
    assert space.stats() == before
    with pytest.raises(AddressUnavailable, match="not assigned"):
        space.release_prefix(prefix)


def test_unreserve_returns_blocks_to_the_general_pool() -> None:
    space = SubnetSpace("100.64.6.0/26", rng=random.Random(2))
    space.reserve("100.64.6.16/28", ReservationKind.EXPLICIT)
    space.reserve("100.64.6.32/28", ReservationKind.EXPLICIT)
    with pytest.raises(InsufficientCidrBlocks):
        space.allocate_prefix()
    space.unreserve("100.64.6.16/28")
    assert space.allocate_prefix() == IPv4Network("100.64.6.16/28")


@pytest.mark.parametrize("cidr", ["100.64.0.0/15", "100.64.0.0/29", "100.64.0.0/32"])
def test_subnet_sizes_outside_ec2_limits_are_refused(cidr: str) -> None:
    with pytest.raises(ValueError, match="between /16 and /28"):
        SubnetSpace(cidr)
