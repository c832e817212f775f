"""The node agent's logic without root: the cloud emulator over boto3 and HTTP on loopback,
the host network a ``RecordedHost``. Discovery, warm pool, cooldown, multi-NIC, restore,
EC2 errors, new ENIs and the host plumbing the agent asks for; the netlink that carries
it out is tested in namespaces (``test_agent.py``, ``test_hostnet.py``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from ipam import agent as agent_module
from ipam.agent import AgentError
from ipam.datastore import Batch
from ipam.datastore_errors import PoolExhausted
from ipam.ec2 import Ec2RetriesExhausted
from ipam.hostnet import ENI_RULE_PRIORITY, EniLink, HostNetworkError, LinkNotFound
from ipam.pool import route_table
from tests.ipam.agentenv import POD, AgentRun, ManualClock, config_for, key
from tests.ipam.cloudnode import CloudNode, agent_on_cloud, cloud_node
from tests.ipam.recording_hostnet import HostRule
from tools.lab.ec2.faults import FaultKind, FaultRule
from tools.lab.lab import CNI_SUBNET_TAG, LabConfig, SubnetSpec


@pytest.fixture
def m5() -> Iterator[CloudNode]:
    """An m5.large (one card, three ENI slots, 9 prefixes per ENI) launched with a prefix."""
    with cloud_node(LabConfig(instance_type="m5.large", prefixes_per_card=1)) as node:
        yield node


def ec2_prefixes(node: CloudNode, eni_id: str) -> set[IPv4Network]:
    return set(node.cloud.eni(eni_id).prefixes)


def link_of(node: CloudNode, eni_id: str) -> EniLink:
    """The ENI as the host port is told of it, from EC2's view."""
    view = node.cloud.eni_view(eni_id)
    assert view.primary_ip is not None
    return EniLink(
        eni_id, view.mac, view.network_card, view.device_index, view.primary_ip, view.subnet
    )


def assert_plumbed(node: CloudNode, eni_id: str) -> None:
    """The ENI's link is up with its address, its table routes to the VPC router, and its
    address is routed by its table: what HostNetwork.setup_eni leaves."""
    eni = link_of(node, eni_id)
    host = node.host
    name = host.links[eni.mac]
    assert host.mtu[name] == 9001
    assert str(host.addresses[name]) == f"{eni.primary_ip}/{eni.subnet.prefixlen}"
    assert host.table(eni.table) == host.expected_routes(eni)
    assert host.rule_tables(eni.primary_ip) == {eni.table}
    assert HostRule(ENI_RULE_PRIORITY, eni.primary_ip, eni.table) in host.rules


def usage(run: AgentRun, card: int = 0) -> tuple[int, int]:
    """(prefixes, ENIs) the agent holds on the card."""
    pool = run.agent.pool
    assert pool is not None
    found = pool.card(card).usage(run.clock())
    return found.prefixes, found.enis


# -- start-up -------------------------------------------------------------------------------


def test_start_from_imds_alone_is_ready_with_no_ec2_call(m5: CloudNode, tmp_path: Path) -> None:
    m5.cloud.requests.clear()
    with agent_on_cloud(m5, tmp_path) as run:
        assert run.agent._ready.is_set()
        assert not run.agent.ec2_used
        assert m5.cloud.requests.count() == 0
        allocation = run.run(run.agent.allocate(key(1), POD, multi_nic=False))
        assert allocation.leases[0].prefix in ec2_prefixes(m5, m5.primary_eni())  # type: ignore[attr-defined]
        assert m5.cloud.requests.count() == 0  # the allocation path calls nothing either
        # The primary ENI is the OS's: the agent asks the host for nothing about it.
        assert m5.host.calls == [("setup_enis", ())]
    assert m5.host.calls[-1] == ("close", ())
    assert m5.host.foreign_calls == []


