"""A crash inside a journal snapshot taken while commits run on a worker thread.

With a slow disk the daemon syncs each batch on a worker thread and keeps staging the next
batch meanwhile (``NodeAgent._commit_on_thread``), so a snapshot due after one batch finds
lines staged, not yet durable. The files as they stand at a point of ``Journal.snapshot``
are what a ``kill -9`` there leaves: the test copies them at that point and starts over
from the copy.
"""

from __future__ import annotations

import shutil
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

import ipam.datastore
from cni.keys import IpamKey, PodRef
from ipam.datastore import Datastore, Journal
from ipam.pool import AddressPool, EniInfo

SUBNET = IPv4Network("100.64.0.0/18")
PREFIX = IPv4Network("100.64.1.0/28")
POD = PodRef("default", "web")


def key(n: int) -> IpamKey:
    return IpamKey("ultranet", f"c{n:05d}", "eth0")


def one_prefix_pool() -> AddressPool:
    # Cooldown 0 (IP_COOLDOWN_PERIOD=0): a released address may be handed out at once.
    pool = AddressPool([0], cooldown_s=0.0)
    info = EniInfo("eni-0001", 0, 0, SUBNET, IPv4Address("100.64.0.10"), 9)
    pool.card(0).add_eni(info)
    pool.card(0).add_prefix(info.eni_id, PREFIX)
    return pool


@pytest.mark.parametrize("point", ["snapshot-written", "snapshot-renamed"])
def test_a_crash_inside_a_snapshot_with_lines_staged_keeps_one_owner_per_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    live = tmp_path / "live"
    crashed = tmp_path / "crashed"

    def crash_here(name: str) -> None:
        if name == point and not crashed.exists():
            shutil.copytree(live, crashed)  # what kill -9 at this instant leaves on disk

    monkeypatch.setattr(ipam.datastore, "pause_point", crash_here)
    store = Datastore(one_prefix_pool(), Journal(live), snapshot_every=16)
    store.restore()
    shutil.rmtree(crashed)  # the start's own snapshot is not the one under test
    held = {n: store.allocate(key(n), POD, 0.0).leases[0].address for n in range(15)}
    store.commit(0.0)  # 15 lines, acknowledged
    store.allocate(key(15), POD, 1.0)

    batch = store.take_batch()  # on its way to disk on the worker thread...
    store.write_batch(batch)
    # ...while the loop applies the next requests: a release and an allocation that
    # reuses its address, staged, not yet durable, never acknowledged.
    store.release(key(0), 2.0)
    reused = store.allocate(key(99), POD, 2.0).leases[0].address
    assert reused == held[0]
    store.finish_batch(batch, None, 3.0)  # 16 lines: a snapshot is due
    assert crashed.exists()
    store.close()

    after = Datastore(one_prefix_pool(), Journal(crashed))
    after.restore()  # raised Conflict: c00000 and c00099 both on one address
    restored = {a.key: a.leases[0].address for a in after.pool.allocations()}
    for n in range(1, 15):
        assert restored[key(n)] == held[n]  # acknowledged: kept
    owners = [k for k, address in restored.items() if address == held[0]]
    assert len(owners) == 1, owners
    assert set(restored) <= {key(n) for n in range(16)} | {key(99)}
