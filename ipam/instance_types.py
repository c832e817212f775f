"""EC2 instance network limits, from two public snapshots of EC2 DescribeInstanceTypes.

The JSON (``ipam/data/instance-network-limits.json``) is the VPC CNI's own table
(``aws/amazon-vpc-cni-k8s``, ``pkg/vpc/vpc_ip_resource_limit.go``) enriched from moto's
(``getmoto/moto``, ``moto/ec2/resources/instance_types.json``); its header names the
commits and the fields taken from each. The emulator answers DescribeInstanceTypes from it
and the planner computes max pods and NAU from it, so both read the same numbers.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from ipam.errors import UnknownInstanceType

DATA_FILE = "instance-network-limits.json"


@dataclass(frozen=True, slots=True)
class NetworkCard:
    index: int
    max_interfaces: int
    baseline_gbps: float | None


@dataclass(frozen=True, slots=True)
class InstanceType:
    name: str
    max_enis_default_card: int  # the VPC CNI's ENILimit
    max_enis_total: int
    ipv4_per_eni: int  # includes the ENI's primary address
    ipv6_per_eni: int | None
    default_network_card_index: int
    network_cards: tuple[NetworkCard, ...]
    hypervisor: str
    bare_metal: bool
    efa_supported: bool | None
    max_efa_interfaces: int | None
    vcpus: int | None

    @property
    def max_prefixes_per_eni(self) -> int:
        """Each /28 takes one of the ENI's address slots; the primary IP takes one more."""
        return self.ipv4_per_eni - 1

    @property
    def nitro(self) -> bool:
        return self.hypervisor == "nitro" or (self.bare_metal and self.hypervisor != "xen")

    def card(self, index: int) -> NetworkCard:
        for card in self.network_cards:
            if card.index == index:
                return card
        raise KeyError(f"{self.name} has no network card {index}")


def _parse(name: str, raw: dict[str, Any]) -> InstanceType:
    cards = tuple(
        NetworkCard(int(c["index"]), int(c["max_interfaces"]), c.get("baseline_gbps"))
        for c in raw["network_cards"]
    )
    return InstanceType(
        name=name,
        max_enis_default_card=int(raw["max_enis_default_card"]),
        max_enis_total=int(raw.get("max_enis_total") or sum(c.max_interfaces for c in cards)),
        ipv4_per_eni=int(raw["ipv4_per_eni"]),
        ipv6_per_eni=raw.get("ipv6_per_eni"),
        default_network_card_index=int(raw.get("default_network_card_index") or 0),
        network_cards=cards,
        hypervisor=str(raw.get("hypervisor") or "unknown"),
        bare_metal=bool(raw.get("bare_metal")),
        efa_supported=raw.get("efa_supported"),
        max_efa_interfaces=raw.get("max_efa_interfaces"),
        vcpus=raw.get("vcpus"),
    )


@cache
def catalog() -> dict[str, InstanceType]:
    """Every instance type in the data, by name."""
    text = resources.files("ipam").joinpath("data", DATA_FILE).read_text(encoding="utf-8")
    raw = json.loads(text)["instance_types"]
    return {name: _parse(name, spec) for name, spec in raw.items()}


def lookup(name: str) -> InstanceType:
    """The named type, or ``UnknownInstanceType`` with the closest names as suggestions."""
    types = catalog()
    try:
        return types[name]
    except KeyError:
        close = difflib.get_close_matches(name, types.keys(), n=3, cutoff=0.6)
        raise UnknownInstanceType(name, close) from None
