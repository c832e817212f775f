"""Per-node NAU: warm-target behaviour, EFA, multi-NIC, custom networking, public IPv4.

Expected values are worked by hand from the VPC CNI's warm-pool rules and the NAU page's
units (``ipam/nau/README.md``, Sources), not from the code.
"""

from __future__ import annotations

from math import ceil
from typing import Any

import pytest

from ipam.errors import ConfigError
from ipam.nau.errors import PlanError
from ipam.nau.model import parse_plan
from ipam.nau.node import NodeBudget, node_budget


def budget(itype: str = "m5.large", pods: int = 10, **kw: Any) -> NodeBudget:
    group = {"instance_type": itype, "nodes": 1, "pods_per_node": pods}
    plan_keys = {
        "mode",
        "warm",
        "custom_networking",
        "efa_counting",
        "extra_eni_primary_ip",
        "count_eks_pods",
        "ipv6_node_address",
    }
    group.update({k: v for k, v in kw.items() if k not in plan_keys})
    plan = parse_plan({"node_groups": [group], **{k: v for k, v in kw.items() if k in plan_keys}})
    return node_budget(plan, plan.groups[0])


def prefixes(b: NodeBudget) -> int:
    return sum(i.ipv4_prefixes for i in b.interfaces)


@pytest.mark.parametrize("target", [1, 2, 3])
@pytest.mark.parametrize("pods", [0, 1, 15, 16, 17, 40, 100])
def test_warm_prefix_target_keeps_k_free_prefixes(pods: int, target: int) -> None:
    b = budget("m5.xlarge", pods, warm={"WARM_PREFIX_TARGET": target})
    # ceil(p/16) + k, capped by ceil(maxPods/16); m5.xlarge (4 vCPUs) caps at 110
    assert prefixes(b) == min(ceil(pods / 16) + target, ceil(110 / 16))


@pytest.mark.parametrize("pods", [0, 1, 15, 16, 31, 47])
def test_warm_ip_target_keeps_that_many_addresses_free(pods: int) -> None:
    b = budget("m5.xlarge", pods, warm={"WARM_IP_TARGET": 1})
    assert prefixes(b) == ceil((pods + 1) / 16)


@pytest.mark.parametrize(("pods", "minimum"), [(0, 40), (10, 40), (50, 40), (3, 16)])
def test_minimum_ip_target_is_a_floor(pods: int, minimum: int) -> None:
    b = budget("m5.xlarge", pods, warm={"MINIMUM_IP_TARGET": minimum})
    # ipam.warm difference 4: with only MINIMUM_IP_TARGET set one address stays free
    assert prefixes(b) == max(ceil(minimum / 16), ceil((pods + 1) / 16))


def test_hand_worked_prefix_mode_nodes() -> None:
    # prefix mode, 1 ENI: primary IPv4 + prefixes; WARM_PREFIX_TARGET=1, <= 16 pods -> 1 + 2;
    # WARM_IP_TARGET=1, <= 15 pods -> 1 + 1
    assert budget(pods=16, warm={"WARM_PREFIX_TARGET": 1}).nau == 3
    assert budget(pods=15, warm={"WARM_IP_TARGET": 1}).nau == 2
    # WARM_IP_TARGET instead of WARM_PREFIX_TARGET saves one NAU per node
    assert budget(pods=12).nau - budget(pods=12, warm={"WARM_IP_TARGET": 1}).nau == 1


@pytest.mark.parametrize("pods", [0, 5, 9, 10, 20, 27])
def test_warm_eni_target_attaches_full_enis(pods: int) -> None:
    # m5.large: 3 ENIs x 10 IPv4, S = 9 secondaries per ENI, max pods 29
    s, max_enis = 9, 3
    enis = min(max_enis, max(1, ceil((pods + s) / s)), max(ceil(29 / s), ceil(pods / s)))
    b = budget(pods=pods, mode="secondary-ip")
    # every ENI: its primary IPv4 + 9 secondaries; each extra one its interface unit too
    assert b.nau == enis * (1 + s) + (enis - 1)
    assert len(b.interfaces) == enis


def test_secondary_warm_ip_target() -> None:
    b = budget(pods=12, mode="secondary-ip", warm={"WARM_IP_TARGET": 5})
    ips = 12 + 5  # 17 secondaries on 2 ENIs of 9
    assert b.nau == (1 + 9) + (1 + 1 + 8)
    assert sum(i.ipv4 for i in b.interfaces) == ips + 2


