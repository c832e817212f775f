"""A DEL of an attachment already torn down (containerd sends one more from
RemovePodSandbox; the kubelet retries StopPodSandbox) finds no veth and hands the reaper
nothing: the reference plugins' repeated DEL is an exec and a file lookup, and ours
should cost no more than the lookups."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from tests.cni.backend import PoolBackend, pool_from_lab
from tests.cni.harness import conf, env, host_state, node, run
from tools.lab.lab import Lab

pytestmark = pytest.mark.netns


def test_a_repeated_del_without_netns_or_prev_result_queues_no_veth_deletion(lab: Lab) -> None:
    pod = lab.create_pod_namespace("twice")

    async def scenario() -> tuple[list[str], list[str]]:
        async with node(lab, PoolBackend(pool_from_lab(lab)), max_interfaces=4) as n:
            reaper = n.plumbing._reaper
            queued: list[str] = []
            delete_all = reaper.delete_all

            def spied(names: Sequence[str]) -> list[asyncio.Future[int]]:
                queued.extend(names)
                return delete_all(names)

            reaper.delete_all = spied  # type: ignore[method-assign]
            added = await n.add("twice", pod)
            await n.delete("twice", pod, added)
            await n.plumbing.settle()
            first = list(queued)
            queued.clear()
            # RemovePodSandbox's DEL: the namespace is gone (empty CNI_NETNS), libcni has
            # dropped its cached result, and the allocation is released.
            code, out = await n.call(env("DEL", "twice", ""), conf())
            assert code == 0, out
            return first, queued

    first, repeated = run(scenario())
    assert len(first) == 1  # the first DEL deleted the veth it found
    assert repeated == []
    assert host_state(lab) == {"links": [], "rules": [], "routes": []}
