"""The periodic stray sweep while ADDs run (``Plumbing.release_vanished``): an attachment
whose host veth is missing because its ADD has not created it yet is not a pod that went
without a DEL, and must keep its address."""

from __future__ import annotations

import asyncio
import time

import pytest

from cni.keys import IpamKey, PodRef
from cni.plumbing import host_ifname
from tests.cni.backend import PoolBackend, pool_from_lab
from tests.cni.harness import NETWORK, conf, env, host_state, ns_path, run
from tests.cni.test_reaper import Gate, gate, reaping_node
from tools.lab.lab import Lab

pytestmark = pytest.mark.netns
__all__ = ["gate"]  # the fixture, used by name


def test_an_attachment_whose_add_is_in_flight_keeps_its_address_while_its_veth_is_missing(
    lab: Lab, gate: Gate
) -> None:
    pod = lab.create_pod_namespace("retried")
    gone, retried = (IpamKey(NETWORK, c, "eth0") for c in ("gone", "retried"))

    async def scenario() -> tuple[list[IpamKey], list[IpamKey], int, list[str]]:
        backend = PoolBackend(pool_from_lab(lab))
        async with reaping_node(lab, backend, gate) as n:
            # Both hold an address and have no veth: "gone" because its pod's namespace
            # went without a DEL; "retried" because its first ADD failed, its rollback
            # could not release, and the runtime retries that ADD now. The retry waits
            # for the first attempt's veth deletion, which the reaper still holds.
            for key in (gone, retried):
                pod_ref = PodRef("default", f"pod-{key.container_id}")
                backend.pool.allocate(key, pod_ref, time.monotonic(), cards=[0])
            n.plumbing._reaper.delete(host_ifname(retried, 0, "eni"))

            def held() -> list[tuple[IpamKey, int]]:
                return [(a.key, len(a.leases)) for a in backend.pool.allocations()]

            def release(key: IpamKey) -> None:
                backend.pool.release(key, time.monotonic())

            add = asyncio.create_task(n.call(env("ADD", "retried", ns_path(pod)), conf()))
            while not n.plumbing._adding:  # the ADD has entered: its names are in flight
                assert not add.done(), add.result()
                await asyncio.sleep(0)
            during = await n.plumbing.release_vanished("eni", held, release)
            gate.open()
            code, _ = await add
            after = await n.plumbing.release_vanished("eni", held, release)
            links = (await asyncio.to_thread(host_state, lab))["links"]
            await n.delete("retried", pod)
            await n.plumbing.settle()
        return during, after, code, links

    during, after, code, links = run(scenario())
    assert during == [gone]  # the sweep works, and leaves the ADD in flight alone
    assert code == 0
    assert links == [host_ifname(retried, 0, "eni")]
    assert after == []  # its veth exists now
    assert host_state(lab) == {"links": [], "rules": [], "routes": []}
