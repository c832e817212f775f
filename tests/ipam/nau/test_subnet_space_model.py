"""SubnetSpace against a plain model of EC2's rules, over seeded random operation sequences.

The allocator keeps per-block counters and index sets so that reservations are bulk
updates; the model keeps one state per address and recomputes everything from it. After
every operation the two must agree on what failed, on the stats and on every address;
at checkpoints a copy of the space is drained, which shows exactly which addresses and
prefixes it still considered pickable (a block missing from an internal pool would never
be handed out, and the drain would miss it).
"""

from __future__ import annotations

import copy
import functools
import random
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

import pytest

from ipam.errors import (
    AddressUnavailable,
    InsufficientCidrBlocks,
    InsufficientFreeAddresses,
    NoRoomForPrefix,
    ReservationConflict,
    SubnetSpaceError,
)
from ipam.nau.subnet_space import AWS_RESERVED_HEAD, BLOCK, ReservationKind, SubnetSpace

SUBNET = IPv4Network("100.64.0.0/24")  # 16 blocks: small enough to fill, drain and fragment
BASE = int(SUBNET.network_address)
SIZE = SUBNET.num_addresses

FREE, AWS, ADDRESS, PREFIX = "free", "aws", "address", "prefix"


class Model:
    """One state and one reservation kind per address; every answer recomputed from them."""

    def __init__(self) -> None:
        self.slot = [FREE] * SIZE
        for offset in [*range(AWS_RESERVED_HEAD), SIZE - 1]:
            self.slot[offset] = AWS
        self.resv = [ReservationKind.NONE] * SIZE
        self.reservations: list[IPv4Network] = []

    def block(self, block: int) -> range:
        return range(block * BLOCK, block * BLOCK + BLOCK)

    def pickable_addresses(self) -> set[int]:
        return {
            o for o in range(SIZE) if self.slot[o] == FREE and self.resv[o] is ReservationKind.NONE
        }

    def free_block(self, block: int) -> bool:
        return all(self.slot[o] == FREE for o in self.block(block))

    def general_blocks(self) -> set[int]:
        return {
            b
            for b in range(SIZE // BLOCK)
            if self.free_block(b)
            and all(self.resv[o] is ReservationKind.NONE for o in self.block(b))
        }

    def reserved_blocks(self) -> set[int]:
        return {
            b
            for b in range(SIZE // BLOCK)
            if self.free_block(b)
            and all(self.resv[o] is ReservationKind.PREFIX for o in self.block(b))
        }

    def free(self) -> int:
        return self.slot.count(FREE)

    def expected_stats(self) -> tuple[int, int, int, int]:
        """(free, free_blocks, prefixes, addresses)"""
        return (
            self.free(),
            len(self.general_blocks()) + len(self.reserved_blocks()),
            self.slot.count(PREFIX) // BLOCK,
            self.slot.count(ADDRESS),
        )


def offset(address: IPv4Address) -> int:
    return int(address) - BASE


def network(block: int) -> IPv4Network:
    return IPv4Network((BASE + block * BLOCK, 28))


class Run:
    """Applies one random operation to the space and the model, checking the answer."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.space = SubnetSpace(SUBNET, rng=random.Random(seed + 1000))
        self.model = Model()
        self.addresses: list[int] = []
        self.prefixes: list[int] = []

    def operations(self) -> list[Callable[[], None]]:
        return [
            self.allocate_address,
            self.allocate_address,
            self.claim_address,
            self.release_address,
            self.allocate_prefix,
            self.allocate_prefix,
            self.claim_prefix,
            self.release_prefix,
            self.reserve,
            self.unreserve,
        ]

    def step(self) -> None:
        self.rng.choice(self.operations())()
        stats = self.space.stats()
        assert (stats.free, stats.free_blocks, stats.prefixes, stats.addresses) == (
            self.model.expected_stats()
        )

    def compare_addresses(self) -> None:
        assert [self.space.is_free(IPv4Address(BASE + o)) for o in range(SIZE)] == [
            s == FREE for s in self.model.slot
        ]

    # -- addresses -----------------------------------------------------------------------

    def allocate_address(self) -> None:
        pickable = self.model.pickable_addresses()
        if not pickable:
            with pytest.raises(InsufficientFreeAddresses):
                self.space.allocate_address()
            return
        got = offset(self.space.allocate_address())
        assert got in pickable
        self.model.slot[got] = ADDRESS
        self.addresses.append(got)

    def claim_address(self) -> None:
        wanted = self.rng.randrange(SIZE)
        if self.model.slot[wanted] != FREE:
            with pytest.raises(AddressUnavailable):
                self.space.claim_address(IPv4Address(BASE + wanted))
            return
        self.space.claim_address(IPv4Address(BASE + wanted))  # explicit reservations allow it
        self.model.slot[wanted] = ADDRESS
        self.addresses.append(wanted)

    def release_address(self) -> None:
        if not self.addresses:
            return
        gone = self.addresses.pop(self.rng.randrange(len(self.addresses)))
        if self.rng.random() < 0.5:
            self.space.release_address(IPv4Address(BASE + gone))
        else:
            self.space.release_address_offset(gone)
        self.model.slot[gone] = FREE

    # -- prefixes --------------------------------------------------------------------------

    def allocate_prefix(self) -> None:
        reserved, general = self.model.reserved_blocks(), self.model.general_blocks()
        if not reserved and not general:
            expected = NoRoomForPrefix if self.model.free() < BLOCK else InsufficientCidrBlocks
            with pytest.raises(expected):
                self.space.allocate_prefix()
            return
        if self.rng.random() < 0.5:
            got = self.space.allocate_block()
        else:
            net = self.space.allocate_prefix()
            assert net.prefixlen == 28
            got = offset(net.network_address) // BLOCK
        assert got in (reserved or general)  # prefix reservations first
        for o in self.model.block(got):
            self.model.slot[o] = PREFIX
        self.prefixes.append(got)

    def claim_prefix(self) -> None:
        block = self.rng.randrange(SIZE // BLOCK)
        if not self.model.free_block(block):
            with pytest.raises(AddressUnavailable):
                self.space.claim_prefix(network(block))
            return
        assert self.space.claim_prefix(network(block)) == network(block)
        for o in self.model.block(block):
            self.model.slot[o] = PREFIX
        self.prefixes.append(block)

    def release_prefix(self) -> None:
        if not self.prefixes:
            return
        block = self.prefixes.pop(self.rng.randrange(len(self.prefixes)))
        if self.rng.random() < 0.5:
            self.space.release_prefix(network(block))
        else:
            self.space.release_block(block)
        for o in self.model.block(block):
            self.model.slot[o] = FREE

    # -- reservations ------------------------------------------------------------------------

    def reserve(self) -> None:
        length = self.rng.choice([24, 26, 27, 28, 28, 29, 30, 32])
        net = IPv4Network((BASE + self.rng.randrange(SIZE), length), strict=False)
        kind = self.rng.choice([ReservationKind.PREFIX, ReservationKind.EXPLICIT])
        if any(r.overlaps(net) for r in self.model.reservations):
            with pytest.raises(ReservationConflict, match="overlaps"):
                self.space.reserve(net, kind)
            return
        self.space.reserve(net, kind)
        self.model.reservations.append(net)
        for o in range(offset(net.network_address), offset(net.broadcast_address) + 1):
            self.model.resv[o] = kind

    def unreserve(self) -> None:
        if not self.model.reservations:
            return
        net = self.model.reservations.pop(self.rng.randrange(len(self.model.reservations)))
        self.space.unreserve(net)
        for o in range(offset(net.network_address), offset(net.broadcast_address) + 1):
            self.model.resv[o] = ReservationKind.NONE

    # -- drain a copy ---------------------------------------------------------------------------

    def drain_prefixes(self) -> None:
        """A copy hands out the prefix reservations' free blocks, then the others, then fails."""
        space = copy.deepcopy(self.space)
        reserved, general = self.model.reserved_blocks(), self.model.general_blocks()
        first = {space.allocate_block() for _ in reserved}
        rest = {space.allocate_block() for _ in general}
        assert (first, rest) == (reserved, general)
        with pytest.raises(SubnetSpaceError):
            space.allocate_block()

    def drain_addresses(self) -> None:
        """A copy hands out exactly the free addresses in no reservation, then fails."""
        space = copy.deepcopy(self.space)
        pickable = self.model.pickable_addresses()
        got = {space.allocate_address_offset() for _ in pickable}
        assert got == pickable
        with pytest.raises(InsufficientFreeAddresses):
            space.allocate_address()


SEEDS = range(10)


@functools.cache
def states_seen(seed: int) -> Counter[str]:
    """Run 400 checked steps (draining copies every 50); count the states they went through."""
    run, seen = Run(seed), Counter[str]()
    for step in range(1, 401):
        run.step()
        m = run.model
        general, reserved = m.general_blocks(), m.reserved_blocks()
        seen["no prefix"] += not general and not reserved
        seen["InsufficientCidrBlocks"] += not general and not reserved and m.free() >= BLOCK
        seen["free blocks in prefix reservations"] += bool(reserved)
        seen["reserved address in use"] += any(
            m.resv[o] is not ReservationKind.NONE and m.slot[o] != FREE for o in range(SIZE)
        )
        if step % 50 == 0:
            run.compare_addresses()
            run.drain_prefixes()
            run.drain_addresses()
    return seen


@pytest.mark.parametrize("seed", SEEDS)
def test_space_matches_the_model(seed: int) -> None:
    states_seen(seed)


def test_the_sequences_reach_the_interesting_states() -> None:
    """The runs above are worth little unless they fill, fragment and reserve."""
    seen = sum((states_seen(seed) for seed in SEEDS), Counter[str]())
    wanted = (
        "no prefix",
        "InsufficientCidrBlocks",
        "free blocks in prefix reservations",
        "reserved address in use",
    )
    assert all(seen[k] > 0 for k in wanted), seen
