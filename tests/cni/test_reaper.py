"""The deferred veth deletion (``LinkReaper``) and the restart sweep, in-process in the
lab: a re-ADD of a name the reaper still holds, a bounded backlog, a burst of DELs the
reaper falls behind, and ``Plumbing.reap_strays`` touching only our own veths.

The reaper "falls behind" on demand: :class:`Gate` holds every deletion on its thread
until the test opens it, so each window is hit without timing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from pyroute2 import IPRoute

from cni import netlink
from cni.handler import CniHandler, HandlerConfig
from cni.keys import IpamKey
from cni.netlink import LinkReaper
from cni.plumbing import HOST_VETH_ALIAS, Plumbing, host_ifname
from tests.cni.backend import PoolBackend, pool_from_lab
from tests.cni.harness import NETWORK, Node, conf, env, host_state, ns_path, pod_state, run
from tests.conftest import LabFactory
from tools.lab.lab import Lab, LabConfig
from tools.lab.pool_backend import pool_from_enis

pytestmark = pytest.mark.netns
GUARD_S = 60  # a failure guard, never a synchronisation


class Gate:
    """Holds every kernel request that deletes links (a batch's group, or one link) on
    the reaper's thread until ``open``; counts those requests, and the deletions queued
    at most at once."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.most_pending = 0
        self.requests = 0

    def open(self) -> None:
        self.opened.set()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    held = Gate()
    real_delete_link = netlink.delete_link
    real_delete_group = getattr(netlink, "delete_group", None)
    real_delete_all = LinkReaper.delete_all

    def gated_link(sock: socket.socket, name: str, seq: int = 1) -> int:
        held.opened.wait()
        held.requests += 1
        return real_delete_link(sock, name, seq)

    def gated_group(sock: socket.socket, group: int, seq: int) -> int:
        held.opened.wait()
        held.requests += 1
        assert real_delete_group is not None
        return real_delete_group(sock, group, seq)

    def counted(self: LinkReaper, names: Sequence[str]) -> list[asyncio.Future[int]]:
        futures = real_delete_all(self, names)
        held.most_pending = max(held.most_pending, len(self._pending))
        return futures

    monkeypatch.setattr(netlink, "delete_link", gated_link)
    monkeypatch.setattr(netlink, "delete_group", gated_group, raising=False)
    monkeypatch.setattr(LinkReaper, "delete_all", counted)
    try:
        yield held
    finally:
        held.open()  # a failing test must not leave the reaper's threads stuck


@asynccontextmanager
async def reaping_node(
    lab: Lab, backend: PoolBackend, gate: Gate, **open_args: Any
) -> AsyncIterator[Node]:
    plumbing = await Plumbing.open(ns_path(lab.node_ns), **open_args)
    try:
        yield Node(lab, backend, CniHandler(backend, plumbing, HandlerConfig()), plumbing)
    finally:
        gate.open()
        await plumbing.close()


def host_name(container: str) -> str:
    return host_ifname(IpamKey(NETWORK, container, "eth0"), 0, "eni")


def link_attr(lab: Lab, name: str, attr: str) -> Any:
    with IPRoute(netns=lab.node_ns) as ipr:
        return ipr.link("get", ifname=name)[0].get(attr)


def put_in_group(lab: Lab, name: str, group: int) -> None:
    with IPRoute(netns=lab.node_ns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=name)[0], group=group)


def test_a_re_add_waits_for_the_old_veth_the_reaper_still_holds(
    lab: Lab, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    pod_ns = lab.create_pod_namespace("re")
    backend = PoolBackend(pool_from_lab(lab))
    before = host_state(lab)
    name = host_name("r1")
    waiting = asyncio.Event()
    real_pending = LinkReaper.pending

    def pending(self: LinkReaper, link: str) -> asyncio.Future[int] | None:
        found = real_pending(self, link)
        if link == name and found is not None:
            waiting.set()  # the ADD found the old veth still being deleted
        return found

    monkeypatch.setattr(LinkReaper, "pending", pending)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], str]:
        async with reaping_node(lab, backend, gate) as n:
            await n.add("r1", pod_ns)
            await n.delete("r1", pod_ns)  # answered; the reaper holds the veth
            held = await asyncio.to_thread(host_state, lab)
            readd = asyncio.create_task(n.call(env("ADD", "r1", ns_path(pod_ns)), conf()))
            async with asyncio.timeout(GUARD_S):
                await waiting.wait()
            assert not readd.done()  # it waits for the old deletion, not EEXIST
            gate.open()
            code, again = await readd
            assert code == 0, again
            code, out = await n.call(env("CHECK", "r1", ns_path(pod_ns)), conf(prevResult=again))
            assert code == 0, out
            mac = await asyncio.to_thread(link_attr, lab, name, "IFLA_ADDRESS")
            await n.delete("r1", pod_ns, again)
            await n.plumbing.settle()
            return held, again, mac

    held, again, mac = run(scenario())
    assert held["links"] == sorted(before["links"] + [name])
    assert mac == again["interfaces"][0]["mac"]  # the new veth survived the old deletion
    assert host_state(lab) == before
    assert pod_state(pod_ns) == {"links": [], "addrs": [], "rules": []}
    assert backend.held() == set()


