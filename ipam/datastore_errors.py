"""Errors of the datastore (``ipam.pool`` and ``ipam.datastore``).

::

    UltranetError                               (cni.errors)
    └── BackendError                            (cni.backend: what the CNI handler catches)
        └── DatastoreError                      the request contradicts the address state
            ├── PoolExhausted(cards)            no free, out-of-cooldown address on those
            │                                   cards; also a cni.backend.NoFreeAddress
            ├── UnmanagedCard(card)             the card has no pool
            ├── UnknownEni(eni_id)
            ├── UnknownPrefix(prefix)
            ├── InvalidEni(field, value)        an ENI description that cannot be true
            ├── InvalidPrefix(prefix)           not a /28, or outside the ENI's subnet
            ├── Conflict                        the ENI, device or prefix is already known
            ├── EniInUse(eni_id, count)         remove_eni without force on an ENI with pods
            ├── PrefixInUse(prefix, count)      remove_prefix on a prefix with pods
            └── DuplicateAddress(address, keys) two records claim one address (restore)

Messages name the object (card, ENI id, prefix, address) so a log line is enough.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Network

from cni.backend import BackendError, NoFreeAddress


class DatastoreError(BackendError):
    """The request contradicts the node's address state."""


class PoolExhausted(DatastoreError, NoFreeAddress):
    """No free, out-of-cooldown address on the named card(s)."""

    def __init__(self, cards: Iterable[int], detail: str = "") -> None:
        self.cards = tuple(cards)
        names = ", ".join(str(c) for c in self.cards)
        suffix = f" ({detail})" if detail else ""
        super().__init__(f"no free address on network card {names}{suffix}")


class UnmanagedCard(DatastoreError):
    def __init__(self, card: int, managed: Iterable[int]) -> None:
        self.card = card
        listed = ", ".join(str(c) for c in sorted(managed))
        super().__init__(f"network card {card} is not managed (managed: {listed})")


class UnknownEni(DatastoreError):
    def __init__(self, eni_id: str) -> None:
        self.eni_id = eni_id
        super().__init__(f"unknown ENI {eni_id!r}")


class UnknownPrefix(DatastoreError):
    def __init__(self, prefix: object) -> None:
        self.prefix = prefix
        super().__init__(f"unknown prefix {prefix}")


class InvalidEni(DatastoreError):
    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"ENI {field}={value!r}: {reason}")


class InvalidPrefix(DatastoreError):
    def __init__(self, prefix: object, reason: str) -> None:
        self.prefix = prefix
        super().__init__(f"prefix {prefix}: {reason}")


class Conflict(DatastoreError):
    """The ENI, its (card, device index) or the prefix is already in the store."""


class EniInUse(DatastoreError):
    def __init__(self, eni_id: str, count: int) -> None:
        self.eni_id = eni_id
        self.count = count
        super().__init__(
            f"ENI {eni_id} holds {count} assigned address(es); remove it with force=True "
            "only when EC2 says it is gone"
        )


class PrefixInUse(DatastoreError):
    def __init__(self, prefix: IPv4Network, count: int) -> None:
        self.prefix = prefix
        self.count = count
        super().__init__(f"prefix {prefix} holds {count} assigned address(es)")


class DuplicateAddress(DatastoreError):
    def __init__(self, address: object, keys: Iterable[object]) -> None:
        self.address = address
        self.keys = tuple(keys)
        owners = " and ".join(str(k) for k in self.keys)
        super().__init__(f"address {address} is claimed by {owners}; refusing to restore")