def test_start_discovers_every_card_and_plumbs_each_secondary_eni_in_one_batch(
    tmp_path: Path,
) -> None:
    config = LabConfig(instance_type="p5.48xlarge", prefixes_per_card=2, other_cards="efa")
    with (
        cloud_node(config) as node,
        agent_on_cloud(node, tmp_path, {"ENABLE_MULTI_NIC": "true"}) as run,
    ):
        assert sorted(run.agent.cards) == list(range(32))
        assert not run.agent.ec2_used
        enis = node.cloud.enis_of(node.instance_id)
        secondary = [e.eni_id for e in enis if e.eni_id != node.primary_eni()]
        assert len(secondary) == 31
        # One batch for all 31 (HostNetwork dumps the tables once per batch), none for the
        # primary, and every call from the thread that opened the port.
        ((batch),) = node.host.called("setup_enis")
        assert sorted(batch) == sorted(secondary)
        assert node.host.called("setup_eni") == []
        assert node.host.foreign_calls == []
        tables = set()
        for eni_id in secondary:
            assert_plumbed(node, eni_id)
            card = node.cloud.eni_view(eni_id).network_card
            assert link_of(node, eni_id).table == route_table(card, 1) == 10001 + 100 * card
            tables.add(link_of(node, eni_id).table)
            assert set(run.agent.pool.card(card).prefixes_of(eni_id)) == ec2_prefixes(node, eni_id)  # type: ignore[union-attr]
        assert len(tables) == 31


def test_without_multi_nic_only_card_0_is_managed_and_plumbed(tmp_path: Path) -> None:
    config = LabConfig(instance_type="p5.48xlarge", prefixes_per_card=1, other_cards="efa")
    with cloud_node(config) as node, agent_on_cloud(node, tmp_path) as run:
        assert list(run.agent.cards) == [0]
        assert node.host.called("setup_enis") == [()]
        assert node.host.rules == set() and node.host.routes == set()
        with pytest.raises(AgentError, match="ENABLE_MULTI_NIC=true"):
            run.run(run.agent.allocate(key(1), POD, multi_nic=True))


def test_a_secondary_eni_whose_link_is_missing_stops_the_start(tmp_path: Path) -> None:
    config = LabConfig(instance_type="p5.48xlarge", prefixes_per_card=1, other_cards="efa")
    with cloud_node(config) as node:
        eni_id = node.cloud.enis_of(node.instance_id)[3].eni_id
        mac = node.cloud.eni_view(eni_id).mac
        del node.host.links[mac]  # not hot-plugged (yet)
        with pytest.raises(
            LinkNotFound, match=f"{eni_id}: find link failed: no link with MAC {mac}"
        ):
            with agent_on_cloud(node, tmp_path, {"ENABLE_MULTI_NIC": "true"}):
                pass


# -- the warm pool through EC2 --------------------------------------------------------------

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
    tmp_path: Path, pods: int, env: dict[str, str], launch: int, prefixes: int, enis: int
) -> None:
    config = LabConfig(instance_type="m5.large", prefixes_per_card=launch)
    with (
        cloud_node(config) as node,
        agent_on_cloud(node, tmp_path, {"IP_COOLDOWN_PERIOD": "0", **env}) as run,
    ):
        run.converge()
        run.allocate_pods(pods)
        run.converge()
        assert usage(run) == (prefixes, enis)
        # EC2 agrees with the pool, ENI by ENI.
        card = run.agent.pool.card(0)  # type: ignore[union-attr]
        for info in card.enis:
            assert set(card.prefixes_of(info.eni_id)) == ec2_prefixes(node, info.eni_id)
        # Every ENI but the primary was plumbed on the host, each with its own table.
        for info in card.enis[1:]:
            assert_plumbed(node, info.eni_id)
        assert len(node.host.rules) == enis - 1


def test_a_new_eni_is_created_tagged_attached_and_plumbed_before_use(
    m5: CloudNode, tmp_path: Path
) -> None:
    with agent_on_cloud(m5, tmp_path, {"IP_COOLDOWN_PERIOD": "0"}) as run:
        m5.cloud.requests.clear()
        run.allocate_pods(150)
        run.converge()
        card = run.agent.pool.card(0)  # type: ignore[union-attr]
        (second,) = card.enis[1:]
        assert (second.device, second.route_table) == (1, 2)
        counts = m5.cloud.requests.counts()
        assert counts["CreateNetworkInterface"] == counts["AttachNetworkInterface"] == 1
        assert counts["ModifyNetworkInterfaceAttribute"] == 1  # delete on termination
        tags = m5.cloud.eni(second.eni_id).tags
        assert tags[agent_module.CREATED_BY_TAG] == "ultranet-ipamd"
        assert tags[agent_module.INSTANCE_TAG] == m5.instance_id
        assert m5.cloud.eni(second.eni_id).attachment.delete_on_termination  # type: ignore[union-attr]
        # The agent waited for the link by MAC, then plumbed it alone (not in a batch).
        mac = m5.cloud.eni_view(second.eni_id).mac
        assert ("find_link", (mac,)) in m5.host.calls
        assert m5.host.called("setup_eni") == [(second.eni_id,)]
        assert_plumbed(m5, second.eni_id)
        on_second = [a for a in run.agent.allocations() if a.leases[0].eni_id == second.eni_id]
        assert on_second and all(a.leases[0].route_table == 2 for a in on_second)


