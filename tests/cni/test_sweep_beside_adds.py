"""The periodic stray sweep while ADDs run (``Plumbing.release_vanished``): an attachment
whose host veth is missing because its ADD has not created it yet is not a pod that went
without a DEL, and must keep its address."""

from __future__ import annotations

import asyncio
import time

import pytest

from cni.backend import Allocation
from cni.keys import IpamKey, PodRef
from cni.plumbing import host_ifname
from ipam.pool import AddressPool
from tests.cni.backend import PoolBackend, pool_from_lab
from tests.cni.harness import NETWORK, conf, env, host_state, node, ns_path, run
from tools.lab.lab import Lab

pytestmark = pytest.mark.netns


class HeldBackend(PoolBackend):
    """Once ``hold`` is set, an ADD's allocate waits for ``go``: the ADD is in flight,
    its namespace checked, its veth not made yet."""

    def __init__(self, pool: AddressPool) -> None:
        super().__init__(pool)
        self.hold = False
        self.entered = asyncio.Event()
        self.go = asyncio.Event()

    async def allocate(self, key: IpamKey, pod: PodRef, *, multi_nic: bool) -> Allocation:
        if self.hold:
            self.entered.set()
            await self.go.wait()
        return await super().allocate(key, pod, multi_nic=multi_nic)


def test_an_attachment_whose_add_is_in_flight_keeps_its_address_while_its_veth_is_missing(
    lab: Lab,
) -> None:
    pod = lab.create_pod_namespace("retried")
    gone, retried = (IpamKey(NETWORK, c, "eth0") for c in ("gone", "retried"))

    async def scenario() -> tuple[list[IpamKey], list[IpamKey], int, list[str]]:
        backend = HeldBackend(pool_from_lab(lab))
        async with node(lab, backend) as n:
            # Both hold an address and have no veth: "gone" because its pod's namespace
            # went without a DEL; "retried" because its first ADD failed and its rollback
            # could not release, and the runtime is retrying that ADD now.
            for key in (gone, retried):
                pod_ref = PodRef("default", f"pod-{key.container_id}")
                backend.pool.allocate(key, pod_ref, time.monotonic(), cards=[0])

            def held() -> list[tuple[IpamKey, int]]:
                return [(a.key, len(a.leases)) for a in backend.pool.allocations()]

            def release(key: IpamKey) -> None:
                backend.pool.release(key, time.monotonic())

            backend.hold = True
            add = asyncio.create_task(n.call(env("ADD", "retried", ns_path(pod)), conf()))
            await backend.entered.wait()
            during = await n.plumbing.release_vanished("eni", held, release)
            backend.go.set()
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
