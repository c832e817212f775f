"""What the checkpoint stores and restores of an allocation.

An allocation is persisted as its key (``cni.keys.IpamKey``: network, container id,
interface name), its pod and, per interface, the card and the address. ENIs and prefixes
are not here: after a restart they come from IMDS and EC2, never from the checkpoint, as
in the VPC CNI, whose checkpoint holds each allocation's container id, interface, address
and pod but no ENI: only what the node alone knows is persisted.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

from cni.backend import Allocation, PodAddress
from cni.keys import IpamKey, PodRef


@dataclass(frozen=True, slots=True)
class RecordedAddress:
    """One interface's address of an allocation, as persisted: the card and the address.

    The ENI, route table and gateway are derived again from the prefix that holds the
    address when the record is restored, because they belong to EC2's state, not ours.
    """

    card: int
    address: PodAddress  # IPv6 on an ENABLE_IPv6 node


@dataclass(frozen=True, slots=True)
class AllocationRecord:
    """What the checkpoint keeps of an allocation."""

    key: IpamKey
    pod: PodRef
    addresses: tuple[RecordedAddress, ...]
    allocated_at: float  # the daemon's clock when it was handed out; informational
    # "cni": made by the CNI handler, which plumbs a host veth for it, so a restart may
    # drop it when that veth is gone; "api": made through the socket API, kept as is.
    origin: str = "api"
    egress_v4: IPv4Address | None = None  # an IPv6 pod's node-local IPv4

    @classmethod
    def of(cls, allocation: Allocation) -> AllocationRecord:
        return cls(
            allocation.key,
            allocation.pod,
            tuple(RecordedAddress(lease.card, lease.address) for lease in allocation.leases),
            allocation.allocated_at,
            allocation.origin,
            allocation.egress_v4,
        )