def test_every_card_grows_through_a_new_eni_of_its_own(tmp_path: Path) -> None:
    # A dl1.24xlarge: four cards, 49 prefixes per ENI; an interface at device 1 of cards 1-3.
    config = LabConfig(instance_type="dl1.24xlarge", prefixes_per_card=1, other_cards="interface")
    env = {"ENABLE_MULTI_NIC": "true", "WARM_PREFIX_TARGET": "50"}  # past one ENI's 49
    with cloud_node(config) as node, agent_on_cloud(node, tmp_path, env) as run:
        launched = {e.eni_id for e in node.cloud.enis_of(node.instance_id)}
        node.cloud.requests.clear()
        run.converge()
        pool = run.agent.pool
        assert pool is not None
        assert node.cloud.requests.counts()["AttachNetworkInterface"] == 4
        for card in range(4):
            assert usage(run, card) == (50, 2)
            (new,) = [e for e in pool.card(card).enis if e.eni_id not in launched]
            view = node.cloud.eni_view(new.eni_id)
            # The lowest free device: card 0's 0 is the primary, the others' 1 the launched one.
            device = 1 if card == 0 else 0
            assert (view.network_card, view.device_index, new.device) == (card, device, device)
            assert new.route_table == route_table(card, device)
            assert_plumbed(node, new.eni_id)
            assert ("setup_eni", (new.eni_id,)) in node.host.calls
        tables = {r.table for r in node.host.rules}
        assert len(tables) == 7  # 3 launched secondaries + 4 new ENIs, no table shared
        assert node.host.foreign_calls == []


def test_a_late_link_is_waited_for_by_mac(m5: CloudNode, tmp_path: Path) -> None:
    looks: dict[str, int] = {}

    def hot_plug_on_the_third_look(mac: str) -> None:
        looks[mac] = looks.get(mac, 0) + 1
        if looks[mac] == 1:
            m5.host.links.pop(mac)  # attached in EC2, not yet in the kernel
        elif looks[mac] == 3:
            m5.host.links[mac] = "ens9"

    with agent_on_cloud(m5, tmp_path, {"WARM_PREFIX_TARGET": "10"}) as run:
        m5.host.on_find_link = hot_plug_on_the_third_look
        run.converge()
        (second,) = run.agent.pool.card(0).enis[1:]  # type: ignore[union-attr]
        mac = m5.cloud.eni_view(second.eni_id).mac
        assert m5.host.calls.count(("find_link", (mac,))) == 3
        assert m5.host.links[mac] == "ens9"
        assert_plumbed(m5, second.eni_id)


def test_a_link_that_never_appears_fails_the_step_naming_the_mac(
    m5: CloudNode, tmp_path: Path
) -> None:
    clock = ManualClock()

    def never(mac: str) -> None:
        m5.host.links.pop(mac, None)
        clock.advance(10.0)  # each look costs the agent 10 s of its clock

    with agent_on_cloud(m5, tmp_path, {"WARM_PREFIX_TARGET": "10"}, clock) as run:
        m5.host.on_find_link = never
        with pytest.raises(AgentError, match="did not appear in 30 s"):
            run.run(run.agent.step())
        looks = [args for op, args in m5.host.calls if op == "find_link"]
        assert len(looks) == 4  # 0, 10, 20, 30 s: then past the deadline
        assert m5.host.called("setup_eni") == []


def test_a_host_plumbing_failure_of_a_new_eni_fails_the_step(m5: CloudNode, tmp_path: Path) -> None:
    with agent_on_cloud(m5, tmp_path, {"WARM_PREFIX_TARGET": "10"}) as run:
        m5.host.failures.append(HostNetworkError("eni-x", "add rule", "injected", 1))
        with pytest.raises(HostNetworkError, match="injected"):
            run.run(run.agent.step())
        assert m5.host.rules == set()


