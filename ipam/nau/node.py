"""NAU of one node: its interfaces, the addresses and prefixes its warm pool holds.

Pure functions over instance data (``ipam.instance_types``), the NAU rule table
(``ipam.nau.rules``) and the VPC CNI's warm-pool rules. Prefix mode grows the pool with
``ipam.warm.plan``, the node daemon's own arithmetic, so the planner and the daemon
agree on how many /28s a node holds; secondary-IP mode, which the daemon does not run,
follows the VPC CNI (``aws/amazon-vpc-cni-k8s``: ``pkg/ipamd/ipamd.go``,
``docs/eni-and-ip-target.md``):

* ``WARM_IP_TARGET``/``MINIMUM_IP_TARGET``: ``max(pods + WARM_IP, MIN_IP)`` addresses;
* otherwise ``WARM_ENI_TARGET=W``: full ENIs until ``W`` ENIs' worth are free,
  ``ENIs = max(1, ceil((pods + W*S) / S))``, ``S = IPv4Limit - 1``;
* both stop growing once the pool reaches max pods, and never exceed the ENI limit.

Interfaces: the primary ENI on card 0; pod ENIs on card 0 (with custom
networking every pod ENI is one, in a pod subnet); on multi-NIC cards one ENI each whose
pool follows the VPC CNI's fixed ``WARM_IP_TARGET=1``/``MINIMUM_IP_TARGET=1``; EFA (with
ENA, one IPv4 each) and EFA-only (no address) interfaces, placed one per network card.
Each interface is priced by ``NauRules.interface_units``, the rule the emulator uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipam.instance_types import InstanceType, lookup
from ipam.nau.errors import PlanError
from ipam.nau.maxpods import HOST_NETWORK_PODS, IPS_PER_PREFIX, MaxPods, Mode, max_pods
from ipam.nau.model import NodeGroup, Plan, WarmKnobs
from ipam.nau.rules import InterfaceType
from ipam.warm import CardUsage, WarmTargets, plan

CNI_CARD_WARM_IP = 1  # VPC CNI: cards other than 0 use WARM_IP_TARGET=1, MINIMUM_IP_TARGET=1
_GROW_LIMIT = 10_000  # warm-plan rounds; far more than any ENI limit allows


@dataclass(frozen=True, slots=True)
class Interface:
    role: str  # primary, pod ENI, multi-NIC ENI, EFA, EFA-only
    card: int
    kind: InterfaceType
    primary: bool
    ipv4: int  # private IPv4 addresses, its own primary included
    public_ipv4: int = 0
    ipv6: int = 0
    ipv4_prefixes: int = 0
    ipv6_prefixes: int = 0
    pod_subnet: bool = False  # custom networking: lives in a pod subnet

    @property
    def addresses(self) -> int:
        return self.ipv4 + self.public_ipv4 + self.ipv6

    @property
    def prefixes(self) -> int:
        return self.ipv4_prefixes + self.ipv6_prefixes


@dataclass(frozen=True, slots=True)
class NodeBudget:
    group: NodeGroup
    itype: InstanceType
    max_pods: int
    max_pods_source: str  # the calculator's formula, or "given"
    interfaces: tuple[Interface, ...]
    breakdown: tuple[tuple[str, int], ...]  # (role, NAU) in interface order, pods last
    nau: int
    notes: tuple[str, ...]

    def subnet_use(self, *, pod_subnet: bool) -> tuple[int, int]:
        """(single private IPv4 addresses, /28 prefixes) one node takes from a subnet class."""
        chosen = [i for i in self.interfaces if i.pod_subnet is pod_subnet]
        return sum(i.ipv4 for i in chosen), sum(i.ipv4_prefixes for i in chosen)


@dataclass(frozen=True, slots=True)
class _Card:
    prefixes: int
    enis: int  # pod ENIs including the primary when it holds pods


def warm_targets(plan_: Plan, max_pods_value: int) -> WarmTargets:
    """The card-0 targets of ``ipam.warm`` for this plan (prefix mode)."""
    knobs = plan_.warm
    prefix_target = 1 if knobs.warm_prefix_target is None else knobs.warm_prefix_target
    return WarmTargets(
        prefix_target, knobs.warm_ip_target, knobs.minimum_ip_target, max_pods=max_pods_value
    )


def grow_prefix_card(
    pods: int, targets: WarmTargets, *, enis: int, slots_free: int, max_enis: int, slots: int
) -> _Card:
    """Run ``ipam.warm.plan`` from an empty pool until ``pods`` are placed and it rests.

    Pods are packed (each prefix full before the next is used), so the releasable prefixes
    are exactly the fully free ones. No cooldown: the steady state, not a churn burst.
    """
    prefixes = 0
    for _ in range(_GROW_LIMIT):
        assigned = min(pods, IPS_PER_PREFIX * prefixes)
        used_prefixes = -(-assigned // IPS_PER_PREFIX)
        usage = CardUsage(
            assigned, 0, prefixes, prefixes - used_prefixes, slots_free, enis, max_enis, slots
        )
        step = plan(usage, targets)
        if step.add_prefixes == 0:
            if assigned < pods:
                raise PlanError(
                    f"{pods} pods do not fit: the pool stops at {prefixes} prefixes ({step.reason})"
                )
            return _Card(prefixes, enis)
        prefixes += step.add_prefixes
        enis += step.new_enis
        slots_free += step.new_enis * slots - step.add_prefixes
    raise AssertionError("warm plan did not converge")  # pragma: no cover


def secondary_ips(
    pods: int,
    knobs: WarmKnobs,
    *,
    max_pods_value: int,
    max_enis: int,
    slots: int,
    primary_holds_pods: bool,
) -> tuple[int, int]:
    """(secondary IPs, pod ENIs) the VPC CNI holds in secondary-IP mode."""
    capacity = max_enis * slots
    if knobs.ip_targets_set:
        wanted = max(pods + (knobs.warm_ip_target or 0), knobs.minimum_ip_target or 0)
        ips = max(pods, min(wanted, max_pods_value, capacity))
        enis = -(-ips // slots)
    else:
        warm_enis = 1 if knobs.warm_eni_target is None else knobs.warm_eni_target
        floor = 1 if primary_holds_pods else 0
        enis = max(floor, -(-(pods + warm_enis * slots) // slots))
        enis = min(max_enis, enis, max(-(-max_pods_value // slots), -(-pods // slots)))
        ips = enis * slots
    if pods > ips or enis > max_enis:
        raise PlanError(f"{pods} pods do not fit in {max_enis} ENIs x {slots} secondary IPs")
    if primary_holds_pods:
        enis = max(enis, 1)
    return ips, enis


def _spread(total: int, enis: int, slots: int) -> list[int]:
    """Fill ENIs in order, each up to ``slots``."""
    out = []
    for _ in range(enis):
        take = min(slots, total)
        out.append(take)
        total -= take
    return out


def _place_efa(group: NodeGroup, itype: InstanceType) -> list[int]:
    """Interfaces per card before pod ENIs: primary, EFAs one per card, multi-NIC ENIs."""
    cards = len(itype.network_cards)
    efa = group.efa_interfaces + group.efa_only_interfaces
    total_efa = efa + (1 if group.efa_primary else 0)
    if total_efa and not itype.efa_supported:
        raise PlanError(f"{itype.name} does not support EFA interfaces")
    if total_efa > (itype.max_efa_interfaces or 0):
        raise PlanError(
            f"{total_efa} EFA interfaces asked for on {itype.name}, which allows "
            f"{itype.max_efa_interfaces}"
        )
    if group.multi_nic_cards > cards - 1:
        raise PlanError(
            f"multi_nic_cards={group.multi_nic_cards} but {itype.name} has {cards} network "
            f"card(s), so at most {cards - 1} besides card 0"
        )
    per_card = [0] * cards
    per_card[0] = 1
    order = list(range(1, cards)) + ([] if group.efa_primary else [0])
    if efa > len(order):
        raise PlanError(
            f"{efa} EFA interfaces need one network card each; {itype.name} has "
            f"{len(order)} free for them"
        )
    for card in order[:efa]:
        per_card[card] += 1
    for card in range(1, group.multi_nic_cards + 1):
        per_card[card] += 1
    for index, count in enumerate(per_card):
        limit = itype.network_cards[index].max_interfaces
        if count > limit:
            raise PlanError(
                f"network card {index} of {itype.name} takes {limit} interfaces; the plan "
                f"puts {count} there (EFA and multi-NIC interfaces)"
            )
    return per_card


def _check_knobs(plan_: Plan) -> None:
    given = plan_.warm.given()
    if plan_.mode is Mode.IPV6 and given:
        raise PlanError(
            f"{', '.join(given)} do not apply in IPv6 mode (one /80 per node, no warm pool)"
        )
    if plan_.mode is Mode.SECONDARY and plan_.warm.warm_prefix_target is not None:
        raise PlanError("WARM_PREFIX_TARGET applies to prefix mode only")
    if plan_.mode is Mode.PREFIX:
        if plan_.warm.warm_eni_target is not None:
            raise PlanError(
                "WARM_ENI_TARGET is ignored by the VPC CNI in prefix mode; use "
                "WARM_PREFIX_TARGET or WARM_IP_TARGET"
            )
        if plan_.warm.warm_prefix_target == 0 and not plan_.warm.ip_targets_set:
            raise PlanError(
                "WARM_PREFIX_TARGET=0 without WARM_IP_TARGET or MINIMUM_IP_TARGET is not "
                "supported in prefix mode"
            )
    if plan_.mode is Mode.IPV6 and plan_.custom_networking:
        raise PlanError("custom networking is not supported in IPv6 mode")


def node_budget(plan_: Plan, group: NodeGroup) -> NodeBudget:
    """The NAU of one node of ``group`` under ``plan_``; ``PlanError`` if impossible."""
    _check_knobs(plan_)
    itype = lookup(group.instance_type)
    if group.max_pods is not None:
        mp_value, mp_source = group.max_pods, "given"
        if plan_.mode is not Mode.SECONDARY and not itype.nitro:
            max_pods(itype, plan_.mode, custom_networking=plan_.custom_networking)  # raises
    else:
        mp: MaxPods = max_pods(itype, plan_.mode, custom_networking=plan_.custom_networking)
        mp_value = mp.value
        mp_source = mp.formula + (f", capped at {mp.cap}" if mp.cap else "")
    if group.pods_per_node + HOST_NETWORK_PODS > mp_value:
        raise PlanError(
            f"group {group.name}: {group.pods_per_node} pods per node plus "
            f"{HOST_NETWORK_PODS} host-network pods exceed max pods {mp_value} of "
            f"{itype.name} in {plan_.mode} mode"
        )
    if plan_.mode is Mode.IPV6 and group.multi_nic_cards:
        raise PlanError("multi-NIC pods are modelled in the IPv4 modes only")
    per_card = _place_efa(group, itype)
    notes: list[str] = []
    interfaces = _card0(plan_, group, itype, mp_value, per_card, notes)
    interfaces += _multi_nic(plan_, group, itype, mp_value, per_card)
    interfaces += _efa_interfaces(group, per_card)
    if len(interfaces) > itype.max_enis_total:
        raise PlanError(
            f"{len(interfaces)} interfaces per node exceed {itype.name}'s limit of "
            f"{itype.max_enis_total}"
        )
    rules = plan_.rules
    breakdown: dict[str, int] = {}
    for iface in interfaces:
        units = rules.interface_units(
            iface.kind, primary=iface.primary, addresses=iface.addresses, prefixes=iface.prefixes
        )
        breakdown[iface.role] = breakdown.get(iface.role, 0) + units
    if plan_.count_eks_pods:
        breakdown["EKS pods"] = group.pods_per_node * rules.eks_pod
    return NodeBudget(
        group,
        itype,
        mp_value,
        mp_source,
        tuple(interfaces),
        tuple(breakdown.items()),
        sum(breakdown.values()),
        tuple(notes),
    )


def _card0(
    plan_: Plan,
    group: NodeGroup,
    itype: InstanceType,
    mp_value: int,
    per_card: list[int],
    notes: list[str],
) -> list[Interface]:
    slots = itype.ipv4_per_eni - 1
    custom = plan_.custom_networking
    max_enis = itype.card(0).max_interfaces - per_card[0] + (0 if custom else 1)
    kind = InterfaceType.EFA if group.efa_primary else InterfaceType.INTERFACE
    public = 1 if group.public_ipv4 else 0
    if plan_.mode is Mode.IPV6:
        ipv6 = 1 if plan_.ipv6_node_address else 0
        return [Interface("primary ENI", 0, kind, True, 1, public, ipv6, 0, 1)]
    pods = group.pods_per_node
    if plan_.mode is Mode.PREFIX:
        targets = warm_targets(plan_, mp_value)
        if plan_.warm.ip_targets_set and plan_.warm.warm_prefix_target is not None:
            notes.append("WARM_IP_TARGET/MINIMUM_IP_TARGET override WARM_PREFIX_TARGET")
        card = grow_prefix_card(
            pods,
            targets,
            enis=0 if custom else 1,
            slots_free=0 if custom else slots,
            max_enis=max_enis,
            slots=slots,
        )
        fills = _spread(card.prefixes, card.enis, slots)
        if custom:
            primary = Interface("primary ENI", 0, kind, True, 1, public)
            pod = [
                Interface("pod ENI", 0, InterfaceType.INTERFACE, False, 1, 0, 0, n, 0, True)
                for n in fills
            ]
            return [primary, *pod]
        primary = Interface("primary ENI", 0, kind, True, 1, public, 0, fills[0] if fills else 0)
        return [
            primary,
            *(
                Interface("pod ENI", 0, InterfaceType.INTERFACE, False, 1, 0, 0, n)
                for n in fills[1:]
            ),
        ]
    ips, enis = secondary_ips(
        pods,
        plan_.warm,
        max_pods_value=mp_value,
        max_enis=max_enis,
        slots=slots,
        primary_holds_pods=not custom,
    )
    fills = _spread(ips, enis, slots)
    if custom:
        primary = Interface("primary ENI", 0, kind, True, 1, public)
        return [
            primary,
            *(
                Interface("pod ENI", 0, InterfaceType.INTERFACE, False, 1 + n, pod_subnet=True)
                for n in fills
            ),
        ]
    primary = Interface("primary ENI", 0, kind, True, 1 + fills[0], public)
    return [
        primary,
        *(Interface("pod ENI", 0, InterfaceType.INTERFACE, False, 1 + n) for n in fills[1:]),
    ]


def _multi_nic(
    plan_: Plan, group: NodeGroup, itype: InstanceType, mp_value: int, per_card: list[int]
) -> list[Interface]:
    out: list[Interface] = []
    slots = itype.ipv4_per_eni - 1
    pod_subnet = plan_.custom_networking
    for card in range(1, group.multi_nic_cards + 1):
        room = itype.card(card).max_interfaces - per_card[card] + 1
        if plan_.mode is Mode.PREFIX:
            targets = WarmTargets(0, CNI_CARD_WARM_IP, CNI_CARD_WARM_IP, max_pods=mp_value)
            grown = grow_prefix_card(
                group.multi_nic_pods, targets, enis=0, slots_free=0, max_enis=room, slots=slots
            )
            for n in _spread(grown.prefixes, grown.enis, slots):
                out.append(
                    Interface(
                        "multi-NIC ENI",
                        card,
                        InterfaceType.INTERFACE,
                        False,
                        1,
                        ipv4_prefixes=n,
                        pod_subnet=pod_subnet,
                    )
                )
        else:
            wanted = max(group.multi_nic_pods + CNI_CARD_WARM_IP, CNI_CARD_WARM_IP)
            enis = -(-wanted // slots)
            if enis > room:
                raise PlanError(f"{group.multi_nic_pods} multi-NIC pods do not fit on card {card}")
            for n in _spread(wanted, enis, slots):
                out.append(
                    Interface(
                        "multi-NIC ENI",
                        card,
                        InterfaceType.INTERFACE,
                        False,
                        1 + n,
                        pod_subnet=pod_subnet,
                    )
                )
    return out


def _efa_interfaces(group: NodeGroup, per_card: list[int]) -> list[Interface]:
    cards = len(per_card)
    order = list(range(1, cards)) + ([] if group.efa_primary else [0])
    out: list[Interface] = []
    for i, card in enumerate(order[: group.efa_interfaces + group.efa_only_interfaces]):
        if i < group.efa_interfaces:
            out.append(Interface("EFA", card, InterfaceType.EFA, False, 1))
        else:
            out.append(Interface("EFA-only", card, InterfaceType.EFA_ONLY, False, 0))
    return out
