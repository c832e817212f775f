"""The node agent against the lab: start from IMDS alone, warm targets, release, cooldown,
multi-NIC, throttling, fragmented subnets, stale IMDS."""

from __future__ import annotations

import asyncio
import threading
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from ipam import agent as agent_module
from ipam.datastore import Batch
from ipam.datastore_errors import PoolExhausted
from tests.conftest import LabFactory
from tests.ipam.agentenv import POD, AgentRun, ManualClock, agent_in, key
from tests.ipam.test_hostnet import rules
from tests.lab.helpers import ec2_client
from tools.lab.lab import CNI_SUBNET_TAG, LabConfig, SubnetSpec

pytestmark = pytest.mark.netns


def ec2_prefixes(lab: object, eni_id: str) -> set[IPv4Network]:
    return set(lab.cloud.eni(eni_id).prefixes)  # type: ignore[attr-defined]


def test_start_from_imds_alone_is_ready_with_no_ec2_call(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=1))
    lab.cloud.requests.clear()
    with agent_in(lab, tmp_path) as run:
        assert run.agent._ready.is_set()
        assert not run.agent.ec2_used
        assert lab.cloud.requests.count() == 0
        primary = lab.cloud.enis_of(lab.instance_id)[0]
        allocation = run.run(run.agent.allocate(key(1), POD, multi_nic=False))
        assert allocation.leases[0].prefix in set(primary.prefixes)  # type: ignore[attr-defined]
        assert lab.cloud.requests.count() == 0  # the allocation path calls nothing either


# (pods, env, launch prefixes) -> (prefixes held after converging, ENIs used)
WARM_CASES = [
    (0, {}, 1, 1, 1),  # WARM_PREFIX_TARGET=1: one free prefix, already there
    (16, {}, 1, 2, 1),  # the first prefix is full: one more free one
    (40, {}, 1, 4, 1),  # 3 prefixes hold 40 pods, plus one free
    (0, {"WARM_PREFIX_TARGET": "3"}, 1, 3, 1),
    (5, {"WARM_IP_TARGET": "20"}, 1, 2, 1),  # 5 used + 20 warm = 25 -> 2 prefixes
    (0, {"MINIMUM_IP_TARGET": "100", "WARM_IP_TARGET": "1"}, 1, 7, 1),
    (100, {"WARM_PREFIX_TARGET": "1"}, 1, 8, 1),  # 7 full-ish + 1 free, still one ENI
    (150, {"WARM_PREFIX_TARGET": "1"}, 1, 11, 2),  # past the primary's 9 slots: a second ENI
]


@pytest.mark.parametrize(("pods", "env", "launch", "prefixes", "enis"), WARM_CASES)
def test_warm_targets(
    lab_factory: LabFactory,
    tmp_path: Path,
    pods: int,
    env: dict[str, str],
    launch: int,
    prefixes: int,
    enis: int,
) -> None:
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=launch))
    with agent_in(lab, tmp_path, {"IP_COOLDOWN_PERIOD": "0", **env}) as run:
        run.converge()
        run.allocate_pods(pods)
        run.converge()
        usage = run.agent.pool.card(0).usage(run.clock())  # type: ignore[union-attr]
        assert (usage.prefixes, usage.enis) == (prefixes, enis)
        # EC2 agrees with the pool, ENI by ENI.
        for info in run.agent.pool.card(0).enis:  # type: ignore[union-attr]
            pooled = set(run.agent.pool.card(0).prefixes_of(info.eni_id))  # type: ignore[union-attr]
            assert pooled == ec2_prefixes(lab, info.eni_id)


def test_prefixes_beyond_the_target_go_back_after_cooldown(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=1))
    clock = ManualClock()
    with agent_in(lab, tmp_path, {"IP_COOLDOWN_PERIOD": "30"}, clock) as run:
        run.allocate_pods(40)
        run.converge()
        assert run.agent.pool.card(0).usage(clock()).prefixes == 4  # type: ignore[union-attr]
        for n in range(40):
            run.run(run.agent.release(key(n)))
        # In cooldown the released addresses count as used: nothing is released yet.
        assert run.agent.plan(0).release_prefixes == 0
        run.converge()
        assert run.agent.pool.card(0).usage(clock()).prefixes == 4  # type: ignore[union-attr]
        clock.advance(30)
        run.converge()
        usage = run.agent.pool.card(0).usage(clock())  # type: ignore[union-attr]
        assert usage.prefixes == 1
        primary = lab.cloud.enis_of(lab.instance_id)[0].eni_id
        assert len(ec2_prefixes(lab, primary)) == 1
        assert lab.cloud.requests.counts()["UnassignPrivateIpAddresses"] >= 1