def test_an_eni_whose_host_setup_failed_is_plumbed_before_pods_use_it(
    m5: CloudNode, tmp_path: Path
) -> None:
    with agent_on_cloud(m5, tmp_path, {"WARM_PREFIX_TARGET": "10"}) as run:
        m5.host.failures.append(HostNetworkError("eni-x", "add rule", "injected", 1))
        with pytest.raises(HostNetworkError):
            run.run(run.agent.step())
        failed = [
            e
            for e in m5.cloud.enis_of(m5.instance_id)
            if e.attachment and e.attachment.device_index > 0
        ]
        assert len(failed) == 1  # attached in EC2, unknown to the pool
        run.converge()
        card = run.agent.pool.card(0)  # type: ignore[union-attr]
        for info in card.enis[1:]:
            if card.prefixes_of(info.eni_id):
                assert_plumbed(m5, info.eni_id)
        # The reconcile finds the attached ENI in IMDS, adopts it and plumbs it; a reconcile
        # whose set-up fails too leaves it out of the pool again.
        m5.host.failures.append(HostNetworkError("eni-x", "add rule", "injected", 1))
        with pytest.raises(HostNetworkError):
            run.run(run.agent.reconcile())
        assert failed[0].eni_id not in {info.eni_id for info in card.enis}
        run.run(run.agent.reconcile())
        assert failed[0].eni_id in {info.eni_id for info in card.enis}
        assert_plumbed(m5, failed[0].eni_id)


# -- allocation, release, cooldown ----------------------------------------------------------


def test_prefixes_beyond_the_target_go_back_after_cooldown(m5: CloudNode, tmp_path: Path) -> None:
    clock = ManualClock()
    with agent_on_cloud(m5, tmp_path, {"IP_COOLDOWN_PERIOD": "30"}, clock) as run:
        run.allocate_pods(40)
        run.converge()
        assert usage(run)[0] == 4
        for n in range(40):
            run.run(run.agent.release(key(n)))
        # In cooldown the released addresses count as used: nothing is released yet.
        assert run.agent.plan(0).release_prefixes == 0
        run.converge()
        assert usage(run)[0] == 4
        clock.advance(30)
        run.converge()
        assert usage(run)[0] == 1
        assert len(ec2_prefixes(m5, m5.primary_eni())) == 1
        assert m5.cloud.requests.counts()["UnassignPrivateIpAddresses"] >= 1


def test_a_released_address_is_not_given_again_during_cooldown(
    m5: CloudNode, tmp_path: Path
) -> None:
    clock = ManualClock()
    with agent_on_cloud(m5, tmp_path, {"IP_COOLDOWN_PERIOD": "30"}, clock) as run:
        first = run.run(run.agent.allocate(key(1), POD, multi_nic=False))
        address = first.leases[0].address  # type: ignore[attr-defined]
        run.run(run.agent.release(key(1)))
        given = set()
        for n in range(2, 17):  # the prefix's 15 other addresses
            lease = run.run(run.agent.allocate(key(n), POD, multi_nic=False)).leases[0]  # type: ignore[attr-defined]
            given.add(lease.address)
        assert address not in given
        with pytest.raises(PoolExhausted):  # 15 taken + 1 cooling: nothing on this prefix
            run.run(run.agent.allocate(key(17), POD, multi_nic=False))
        clock.advance(30)
        again = run.run(run.agent.allocate(key(17), POD, multi_nic=False))
        assert again.leases[0].address == address  # type: ignore[attr-defined]


def test_bin_packing_lets_whole_prefixes_go(tmp_path: Path) -> None:
    config = LabConfig(instance_type="m5.large", prefixes_per_card=4)
    env = {"IP_COOLDOWN_PERIOD": "0", "WARM_PREFIX_TARGET": "4"}
    with cloud_node(config) as node, agent_on_cloud(node, tmp_path, env) as run:
        for n in range(32):
            run.run(run.agent.allocate(key(n), POD, multi_nic=False))
        prefixes = {run.agent.lookup(key(n)).leases[0].prefix for n in range(32)}  # type: ignore[union-attr]
        assert len(prefixes) == 2  # 32 pods fill two prefixes exactly, not four partly


def test_allocation_is_idempotent_per_key_and_release_of_nothing_is_none(
    m5: CloudNode, tmp_path: Path
) -> None:
    with agent_on_cloud(m5, tmp_path) as run:
        first = run.run(run.agent.allocate(key(1), POD, multi_nic=False))
        again = run.run(run.agent.allocate(key(1), POD, multi_nic=False))
        assert again.leases == first.leases  # type: ignore[attr-defined]
        assert len(run.agent.allocations()) == 1
        assert run.run(run.agent.release(key(2))) is None
        assert run.run(run.agent.release(key(1))) is not None
        assert run.run(run.agent.release(key(1))) is None


