"""Multi-NIC pods on a p5.48xlarge lab (32 network cards): one interface per card, and
the packets from interface k leave through card k's ENI."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni.keys import IpamKey
from cni.netlink import LinkReaper
from cni.plumbing import RULE_FROM_POD, RULE_TO_POD
from cni.spec import ANNOTATIONS_CAPABILITY, MULTI_NIC_ANNOTATION, MULTI_NIC_VALUE
from ipam.hostnet import EniLink, HostNetwork
from tests.cni.backend import PoolBackend, pool_from_lab
from tests.cni.harness import NETWORK, conf, env, host_state, node, ns_path, pod_state, run
from tests.lab.helpers import python_in
from tools.lab import netns
from tools.lab.lab import Lab, LabConfig

pytestmark = pytest.mark.netns

PAYLOAD = 64 * 1024
CARDS = 32
SEND_FROM = """
import socket, sys
sock = socket.socket()
sock.settimeout(5)
sock.bind((sys.argv[1], 0))
sock.connect((sys.argv[2], int(sys.argv[3])))
sock.sendall(bytes(int(sys.argv[4])))
sock.close()
print("sent")
"""
MULTI = {ANNOTATIONS_CAPABILITY: {MULTI_NIC_ANNOTATION: MULTI_NIC_VALUE}}


@pytest.fixture(scope="module")
def p5(request: pytest.FixtureRequest) -> Any:
    """One p5.48xlarge lab for the module (launching 32 cards is the slow part), with
    every ENI's host side plumbed by ipam.hostnet as the daemon does."""
    from tools.lab.lab import Lab as LabClass

    lab = LabClass(LabConfig(instance_type="p5.48xlarge", prefixes_per_card=1, other_cards="efa"))
    lab.start()
    try:
        links = {}
        with HostNetwork(netns=lab.node_ns) as host:
            for eni in lab.cloud.enis_of(lab.instance_id):
                view = lab.cloud.eni_view(eni.eni_id)
                assert view.primary_ip is not None
                link = EniLink(
                    view.eni_id,
                    view.mac,
                    view.network_card,
                    view.device_index,
                    view.primary_ip,
                    view.subnet,
                )
                host.setup_eni(link)
                links[view.network_card] = host.find_link(view.mac)
        yield lab, links
    finally:
        lab.close()


def tx_bytes(ns: str) -> dict[str, int]:
    with IPRoute(netns=ns) as ipr:
        links = ipr.get_links()
        return {str(link.get("ifname")): int(link.get("stats64")["tx_bytes"]) for link in links}


def send_from(lab: Lab, pod_ns: str, source: str, gateway: str) -> str:
    listener = netns.listening_socket(lab.vpc_ns, gateway, 0)
    try:
        port = str(listener.getsockname()[1])
        done = python_in(pod_ns, SEND_FROM, source, gateway, port, str(PAYLOAD))
        assert done.stdout.strip() == "sent", done.stderr
        listener.settimeout(5)
        conn, peer = listener.accept()
        got = 0
        while chunk := conn.recv(65536):
            got += len(chunk)
        conn.close()
        assert got == PAYLOAD
        return str(peer[0])
    finally:
        listener.close()


def test_multi_nic_pod_gets_one_interface_per_card_and_uses_each(p5: Any) -> None:
    lab, eni_links = p5
    pod_ns = lab.create_pod_namespace("mn")
    backend = PoolBackend(pool_from_lab(lab))
    assert backend.pool.cards == list(range(CARDS))
    before = host_state(lab)
    gateway = str(lab.cloud.eni_view(lab.cloud.enis_of(lab.instance_id)[0].eni_id).gateway)

    async def scenario() -> tuple[dict[str, Any], dict[int, tuple[str, dict[str, int]]], Any]:
        async with node(lab, backend, enable_multi_nic=True) as n:
            result = await n.add("m1", pod_ns, runtimeConfig=MULTI)
            inside = await asyncio.to_thread(pod_state, pod_ns)
            sent = {}
            for card in (0, 1, 7, 31):
                address = result["ips"][card]["address"].split("/")[0]
                before_tx = await asyncio.to_thread(tx_bytes, lab.node_ns)
                peer = await asyncio.to_thread(send_from, lab, pod_ns, address, gateway)
                after_tx = await asyncio.to_thread(tx_bytes, lab.node_ns)
                delta = {k: after_tx[k] - before_tx.get(k, 0) for k in after_tx}
                sent[card] = (peer, delta)
                assert peer == address
            code, out = await n.call(
                env("CHECK", "m1", ns_path(pod_ns)), conf(prevResult=result, runtimeConfig=MULTI)
            )
            assert code == 0, out
            await n.delete("m1", pod_ns, result)
            await n.plumbing.settle()
            return result, sent, inside

    result, sent, inside = run(scenario())
    names = [i["name"] for i in result["interfaces"] if i.get("sandbox")]
    assert names == ["eth0"] + [f"mNicIf{k}" for k in range(1, CARDS)]
    assert len(result["ips"]) == CARDS
    assert [ip["gateway"] for ip in result["ips"]] == [f"169.254.1.{k + 1}" for k in range(CARDS)]
    assert len({ip["address"] for ip in result["ips"]}) == CARDS
    # Policy routing in the pod: interface k > 0 has its table k, chosen by source.
    assert sorted(r for r in inside["rules"] if r[0] == 1) == sorted(
        (1, ip["address"].split("/")[0], k) for k, ip in enumerate(result["ips"]) if k > 0
    )
    for card, (_, delta) in sent.items():
        own = eni_links[card]
        assert delta[own] >= PAYLOAD, (card, own, delta[own])
        others = [name for c, name in eni_links.items() if c != card]
        assert all(delta[name] < PAYLOAD for name in others), card
    assert host_state(lab) == before
    assert pod_state(pod_ns) == {"links": [], "addrs": [], "rules": []}
    assert backend.held() == set()