def test_p5_secondary_ip_is_about_a_hundred() -> None:
    b = budget("p5.48xlarge", 12, mode="secondary-ip")
    # 2 ENIs on card 0, 49 secondaries each: 50 + (1 + 50) = 101
    assert b.nau == 101


@pytest.mark.parametrize(("counting", "per_efa_only"), [("restate", 1), ("adds", 2)])
def test_efa_only_interfaces(counting: str, per_efa_only: int) -> None:
    base = budget("trn2.48xlarge", 12, efa_counting=counting)
    with_efa = budget(
        "trn2.48xlarge", 12, efa_counting=counting, efa_only_interfaces=15, efa_primary=True
    )
    # 15 EFA-only on cards 1..15, plus the EFA row for the primary EFA
    assert with_efa.nau - base.nau == 15 * per_efa_only + 1
    assert with_efa.nau >= 18  # 16 EFA interfaces + the primary IPv4 + >= 1 prefix


def test_efa_with_ena_has_an_address() -> None:
    base = budget("p4d.24xlarge", 12, efa_counting="restate")
    b = budget("p4d.24xlarge", 12, efa_counting="restate", efa_interfaces=3)
    assert b.nau - base.nau == 3 * (1 + 1)  # EFA row + its IPv4


def test_public_ipv4_adds_one() -> None:
    assert budget(public_ipv4=True).nau - budget().nau == 1


def test_custom_networking_moves_prefixes_to_a_pod_eni() -> None:
    plain = budget(pods=10)
    custom = budget(pods=10, custom_networking=True)
    # the pod ENI: interface unit + its own primary IPv4, in a pod subnet
    assert custom.nau - plain.nau == 2
    pod = [i for i in custom.interfaces if i.pod_subnet]
    assert len(pod) == 1 and pod[0].ipv4_prefixes == prefixes(plain)


def test_multi_nic_cards_use_warm_ip_one() -> None:
    base = budget("p5.48xlarge", 12)
    b = budget("p5.48xlarge", 12, multi_nic_cards=3, multi_nic_pods=4)
    # per card: interface + primary IPv4 + ceil((4 + 1) / 16) prefixes
    assert b.nau - base.nau == 3 * (1 + 1 + 1)


def test_ipv6_mode() -> None:
    assert budget(mode="ipv6").nau == 3  # IPv4 + /80 + node IPv6
    assert budget(mode="ipv6", ipv6_node_address=False).nau == 2


def test_count_eks_pods() -> None:
    assert budget(pods=10, count_eks_pods=True).nau - budget(pods=10).nau == 10


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"efa_only_interfaces": 1}, "does not support EFA"),
        ({"itype": "p4d.24xlarge", "efa_only_interfaces": 5}, "allows 4"),
        ({"pods": 109}, "exceed max pods 110"),
        ({"mode": "ipv6", "warm": {"WARM_IP_TARGET": 1}}, "do not apply in IPv6"),
        ({"warm": {"WARM_ENI_TARGET": 1}}, "ignored by the VPC CNI in prefix mode"),
        ({"mode": "secondary-ip", "warm": {"WARM_PREFIX_TARGET": 1}}, "prefix mode only"),
        ({"warm": {"WARM_PREFIX_TARGET": 0}}, "not supported"),
        ({"mode": "ipv6", "custom_networking": True}, "IPv6"),
        ({"itype": "p3.2xlarge"}, "Nitro"),
        ({"multi_nic_cards": 1}, "network card"),
    ],
)
def test_impossible_combinations(kw: dict[str, Any], message: str) -> None:
    itype = kw.pop("itype", "m5.large")
    pods = kw.pop("pods", 10)
    with pytest.raises(PlanError, match=message):
        budget(itype, pods, **kw)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"nodes": 0}, "nodes"),
        ({"nodes": -5}, "nodes"),
        ({"nodes": "ten"}, "nodes"),
        ({"pods_per_node": -1}, "pods_per_node"),
        ({"nodez": 1}, "nodez"),
    ],
)
def test_bad_numbers_name_the_field(raw: dict[str, Any], field: str) -> None:
    group = {"instance_type": "m5.large", "nodes": 1, "pods_per_node": 1} | raw
    with pytest.raises(ConfigError, match=field):
        parse_plan({"node_groups": [group]})