def test_bin_packing_lets_whole_prefixes_go(lab_factory: LabFactory, tmp_path: Path) -> None:
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=4))
    clock = ManualClock()
    with agent_in(
        lab, tmp_path, {"IP_COOLDOWN_PERIOD": "0", "WARM_PREFIX_TARGET": "4"}, clock
    ) as run:
        for n in range(32):
            run.run(run.agent.allocate(key(n), POD, multi_nic=False))
        prefixes = {
            run.agent.lookup(key(n)).leases[0].prefix
            for n in range(32)  # type: ignore[union-attr]
        }
        assert len(prefixes) == 2  # 32 pods fill two prefixes exactly, not four partly


def test_multi_nic_allocation_spans_every_card_all_or_nothing(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(
        LabConfig(instance_type="p5.48xlarge", prefixes_per_card=1, other_cards="efa")
    )
    env = {"ENABLE_MULTI_NIC": "true", "IP_COOLDOWN_PERIOD": "0"}
    with agent_in(lab, tmp_path, env) as run:
        assert sorted(run.agent.cards) == list(range(32))
        allocation = run.run(run.agent.allocate(key(1), POD, multi_nic=True))
        cards = [lease.card for lease in allocation.leases]  # type: ignore[attr-defined]
        assert cards == list(range(32))
        tables = {lease.route_table for lease in allocation.leases}  # type: ignore[attr-defined]
        assert len(tables) == 32
        # Exhaust card 5 alone: a multi-NIC allocation must then take nothing anywhere.
        card5 = run.agent.pool.card(5)  # type: ignore[union-attr]
        while card5.can_allocate(run.clock()):
            card5.take(key(9999), run.clock())
        before = [run.agent.pool.card(c).usage(run.clock()).assigned for c in range(32)]  # type: ignore[union-attr]
        with pytest.raises(PoolExhausted) as excinfo:
            run.run(run.agent.allocate(key(2), POD, multi_nic=True))
        assert excinfo.value.cards == (5,)
        after = [run.agent.pool.card(c).usage(run.clock()).assigned for c in range(32)]  # type: ignore[union-attr]
        assert after == before
        single = run.run(run.agent.allocate(key(3), POD, multi_nic=False))
        assert [lease.card for lease in single.leases] == [0]  # type: ignore[attr-defined]


def test_throttled_ec2_still_converges_with_bounded_calls(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=1))
    with agent_in(lab, tmp_path, {"WARM_PREFIX_TARGET": "4"}) as run:
        lab.cloud.requests.clear()
        lab.cloud.faults.throttle_next(5, "AssignPrivateIpAddresses")
        run.converge()
        usage = run.agent.pool.card(0).usage(run.clock())  # type: ignore[union-attr]
        assert usage.prefixes == 4
        counts = lab.cloud.requests.counts()
        assert counts["AssignPrivateIpAddresses"] == 6  # 5 throttled + 1 that asked for all 3
        assert sum(counts.values()) <= 8


def test_fragmented_subnet_falls_back_to_another_tagged_subnet(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    subnets = (
        SubnetSpec("100.64.0.0/24", "us-west-2a", {CNI_SUBNET_TAG: "1"}),
        SubnetSpec("100.64.1.0/24", "us-west-2a", {CNI_SUBNET_TAG: "1"}),
        SubnetSpec("100.64.2.0/24", "us-west-2b", {CNI_SUBNET_TAG: "1"}),
    )
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=0, subnets=subnets))
    # Fragment the instance's subnet: one address in every /28 that is still whole.
    ec2 = ec2_client(lab)
    holder = ec2.create_network_interface(SubnetId=lab.subnet_ids[0])["NetworkInterface"]
    taken = {a for e in lab.cloud.enis() for a in e.addresses}
    targets = [
        str(block.network_address + 7)
        for block in IPv4Network("100.64.0.0/24").subnets(new_prefix=28)
        if not any(a in block for a in taken) and block.network_address + 7 not in taken
    ]
    ec2.assign_private_ip_addresses(
        NetworkInterfaceId=holder["NetworkInterfaceId"], PrivateIpAddresses=targets
    )
    with agent_in(lab, tmp_path, {"WARM_PREFIX_TARGET": "1"}) as run:
        run.converge()
        card = run.agent.pool.card(0)  # type: ignore[union-attr]
        assert card.usage(run.clock()).prefixes == 1
        (secondary,) = [e for e in card.enis if e.device != 0]
        assert secondary.subnet == IPv4Network("100.64.1.0/24")  # same AZ, tagged, not 2b
        insufficient = run.agent.metrics.insufficient_cidr.labels(lab.subnet_ids[0])._value.get()
        assert insufficient == 1


