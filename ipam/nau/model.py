"""The planner's inputs, validated once: a :class:`Plan` of node groups and VPC consumers.

A plan comes from a mapping (a YAML plan file, or the CLI's flags folded into the same
shape), so there is one parser and one set of error messages. Every error is a
``ConfigError(field, value, reason)`` naming the field; unknown keys get a did-you-mean.
The warm-pool knobs keep the VPC CNI's environment names (``WARM_PREFIX_TARGET`` ...),
as ``ipam.config`` does for the daemon.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network
from typing import Any, Literal

from ipam.errors import ConfigError
from ipam.nau.maxpods import Mode
from ipam.nau.rules import CONSERVATIVE_RULES, NauRules

WARM_PREFIX_TARGET = "WARM_PREFIX_TARGET"
WARM_IP_TARGET = "WARM_IP_TARGET"
MINIMUM_IP_TARGET = "MINIMUM_IP_TARGET"
WARM_ENI_TARGET = "WARM_ENI_TARGET"
WARM_KNOBS = (WARM_PREFIX_TARGET, WARM_IP_TARGET, MINIMUM_IP_TARGET, WARM_ENI_TARGET)

QuotaLevel = Literal["default", "max"] | int
MAX_NODES = 10_000_000  # far beyond any VPC; catches typos such as an extra zero or two


@dataclass(frozen=True, slots=True)
class WarmKnobs:
    """``None`` means not given: the VPC CNI's chart defaults then apply."""

    warm_prefix_target: int | None = None
    warm_ip_target: int | None = None
    minimum_ip_target: int | None = None
    warm_eni_target: int | None = None

    @property
    def ip_targets_set(self) -> bool:
        return bool(self.warm_ip_target) or bool(self.minimum_ip_target)

    def given(self) -> dict[str, int]:
        values = {
            WARM_PREFIX_TARGET: self.warm_prefix_target,
            WARM_IP_TARGET: self.warm_ip_target,
            MINIMUM_IP_TARGET: self.minimum_ip_target,
            WARM_ENI_TARGET: self.warm_eni_target,
        }
        return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True, slots=True)
class NodeGroup:
    name: str
    instance_type: str
    nodes: int
    pods_per_node: int  # pods with a VPC address (host-network pods excluded)
    max_pods: int | None = None  # None: the EKS calculator's value
    efa_interfaces: int = 0  # EFA with ENA, besides the primary; each has an IPv4
    efa_only_interfaces: int = 0  # no IP address
    efa_primary: bool = False  # the primary interface is an EFA (with ENA)
    multi_nic_cards: int = 0  # cards > 0 given pod addresses (ENABLE_MULTI_NIC)
    multi_nic_pods: int = 0  # pods per node that take one address on every such card
    public_ipv4: bool = False


@dataclass(frozen=True, slots=True)
class Consumers:
    """VPC resources besides nodes. Per-AZ resources are counts of resources, not ENIs."""

    nlb: int = 0  # per AZ
    gwlb: int = 0  # per AZ
    vpc_endpoints: int = 0  # interface endpoints, per AZ
    nat_gateways: int = 0
    lambda_functions: int = 0
    efs_mount_targets: int = 0
    tgw_attachments: int = 0
    other_nau: int = 0  # anything else, as NAU (ALB, RDS, ... are not on AWS's list)


@dataclass(frozen=True, slots=True)
class Plan:
    groups: tuple[NodeGroup, ...]
    mode: Mode = Mode.PREFIX
    warm: WarmKnobs = WarmKnobs()
    custom_networking: bool = False
    azs: int = 3
    consumers: Consumers = Consumers()
    peered_nau: int = 0  # NAU of same-Region peered VPCs
    quota: QuotaLevel = "max"
    rules: NauRules = CONSERVATIVE_RULES
    count_eks_pods: bool = False  # the "EKS pod = 1" row for every pod
    ipv6_node_address: bool = True  # IPv6 mode: the node's own IPv6 address counts
    prefix_reservations: bool = True  # layout reserves prefix space in mixed subnets
    vpc_cidr: IPv4Network = field(default_factory=lambda: IPv4Network("10.0.0.0/16"))
    name: str = "plan"

    @property
    def nodes(self) -> int:
        return sum(g.nodes for g in self.groups)


# -- parsing ------------------------------------------------------------------------------

_GROUP_KEYS = {f for f in NodeGroup.__dataclass_fields__}
_CONSUMER_KEYS = {f for f in Consumers.__dataclass_fields__}
_PLAN_KEYS = {
    "name",
    "mode",
    "warm",
    "custom_networking",
    "azs",
    "consumers",
    "peered_nau",
    "quota",
    "efa_counting",
    "extra_eni_primary_ip",
    "count_eks_pods",
    "ipv6_node_address",
    "prefix_reservations",
    "vpc_cidr",
    "node_groups",
}


def _check_keys(where: str, raw: Mapping[str, Any], allowed: set[str] | tuple[str, ...]) -> None:
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(allowed)}"
            raise ConfigError(f"{where}{key}", raw[key], f"unknown key ({hint})")


