"""IPv6 prefix mode's pool: /128s from the primary ENI's /80, cooldown, journal, restore."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from cni.keys import IpamKey, PodRef
from ipam.datastore import Datastore, Journal
from ipam.datastore_errors import (
    Conflict,
    DuplicateAddress,
    InvalidPrefix,
    PoolExhausted,
    UnmanagedCard,
)
from ipam.pool6 import OFFSETS, Ipv6PrefixPool
from ipam.protocol import allocation_json, allocation_reply, ok
from ipam.records import AllocationRecord, RecordedAddress

PREFIX = IPv6Network("fd00:ec2:0:1:a1b2::/80")
POD = PodRef("default", "pod")


def key(n: int) -> IpamKey:
    return IpamKey("ultranet", f"c{n:05d}", "eth0")


def pool(cooldown_s: float = 30.0) -> Ipv6PrefixPool:
    made = Ipv6PrefixPool("eni-primary", cooldown_s=cooldown_s)
    made.set_prefix(PREFIX)
    return made


def test_pods_get_consecutive_128s_of_the_80_with_the_lease_the_plumbing_needs() -> None:
    p = pool()
    first = p.allocate(key(1), POD, 0.0).leases[0]
    second = p.allocate(key(2), POD, 0.0).leases[0]
    assert first.address == PREFIX.network_address + 1  # offset 0 is never used
    assert second.address == PREFIX.network_address + 2
    assert (first.card, first.eni_id, first.device, first.prefix) == (0, "eni-primary", 0, PREFIX)
    assert first.subnet == IPv6Network("fd00:ec2:0:1::/64")
    assert p.allocate(key(1), POD, 5.0).leases[0] == first  # a repeated ADD: the same
    assert p.usage(0.0).assigned == 2


def test_no_prefix_yet_is_exhausted_and_other_cards_are_refused() -> None:
    empty = Ipv6PrefixPool("eni-primary", cooldown_s=30)
    with pytest.raises(PoolExhausted, match="no IPv6 /80"):
        empty.allocate(key(1), POD, 0.0)
    assert empty.usage(0.0).free == 0
    with pytest.raises(UnmanagedCard):
        pool().allocate(key(1), POD, 0.0, cards=[0, 1])


def test_the_prefix_must_be_an_80_and_stays_the_same() -> None:
    p = Ipv6PrefixPool("eni-primary", cooldown_s=30)
    with pytest.raises(InvalidPrefix):
        p.set_prefix(IPv6Network("fd00::/64"))
    p.set_prefix(PREFIX)
    p.set_prefix(PREFIX)  # adopting it again is a no-op
    with pytest.raises(Conflict):
        p.set_prefix(IPv6Network("fd00:ec2:0:1:ffff::/80"))


def test_a_released_address_cools_and_is_not_reused_before_the_order_wraps() -> None:
    p = pool(cooldown_s=30)
    address = p.allocate(key(1), POD, 0.0).leases[0].address
    p.release(key(1), 1.0)
    assert (p.usage(1.0).assigned, p.usage(1.0).cooldown) == (0, 1)
    assert p.allocate(key(2), POD, 2.0).leases[0].address != address
    assert p.usage(31.0).cooldown == 0  # cooled
    assert p.release(key(1), 2.0) is None  # DEL is idempotent


def test_after_a_wrap_a_cooling_address_is_still_skipped() -> None:
    p = pool(cooldown_s=30)
    p.allocate(key(1), POD, 0.0)
    p.release(key(1), 0.0)  # offset 1 cools until 30
    p._next = OFFSETS - 1  # the last offset: the next take wraps to 1
    last = p.allocate(key(2), POD, 1.0).leases[0].address
    assert last == PREFIX.network_address + OFFSETS - 1
    wrapped = p.allocate(key(3), POD, 1.0).leases[0].address
    assert wrapped == PREFIX.network_address + 2  # offset 1 is cooling: skipped


def test_a_release_without_cooldown_frees_at_once() -> None:
    p = pool(cooldown_s=30)
    p.allocate(key(1), POD, 0.0)
    p.release(key(1), 0.0, cooldown=False)
    assert p.usage(0.0).cooldown == 0


def test_the_journal_keeps_ipv6_allocations_and_a_restart_restores_them(tmp_path: Path) -> None:
    store = Datastore(pool(), Journal(tmp_path))
    held = [store.allocate(key(n), POD, 0.0, cards=[0]).leases[0].address for n in range(3)]
    store.release(key(1), 1.0)
    store.commit(1.0)
    line = (tmp_path / "allocations.journal").read_bytes().splitlines()[0]
    assert b'"ipv6":"fd00:ec2:0:1:a1b2::1"' in line
    store.close()

    again = pool()
    restarted = Datastore(again, Journal(tmp_path))
    report = restarted.restore()
    assert report.restored == 2 and not report.dropped
    assert {a.leases[0].address for a in again.allocations()} == {held[0], held[2]}
    # The order resumes past the highest restored address: nothing held is handed out.
    assert restarted.allocate(key(9), POD, 2.0, cards=[0]).leases[0].address == held[2] + 1
    # The snapshot the restore wrote reads back too.
    restarted.commit(2.0)
    restarted.close()
    third = pool()
    assert Datastore(third, Journal(tmp_path)).restore().restored == 3


def test_a_record_outside_the_80_is_dropped_and_a_duplicate_refused() -> None:
    outside = AllocationRecord(key(1), POD, (RecordedAddress(0, IPv6Address("fd00::1")),), 0.0)
    v4 = AllocationRecord(key(2), POD, (RecordedAddress(0, IPv4Address("100.64.0.1")),), 0.0)
    p = pool()
    dropped = p.restore([outside, v4])
    assert [r.key for r, _ in dropped] == [key(1), key(2)]
    assert "not in fd00:ec2:0:1:a1b2::/80" in dropped[0][1]
    inside = PREFIX.network_address + 7
    twice = [AllocationRecord(key(n), POD, (RecordedAddress(0, inside),), 0.0) for n in range(3, 5)]
    with pytest.raises(DuplicateAddress):
        pool().restore(twice)


def test_losing_the_prefix_loses_every_allocation() -> None:
    p = pool()
    p.allocate(key(1), POD, 0.0)
    lost = p.drop_prefix(1.0)
    assert [a.key for a in lost] == [key(1)]
    assert p.prefix is None and p.get(key(1)) is None and p.usage(1.0).assigned == 0


# -- node-local IPv4 for egress (ENABLE_V4_EGRESS) -----------------------------------------

EGRESS = IPv4Network("169.254.172.0/29")  # pod addresses .2 .. .6: .0 the range, .1 gateway


def egress_pool(cooldown_s: float = 30.0) -> Ipv6PrefixPool:
    made = Ipv6PrefixPool("eni-primary", cooldown_s=cooldown_s, egress_range=EGRESS)
    made.set_prefix(PREFIX)
    return made


def test_each_pod_also_gets_a_node_local_ipv4_in_order_never_the_gateway() -> None:
    p = egress_pool()
    got = [p.allocate(key(n), POD, 0.0).egress_v4 for n in range(5)]
    assert got == [IPv4Address(f"169.254.172.{i}") for i in range(2, 7)]
    assert pool().allocate(key(1), POD, 0.0).egress_v4 is None  # egress off: none


def test_a_full_egress_range_refuses_the_pod_and_takes_nothing() -> None:
    p = egress_pool()
    for n in range(5):
        p.allocate(key(n), POD, 0.0)
    before = p.usage(0.0).assigned
    with pytest.raises(PoolExhausted, match="node-local IPv4"):
        p.allocate(key(9), POD, 0.0)
    assert p.usage(0.0).assigned == before and p.get(key(9)) is None
    p.release(key(2), 1.0)  # cools 30 s
    with pytest.raises(PoolExhausted):
        p.allocate(key(9), POD, 2.0)
    assert p.allocate(key(9), POD, 31.0).egress_v4 == IPv4Address("169.254.172.4")


def test_egress_addresses_are_journaled_and_restored(tmp_path: Path) -> None:
    store = Datastore(egress_pool(), Journal(tmp_path))
    held = {n: store.allocate(key(n), POD, 0.0, cards=[0]).egress_v4 for n in range(3)}
    store.commit(0.0)
    assert b'"egressV4":"169.254.172.2"' in (tmp_path / "allocations.journal").read_bytes()
    store.close()
    again = egress_pool()
    Datastore(again, Journal(tmp_path)).restore()
    assert {n: again.get(key(n)).egress_v4 for n in range(3)} == held  # type: ignore[union-attr]
    assert again.allocate(key(7), POD, 1.0).egress_v4 == IPv4Address("169.254.172.5")
    twice = [
        AllocationRecord(
            key(n),
            POD,
            (RecordedAddress(0, PREFIX.network_address + n),),
            0.0,
            egress_v4=IPv4Address("169.254.172.3"),
        )
        for n in (1, 2)
    ]
    with pytest.raises(DuplicateAddress):
        egress_pool().restore(twice)


def test_the_socket_api_shows_the_node_local_ipv4_both_ways() -> None:
    allocation = egress_pool().allocate(key(1), POD, 0.0)
    fast = json.loads(allocation_reply(allocation)[4:])
    assert fast == ok(allocation_json(allocation))
    assert fast["result"]["egress_v4"] == "169.254.172.2"
    assert "egress_v4" not in allocation_json(pool().allocate(key(1), POD, 0.0))
