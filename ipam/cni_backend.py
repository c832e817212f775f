"""The node agent as the CNI handler's IPAM backend (``cni.backend.IpamBackend``).

The CNI logic lives in ``cni/`` and runs inside the daemon; this adapter is the only
place the two meet, so neither package imports the other's internals.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable
from pathlib import Path

from cni.backend import Allocation, BackendStatus, BackendUnavailable, PodAddress
from cni.keys import IpamKey, PodRef
from ipam.agent import AgentError, NodeAgent


class AgentBackend:
    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    def _started(self) -> NodeAgent:
        if self.agent.pool is None:
            raise BackendUnavailable("ultranet-ipamd is still starting")
        return self.agent

    async def allocate(self, key: IpamKey, pod: PodRef, *, multi_nic: bool) -> Allocation:
        return await self._started().allocate(key, pod, multi_nic=multi_nic, origin="cni")

    def allocate_staged(
        self, key: IpamKey, pod: PodRef, *, multi_nic: bool
    ) -> tuple[Allocation, Awaitable[None]]:
        return self._started().allocate_overlapped(key, pod, multi_nic=multi_nic, origin="cni")

    async def release(self, key: IpamKey, *, cooldown: bool = True) -> Allocation | None:
        return await self._started().release(key, cooldown=cooldown)

    async def gc(self, valid: Collection[IpamKey]) -> list[Allocation]:
        networks = {key.network for key in valid}
        released: list[Allocation] = []
        for network in networks:
            released += await self._started().gc(
                network, [k for k in valid if k.network == network]
            )
        return released

    def lookup(self, key: IpamKey) -> Allocation | None:
        return self._started().lookup(key)

    async def status(self) -> BackendStatus:
        try:
            status = await self._started().status()
        except AgentError as err:
            raise BackendUnavailable(str(err)) from err
        return BackendStatus(
            ready=status.ready, reason=status.reason, free_addresses=dict(status.free_addresses)
        )


def accounted_veths(allocations: Iterable[Allocation], veth_prefix: str) -> set[str]:
    """The host veth names the allocations account for: one per lease, and an IPv6
    pod's IPv4 egress veth when it holds a node-local IPv4."""
    from cni.plumbing import host_ifname, v4_egress_ifname

    leases = {
        host_ifname(a.key, index, veth_prefix)
        for a in allocations
        for index in range(len(a.leases))
    }
    return leases | {v4_egress_ifname(a.key) for a in allocations if a.egress_v4 is not None}


def accounted_addresses(allocations: Iterable[Allocation]) -> set[PodAddress]:
    """The pod addresses the allocations hold: every lease's."""
    return {lease.address for a in allocations for lease in a.leases}


def host_veth_alive(veth_prefix: str = "eni") -> Callable[[Allocation], bool]:
    """A ``pod_alive`` check for restarts: the pod's host-side veth still exists.

    The VPC CNI drops, after a restart, allocations whose host veth is gone
    (``pkg/ipamd/datastore/data_store.go``: ``ReadBackingStore``,
    ``normalizeCheckpointDataByPodVethExistence``): the pod went away while the daemon was
    down and its DEL was lost.
    """
    from cni.plumbing import host_ifname

    def alive(allocation: Allocation) -> bool:
        name = host_ifname(allocation.key, 0, veth_prefix)
        return Path("/sys/class/net", name).exists()

    return alive
