"""A plan's NAU against the quotas, its CIDR layout, the largest node count that fits,
and the knobs that would make a failing plan fit. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ipam.nau.errors import PlanError
from ipam.nau.layout import EKS_CLUSTER_ENIS, Layout, SubnetNeed, plan_layout
from ipam.nau.maxpods import Mode
from ipam.nau.model import NodeGroup, Plan, WarmKnobs
from ipam.nau.node import NodeBudget, node_budget
from ipam.nau.rules import (
    NAU_QUOTA_DEFAULT,
    NAU_QUOTA_MAX,
    PEERED_NAU_QUOTA_DEFAULT,
    PEERED_NAU_QUOTA_MAX,
    ManagedResource,
)


@dataclass(frozen=True, slots=True)
class Quota:
    level: str  # default, max, or custom
    vpc: int
    peered: int


def quota_of(plan: Plan) -> Quota:
    if plan.quota == "default":
        return Quota("default", NAU_QUOTA_DEFAULT, PEERED_NAU_QUOTA_DEFAULT)
    if plan.quota == "max":
        return Quota("max", NAU_QUOTA_MAX, PEERED_NAU_QUOTA_MAX)
    # AWS's peered quota is twice the VPC quota at both published levels.
    return Quota("custom", plan.quota, min(2 * plan.quota, PEERED_NAU_QUOTA_MAX))


@dataclass(frozen=True, slots=True)
class Budget:
    plan: Plan
    nodes: tuple[NodeBudget, ...]
    infra: tuple[tuple[str, int], ...]  # (resource, NAU)
    quota: Quota
    layout: Layout

    @property
    def nau_nodes(self) -> int:
        return sum(b.nau * b.group.nodes for b in self.nodes)

    @property
    def nau_infra(self) -> int:
        return sum(units for _, units in self.infra)

    @property
    def nau_total(self) -> int:
        return self.nau_nodes + self.nau_infra

    @property
    def nau_peered_total(self) -> int:
        return self.nau_total + self.plan.peered_nau

    @property
    def fits_nau(self) -> bool:
        return self.nau_total <= self.quota.vpc and self.nau_peered_total <= self.quota.peered

    @property
    def fits_addresses(self) -> bool:
        return self.layout.fits_max

    @property
    def fits(self) -> bool:
        return self.fits_nau and self.fits_addresses


def infra_units(plan: Plan) -> tuple[tuple[str, int], ...]:
    c, rules, azs = plan.consumers, plan.rules, plan.azs
    rows = [
        (ManagedResource.NLB, c.nlb * azs),
        (ManagedResource.GWLB, c.gwlb * azs),
        (ManagedResource.VPC_ENDPOINT, c.vpc_endpoints * azs),
        (ManagedResource.NAT_GATEWAY, c.nat_gateways),
        (ManagedResource.LAMBDA, c.lambda_functions),
        (ManagedResource.EFS_MOUNT_TARGET, c.efs_mount_targets),
        (ManagedResource.TGW_ATTACHMENT, c.tgw_attachments),
    ]
    out = [(str(kind), count * rules.resource_units(kind)) for kind, count in rows if count]
    if c.other_nau:
        out.append(("other (given as NAU)", c.other_nau))
    return tuple(out)


def _infra_addresses_per_az(plan: Plan) -> int:
    """One ENI per AZ for each per-AZ resource, the rest spread over the AZs."""
    c = plan.consumers
    per_az = c.nlb + c.gwlb + c.vpc_endpoints + c.tgw_attachments + EKS_CLUSTER_ENIS
    spread = c.nat_gateways + c.efs_mount_targets + c.lambda_functions
    return per_az + -(-spread // plan.azs)


def subnet_needs(plan: Plan, budgets: tuple[NodeBudget, ...]) -> list[SubnetNeed]:
    needs = [SubnetNeed("infrastructure", "infra", 1, 0, _infra_addresses_per_az(plan))]
    for b in budgets:
        singles, prefixes = b.subnet_use(pod_subnet=False)
        needs.append(SubnetNeed(b.group.name, "nodes", singles, prefixes, b.group.nodes))
        pod_singles, pod_prefixes = b.subnet_use(pod_subnet=True)
        if pod_singles or pod_prefixes:
            needs.append(SubnetNeed(b.group.name, "pods", pod_singles, pod_prefixes, b.group.nodes))
    return needs


def layout_of(plan: Plan, budgets: tuple[NodeBudget, ...]) -> Layout:
    return plan_layout(
        subnet_needs(plan, budgets),
        azs=plan.azs,
        primary=plan.vpc_cidr,
        custom_networking=plan.custom_networking,
        reservations=plan.prefix_reservations,
    )


def nau_per_node_average(plan: Plan) -> float:
    """The mix's mean NAU per node (no layout): the slope of NAU against node count."""
    budgets = [node_budget(plan, g) for g in plan.groups]
    return sum(b.nau * b.group.nodes for b in budgets) / plan.nodes