def test_gc_releases_only_the_networks_unlisted_allocations(m5: CloudNode, tmp_path: Path) -> None:
    with agent_on_cloud(m5, tmp_path) as run:
        for n in range(3):
            run.run(run.agent.allocate(key(n), POD, multi_nic=False))
        run.run(run.agent.allocate(key(9, "other"), POD, multi_nic=False))
        released = run.run(run.agent.gc("ultranet", [key(1)]))
        assert {a.key for a in released} == {key(0), key(2)}  # type: ignore[attr-defined]
        assert {a.key for a in run.agent.allocations()} == {key(1), key(9, "other")}


# -- multi-NIC ------------------------------------------------------------------------------


def test_multi_nic_allocation_spans_every_card_all_or_nothing(tmp_path: Path) -> None:
    config = LabConfig(instance_type="p5.48xlarge", prefixes_per_card=1, other_cards="efa")
    env = {"ENABLE_MULTI_NIC": "true", "IP_COOLDOWN_PERIOD": "0"}
    with cloud_node(config) as node, agent_on_cloud(node, tmp_path, env) as run:
        allocation = run.run(run.agent.allocate(key(1), POD, multi_nic=True))
        cards = [lease.card for lease in allocation.leases]  # type: ignore[attr-defined]
        assert cards == list(range(32))
        tables = [lease.route_table for lease in allocation.leases]  # type: ignore[attr-defined]
        assert tables == [254] + [route_table(c, 1) for c in range(1, 32)]
        # Each lease's table is one the host was told to fill for that card's ENI.
        assert set(tables[1:]) == {r.table for r in node.host.rules}
        # Exhaust card 5 alone: a multi-NIC allocation must then take nothing anywhere.
        pool = run.agent.pool
        assert pool is not None
        card5 = pool.card(5)
        while card5.can_allocate(run.clock()):
            card5.take(key(9999), run.clock())
        before = [pool.card(c).usage(run.clock()).assigned for c in range(32)]
        with pytest.raises(PoolExhausted) as excinfo:
            run.run(run.agent.allocate(key(2), POD, multi_nic=True))
        assert excinfo.value.cards == (5,)
        assert [pool.card(c).usage(run.clock()).assigned for c in range(32)] == before
        single = run.run(run.agent.allocate(key(3), POD, multi_nic=False))
        assert [lease.card for lease in single.leases] == [0]  # type: ignore[attr-defined]
        # The exhausted card is topped up first: the step grows card 5 through EC2.
        node.cloud.requests.clear()
        run.run(run.agent.step())
        assert card5.can_allocate(run.clock())
        assert node.cloud.requests.counts()["AssignPrivateIpAddresses"] >= 1


# -- EC2 errors and retries -----------------------------------------------------------------


def test_throttled_ec2_still_converges_with_bounded_calls(m5: CloudNode, tmp_path: Path) -> None:
    with agent_on_cloud(m5, tmp_path, {"WARM_PREFIX_TARGET": "4"}) as run:
        m5.cloud.requests.clear()
        # 2: a call retries a throttle at most twice (max_throttled_attempts=3)
        m5.cloud.faults.throttle_next(2, "AssignPrivateIpAddresses")
        run.converge()
        assert usage(run)[0] == 4
        counts = m5.cloud.requests.counts()
        assert counts["AssignPrivateIpAddresses"] == 3  # 2 throttled + 1 that asked for all 3
        assert sum(counts.values()) <= 5


def test_ec2_down_fails_the_step_without_changing_the_pool_then_it_converges(
    m5: CloudNode, tmp_path: Path
) -> None:
    with agent_on_cloud(m5, tmp_path, {"WARM_PREFIX_TARGET": "3"}) as run:
        assert not run.agent._ready.is_set()  # one prefix of three: not ready
        m5.cloud.faults.add(FaultRule(FaultKind.UNAVAILABLE, "AssignPrivateIpAddresses"))
        with pytest.raises(Ec2RetriesExhausted, match="AssignPrivateIpAddresses"):
            run.run(run.agent.step())
        assert usage(run) == (1, 1)
        assert ec2_prefixes(m5, m5.primary_eni()) == set(
            run.agent.pool.card(0).prefixes_of(m5.primary_eni())  # type: ignore[union-attr]
        )
        status = run.run(run.agent.status())
        assert not status.ready and "card 0" in status.reason  # type: ignore[attr-defined]
        m5.cloud.faults.clear()
        run.converge()
        assert usage(run) == (3, 1) and run.agent._ready.is_set()


