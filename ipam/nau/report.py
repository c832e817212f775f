"""Render a planned budget: a table for people, a JSON document for automation."""

from __future__ import annotations

from typing import Any

from ipam.nau.budget import Budget, Knob, Largest
from ipam.nau.rules import (
    NAU_QUOTA_DEFAULT,
    NAU_QUOTA_MAX,
    PEERED_NAU_QUOTA_DEFAULT,
    PEERED_NAU_QUOTA_MAX,
    RULES_VERSION,
    VPC_CIDR_BLOCKS_DEFAULT,
    VPC_CIDR_BLOCKS_MAX,
    NauRules,
)

SWITCH_NOTES = {
    "efa-counting": "does the EFA row add to the additional-interface row or restate it?",
    "extra-eni-primary-ip": "does an extra ENI's own primary IPv4 count on top of its unit?",
}


def rule_lines(rules: NauRules) -> list[str]:
    lines = [f"NAU rule table {RULES_VERSION}"]
    lines += [f"  {units:>2}  {resource}" for resource, units in rules.table()]
    for switch, chosen, other in rules.switches():
        lines.append(
            f"  ambiguous: {switch}={chosen} (alternative {other}): {SWITCH_NOTES[switch]}"
        )
    return lines


def notes_of(budget: Budget) -> list[str]:
    plan = budget.plan
    notes = [
        "EKS pod row: "
        + ("every pod counts 1" if plan.count_eks_pods else "not applied to pods with a node IP")
        + " (AWS does not say which pods it means; --count-eks-pods counts every pod)",
    ]
    if plan.mode.value == "ipv6":
        notes.append(
            "IPv6: node IPv6 address "
            + ("counted" if plan.ipv6_node_address else "not counted")
            + "; warm targets do not apply"
        )
    seen = set()
    for b in budget.nodes:
        for note in b.notes:
            if note not in seen:
                seen.add(note)
                notes.append(note)
    notes.append(
        "nodes are spread evenly over the AZs; each group gets its own subnets; "
        "pods are packed into prefixes and no address is in cooldown (steady state)"
    )
    return notes


def to_json(budget: Budget, best: Largest, found: list[Knob]) -> dict[str, Any]:
    plan, layout = budget.plan, budget.layout
    return {
        "plan": plan.name,
        "rules_version": RULES_VERSION,
        "rules": [{"resource": r, "nau": u} for r, u in plan.rules.table()],
        "switches": {s: c for s, c, _ in plan.rules.switches()}
        | {"count_eks_pods": plan.count_eks_pods},
        "mode": plan.mode.value,
        "warm": plan.warm.given(),
        "custom_networking": plan.custom_networking,
        "azs": plan.azs,
        "nodes": plan.nodes,
        "nau_per_node": {b.group.name: b.nau for b in budget.nodes},
        "groups": [
            {
                "name": b.group.name,
                "instance_type": b.itype.name,
                "nodes": b.group.nodes,
                "pods_per_node": b.group.pods_per_node,
                "max_pods": b.max_pods,
                "max_pods_source": b.max_pods_source,
                "nau_per_node": b.nau,
                "nau_total": b.nau * b.group.nodes,
                "breakdown": dict(b.breakdown),
                "interfaces": len(b.interfaces),
                "ipv4_singles_per_node": sum(i.ipv4 for i in b.interfaces),
                "ipv4_prefixes_per_node": sum(i.ipv4_prefixes for i in b.interfaces),
            }
            for b in budget.nodes
        ],
        "infrastructure": dict(budget.infra),
        "nau_nodes": budget.nau_nodes,
        "nau_infra": budget.nau_infra,
        "nau_total": budget.nau_total,
        "peered_nau": plan.peered_nau,
        "nau_peered_total": budget.nau_peered_total,
        "quota": {
            "level": budget.quota.level,
            "vpc": budget.quota.vpc,
            "peered": budget.quota.peered,
            "published": {
                "vpc_default": NAU_QUOTA_DEFAULT,
                "vpc_max": NAU_QUOTA_MAX,
                "peered_default": PEERED_NAU_QUOTA_DEFAULT,
                "peered_max": PEERED_NAU_QUOTA_MAX,
            },
        },
        "fits": budget.fits,
        "fits_nau": budget.fits_nau,
        "fits_addresses": budget.fits_addresses,
        "addresses": {
            "ipv4_needed": layout.addresses_needed,
            "ipv4_in_subnets": layout.addresses_planned,
            "vpc_cidr_blocks": [str(b) for b in layout.blocks],
            "vpc_cidr_block_quota": {
                "default": VPC_CIDR_BLOCKS_DEFAULT,
                "max": VPC_CIDR_BLOCKS_MAX,
            },
            "fits_default_block_quota": layout.fits_default,
            "subnets": len(layout.subnets),
            "subnets_per_az": {str(az): n for az, n in sorted(layout.per_az().items())},
            "prefix_reservations": sum(len(s.reservations) for s in layout.subnets),
            "subnet_list": [
                {
                    "group": s.group,
                    "role": s.role,
                    "az": s.az,
                    "cidr": str(s.cidr),
                    "nodes": s.nodes,
                    "capacity": s.capacity,
                    "singles_area": str(s.singles_area) if s.singles_area else None,
                    "prefix_reservations": [str(r) for r in s.reservations],
                }
                for s in layout.subnets
            ],
        },
        "largest_nodes": {"nodes": best.nodes, "limited_by": best.limited_by},
        "knobs": [
            {"change": k.change, "nau_total": k.nau_total, "fits": k.fits, "kind": k.kind}
            for k in found
        ],
        "notes": notes_of(budget),
    }


