"""An in-process :class:`~cni.backend.IpamBackend` over ``ipam.pool.AddressPool``.

For tests and the benchmark, which run the CNI handler without ``ultranet-ipamd``: the
pool is filled from ENI descriptions (the lab's ``EniView``s), and two switches make the
backend "down" (``BackendUnavailable``) or report degraded connectivity.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Collection, Iterable
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

from cni.backend import Allocation, BackendStatus, BackendUnavailable, PodAddress
from cni.keys import IpamKey, PodRef
from ipam.pool import PREFIX_SIZE, AddressPool, EniInfo


async def _in_memory() -> None:
    """The pool lives in memory only: an allocation is as durable as it gets at once."""


class PoolBackend:
    """The daemon's backend as the tests need it: a pool, a switch to make it "down",
    and a switch to say existing pods lost connectivity."""

    def __init__(self, pool: AddressPool) -> None:
        self.pool = pool
        self.down: str = ""  # non-empty: every call raises BackendUnavailable(down)
        self.connectivity_limited = False
        self.calls: list[str] = []

    def _check(self, call: str) -> None:
        self.calls.append(call)
        if self.down:
            raise BackendUnavailable(self.down)

    async def allocate(self, key: IpamKey, pod: PodRef, *, multi_nic: bool) -> Allocation:
        self._check("allocate")
        cards = self.pool.cards if multi_nic else [0]
        return self.pool.allocate(key, pod, time.monotonic(), cards=cards)

    def allocate_staged(
        self, key: IpamKey, pod: PodRef, *, multi_nic: bool
    ) -> tuple[Allocation, Awaitable[None]]:
        self._check("allocate")
        cards = self.pool.cards if multi_nic else [0]
        return self.pool.allocate(key, pod, time.monotonic(), cards=cards), _in_memory()

    async def release(self, key: IpamKey, *, cooldown: bool = True) -> Allocation | None:
        self._check("release")
        return self.pool.release(key, time.monotonic(), cooldown=cooldown)

    async def gc(self, valid: Collection[IpamKey]) -> list[Allocation]:
        self._check("gc")
        networks = {key.network for key in valid}
        stale = [
            a.key
            for a in self.pool.allocations()
            if a.key.network in networks and a.key not in valid
        ]
        released = [self.pool.release(key, time.monotonic()) for key in stale]
        return [a for a in released if a is not None]

    def lookup(self, key: IpamKey) -> Allocation | None:
        self._check("lookup")
        return self.pool.get(key)

    async def status(self) -> BackendStatus:
        self._check("status")
        free = {}
        now = time.monotonic()
        for card in self.pool.cards:
            usage = self.pool.card(card).usage(now)
            free[card] = usage.prefixes * PREFIX_SIZE - usage.assigned - usage.cooldown
        reason = "an ENI with pods is gone" if self.connectivity_limited else ""
        return BackendStatus(True, reason, free, self.connectivity_limited)

    def held(self) -> set[PodAddress]:
        return {lease.address for a in self.pool.allocations() for lease in a.leases}


class EniDescription(Protocol):
    """What the pool needs of an ENI (``tools.lab.events.EniView`` has it)."""

    @property
    def eni_id(self) -> str: ...
    @property
    def network_card(self) -> int: ...
    @property
    def device_index(self) -> int: ...
    @property
    def subnet(self) -> IPv4Network: ...
    @property
    def primary_ip(self) -> IPv4Address | None: ...
    @property
    def prefixes(self) -> tuple[IPv4Network, ...]: ...


def pool_from_enis(enis: Iterable[EniDescription], *, max_prefixes: int = 8) -> AddressPool:
    """Every ENI with an address and prefixes, each prefix in the pool; no cooldown."""
    usable = [e for e in enis if e.primary_ip is not None and e.prefixes]
    pool = AddressPool({e.network_card for e in usable}, cooldown_s=0)
    for eni in usable:
        assert eni.primary_ip is not None
        card = pool.card(eni.network_card)
        info = EniInfo(
            eni.eni_id, eni.network_card, eni.device_index, eni.subnet, eni.primary_ip, max_prefixes
        )
        card.add_eni(info)
        for prefix in eni.prefixes:
            card.add_prefix(eni.eni_id, prefix)
    return pool
