"""The node's address pool: bin-packing, cooldown, multi-NIC all or nothing, restore."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from cni.backend import MAIN_TABLE
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
    UnmanagedCard,
)
from ipam.pool import AddressPool, EniInfo, route_table
from ipam.records import AllocationRecord, RecordedAddress

SUBNET = IPv4Network("100.64.0.0/18")
POD = PodRef("default", "web")


def key(n: int, ifname: str = "eth0") -> IpamKey:
    return IpamKey("ultranet", f"c{n:04d}", ifname)


def eni(card: int = 0, device: int = 0, max_prefixes: int = 9) -> EniInfo:
    return EniInfo(
        eni_id=f"eni-{card:02d}{device:02d}",
        card=card,
        device=device,
        subnet=SUBNET,
        primary_ip=IPv4Address(int(SUBNET.network_address) + 100 * card + device + 10),
        max_prefixes=max_prefixes,
    )


def prefix(n: int) -> IPv4Network:
    return IPv4Network((int(SUBNET.network_address) + 4096 + 16 * n, 28))


def pool_with(
    prefixes: int, *, cooldown_s: float = 30.0, cards: tuple[int, ...] = (0,)
) -> AddressPool:
    pool = AddressPool(cards, cooldown_s=cooldown_s)
    n = 0
    for card in cards:
        info = eni(card)
        pool.card(card).add_eni(info)
        for _ in range(prefixes):
            pool.card(card).add_prefix(info.eni_id, prefix(n))
            n += 1
    return pool


def test_route_tables_follow_the_vpc_cni() -> None:
    assert route_table(0, 0) == MAIN_TABLE
    assert route_table(0, 1) == 2
    assert route_table(0, 4) == 5
    assert route_table(1, 1) == 10101
    assert route_table(31, 1) == 13101
    tables = {route_table(c, d) for c in range(32) for d in range(4)}
    assert len(tables) == 32 * 4  # no two (card, device) share a table


def test_pods_pack_into_the_fullest_prefix() -> None:
    pool = pool_with(3)
    first = pool.allocate(key(0), POD, 0.0).leases[0]
    for n in range(1, 16):
        lease = pool.allocate(key(n), POD, 0.0).leases[0]
        assert lease.prefix == first.prefix  # the first prefix fills before another is opened
    seventeenth = pool.allocate(key(16), POD, 0.0).leases[0]
    assert seventeenth.prefix != first.prefix
    # Free most of the first prefix: new pods still go where they pack best.
    for n in range(0, 10):
        pool.release(key(n), 0.0)
    later = pool.allocate(key(100), POD, 100.0).leases[0]
    assert later.prefix == first.prefix  # 6 pods (+ cooldown expired) beats 1 pod


def test_packing_frees_whole_prefixes_for_release() -> None:
    rng = random.Random(4)
    pool = pool_with(8)
    live: set[IpamKey] = set()
    now = 0.0
    for step in range(2000):
        now += 1.0
        if live and (len(live) > 40 or rng.random() < 0.5):
            gone = rng.choice(sorted(live, key=str))
            pool.release(gone, now)
            live.discard(gone)
        else:
            k = key(step)
            pool.allocate(k, POD, now)
            live.add(k)
    usage = pool.card(0).usage(now + 31)
    needed = -(-usage.assigned // 16)
    # With packing, the pods occupy nearly the minimum number of prefixes.
    assert usage.prefixes - usage.releasable_prefixes <= needed + 2


def test_released_addresses_cool_down_and_count_as_used() -> None:
    pool = pool_with(1, cooldown_s=30.0)
    held = [pool.allocate(key(n), POD, 0.0) for n in range(16)]
    with pytest.raises(PoolExhausted) as excinfo:
        pool.allocate(key(99), POD, 0.0)
    assert excinfo.value.cards == (0,)
    released = held[3].leases[0].address
    pool.release(key(3), 10.0)
    usage = pool.card(0).usage(10.0)
    assert (usage.assigned, usage.cooldown, usage.releasable_prefixes) == (15, 1, 0)
    with pytest.raises(PoolExhausted, match="1 in cooldown"):
        pool.allocate(key(99), POD, 39.9)
    again = pool.allocate(key(99), POD, 40.0).leases[0]
    assert again.address == released


def test_zero_cooldown_reuses_at_once() -> None:
    pool = pool_with(1, cooldown_s=0.0)
    first = pool.allocate(key(1), POD, 0.0).leases[0].address
    pool.release(key(1), 0.0)
    assert pool.allocate(key(2), POD, 0.0).leases[0].address == first


def test_allocate_is_idempotent_per_key_and_release_too() -> None:
    pool = pool_with(1)
    a = pool.allocate(key(1), POD, 0.0)
    assert pool.allocate(key(1), POD, 5.0) is a
    assert pool.release(key(1), 6.0) == a
    assert pool.release(key(1), 7.0) is None
    assert pool.card(0).usage(7.0).assigned == 0


def test_lease_carries_what_the_plumbing_needs() -> None:
    pool = AddressPool([0], cooldown_s=0)
    secondary = eni(0, 2)
    pool.card(0).add_eni(secondary)
    pool.card(0).add_prefix(secondary.eni_id, prefix(0))
    lease = pool.allocate(key(1), POD, 0.0).leases[0]
    assert lease.address in prefix(0)
    assert lease.eni_id == secondary.eni_id
    assert lease.device == 2 and lease.route_table == 3
    assert lease.gateway == IPv4Address("100.64.0.1")
    assert lease.subnet == SUBNET


def test_multi_nic_allocation_is_all_or_nothing() -> None:
    pool = pool_with(1, cards=(0, 1, 2))
    for n in range(16):  # fill card 1 only
        pool.card(1).take(key(1000 + n), 0.0)
    before = [pool.card(c).usage(0.0) for c in (0, 1, 2)]
    with pytest.raises(PoolExhausted) as excinfo:
        pool.allocate(key(1), POD, 0.0, cards=(0, 1, 2))
    assert excinfo.value.cards == (1,)
    assert "card 1" in str(excinfo.value)
    assert [pool.card(c).usage(0.0) for c in (0, 1, 2)] == before
    assert pool.get(key(1)) is None
    fine = pool.allocate(key(2), POD, 0.0, cards=(0, 2))
    assert [lease.card for lease in fine.leases] == [0, 2]
    with pytest.raises(UnmanagedCard, match="card 7"):
        pool.allocate(key(3), POD, 0.0, cards=(0, 7))


def test_prefix_and_eni_bookkeeping_refuses_what_cannot_be_true() -> None:
    pool = pool_with(1)
    card = pool.card(0)
    with pytest.raises(Conflict):
        card.add_eni(eni(0, 0))
    with pytest.raises(InvalidEni):
        card.add_eni(eni(1, 1))  # a card 1 ENI in card 0's pool
    with pytest.raises(Conflict):
        card.add_prefix("eni-0000", prefix(0))
    with pytest.raises(InvalidPrefix):
        card.add_prefix("eni-0000", IPv4Network("100.64.1.0/27"))
    with pytest.raises(InvalidPrefix):
        card.add_prefix("eni-0000", IPv4Network("100.65.0.0/28"))  # outside the subnet
    with pytest.raises(UnknownEni):
        card.add_prefix("eni-9999", prefix(5))
    with pytest.raises(InvalidEni):
        EniInfo("eni-x", 0, 0, SUBNET, IPv4Address("100.65.0.1"), 9)
    small = AddressPool([0], cooldown_s=0)
    small.card(0).add_eni(eni(0, 0, max_prefixes=1))
    small.card(0).add_prefix("eni-0000", prefix(0))
    with pytest.raises(InvalidPrefix, match="already holds 1"):
        small.card(0).add_prefix("eni-0000", prefix(1))


def test_releasable_prefixes_exclude_pods_and_cooldown() -> None:
    pool = pool_with(3, cooldown_s=30)
    pool.allocate(key(1), POD, 0.0)
    pool.allocate(key(2), POD, 0.0)
    card = pool.card(0)
    used = pool.get(key(1))
    assert used is not None
    busy = used.leases[0].prefix
    assert busy not in card.releasable_prefixes(0.0)
    assert len(card.releasable_prefixes(0.0)) == 2
    with pytest.raises(PrefixInUse):
        card.remove_prefix(busy)
    pool.release(key(1), 1.0)
    pool.release(key(2), 1.0)
    assert busy not in card.releasable_prefixes(30.9)  # still cooling
    assert busy in card.releasable_prefixes(31.0)
    card.remove_prefix(busy)
    assert card.usage(31.0).prefixes == 2


def test_force_removing_an_eni_loses_its_pods_on_every_card() -> None:
    pool = pool_with(1, cards=(0, 1), cooldown_s=30)
    both = pool.allocate(key(1), POD, 0.0, cards=(0, 1))
    with pytest.raises(EniInUse):
        pool.remove_eni(1, "eni-0100", 1.0)
    lost = pool.remove_eni(1, "eni-0100", 1.0, force=True)
    assert lost == [both]
    assert pool.get(key(1)) is None
    usage = pool.card(0).usage(1.0)
    assert (usage.assigned, usage.cooldown) == (0, 1)  # card 0's lease went into cooldown


def test_restore_readopts_records_and_drops_those_whose_prefix_is_gone() -> None:
    pool = pool_with(2)
    records = [
        AllocationRecord(key(1), POD, (RecordedAddress(0, prefix(1).network_address + 3),), 5.0),
        AllocationRecord(key(2), POD, (RecordedAddress(0, IPv4Address("100.64.50.5")),), 6.0),
        AllocationRecord(key(3), POD, (RecordedAddress(4, prefix(0).network_address + 1),), 7.0),
    ]
    dropped = pool.restore(records)
    assert [(r.key, reason.split()[0]) for r, reason in dropped] == [
        (key(2), "address"),
        (key(3), "network"),
    ]
    restored = pool.get(key(1))
    assert restored is not None and restored.leases[0].address == prefix(1).network_address + 3
    # A new pod never gets a restored address.
    addresses = {pool.allocate(key(10 + n), POD, 10.0).leases[0].address for n in range(31)}
    assert prefix(1).network_address + 3 not in addresses
    with pytest.raises(PoolExhausted):
        pool.allocate(key(99), POD, 10.0)


def test_restore_refuses_two_owners_of_one_address() -> None:
    pool = pool_with(1)
    address = prefix(0).network_address + 2
    records = [
        AllocationRecord(key(1), POD, (RecordedAddress(0, address),), 1.0),
        AllocationRecord(key(2), POD, (RecordedAddress(0, address),), 2.0),
    ]
    with pytest.raises(DuplicateAddress, match=str(address)):
        pool.restore(records)


def test_random_operations_never_hand_out_an_address_twice() -> None:
    rng = random.Random(11)
    pool = pool_with(4, cards=(0, 1), cooldown_s=5)
    live: dict[IpamKey, set[IPv4Address]] = {}
    now = 0.0
    for step in range(3000):
        now += rng.random()
        if live and rng.random() < 0.45:
            gone = rng.choice(sorted(live, key=str))
            pool.release(gone, now)
            del live[gone]
            continue
        cards = (0, 1) if rng.random() < 0.3 else (rng.choice((0, 1)),)
        try:
            allocation = pool.allocate(key(step), POD, now, cards=cards)
        except PoolExhausted:
            continue
        addresses = {lease.address for lease in allocation.leases}
        for held in live.values():
            assert not addresses & held
        live[allocation.key] = addresses
    for card in (0, 1):
        assert pool.card(card).usage(now).assigned == sum(
            1 for a in pool.allocations() for lease in a.leases if lease.card == card
        )