def _verdict(ok: bool) -> str:
    return "fits" if ok else "DOES NOT FIT"


def to_table(budget: Budget, best: Largest, found: list[Knob]) -> str:
    plan, layout, q = budget.plan, budget.layout, budget.quota
    warm = ", ".join(f"{k}={v}" for k, v in plan.warm.given().items()) or "chart defaults"
    out = [
        f"NAU plan {plan.name}: {plan.nodes:,} nodes, {plan.mode.value} mode ({warm}), "
        f"{plan.azs} AZs" + (", custom networking" if plan.custom_networking else ""),
        "",
        f"{'group':<16} {'instance type':<16} {'nodes':>8} {'pods':>5} {'max':>5} "
        f"{'NAU/node':>8} {'NAU':>11}  breakdown",
    ]
    for b in budget.nodes:
        parts = ", ".join(f"{role} {units}" for role, units in b.breakdown)
        out.append(
            f"{b.group.name:<16} {b.itype.name:<16} {b.group.nodes:>8,} "
            f"{b.group.pods_per_node:>5} {b.max_pods:>5} {b.nau:>8} "
            f"{b.nau * b.group.nodes:>11,}  {parts}"
        )
    for resource, units in budget.infra:
        out.append(f"{resource:<50} {'':>8} {units:>11,}")
    out.append(f"{'total':<50} {'':>8} {budget.nau_total:>11,}")
    out.append("")
    out.append(
        f"NAU {budget.nau_total:,} vs VPC quota {q.vpc:,} ({q.level}): "
        f"{_verdict(budget.nau_total <= q.vpc)}"
        f"   [published: {NAU_QUOTA_DEFAULT:,} default, {NAU_QUOTA_MAX:,} max]"
    )
    out.append(
        f"with peers {budget.nau_peered_total:,} vs peered quota {q.peered:,}: "
        f"{_verdict(budget.nau_peered_total <= q.peered)}"
        f"   [published: {PEERED_NAU_QUOTA_DEFAULT:,} default, {PEERED_NAU_QUOTA_MAX:,} max]"
    )
    blocks = len(layout.blocks)
    out.append(
        f"IPv4: {layout.addresses_needed:,} addresses needed, {len(layout.subnets)} subnets "
        f"({', '.join(f'AZ{az} {n}' for az, n in sorted(layout.per_az().items()))}) "
        f"in {blocks} VPC CIDR blocks of 5 default / 50 max: "
        f"{_verdict(layout.fits_max)}"
        + ("" if layout.fits_default or not layout.fits_max else " (ask for more than 5 blocks)")
    )
    out.append("  blocks: " + _blocks_summary(layout.blocks))
    resv = sum(len(s.reservations) for s in layout.subnets)
    if resv:
        sample = next(s for s in layout.subnets if s.reservations)
        out.append(
            f"  prefix reservations: {resv} in {sum(1 for s in layout.subnets if s.reservations)}"
            f" subnets, e.g. {sample.cidr}: singles {sample.singles_area}, prefixes "
            + " ".join(str(r) for r in sample.reservations)
        )
    out.append("")
    out.append(f"VERDICT: {_verdict(budget.fits)}")
    out.append(f"largest node count of this mix that fits: {best.nodes:,} ({best.limited_by})")
    if found:
        out.append("knobs (NAU total after the change):")
        for k in found:
            tag = "" if k.kind == "knob" else f" [{k.kind}]"
            out.append(f"  {k.nau_total:>11,}  {_verdict(k.fits):<12}  {k.change}{tag}")
    out.append("")
    out += rule_lines(plan.rules)
    out += [f"note: {n}" for n in notes_of(budget)]
    return "\n".join(out)


def _blocks_summary(blocks: tuple[Any, ...]) -> str:
    if len(blocks) <= 4:
        return ", ".join(str(b) for b in blocks)
    return f"{blocks[0]} (primary), {blocks[1]} .. {blocks[-1]} ({len(blocks) - 1} secondary)"