def test_an_attach_that_fails_deletes_the_eni_it_created(m5: CloudNode, tmp_path: Path) -> None:
    with agent_on_cloud(m5, tmp_path, {"WARM_PREFIX_TARGET": "10"}) as run:
        before = {e.eni_id for e in m5.cloud.enis()}
        m5.cloud.faults.add(FaultRule(FaultKind.INTERNAL, "AttachNetworkInterface"))
        with pytest.raises(Ec2RetriesExhausted, match="AttachNetworkInterface"):
            run.run(run.agent.step())
        assert {e.eni_id for e in m5.cloud.enis()} == before  # created, then deleted
        assert m5.cloud.requests.counts()["DeleteNetworkInterface"] == 1
        assert usage(run)[1] == 1
        assert m5.host.called("setup_eni") == [] and m5.host.rules == set()
        m5.cloud.faults.clear()
        run.converge()
        assert usage(run) == (10, 2)


def test_fragmented_subnet_falls_back_to_another_tagged_subnet(tmp_path: Path) -> None:
    subnets = (
        SubnetSpec("100.64.0.0/24", "us-west-2a", {CNI_SUBNET_TAG: "1"}),
        SubnetSpec("100.64.1.0/24", "us-west-2a", {CNI_SUBNET_TAG: "1"}),
        SubnetSpec("100.64.2.0/24", "us-west-2b", {CNI_SUBNET_TAG: "1"}),
    )
    config = LabConfig(instance_type="m5.large", prefixes_per_card=0, subnets=subnets)
    with cloud_node(config) as node:
        # Fragment the instance's subnet: one address in every /28 that is still whole.
        ec2 = node.ec2()
        holder = ec2.create_network_interface(SubnetId=node.subnet_ids[0])["NetworkInterface"]
        taken = {a for e in node.cloud.enis() for a in e.addresses}
        targets = [
            str(block.network_address + 7)
            for block in IPv4Network("100.64.0.0/24").subnets(new_prefix=28)
            if not any(a in block for a in taken) and block.network_address + 7 not in taken
        ]
        ec2.assign_private_ip_addresses(
            NetworkInterfaceId=holder["NetworkInterfaceId"], PrivateIpAddresses=targets
        )
        with agent_on_cloud(node, tmp_path, {"WARM_PREFIX_TARGET": "1"}) as run:
            run.converge()
            card = run.agent.pool.card(0)  # type: ignore[union-attr]
            assert card.usage(run.clock()).prefixes == 1
            (secondary,) = [e for e in card.enis if e.device != 0]
            assert secondary.subnet == IPv4Network("100.64.1.0/24")  # same AZ, tagged, not 2b
            metric = run.agent.metrics.insufficient_cidr.labels(node.subnet_ids[0])
            assert metric._value.get() == 1
            assert_plumbed(node, secondary.eni_id)
            assert link_of(node, secondary.eni_id).gateway == IPv4Address("100.64.1.1")


# -- restore, stale IMDS, reconcile ---------------------------------------------------------


def test_a_restart_restores_every_allocation_from_the_journal_without_ec2(
    m5: CloudNode, tmp_path: Path
) -> None:
    env = {"IP_COOLDOWN_PERIOD": "0", "WARM_PREFIX_TARGET": "1"}
    with agent_on_cloud(m5, tmp_path, env) as run:
        run.allocate_pods(150)  # two ENIs
        run.converge()
        held = {a.key: a.leases for a in run.agent.allocations()}
        second = run.agent.pool.card(0).enis[1].eni_id  # type: ignore[union-attr]
    m5.cloud.requests.clear()
    calls = len(m5.host.calls)
    with agent_on_cloud(m5, tmp_path, env) as again:
        assert {a.key: a.leases for a in again.agent.allocations()} == held
        assert not again.agent.ec2_used and m5.cloud.requests.count() == 0
        # The host is plumbed again (idempotent), from a fresh port on the new netlink thread.
        assert m5.host.calls[calls] == ("setup_enis", (second,))
        assert_plumbed(m5, second)
        fresh = again.run(again.agent.allocate(key(1000), POD, multi_nic=False))
        assert fresh.leases[0].address not in {ls[0].address for ls in held.values()}  # type: ignore[attr-defined]
    assert [p.closed for p in m5.host.ports] == [True, True]


