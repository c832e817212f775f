"""Plans at 1K, 10K and 100K nodes: totals against quotas, layout, largest fit, knobs."""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

import pytest

from ipam.nau.budget import evaluate, knobs, largest
from ipam.nau.defaults import DEFAULT_PLAN
from ipam.nau.layout import sizing
from ipam.nau.model import parse_plan
from ipam.nau.subnet_space import SubnetSpace

CONSUMERS = {"nlb": 2, "vpc_endpoints": 10, "nat_gateways": 3, "tgw_attachments": 1}
# 6 per NLB and endpoint per AZ, 6 per NAT gateway and attachment (AWS's table)
INFRA_3AZ = 6 * 3 * (2 + 10) + 6 * 3 + 6 * 1


def plan(nodes: int, warm: dict[str, int] | None = None, **kw: Any) -> Any:
    raw: dict[str, Any] = {
        "node_groups": [{"instance_type": "m7i.4xlarge", "nodes": nodes, "pods_per_node": 12}],
        "consumers": CONSUMERS,
        "warm": warm or {"WARM_PREFIX_TARGET": 1},
    }
    return parse_plan(raw | kw)


@pytest.mark.parametrize(
    ("nodes", "quota", "fits"),
    [
        (1_000, "default", True),
        (10_000, "default", True),  # 30,312 <= 64,000
        (100_000, "max", False),  # 300,312 > 256,000: 3 NAU a node, worked by hand
    ],
)
def test_totals_against_quotas(nodes: int, quota: str, fits: bool) -> None:
    b = evaluate(plan(nodes, quota=quota))
    # 12 pods, WARM_PREFIX_TARGET=1: primary IPv4 + ceil(12/16) + 1 prefixes = 3 per node
    assert b.nau_total == 3 * nodes + INFRA_3AZ
    assert b.fits_nau is fits


def test_100k_with_warm_ip_target_fits_one_vpc() -> None:
    b = evaluate(plan(100_000, warm={"WARM_IP_TARGET": 1}))
    assert b.nau_total == 2 * 100_000 + INFRA_3AZ
    assert b.fits


def test_peered_usage_counts_against_the_peered_quota() -> None:
    b = evaluate(plan(10_000, quota="default", peered_nau=100_000))
    assert b.nau_total <= 64_000
    assert not b.fits_nau  # 30,312 + 100,000 > 128,000


def test_largest_node_count_is_the_quota_over_the_per_node_cost() -> None:
    b = evaluate(plan(100_000))
    best = largest(b)
    assert best.nodes == (256_000 - INFRA_3AZ) // 3
    assert best.limited_by == "NAU quota"


def test_knobs_include_warm_ip_target_saving_one_nau_per_node() -> None:
    b = evaluate(plan(100_000))
    found = {k.change: k for k in knobs(b)}
    knob = found["WARM_IP_TARGET=1 instead of WARM_PREFIX_TARGET=1"]
    assert knob.nau_total == b.nau_total - 100_000
    assert knob.fits


def test_embedded_default_does_not_fit_and_says_how_it_could() -> None:
    b = evaluate(parse_plan(DEFAULT_PLAN))
    assert b.plan.nodes == 100_000
    assert not b.fits
    kinds = {k.kind for k in knobs(b)}
    assert "split" in kinds


def test_layout_fits_the_block_quota_and_reservations_are_inside_their_subnets() -> None:
    b = evaluate(plan(100_000, warm={"WARM_IP_TARGET": 1}))
    layout = b.layout
    assert layout.fits_max and len(layout.blocks) <= 50
    cidrs = [s.cidr for s in layout.subnets]
    for i, a in enumerate(cidrs):  # no two subnets overlap, each in a VPC block
        assert any(a.subnet_of(block) for block in layout.blocks)
        assert not any(a.overlaps(other) for other in cidrs[i + 1 :])
    for subnet in layout.subnets:
        for r in subnet.reservations:
            assert r.subnet_of(subnet.cidr)
        assert subnet.nodes <= subnet.capacity
    nodes = sum(s.nodes for s in layout.subnets if s.role == "nodes")
    assert nodes == 100_000


def test_prefixes_in_an_empty_subnet_match_the_allocator() -> None:
    # our arithmetic (ipam/nau/layout.py): 2^(28-n) - 2 prefixes in an empty /n; the
    # allocator, which applies EC2's reserved addresses and /28 alignment, must agree
    for n in (24, 20):
        space = SubnetSpace(IPv4Network(f"100.64.0.0/{n}"))
        assert space.stats().free_blocks == 2 ** (28 - n) - 2
    assert sizing(20, 1, 254, reservations=False).nodes == 1  # the address fits in block 0
    assert sizing(20, 1, 255, reservations=False).nodes == 0


def test_reserved_layout_holds_what_the_allocator_can_give() -> None:
    fit = sizing(20, 1, 2, reservations=True)
    assert fit.singles_bits is not None
    space = SubnetSpace(IPv4Network("100.64.0.0/20"))
    from ipam.nau.subnet_space import ReservationKind

    base = 0x64400000
    for k in range(fit.singles_bits, 12):
        space.reserve(IPv4Network((base + (1 << k), 32 - k)), ReservationKind.PREFIX)
    for _ in range(fit.nodes):
        space.allocate_address()
        space.allocate_prefix()
        space.allocate_prefix()
    assert space.stats().prefixes == 2 * fit.nodes


def test_secondary_ip_mode_needs_millions_at_100k() -> None:
    b = evaluate(
        parse_plan(
            {
                "mode": "secondary-ip",
                "node_groups": [
                    {"instance_type": "p5.48xlarge", "nodes": 100_000, "pods_per_node": 12}
                ],
            }
        )
    )
    assert b.nau_total == 101 * 100_000  # ~10M by hand (see test_node), impossible
    assert not b.fits