def test_the_reaper_backlog_is_bounded_and_dels_past_it_wait_for_room(lab: Lab, gate: Gate) -> None:
    pods = [lab.create_pod_namespace(f"b{i}") for i in range(10)]
    extra = lab.create_pod_namespace("bx")
    backend = PoolBackend(pool_from_lab(lab))
    before = host_state(lab)

    async def scenario() -> tuple[int, int, set[str]]:
        async with reaping_node(lab, backend, gate, max_pending_deletions=4) as n:
            for i, pod in enumerate(pods):
                await n.add(f"b{i}", pod)
            dels = [
                asyncio.create_task(n.call(env("DEL", f"b{i}", ns_path(pod)), conf()))
                for i, pod in enumerate(pods)
            ]
            async with asyncio.timeout(GUARD_S):
                while sum(t.done() for t in dels) < 4:
                    await asyncio.wait(
                        [t for t in dels if not t.done()], return_when=asyncio.FIRST_COMPLETED
                    )
            answered_while_held = sum(t.done() for t in dels)
            # An ADD is not held up by the DELs waiting for the reaper.
            await n.add("bx", extra)
            gate.open()
            for code, out in await asyncio.gather(*dels):
                assert code == 0, out
            await n.plumbing.settle()
            left = set((await asyncio.to_thread(host_state, lab))["links"]) - set(before["links"])
            await n.delete("bx", extra)
            await n.plumbing.settle()
            return answered_while_held, gate.most_pending, left

    answered_while_held, most_pending, left = run(scenario())
    assert answered_while_held == 4  # the other six waited for room
    assert most_pending == 4
    assert left == {host_name("bx")}
    assert host_state(lab) == before
    assert backend.held() == set()


def test_a_burst_of_200_dels_the_reaper_falls_behind_leaves_nothing(
    lab_factory: LabFactory, gate: Gate
) -> None:
    lab = lab_factory(LabConfig(instance_type="m5.4xlarge", prefixes_per_card=13))
    pods = [lab.create_pod_namespace(f"p{i}") for i in range(200)]
    late = lab.create_pod_namespace("late")
    enis = lab.cloud.enis_of(lab.instance_id)
    backend = PoolBackend(
        pool_from_enis((lab.cloud.eni_view(e.eni_id) for e in enis), max_prefixes=29)
    )
    before = host_state(lab)

    async def scenario() -> tuple[int, int, int, dict[str, Any]]:
        async with reaping_node(lab, backend, gate) as n:
            added = [await n.add(f"p{i}", pod) for i, pod in enumerate(pods)]
            async with asyncio.timeout(GUARD_S):  # every DEL answers with the reaper stalled
                results = await asyncio.gather(
                    *(
                        n.call(env("DEL", f"p{i}", ns_path(pod)), conf(prevResult=added[i]))
                        for i, pod in enumerate(pods)
                    )
                )
            assert all(code == 0 for code, _ in results), results[:3]
            links = (await asyncio.to_thread(host_state, lab))["links"]
            behind = len(set(links) - set(before["links"]))
            # A new pod while the reaper has 200 veths to go: not held up by them.
            async with asyncio.timeout(GUARD_S):
                late_result = await n.add("late", late)
            gate.open()
            await n.plumbing.settle()
            requests = gate.requests
            after_burst = await asyncio.to_thread(host_state, lab)
            await n.delete("late", late, late_result)
            await n.plumbing.settle()
            return behind, gate.most_pending, requests, after_burst

    behind, most_pending, requests, after_burst = run(scenario())
    assert behind == 200 and most_pending == 200
    # Each of the reaper's four threads holds one request; the veths queued behind them
    # go in batches of up to 64, one kernel request each (one request per veth: 200).
    assert requests <= 4 + math.ceil((200 - 4) / 64)
    assert after_burst["links"] == sorted(before["links"] + [host_name("late")])
    assert host_state(lab) == before
    assert all(pod_state(pod)["links"] == [] for pod in pods)
    assert backend.held() == set()