def test_a_restart_drops_cni_allocations_whose_pod_is_gone(m5: CloudNode, tmp_path: Path) -> None:
    with agent_on_cloud(m5, tmp_path) as run:
        for n in range(4):
            run.run(run.agent.allocate(key(n), POD, multi_nic=False, origin="cni"))
        run.run(run.agent.allocate(key(9), POD, multi_nic=False, origin="api"))
    alive = {key(0), key(2)}
    # The daemon's restart with its check for the pods' host veths (``host_veth_alive``).
    again = AgentRun(m5, config_for(tmp_path), ManualClock(), m5.host.open)
    again.agent._pod_alive = lambda allocation: allocation.key in alive
    try:
        again.start()
        # Only CNI allocations are checked: the API's has no veth.
        assert {a.key for a in again.agent.allocations()} == {key(0), key(2), key(9)}
    finally:
        again.close()
    with agent_on_cloud(m5, tmp_path) as last:  # and the drop was made durable
        assert len(last.agent.allocations()) == 3


def test_a_prefix_released_here_is_not_readopted_from_stale_imds(
    tmp_path: Path,
) -> None:
    env = {"IP_COOLDOWN_PERIOD": "0", "WARM_PREFIX_TARGET": "1"}
    with cloud_node(LabConfig(instance_type="m5.large", prefixes_per_card=3)) as node:
        primary = node.primary_eni()
        with agent_on_cloud(node, tmp_path, env) as run:
            node.cloud.set_imds_lag(3600.0)  # IMDS will keep showing the launch state
            run.converge()
            kept = run.agent.pool.card(0).prefixes_of(primary)  # type: ignore[union-attr]
            assert len(kept) == 1
        assert len(ec2_prefixes(node, primary)) == 1
        # Restart: IMDS still lists all three; the two freed here must stay out.
        with agent_on_cloud(node, tmp_path, env) as again:
            assert again.agent.pool.card(0).prefixes_of(primary) == kept  # type: ignore[union-attr]
            assert not again.agent.ec2_used


def test_allocations_on_a_prefix_imds_does_not_show_yet_are_checked_with_ec2(
    m5: CloudNode, tmp_path: Path
) -> None:
    env = {"IP_COOLDOWN_PERIOD": "0"}
    m5.cloud.set_imds_lag(3600.0)
    with agent_on_cloud(m5, tmp_path, env) as run:
        run.allocate_pods(20)  # the second prefix comes from EC2; IMDS will not show it
        held = {n: run.agent.lookup(key(n)).leases[0].address for n in range(20)}  # type: ignore[union-attr]
    with agent_on_cloud(m5, tmp_path, env) as again:
        assert again.agent.ec2_used  # IMDS and the journal disagreed: EC2 decided
        for n in range(20):
            assert again.agent.lookup(key(n)).leases[0].address == held[n]  # type: ignore[union-attr]
        fresh = again.run(again.agent.allocate(key(100), POD, multi_nic=False))
        assert fresh.leases[0].address not in held.values()  # type: ignore[attr-defined]


def test_reconcile_follows_ec2_changes_made_behind_the_agents_back(
    m5: CloudNode, tmp_path: Path
) -> None:
    env = {"IP_COOLDOWN_PERIOD": "0", "WARM_PREFIX_TARGET": "0", "WARM_IP_TARGET": "1"}
    with agent_on_cloud(m5, tmp_path, env) as run:
        m5.cloud.requests.clear()
        run.run(run.agent.reconcile())
        assert m5.cloud.requests.count() == 0  # IMDS agrees: EC2 is not asked

        ec2 = m5.ec2()
        primary = m5.primary_eni()
        added = ec2.assign_private_ip_addresses(NetworkInterfaceId=primary, Ipv4PrefixCount=1)[
            "AssignedIpv4Prefixes"
        ][0]["Ipv4Prefix"]
        extra = ec2.create_network_interface(SubnetId=m5.subnet_ids[0], Ipv4PrefixCount=1)[
            "NetworkInterface"
        ]["NetworkInterfaceId"]
        attachment = ec2.attach_network_interface(
            NetworkInterfaceId=extra, InstanceId=m5.instance_id, DeviceIndex=1
        )["AttachmentId"]
        run.run(run.agent.reconcile())
        card = run.agent.pool.card(0)  # type: ignore[union-attr]
        assert IPv4Network(added) in card.prefixes_of(primary)
        assert extra in {e.eni_id for e in card.enis}
        assert m5.host.called("setup_enis")[-1] == (extra,)  # adopted, and plumbed
        assert_plumbed(m5, extra)

        # Pods on every prefix, then the extra ENI is detached by someone else.
        for n in range(48):
            run.run(run.agent.allocate(key(n), POD, multi_nic=False))
        on_extra = [a.key for a in run.agent.allocations() if a.leases[0].eni_id == extra]
        assert len(on_extra) == 16
        mac = m5.cloud.eni_view(extra).mac
        ec2.detach_network_interface(AttachmentId=attachment)
        assert mac not in m5.host.links  # the kernel dropped the link with its routes
        run.run(run.agent.reconcile())
        assert extra not in {e.eni_id for e in card.enis}
        assert all(run.agent.lookup(k) is None for k in on_extra)  # those pods lost them
        assert len(run.agent.allocations()) == 32
        assert run.agent.metrics.force_removed._value.get() == 16
    # And it is durable: a restart does not bring them back.
    with agent_on_cloud(m5, tmp_path, env) as again:
        assert len(again.agent.allocations()) == 32


