"""The port between the CNI handler and the node daemon's address management.

``ultranet-ipamd`` implements :class:`IpamBackend` over its datastore and hands it to
:class:`cni.handler.CniHandler`; the tests use an in-process one over
``ipam.pool.AddressPool`` (``tests/cni/backend.py``). Errors a backend raises:

* ``ipam.datastore_errors.PoolExhausted``: no address now (ADD answers code 11, STATUS 50);
* another ``ipam.datastore_errors.DatastoreError``: the request contradicts the store
  (ADD answers code 101);
* :class:`BackendUnavailable`: the backend cannot answer at all yet (not synced with
  EC2, store failing). ADD answers code 11; DEL tears down from ``prevResult`` and spools
  the release (``cni.spool``) so it happens once the backend is back.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ipam.errors import UltranetError
from ipam.keys import IpamKey, PodRef
from ipam.pool import Allocation

__all__ = ["BackendStatus", "BackendUnavailable", "IpamBackend"]


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

    async def release(self, key: IpamKey) -> Allocation | None:
        """Give back ``key``'s addresses; None if it held none (idempotent)."""
        ...

    async def gc(self, valid: Collection[IpamKey]) -> list[Allocation]:
        """Release this network's allocations whose key is not in ``valid``; returns them.

        Every key in ``valid`` has the network of the GC request; allocations of other
        networks are never touched."""
        ...

    def lookup(self, key: IpamKey) -> Allocation | None: ...

    async def status(self) -> BackendStatus: ...