def test_the_sweep_reaps_only_our_veths_that_no_allocation_accounts_for(lab: Lab) -> None:
    pods = [lab.create_pod_namespace(name) for name in ("keep", "lose")]
    backend = PoolBackend(pool_from_lab(lab))
    before = host_state(lab)
    foreign = "eni0123456789a"  # the VPC CNI's naming, no alias: not ours
    renamed = "enizz"  # our alias, not our naming

    with IPRoute(netns=lab.node_ns) as ipr:
        ipr.link("add", ifname=foreign, kind="veth", peer="foreign-peer")
        ipr.link("add", ifname=renamed, kind="veth", peer="renamed-peer")
        (index,) = ipr.link_lookup(ifname=renamed)
        ipr.link("set", index=index, ifalias=HOST_VETH_ALIAS)

    async def scenario() -> tuple[list[str], list[str]]:
        plumbing = await Plumbing.open(ns_path(lab.node_ns))
        try:
            n = Node(lab, backend, CniHandler(backend, plumbing), plumbing)
            await n.add("keep", pods[0])
            await n.add("lose", pods[1])
            kept = host_name("keep")
            first = await plumbing.reap_strays("eni", lambda: {kept})
            second = await plumbing.reap_strays("eni", lambda: {kept})
            return first, second
        finally:
            await plumbing.close()

    first, second = run(scenario())
    assert first == [host_name("lose")] and second == []
    assert host_state(lab)["links"] == sorted(
        before["links"] + [foreign, host_name("keep"), renamed]
    )
    assert link_attr(lab, host_name("keep"), "IFLA_IFALIAS") == HOST_VETH_ALIAS


def test_what_the_kernel_cannot_delete_in_the_reapers_group_stays_and_the_veths_go(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    """The reaper deletes a batch as its device group; another program's device in that
    group makes the kernel refuse the whole group (it deletes none): that device stays,
    and the veths go one request each, with a warning."""
    names = [f"rbg{i}" for i in range(3)]
    with IPRoute(netns=lab.node_ns) as ipr:
        for name in names:
            ipr.link("add", ifname=name, kind="veth", peer=f"{name}-peer")

    async def scenario() -> tuple[int, list[int]]:
        reaper = LinkReaper(ns_path(lab.node_ns), workers=1)
        try:
            (group,) = reaper.groups
            # As an ENI could be: a device with no rtnetlink delete, here the loopback.
            await asyncio.to_thread(put_in_group, lab, "lo", group)
            async with asyncio.timeout(GUARD_S):
                return group, list(await asyncio.gather(*reaper.delete_all(names)))
        finally:
            reaper.close()

    with caplog.at_level(logging.WARNING, logger="ultranet.cni"):
        group, codes = run(scenario())
    assert codes == [0, 0, 0]
    with IPRoute(netns=lab.node_ns) as ipr:
        assert [ipr.link_lookup(ifname=name) for name in names] == [[], [], []]
    assert link_attr(lab, "lo", "IFLA_GROUP") == group  # there, in the group it was put in
    assert [r.getMessage() for r in caplog.records if "device group" in r.getMessage()]


def test_a_batch_that_fails_fails_its_callers_and_the_reaper_goes_on(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_mark_links = netlink.mark_links
    failures = [RuntimeError("a bug in the batch")]

    def mark_once_badly(*args: Any) -> list[int]:
        if failures:
            raise failures.pop()
        return real_mark_links(*args)

    monkeypatch.setattr(netlink, "mark_links", mark_once_badly)
    with IPRoute(netns=lab.node_ns) as ipr:
        ipr.link("add", ifname="rbx", kind="veth", peer="rbx-peer")

    async def scenario() -> tuple[BaseException | int, int]:
        reaper = LinkReaper(ns_path(lab.node_ns), workers=1)
        try:
            async with asyncio.timeout(GUARD_S):
                (first,) = await asyncio.gather(reaper.delete("rbx"), return_exceptions=True)
                return first, await reaper.delete("rbx")
        finally:
            reaper.close()

    first, second = run(scenario())
    assert isinstance(first, RuntimeError)
    assert second == 0
    with IPRoute(netns=lab.node_ns) as ipr:
        assert ipr.link_lookup(ifname="rbx") == []


def test_one_call_with_hundreds_of_names_deletes_them_all(lab: Lab) -> None:
    """A start-up sweep after a crash on a big node hands the reaper every stray at once:
    the kernel's answers to the group marks must not overflow the socket (they did at 400
    names in one send: ENOBUFS, nothing deleted)."""
    names = [f"rbb{i}" for i in range(400)]
    script = "".join(f"link add {name} type veth peer name {name}p\n" for name in names)
    done = subprocess.run(
        ["ip", "-n", lab.node_ns, "-batch", "-"], input=script, text=True, capture_output=True
    )
    assert done.returncode == 0, done.stderr

    async def scenario() -> list[int]:
        reaper = LinkReaper(ns_path(lab.node_ns))
        try:
            async with asyncio.timeout(GUARD_S):
                return list(await asyncio.gather(*reaper.delete_all(names)))
        finally:
            reaper.close()

    assert run(scenario()) == [0] * len(names)
    with IPRoute(netns=lab.node_ns) as ipr:
        assert not [n for n in (link.get("ifname") for link in ipr.get_links()) if n in names]