# -- idle ENIs ------------------------------------------------------------------------------


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


def test_an_eni_left_without_prefixes_is_detached_deleted_and_unplumbed(
    m5: CloudNode, tmp_path: Path
) -> None:
    clock = ManualClock()
    with agent_on_cloud(m5, tmp_path, {"IP_COOLDOWN_PERIOD": "0"}, clock) as run:
        second = _grow_to_two_enis_then_empty(run)
        eni = link_of(m5, second)
        run.run(run.agent.step())
        assert second in {e.eni_id for e in m5.cloud.enis()}  # not idle for long enough
        assert m5.host.called("teardown_eni") == []

        clock.advance(agent_module.IDLE_ENI_S)
        run.run(run.agent.step())
        assert second not in {e.eni_id for e in m5.cloud.enis()}  # detached and deleted
        assert [e.device for e in run.agent.pool.card(0).enis] == [0]  # type: ignore[union-attr]
        assert m5.host.called("teardown_eni") == [(second,)]
        assert m5.host.rule_tables(eni.primary_ip) == set()
        assert m5.host.table(eni.table) == set()
        # The pool still works, and grows a new ENI when it must.
        run.run(run.agent.allocate(key(1000), POD, multi_nic=False))


def test_an_empty_eni_that_is_not_ours_is_kept(m5: CloudNode, tmp_path: Path) -> None:
    clock = ManualClock()
    with agent_on_cloud(m5, tmp_path, {"IP_COOLDOWN_PERIOD": "0"}, clock) as run:
        second = _grow_to_two_enis_then_empty(run)
        del m5.cloud.eni(second).tags[agent_module.CREATED_BY_TAG]  # as if a launch template's
        clock.advance(agent_module.IDLE_ENI_S)
        run.run(run.agent.step())
        run.run(run.agent.step())
        assert second in {e.eni_id for e in m5.cloud.enis()}
        assert len(run.agent.pool.card(0).enis) == 2  # type: ignore[union-attr]
        assert m5.cloud.requests.counts().get("DetachNetworkInterface", 0) == 0
        assert m5.host.called("teardown_eni") == []
        assert_plumbed(m5, second)


# -- status and the journal's commit path ---------------------------------------------------


def test_status_counts_free_addresses_and_says_why_it_is_not_ready(
    m5: CloudNode, tmp_path: Path
) -> None:
    clock = ManualClock()
    env = {"WARM_PREFIX_TARGET": "3", "IP_COOLDOWN_PERIOD": "30"}
    with agent_on_cloud(m5, tmp_path, env, clock) as run:
        status = run.run(run.agent.status())
        assert (status.ready, status.free_addresses, status.cards) == (False, {0: 16}, (0,))  # type: ignore[attr-defined]
        assert status.reason.startswith("card 0: ")  # type: ignore[attr-defined]
        run.converge()
        status = run.run(run.agent.status())
        assert (status.ready, status.reason, status.free_addresses) == (
            True,
            "warm pool met",
            {0: 48},
        )  # type: ignore[attr-defined]
        run.run(run.agent.allocate(key(1), POD, multi_nic=False))
        run.run(run.agent.release(key(1)))
        assert run.run(run.agent.status()).free_addresses == {0: 47}  # type: ignore[attr-defined]
        clock.advance(30)  # out of cooldown
        assert run.run(run.agent.status()).free_addresses == {0: 48}  # type: ignore[attr-defined]
        report = run.agent.introspect()
        assert report["ready"] and report["cards"]["0"]["prefixes"] == 3


def _sync_count(run: AgentRun, mode: str) -> float:
    registry = run.agent.metrics.registry
    value = registry.get_sample_value("ultranet_ipamd_journal_sync_seconds_count", {"mode": mode})
    return float(value or 0.0)


def test_a_slow_journal_sync_moves_commits_off_the_event_loop(
    m5: CloudNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with agent_on_cloud(m5, tmp_path) as run:
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