def evaluate(plan: Plan) -> Budget:
    """NAU per node and in total, the quota, and the CIDR layout."""
    budgets = tuple(node_budget(plan, g) for g in plan.groups)
    return Budget(plan, budgets, infra_units(plan), quota_of(plan), layout_of(plan, budgets))


# -- the largest node count ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Largest:
    nodes: int  # of the plan's mix, scaled in proportion
    limited_by: str  # NAU quota, peered NAU quota, or VPC CIDR blocks


def scaled(groups: tuple[NodeGroup, ...], total: int) -> tuple[NodeGroup, ...]:
    """The mix with ``total`` nodes, shares kept (largest remainder); empty groups dropped."""
    whole = sum(g.nodes for g in groups)
    exact = [g.nodes * total / whole for g in groups]
    counts = [int(x) for x in exact]
    order = sorted(range(len(groups)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return tuple(replace(g, nodes=n) for g, n in zip(groups, counts, strict=True) if n > 0)


def largest(budget: Budget) -> Largest:
    """The most nodes of this mix that fit both the NAU quotas and the address space."""
    plan, per_node = budget.plan, {b.group.name: b.nau for b in budget.nodes}

    def nau_at(total: int) -> int:
        return budget.nau_infra + sum(
            per_node[g.name] * g.nodes for g in scaled(plan.groups, total)
        )

    def fits_nau(total: int) -> bool:
        used = nau_at(total)
        return used <= budget.quota.vpc and used + plan.peered_nau <= budget.quota.peered

    def fits_layout(total: int) -> bool:
        groups = scaled(plan.groups, total)
        by_name = {b.group.name: b for b in budget.nodes}
        budgets = tuple(replace(by_name[g.name], group=g) for g in groups)
        return layout_of(plan, budgets).fits_max

    avg = budget.nau_nodes / plan.nodes
    room = min(budget.quota.vpc, budget.quota.peered - plan.peered_nau) - budget.nau_infra
    if room < 0:
        return Largest(0, "NAU quota (infrastructure alone)")
    hi = int(room / avg) + 2
    while hi > 0 and not fits_nau(hi):
        hi -= 1
    limited_by = (
        "peered NAU quota"
        if nau_at(hi + 1) > budget.quota.peered - plan.peered_nau
        else ("NAU quota")
    )
    if hi == 0 or fits_layout(hi):
        return Largest(hi, limited_by)
    lo = 0
    while lo < hi:  # the largest count whose layout fits in 50 blocks
        mid = (lo + hi + 1) // 2
        if fits_layout(mid):
            lo = mid
        else:
            hi = mid - 1
    return Largest(lo, "VPC CIDR blocks (50 at most)")


# -- knobs ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Knob:
    change: str
    nau_total: int
    fits: bool  # NAU and addresses
    kind: str = "knob"  # knob, rule reading, or split


def _try(change: str, plan: Plan, kind: str = "knob") -> Knob | None:
    try:
        after = evaluate(plan)
    except PlanError:
        return None  # the variant is impossible for this plan: not a knob to offer
    return Knob(change, after.nau_total, after.fits, kind)


def _variants(plan: Plan) -> list[tuple[str, Plan, str]]:
    out: list[tuple[str, Plan, str]] = []
    warm = plan.warm
    if plan.mode is Mode.PREFIX and not warm.ip_targets_set:
        target = 1 if warm.warm_prefix_target is None else warm.warm_prefix_target
        out.append(
            (
                f"WARM_IP_TARGET=1 instead of WARM_PREFIX_TARGET={target}",
                replace(plan, warm=WarmKnobs(warm_ip_target=1)),
                "knob",
            )
        )
    if plan.mode is Mode.SECONDARY:
        out.append(
            (
                "prefix mode, WARM_IP_TARGET=1",
                replace(plan, mode=Mode.PREFIX, warm=WarmKnobs(warm_ip_target=1)),
                "knob",
            )
        )
        if not warm.ip_targets_set:
            out.append(
                (
                    "WARM_IP_TARGET=1 instead of WARM_ENI_TARGET",
                    replace(plan, warm=WarmKnobs(warm_ip_target=1)),
                    "knob",
                )
            )
    if plan.mode is not Mode.IPV6 and not plan.custom_networking:
        groups = tuple(replace(g, multi_nic_cards=0, multi_nic_pods=0) for g in plan.groups)
        out.append(
            (
                "IPv6 mode (one /80 per node)",
                replace(plan, mode=Mode.IPV6, warm=WarmKnobs(), groups=groups),
                "knob",
            )
        )
    if plan.custom_networking:
        out.append(
            (
                "custom networking off (pods on the node's ENIs)",
                replace(plan, custom_networking=False),
                "knob",
            )
        )
    if any(g.public_ipv4 for g in plan.groups):
        groups = tuple(replace(g, public_ipv4=False) for g in plan.groups)
        out.append(("no public IPv4 on nodes", replace(plan, groups=groups), "knob"))
    if plan.quota == "default":
        out.append(
            ("raise the NAU quota to 256,000 (512,000 peered)", replace(plan, quota="max"), "knob")
        )
    has_efa = any(g.efa_interfaces or g.efa_only_interfaces for g in plan.groups)
    if has_efa and plan.rules.efa_adds_to_interface:
        out.append(
            (
                "EFA row restates the interface row (--efa-counting restate)",
                replace(plan, rules=replace(plan.rules, efa_adds_to_interface=False)),
                "rule reading",
            )
        )
    if any(g.efa_primary for g in plan.groups):
        groups = tuple(replace(g, efa_primary=False) for g in plan.groups)
        out.append(("ENA primary interface instead of EFA", replace(plan, groups=groups), "knob"))
    if has_efa:
        groups = tuple(replace(g, efa_interfaces=0, efa_only_interfaces=0) for g in plan.groups)
        out.append(("no EFA interfaces besides the primary", replace(plan, groups=groups), "knob"))
    if plan.count_eks_pods:
        out.append(
            (
                "EKS pod row off (--no-count-eks-pods)",
                replace(plan, count_eks_pods=False),
                "rule reading",
            )
        )
    if not plan.prefix_reservations:
        out.append(
            (
                "prefix reservations in mixed subnets",
                replace(plan, prefix_reservations=True),
                "knob",
            )
        )
    return out


def _efa_capped(plan: Plan, cap: int) -> Plan:
    groups = []
    for g in plan.groups:
        efa = min(g.efa_interfaces, cap)
        groups.append(
            replace(
                g, efa_interfaces=efa, efa_only_interfaces=min(g.efa_only_interfaces, cap - efa)
            )
        )
    return replace(plan, groups=tuple(groups))


def _efa_cap_that_fits(plan: Plan) -> int | None:
    """The most EFA interfaces per node (besides the primary) with which ``plan`` fits."""
    most = max(g.efa_interfaces + g.efa_only_interfaces for g in plan.groups)
    if most == 0 or not evaluate(_efa_capped(plan, 0)).fits:
        return None
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if evaluate(_efa_capped(plan, mid)).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _combine(budget: Budget, found: list[Knob]) -> Knob | None:
    """Apply the plain knobs together, most saving first, until the plan fits; if it still
    does not, cap the EFA interfaces per node at the most that fit."""
    plain = [k.change for k in found if k.kind == "knob" and not k.change.startswith("no EFA")]
    plan = budget.plan
    applied: list[str] = []
    best = budget.nau_total
    for change in plain:
        variants = {c: p for c, p, _ in _variants(plan)}
        if change not in variants:
            continue
        try:
            after = evaluate(variants[change])
        except PlanError:
            continue
        if after.nau_total >= best and not after.fits:
            continue
        plan, applied, best = variants[change], [*applied, change], after.nau_total
        if after.fits:
            return Knob(" + ".join(applied), after.nau_total, True, "combination")
    try:
        cap = _efa_cap_that_fits(plan)
    except PlanError:
        cap = None
    if cap is not None:
        after = evaluate(_efa_capped(plan, cap))
        change = f"at most {cap} EFA interfaces per node besides the primary"
        return Knob(" + ".join([*applied, change]), after.nau_total, True, "combination")
    if len(applied) > 1:
        return Knob(" + ".join(applied), best, False, "combination")
    return None


def knobs(budget: Budget) -> list[Knob]:
    """Changes that lower the NAU or make the plan fit, fewest NAU first; then a combination
    of the plain knobs (no rule readings, EFA kept) and a split into several VPCs."""
    found: list[Knob] = []
    for change, variant, kind in _variants(budget.plan):
        knob = _try(change, variant, kind)
        if knob is not None and (knob.nau_total < budget.nau_total or knob.fits):
            found.append(knob)
    found.sort(key=lambda k: k.nau_total)
    if not budget.fits and not any(k.fits for k in found):
        combined = _combine(budget, found)
        if combined is not None:
            found.append(combined)
    if not budget.fits_nau:
        vpcs = -(-budget.nau_total // budget.quota.vpc)
        found.append(
            Knob(
                f"split into {vpcs} clusters in {vpcs} VPCs, not peered "
                "(Transit Gateway shares no quota)",
                -(-budget.nau_total // vpcs),
                True,
                "split",
            )
        )
    return found
