"""The port between the CNI handler and the node daemon's address management.

``ultranet-ipamd`` implements :class:`IpamBackend` over its datastore
(``ipam.cni_backend``) and hands it to :class:`cni.handler.CniHandler`; the tests and the
lab use an in-process one over the address pool (``tools.lab.pool_backend``). The port's
types live here, in ``cni``, and ``ipam`` imports them: the package graph is one-way,
``ipam`` -> ``cni``. Errors a backend raises:

* :class:`NoFreeAddress`: no address now (ADD answers code 11, STATUS 50);
* another :class:`BackendError`: the request contradicts the store, or the store
  failed (ADD answers code 101, DEL reports it, GC answers code 11);
* :class:`BackendUnavailable`: the backend cannot answer at all yet (not synced with
  EC2, store failing). ADD answers code 11; DEL tears down from ``prevResult`` and spools
  the release (``cni.spool``) so it happens once the backend is back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Collection, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Protocol

from cni.errors import UltranetError
from cni.keys import IpamKey, PodRef

__all__ = [
    "MAIN_TABLE",
    "Allocation",
    "BackendError",
    "BackendStatus",
    "BackendUnavailable",
    "IpamBackend",
    "Lease",
    "NoFreeAddress",
    "PodAddress",
    "PodPrefix",
]

# Linux's main routing table (RT_TABLE_MAIN): the primary ENI's routes live there.
MAIN_TABLE = 254

# A node is single stack, as in the VPC CNI: IPv4 pods take addresses from /28 prefixes,
# IPv6 pods /128s from the primary ENI's /80 (ENABLE_IPv6).
PodAddress = IPv4Address | IPv6Address
PodPrefix = IPv4Network | IPv6Network


@dataclass(frozen=True, slots=True)
class Lease:
    """One interface's address of an allocation, with what the plumbing needs."""

    card: int
    address: PodAddress
    prefix: PodPrefix
    eni_id: str
    device: int
    route_table: int
    gateway: PodAddress  # the subnet's VPC router
    subnet: PodPrefix


@dataclass(frozen=True, slots=True)
class Allocation:
    """What an attachment holds: one lease per network card, index 0 first."""

    key: IpamKey
    pod: PodRef
    leases: tuple[Lease, ...]
    allocated_at: float
    # "cni": made by the CNI handler, which plumbs a host veth for it, so a restart may
    # drop it when that veth is gone; "api": made through the daemon's socket API.
    origin: str = "api"
    # An IPv6 pod's node-local IPv4 (ENABLE_V4_EGRESS): its second, egress-only veth.
    egress_v4: IPv4Address | None = None


class BackendError(UltranetError):
    """The backend refused the request (it contradicts the address state) or failed it."""


class NoFreeAddress(BackendError):
    """No address can be handed out now (ADD answers code 11: the runtime retries)."""


class BackendUnavailable(UltranetError):
    """The backend cannot serve requests now; the message says why."""


@dataclass(frozen=True, slots=True)
class BackendStatus:
    """What STATUS reports (CNI spec 1.1.0 §"STATUS").

    ``ready`` false: ADD cannot succeed (code 50, ``reason`` says why).
    ``connectivity_limited``: existing pods may have lost connectivity too (code 51),
    e.g. an ENI carrying pod addresses is gone.
    ``free_addresses``: usable addresses per managed network card; card 0 at zero
    means a single-NIC ADD would fail, so STATUS answers 50 with that as the reason.
    """

    ready: bool
    reason: str = ""
    free_addresses: Mapping[int, int] = field(default_factory=dict)
    connectivity_limited: bool = False


class IpamBackend(Protocol):
    async def allocate(self, key: IpamKey, pod: PodRef, *, multi_nic: bool) -> Allocation:
        """An address on card 0, or one on every managed card with ``multi_nic``.

        The same key gets the same allocation back (a runtime retries ADD)."""
        ...

    def allocate_staged(
        self, key: IpamKey, pod: PodRef, *, multi_nic: bool
    ) -> tuple[Allocation, Awaitable[None]]:
        """As :meth:`allocate`, but back as soon as the address is taken, with what to
        await before the allocation may be reported: it resolves once the allocation is
        durable, or raises :class:`BackendError` if it never will be (it is then not
        held). A CNI ADD plumbs meanwhile, so its netlink work overlaps the journal's
        sync; a crash before the sync leaves only plumbing no allocation accounts for,
        which the daemon's stray sweep removes."""
        ...

    async def release(self, key: IpamKey, *, cooldown: bool = True) -> Allocation | None:
        """Give back ``key``'s addresses; None if it held none (idempotent).

        They go into the node's cooldown (IP_COOLDOWN_PERIOD: kube-proxy may still route
        to a deleted pod's address) unless ``cooldown`` is false, which an ADD that failed
        asks for: its address was never reported, so nothing can route to it. The release
        is durable as any other."""
        ...

    async def gc(self, valid: Collection[IpamKey]) -> list[Allocation]:
        """Release this network's allocations whose key is not in ``valid``; returns them.

        Every key in ``valid`` has the network of the GC request; allocations of other
        networks are never touched."""
        ...

    def lookup(self, key: IpamKey) -> Allocation | None: ...

    async def status(self) -> BackendStatus: ...