def test_a_prefix_released_here_is_not_readopted_from_stale_imds(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=3))
    env = {"IP_COOLDOWN_PERIOD": "0", "WARM_PREFIX_TARGET": "1"}
    with agent_in(lab, tmp_path, env) as run:
        lab.cloud.set_imds_lag(3600.0)  # IMDS will keep showing the launch state
        run.converge()
        kept = run.agent.pool.card(0).prefixes_of(lab.cloud.enis_of(lab.instance_id)[0].eni_id)  # type: ignore[union-attr]
        assert len(kept) == 1
    primary = lab.cloud.enis_of(lab.instance_id)[0].eni_id
    assert len(ec2_prefixes(lab, primary)) == 1
    # Restart: IMDS still lists all three; the two freed here must stay out.
    with agent_in(lab, tmp_path, env) as again:
        assert again.agent.pool.card(0).prefixes_of(primary) == kept  # type: ignore[union-attr]
        assert not again.agent.ec2_used


def test_allocations_on_a_prefix_imds_does_not_show_yet_are_checked_with_ec2(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=1))
    env = {"IP_COOLDOWN_PERIOD": "0"}
    lab.cloud.set_imds_lag(3600.0)
    with agent_in(lab, tmp_path, env) as run:
        run.allocate_pods(20)  # the second prefix comes from EC2; IMDS will not show it
        held = {n: run.agent.lookup(key(n)).leases[0].address for n in range(20)}  # type: ignore[union-attr]
    with agent_in(lab, tmp_path, env) as again:
        assert again.agent.ec2_used  # IMDS and the journal disagreed: EC2 decided
        for n in range(20):
            assert again.agent.lookup(key(n)).leases[0].address == held[n]  # type: ignore[union-attr]
        fresh = again.run(again.agent.allocate(key(100), POD, multi_nic=False))
        assert fresh.leases[0].address not in held.values()  # type: ignore[attr-defined]


def test_reconcile_follows_ec2_changes_made_behind_the_agents_back(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=1))
    env = {"IP_COOLDOWN_PERIOD": "0", "WARM_PREFIX_TARGET": "0", "WARM_IP_TARGET": "1"}
    with agent_in(lab, tmp_path, env) as run:
        lab.cloud.requests.clear()
        run.run(run.agent.reconcile())
        assert lab.cloud.requests.count() == 0  # IMDS agrees: EC2 is not asked

        ec2 = ec2_client(lab)
        primary = lab.cloud.enis_of(lab.instance_id)[0].eni_id
        added = ec2.assign_private_ip_addresses(NetworkInterfaceId=primary, Ipv4PrefixCount=1)[
            "AssignedIpv4Prefixes"
        ][0]["Ipv4Prefix"]
        extra = ec2.create_network_interface(SubnetId=lab.subnet_ids[0], Ipv4PrefixCount=1)[
            "NetworkInterface"
        ]
        attachment = ec2.attach_network_interface(
            NetworkInterfaceId=extra["NetworkInterfaceId"],
            InstanceId=lab.instance_id,
            DeviceIndex=1,
        )["AttachmentId"]
        run.run(run.agent.reconcile())
        card = run.agent.pool.card(0)  # type: ignore[union-attr]
        assert IPv4Network(added) in card.prefixes_of(primary)
        assert extra["NetworkInterfaceId"] in {e.eni_id for e in card.enis}

        # Pods on every prefix, then the extra ENI is detached by someone else.
        for n in range(48):
            run.run(run.agent.allocate(key(n), POD, multi_nic=False))
        on_extra = [
            a.key
            for a in run.agent.allocations()
            if a.leases[0].eni_id == extra["NetworkInterfaceId"]
        ]
        assert len(on_extra) == 16
        ec2.detach_network_interface(AttachmentId=attachment)
        run.run(run.agent.reconcile())
        assert extra["NetworkInterfaceId"] not in {e.eni_id for e in card.enis}
        assert all(run.agent.lookup(k) is None for k in on_extra)  # those pods lost them
        assert len(run.agent.allocations()) == 32
        assert run.agent.metrics.force_removed._value.get() == 16
        # And it is durable: a restart does not bring them back.
    with agent_in(lab, tmp_path, env) as again:
        assert len(again.agent.allocations()) == 32