def test_a_repeated_del_without_allocation_or_prev_result_removes_every_veth(
    p5: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first DEL is answered and its allocation released, but its veth deletions are
    lost (the reaper's queue died with the daemon); the runtime's next DEL has neither the
    allocation nor prevResult, and finds every veth by name."""
    lab, _ = p5
    pod_ns = lab.create_pod_namespace("again")
    backend = PoolBackend(pool_from_lab(lab))
    before = host_state(lab)
    real_delete_batch = LinkReaper._delete_batch
    lost: list[str] = []

    def lose(self: LinkReaper, lane: object, names: list[str]) -> list[int]:
        lost.extend(names)
        return [0] * len(names)

    async def scenario() -> dict[str, Any]:
        async with node(lab, backend, enable_multi_nic=True, max_interfaces=CARDS) as n:
            result = await n.add("again", pod_ns, runtimeConfig=MULTI)
            monkeypatch.setattr(LinkReaper, "_delete_batch", lose)
            await n.delete("again", pod_ns, result)
            await n.plumbing.settle()
            monkeypatch.setattr(LinkReaper, "_delete_batch", real_delete_batch)
            stranded = await asyncio.to_thread(host_state, lab)
            await n.delete("again", pod_ns)  # no prevResult, no allocation
            await n.plumbing.settle()
            return stranded

    stranded = run(scenario())
    assert len(lost) == CARDS
    assert sorted(stranded["links"]) == sorted(before["links"] + lost)
    assert stranded["rules"] == before["rules"]  # the first DEL removed the routing
    assert host_state(lab) == before
    assert pod_state(pod_ns) == {"links": [], "addrs": [], "rules": []}
    assert backend.held() == set()


def test_a_del_without_allocation_or_prev_result_removes_every_rule_of_the_pod(
    p5: Any,
) -> None:
    """The allocation went behind the runtime's back (released through the socket API,
    or dropped at a restart) and the DEL carries no prevResult: the addresses come from
    the host's /32 routes to the veths, so the rules 512 and 1536 of all 32 interfaces
    go with them."""
    lab, _ = p5
    pod_ns = lab.create_pod_namespace("norecord")
    backend = PoolBackend(pool_from_lab(lab))
    before = host_state(lab)

    async def scenario() -> dict[str, Any]:
        async with node(lab, backend, enable_multi_nic=True, max_interfaces=CARDS) as n:
            await n.add("norecord", pod_ns, runtimeConfig=MULTI)
            plumbed = await asyncio.to_thread(host_state, lab)
            await backend.release(IpamKey(NETWORK, "norecord", "eth0"))
            await n.delete("norecord", pod_ns)  # no prevResult, no allocation
            await n.plumbing.settle()
            return plumbed

    plumbed = run(scenario())
    added = {r[0] for r in plumbed["rules"]} - {r[0] for r in before["rules"]}
    assert {RULE_TO_POD, RULE_FROM_POD} <= added  # both kinds were there to remove
    assert host_state(lab) == before
    assert pod_state(pod_ns) == {"links": [], "addrs": [], "rules": []}


def add_host_rules(lab: Lab, rules: list[tuple[int, str, str, int]], op: str = "add") -> None:
    """``host_state`` rules (priority, src, dst, table) added, or deleted where present."""
    with IPRoute(netns=lab.node_ns) as ipr:
        for priority, src, dst, table in rules:
            side = {"src": src, "src_len": 32} if src else {"dst": dst, "dst_len": 32}
            try:
                ipr.rule(op, priority=priority, table=table, **side)
            except NetlinkError as err:
                if op == "add" or err.code != errno.ENOENT:
                    raise


def test_an_add_takes_over_identical_host_rules_a_gone_pod_left_on_its_addresses(
    p5: Any,
) -> None:
    """The host rules 512 and 1536 of an earlier pod on the same addresses are still
    there (its DEL never ran): the ADD's own rules answer EEXIST, which was a failure
    (code 100 'rule to ... failed', EEXIST) on every later ADD of that address. The
    rules are equal in every field, so the ADD takes them over and its DEL removes them."""
    lab, _ = p5
    before = host_state(lab)
    pod_ns = lab.create_pod_namespace("heir")

    async def add_and_delete(name: str) -> tuple[list[str], list[tuple[int, str, str, int]]]:
        # A fresh pool: no cooldown, so the same addresses come first each time.
        backend = PoolBackend(pool_from_lab(lab))
        async with node(lab, backend, enable_multi_nic=True, max_interfaces=CARDS) as n:
            result = await n.add(name, pod_ns, runtimeConfig=MULTI)
            plumbed = await asyncio.to_thread(host_state, lab)
            await n.delete(name, pod_ns, result)
            await n.plumbing.settle()
        return [ip["address"] for ip in result["ips"]], plumbed["rules"]

    first, rules = run(add_and_delete("gone"))
    stale = sorted(set(rules) - set(before["rules"]))
    assert {r[0] for r in stale} == {RULE_TO_POD, RULE_FROM_POD}
    try:
        add_host_rules(lab, stale)  # what the gone pod left
        second, rules_then = run(add_and_delete("heir"))
        assert second == first  # the same addresses, so the same rules
        assert sorted(set(rules_then) - set(before["rules"])) == stale
        assert len(rules_then) == len(set(rules_then))  # taken over, not duplicated
        assert host_state(lab) == before
    finally:
        add_host_rules(lab, stale, "del")
