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
from ipam.nau.subnet_space import BLOCK, ReservationKind, SubnetSpace


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


def test_automatic_addresses_are_uniform_over_the_free_ones() -> None:
    # /27: block 0 keeps one free address (15) once 4..14 are claimed, block 1 has 15
    # (16..30). Uniform over addresses gives 15 one pick in 16; uniform over blocks would
    # give it one in 2.
    picks = []
    for seed in range(3_200):
        space = SubnetSpace("100.64.7.0/27", rng=random.Random(seed))
        for last in range(4, 15):
            space.claim_address(f"100.64.7.{last}")
        picks.append(int(space.allocate_address()) & 31)
    assert set(picks) == {15, *range(16, 31)}
    assert 100 < picks.count(15) < 300  # 200 expected, sd 14


def test_block_and_offset_calls_are_the_prefix_and_address_calls() -> None:
    space = SubnetSpace("100.64.8.0/24", rng=random.Random(4))
    block = space.allocate_block()
    prefix = IPv4Network((int(IPv4Address("100.64.8.0")) + block * BLOCK, 28))
    assert not space.is_free(prefix.network_address)
    with pytest.raises(AddressUnavailable, match="overlaps"):
        space.claim_prefix(prefix)
    space.release_block(block)
    assert space.is_free(prefix.network_address)
    with pytest.raises(AddressUnavailable, match=f"prefix {prefix} is not assigned"):
        space.release_prefix(prefix)
    with pytest.raises(AddressUnavailable, match="block 16 is not in subnet 100.64.8.0/24"):
        space.release_block(16)
    offset = space.allocate_address_offset()
    address = IPv4Address(int(IPv4Address("100.64.8.0")) + offset)
    assert not space.is_free(address)
    space.release_address_offset(offset)
    with pytest.raises(AddressUnavailable, match=f"address {address} is not assigned"):
        space.release_address(address)
    with pytest.raises(AddressUnavailable, match="offset -1 is not in subnet"):
        space.release_address_offset(-1)
    assert space.stats().used == 0


def test_reserving_over_an_address_in_use_frees_its_block_for_prefixes_on_release() -> None:
    space = SubnetSpace("100.64.9.0/24", rng=random.Random(5))
    space.claim_address("100.64.9.20")
    space.reserve("100.64.9.16/28", ReservationKind.PREFIX)
    space.reserve("100.64.9.64/26", ReservationKind.EXPLICIT)
    assert space.stats().free_blocks == 16 - 2 - 1 - 4  # AWS's two, the one in use, explicit
    space.release_address("100.64.9.20")
    assert space.allocate_prefix() == IPv4Network("100.64.9.16/28")  # reservations first
    for _ in range(space.stats().free - 4 * BLOCK):  # everything outside the reservations
        assert space.allocate_address() not in IPv4Network("100.64.9.64/26")
    with pytest.raises(InsufficientFreeAddresses):
        space.allocate_address()
    space.unreserve("100.64.9.64/26")
    assert space.allocate_address() in IPv4Network("100.64.9.64/26")


def test_counters_out_of_step_are_reported_not_looped_on() -> None:
    space = SubnetSpace("100.64.10.0/28")
    for _ in range(11):
        space.allocate_address()
    space._open_blocks.add(0)  # a block with nothing free, claimed to hold a free address
    with pytest.raises(RuntimeError, match="out of step"):
        space.allocate_address()