def _sync_count(run: object, mode: str) -> float:
    registry = run.agent.metrics.registry  # type: ignore[attr-defined]
    value = registry.get_sample_value("ultranet_ipamd_journal_sync_seconds_count", {"mode": mode})
    return float(value or 0.0)


def test_a_slow_journal_sync_moves_commits_off_the_event_loop(
    lab_factory: LabFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=1))
    with agent_in(lab, tmp_path) as run:
        run.run(run.agent.allocate(key(1), POD, multi_nic=False))
        assert _sync_count(run, "inline") == 1 and _sync_count(run, "thread") == 0

        # Any inline sync now counts as slow: the next one hands commits to a thread.
        monkeypatch.setattr(agent_module, "SLOW_SYNC_S", 0.0)
        run.run(run.agent.allocate(key(2), POD, multi_nic=False))
        assert _sync_count(run, "inline") == 2

        # A disk that hangs: the commit waits on the thread, the loop keeps answering.
        store = run.agent.datastore
        assert store is not None
        disk = threading.Event()
        entered = threading.Event()
        write_batch = store.write_batch

        def hanging_write(batch: Batch) -> None:
            entered.set()
            disk.wait(5)  # inline, this would stall the loop until the timeout
            write_batch(batch)

        monkeypatch.setattr(store, "write_batch", hanging_write)

        async def allocate_while_the_disk_hangs() -> tuple[bool, str]:
            allocating = asyncio.ensure_future(run.agent.allocate(key(3), POD, multi_nic=False))
            assert await asyncio.to_thread(entered.wait, 5)
            status = await run.agent.status()  # answered while the commit is stuck
            pending = not allocating.done() and not disk.is_set()
            disk.set()
            allocation = await allocating
            return pending and status.ready, str(allocation.leases[0].address)

        answered_meanwhile, address = run.run(allocate_while_the_disk_hangs())  # type: ignore[misc]
        assert answered_meanwhile
        assert _sync_count(run, "thread") == 1
        assert run.agent.lookup(key(3)) is not None and address


def _grow_to_two_enis_then_empty(run: AgentRun) -> str:
    """150 pods take a second ENI; once they are gone its prefixes go back first."""
    run.allocate_pods(150)
    run.converge()
    pool = run.agent.pool.card(0)  # type: ignore[union-attr]
    assert len(pool.enis) == 2
    second = pool.enis[1].eni_id
    for n in range(150):
        run.run(run.agent.release(key(n)))
    run.converge()
    assert pool.prefixes_of(second) == []
    return second


def test_an_eni_left_without_prefixes_is_detached_and_deleted(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=1))
    clock = ManualClock()
    with agent_in(lab, tmp_path, {"IP_COOLDOWN_PERIOD": "0"}, clock) as run:
        second = _grow_to_two_enis_then_empty(run)
        table = 1 + run.agent.pool.card(0).enis[1].device  # type: ignore[union-attr]
        assert any(r[3] == table for r in rules(lab.node_ns))
        run.run(run.agent.step())
        assert second in {e.eni_id for e in lab.cloud.enis()}  # not idle for long enough

        clock.advance(agent_module.IDLE_ENI_S)
        run.run(run.agent.step())
        assert second not in {e.eni_id for e in lab.cloud.enis()}  # detached and deleted
        pool = run.agent.pool.card(0)  # type: ignore[union-attr]
        assert [e.device for e in pool.enis] == [0]
        assert not any(r[3] == table for r in rules(lab.node_ns))  # its source rule is gone
        # The pool still works, and grows a new ENI when it must.
        run.run(run.agent.allocate(key(1000), POD, multi_nic=False))


def test_an_empty_eni_that_is_not_ours_is_kept(lab_factory: LabFactory, tmp_path: Path) -> None:
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=1))
    clock = ManualClock()
    with agent_in(lab, tmp_path, {"IP_COOLDOWN_PERIOD": "0"}, clock) as run:
        second = _grow_to_two_enis_then_empty(run)
        del lab.cloud.eni(second).tags[agent_module.CREATED_BY_TAG]  # as if a launch template's
        clock.advance(agent_module.IDLE_ENI_S)
        run.run(run.agent.step())
        run.run(run.agent.step())
        assert second in {e.eni_id for e in lab.cloud.enis()}
        assert len(run.agent.pool.card(0).enis) == 2  # type: ignore[union-attr]
        assert lab.cloud.requests.counts().get("DetachNetworkInterface", 0) == 0
