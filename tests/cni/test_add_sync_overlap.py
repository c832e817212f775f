"""An ADD plumbs while its allocation is synced (``IpamBackend.allocate_staged``): when the
sync fails after the plumbing is in place, the ADD takes the plumbing back and fails."""

from __future__ import annotations

import time
from collections.abc import Awaitable

import pytest

from cni.backend import Allocation, BackendError
from cni.keys import IpamKey, PodRef
from ipam.pool import AddressPool
from tests.cni.backend import PoolBackend, pool_from_lab
from tests.cni.harness import conf, env, host_state, node, ns_path, pod_state, run
from tools.lab.lab import Lab

pytestmark = pytest.mark.netns


class RefusingJournal(PoolBackend):
    """Every allocation is taken, then its sync fails (a journal write error): as the
    daemon's datastore does then, the allocation is no longer held."""

    def __init__(self, pool: AddressPool) -> None:
        super().__init__(pool)
        self.synced = 0

    def allocate_staged(
        self, key: IpamKey, pod: PodRef, *, multi_nic: bool
    ) -> tuple[Allocation, Awaitable[None]]:
        cards = self.pool.cards if multi_nic else [0]
        allocation = self.pool.allocate(key, pod, time.monotonic(), cards=cards)
        return allocation, self._refuse(key)

    async def _refuse(self, key: IpamKey) -> None:
        self.synced += 1
        self.pool.release(key, time.monotonic(), cooldown=False)
        raise BackendError("journal write failed: No space left on device")


def test_an_add_whose_allocation_the_journal_refuses_leaves_nothing_plumbed(lab: Lab) -> None:
    pod = lab.create_pod_namespace("refused")
    backend = RefusingJournal(pool_from_lab(lab))

    async def scenario() -> tuple[int, dict[str, object]]:
        async with node(lab, backend) as n:
            code, out = await n.call(env("ADD", "refused", ns_path(pod)), conf())
            await n.plumbing.settle()
            return code, out

    code, out = run(scenario())
    assert (code, out["code"]) == (1, 101), out
    assert "No space left on device" in str(out["details"])
    assert backend.synced == 1
    assert host_state(lab) == {"links": [], "rules": [], "routes": []}
    assert pod_state(pod) == {"links": [], "addrs": [], "rules": []}
    assert backend.held() == set()