def _int(name: str, value: object, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, value, "must be a whole number")
    if value < minimum:
        raise ConfigError(name, value, f"must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, value, f"must be <= {maximum:,}")
    return value


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(name, value, "must be true or false")
    return value


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(name, value, f"must be one of {', '.join(choices)}")
    return str(value)


def _mapping(name: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(name, value, "must be a mapping")
    return value


def parse_warm(raw: Mapping[str, Any]) -> WarmKnobs:
    _check_keys("warm.", raw, WARM_KNOBS)

    def knob(key: str) -> int | None:
        value = raw.get(key)
        return None if value is None else _int(key, value)

    return WarmKnobs(
        knob(WARM_PREFIX_TARGET),
        knob(WARM_IP_TARGET),
        knob(MINIMUM_IP_TARGET),
        knob(WARM_ENI_TARGET),
    )


def parse_group(index: int, raw: Mapping[str, Any]) -> NodeGroup:
    where = f"node_groups[{index}]."
    _check_keys(where, raw, _GROUP_KEYS)
    for key in ("instance_type", "nodes", "pods_per_node"):
        if key not in raw:
            raise ConfigError(f"{where}{key}", None, "is required")
    itype = raw["instance_type"]
    if not isinstance(itype, str) or not itype:
        raise ConfigError(f"{where}instance_type", itype, "must be an instance type name")
    max_pods = raw.get("max_pods")
    group = NodeGroup(
        name=str(raw.get("name") or itype),
        instance_type=itype,
        nodes=_int(f"{where}nodes", raw["nodes"], 1, MAX_NODES),
        pods_per_node=_int(f"{where}pods_per_node", raw["pods_per_node"]),
        max_pods=None if max_pods is None else _int(f"{where}max_pods", max_pods, 1),
        efa_interfaces=_int(f"{where}efa_interfaces", raw.get("efa_interfaces", 0)),
        efa_only_interfaces=_int(f"{where}efa_only_interfaces", raw.get("efa_only_interfaces", 0)),
        efa_primary=_bool(f"{where}efa_primary", raw.get("efa_primary", False)),
        multi_nic_cards=_int(f"{where}multi_nic_cards", raw.get("multi_nic_cards", 0)),
        multi_nic_pods=_int(f"{where}multi_nic_pods", raw.get("multi_nic_pods", 0)),
        public_ipv4=_bool(f"{where}public_ipv4", raw.get("public_ipv4", False)),
    )
    if group.multi_nic_pods > group.pods_per_node:
        raise ConfigError(
            f"{where}multi_nic_pods", group.multi_nic_pods, "must not exceed pods_per_node"
        )
    if group.multi_nic_pods and not group.multi_nic_cards:
        raise ConfigError(f"{where}multi_nic_pods", group.multi_nic_pods, "needs multi_nic_cards")
    return group


def parse_consumers(raw: Mapping[str, Any]) -> Consumers:
    _check_keys("consumers.", raw, _CONSUMER_KEYS)
    return Consumers(**{k: _int(f"consumers.{k}", v) for k, v in raw.items()})


def _quota(value: object) -> QuotaLevel:
    if value in ("default", "max"):
        return "default" if value == "default" else "max"
    return _int("quota", value, 1)


def parse_plan(raw: Mapping[str, Any]) -> Plan:
    """A validated :class:`Plan` from a plan file's mapping."""
    raw = _mapping("plan", raw)
    _check_keys("", raw, _PLAN_KEYS)
    groups_raw = raw.get("node_groups")
    if not isinstance(groups_raw, list) or not groups_raw:
        raise ConfigError("node_groups", groups_raw, "must be a non-empty list of node groups")
    groups = tuple(
        parse_group(i, _mapping(f"node_groups[{i}]", g)) for i, g in enumerate(groups_raw)
    )
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ConfigError("node_groups", names, "group names must be unique")
    efa_counting = _choice("efa_counting", raw.get("efa_counting", "adds"), ("adds", "restate"))
    rules = replace(
        CONSERVATIVE_RULES,
        efa_adds_to_interface=efa_counting == "adds",
        extra_interface_primary_ip=_bool(
            "extra_eni_primary_ip", raw.get("extra_eni_primary_ip", True)
        ),
    )
    try:
        vpc_cidr = IPv4Network(str(raw.get("vpc_cidr", "10.0.0.0/16")))
    except ValueError as err:
        raise ConfigError("vpc_cidr", raw.get("vpc_cidr"), str(err)) from None
    if vpc_cidr.prefixlen != 16 or not vpc_cidr.is_private:
        raise ConfigError("vpc_cidr", str(vpc_cidr), "must be a private (RFC 1918) /16")
    modes = tuple(m.value for m in Mode)
    return Plan(
        groups=groups,
        mode=Mode(_choice("mode", raw.get("mode", "prefix"), modes)),
        warm=parse_warm(_mapping("warm", raw.get("warm") or {})),
        custom_networking=_bool("custom_networking", raw.get("custom_networking", False)),
        azs=_int("azs", raw.get("azs", 3), 1, 32),
        consumers=parse_consumers(_mapping("consumers", raw.get("consumers") or {})),
        peered_nau=_int("peered_nau", raw.get("peered_nau", 0)),
        quota=_quota(raw.get("quota", "max")),
        rules=rules,
        count_eks_pods=_bool("count_eks_pods", raw.get("count_eks_pods", False)),
        ipv6_node_address=_bool("ipv6_node_address", raw.get("ipv6_node_address", True)),
        prefix_reservations=_bool("prefix_reservations", raw.get("prefix_reservations", True)),
        vpc_cidr=vpc_cidr,
        name=str(raw.get("name", "plan")),
    )
