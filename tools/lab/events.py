"""What the cloud emulator tells the namespaced node when EC2 state changes.

The emulator calls its listeners synchronously, after the change and before the API
answers, so when boto3's AttachNetworkInterface returns the link is already in the
node namespace (real EC2 is slower; IMDS staleness models that separately).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Protocol


@dataclass(frozen=True, slots=True)
class EniView:
    """An attached network interface as the VPC fabric sees it."""

    eni_id: str
    instance_id: str
    mac: str
    interface_type: str  # interface | efa | efa-only
    network_card: int
    device_index: int
    subnet: IPv4Network
    gateway: IPv4Address
    primary_ip: IPv4Address | None  # None for efa-only
    secondary_ips: tuple[IPv4Address, ...]
    prefixes: tuple[IPv4Network, ...]
    # IPv6: the subnet's /64 (None without one), /128 addresses and /80 prefixes
    ipv6_subnet: IPv6Network | None = None
    ipv6_addresses: tuple[IPv6Address, ...] = ()
    ipv6_prefixes: tuple[IPv6Network, ...] = ()


class CloudListener(Protocol):
    def eni_attached(self, eni: EniView) -> None: ...

    def eni_detached(self, eni: EniView) -> None: ...

    def eni_addresses_changed(self, eni: EniView) -> None: ...
