"""Replay node launches and pod churn against the planned subnets.

Every address and prefix goes through ``ipam.nau.subnet_space.SubnetSpace``, the aligned-/28
allocator the EC2 emulator answers boto3 with, so an ``InsufficientCidrBlocks`` here is
the one the emulator (and, as far as it models EC2, AWS) would return.

The node side is a faithful simplification of the daemon:

* card 0's prefix pool follows ``ipam.warm.plan`` (the daemon's own arithmetic), memoised
  per (group, pods, prefixes); pods are packed, so the releasable prefixes are the fully
  free ones, and there is no cooldown (each event is a settled pod count);
* a new pod ENI is created (one more single address) when the prefixes outgrow the ENIs'
  slots; ENIs are kept when prefixes are released, as the VPC CNI keeps them;
* secondary-IP mode holds the VPC CNI's target count of addresses
  (:func:`ipam.nau.node.secondary_ips`); IPv6 mode takes one IPv4 per node and no more;
* the rest of a node (multi-NIC ENIs, EFA addresses) is allocated at launch and stays.

A pod event picks a node at random and adds or deletes one pod (never below 0 or above
max pods minus the host-network pods). Launch order is shuffled over the subnets, so
single addresses and prefixes interleave as they do in a scaling cluster.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from ipam.errors import InsufficientCidrBlocks, SubnetSpaceError
from ipam.nau.budget import Budget
from ipam.nau.maxpods import HOST_NETWORK_PODS, IPS_PER_PREFIX, Mode
from ipam.nau.node import NodeBudget, secondary_ips, warm_targets
from ipam.nau.subnet_space import BLOCK, ReservationKind, SubnetSpace
from ipam.warm import CardUsage, WarmTargets, plan

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class Failure:
    phase: str  # launch or churn
    step: int  # node number (launch) or pod event number (churn), from 1
    subnet: str
    free_addresses: int  # AvailableIpAddressCount at the time
    free_blocks: int
    code: str


@dataclass(frozen=True, slots=True)
class SimResult:
    scenario: str  # with or without prefix reservations
    nodes: int
    pod_events: int
    prefixes_failed: int  # prefix requests refused (InsufficientCidrBlocks or no room)
    insufficient_cidr_blocks: int
    addresses_failed: int
    nodes_short: int  # nodes holding fewer prefixes than their pool wants at the end
    first_icb: Failure | None
    first_failure: Failure | None
    free_addresses: int
    free_blocks: int
    stranded: int  # free addresses in no fully free aligned /28
    prefix_ops: int  # prefixes assigned and released during churn

    @property
    def blocks_lost(self) -> int:
        """Prefixes that would fit in the free addresses but have no aligned /28."""
        return self.free_addresses // BLOCK - self.free_blocks


class _Pool:
    """Card 0 of one node group: what the warm pool wants for (pods, prefixes)."""

    def __init__(self, budget: NodeBudget, targets: WarmTargets, custom: bool) -> None:
        self.slots = budget.itype.ipv4_per_eni - 1
        self.custom = custom
        card0 = [
            i for i in budget.interfaces if i.card == 0 and i.role in ("primary ENI", "pod ENI")
        ]
        self.max_enis = (
            budget.itype.card(0).max_interfaces
            - (len([i for i in budget.interfaces if i.card == 0]) - len(card0))
            - (1 if custom else 0)
        )
        self.targets = targets
        self._memo: dict[int, int] = {}
        self._width = self.max_enis * self.slots + 1

    def enis(self, prefixes: int) -> int:
        need = -(-prefixes // self.slots)
        return need if self.custom else max(1, need)

    def delta(self, pods: int, prefixes: int) -> int:
        """Prefixes to add (> 0) or release (< 0) now."""
        key = pods * self._width + prefixes
        found = self._memo.get(key)
        if found is None:
            enis = self.enis(prefixes)
            assigned = min(pods, IPS_PER_PREFIX * prefixes)  # the rest wait for a prefix
            used = -(-assigned // IPS_PER_PREFIX)
            usage = CardUsage(
                assigned,
                0,
                prefixes,
                prefixes - used,
                enis * self.slots - prefixes,
                enis,
                self.max_enis,
                self.slots,
            )
            step = plan(usage, self.targets)
            found = step.add_prefixes - step.release_prefixes
            self._memo[key] = found
        return found


def _launch_steps(budget: NodeBudget, mode: Mode) -> tuple[tuple[bool, int, int], ...]:
    """(in the pod subnet, addresses, prefixes) a node takes at launch, interface by interface.

    Card 0's pool (primary and pod ENIs) is left out in prefix and secondary-IP mode: the
    pool grows it afterwards, ENI by ENI.
    """
    card0_pool = {"primary ENI", "pod ENI"}
    steps = []
    for iface in budget.interfaces:
        if iface.card == 0 and iface.role in card0_pool and mode is Mode.PREFIX:
            continue
        if mode is Mode.SECONDARY and iface.role in card0_pool:
            continue
        if iface.ipv4 or iface.ipv4_prefixes:
            steps.append((iface.pod_subnet, iface.ipv4, iface.ipv4_prefixes))
    return tuple(steps)


def _spaces(
    budget: Budget, reservations: bool, rng: random.Random
) -> list[tuple[SubnetSpace, str]]:
    out = []
    for s in budget.layout.subnets:
        space = SubnetSpace(s.cidr, rng=random.Random(rng.getrandbits(64)))
        if reservations:
            for r in s.reservations:
                space.reserve(r, ReservationKind.PREFIX)
        out.append((space, s.role))
    return out


def simulate(
    budget: Budget,
    *,
    pod_events: int,
    seed: int,
    reservations: bool,
    progress: Progress | None = None,
) -> SimResult:
    """Launch every planned node, then replay ``pod_events`` pod adds and deletes."""
    sim = _Sim(budget, pod_events, seed, reservations, progress)
    sim.launch_all()
    sim.churn()
    return sim.result()


class _Sim:
    def __init__(
        self, budget: Budget, events: int, seed: int, reservations: bool, progress: Progress | None
    ) -> None:
        self.budget, self.events, self.progress = budget, events, progress
        self.rng = random.Random(seed)
        self.scenario = "with prefix reservations" if reservations else "without reservations"
        self.spaces = _spaces(budget, reservations, self.rng)
        self.mode = budget.plan.mode
        by_name = {b.group.name: b for b in budget.nodes}
        self.groups = [by_name[b.group.name] for b in budget.nodes]
        self.pools = [
            _Pool(b, warm_targets(budget.plan, b.max_pods), budget.plan.custom_networking)
            for b in self.groups
        ]
        self.launch_steps = [_launch_steps(b, self.mode) for b in self.groups]
        self.total = sum(b.group.nodes for b in self.groups) + events
        self.done = 0
        self.tick = max(1, self.total // 100)
        # per node
        self.node_group = array("i")
        self.node_space = array(
            "i"
        )  # where card 0's pool lives (pod subnet with custom networking)
        self.pods = array("i")
        self.prefix_count = array("i")
        self.held: list[list[int]] = []  # prefixes, as block indexes in the pool's subnet
        self.singles: list[list[int]] = []  # the secondary-IP pool, as offsets in its subnet
        self.enis = array("i")
        self.icb = self.prefix_failed = self.addr_failed = self.prefix_ops = 0
        self.first_icb: Failure | None = None
        self.first_failure: Failure | None = None

    # -- failures ------------------------------------------------------------------------

    def _fail(self, err: SubnetSpaceError, space: SubnetSpace, phase: str, step: int) -> None:
        icb = isinstance(err, InsufficientCidrBlocks)
        self.icb += icb
        if self.first_failure is not None and (self.first_icb is not None or not icb):
            return  # counted; only the first ones are described
        stats = space.stats()
        failure = Failure(phase, step, str(space.cidr), stats.free, stats.free_blocks, err.code)
        if self.first_failure is None:
            self.first_failure = failure
        if icb and self.first_icb is None:
            self.first_icb = failure

    def _prefix(self, node: int, space: SubnetSpace, phase: str, step: int) -> bool:
        try:
            self.held[node].append(space.allocate_block())
        except SubnetSpaceError as err:
            self.prefix_failed += 1
            self._fail(err, space, phase, step)
            return False
        self.prefix_count[node] += 1
        return True

    def _address(
        self, node: int, space: SubnetSpace, phase: str, step: int, *, pool: bool = False
    ) -> None:
        """One single address; only the secondary-IP pool's are kept, to be released."""
        try:
            address = space.allocate_address_offset()
        except SubnetSpaceError as err:
            self.addr_failed += 1
            self._fail(err, space, phase, step)
            return
        if pool:
            self.singles[node].append(address)

    # -- launches --------------------------------------------------------------------------

    def _slots(self) -> list[tuple[int, int, int]]:
        """(group, node subnet, pool subnet) for every node, in launch order."""
        names = [b.group.name for b in self.groups]
        node_slots: dict[tuple[str, int], list[int]] = {}
        pod_slots: dict[tuple[str, int], list[int]] = {}
        for index, s in enumerate(self.budget.layout.subnets):
            table = pod_slots if s.role == "pods" else node_slots
            if s.role != "infra":
                table.setdefault((s.group, s.az), []).extend([index] * s.nodes)
        out = []
        for (group, az), subnets in node_slots.items():
            pods = pod_slots.get((group, az), subnets)
            g = names.index(group)
            out += [(g, n, p) for n, p in zip(subnets, pods, strict=True)]
        self.rng.shuffle(out)
        return out

    def launch_all(self) -> None:
        for step, (g, node_subnet, pool_subnet) in enumerate(self._slots(), start=1):
            self._launch(step - 1, g, node_subnet, pool_subnet, step)
            self._advance()

    def _launch(self, node: int, g: int, node_subnet: int, pool_subnet: int, step: int) -> None:
        budget, pool = self.groups[g], self.pools[g]
        self.node_group.append(g)
        self.node_space.append(pool_subnet)
        self.held.append([])
        self.singles.append([])
        self.prefix_count.append(0)
        pods = budget.group.pods_per_node if self.mode is not Mode.IPV6 else 0
        self.pods.append(pods)
        home = self.spaces[node_subnet][0]
        pool_space = self.spaces[pool_subnet][0]
        for pod_subnet, addresses, prefixes in self.launch_steps[g]:
            space = pool_space if pod_subnet else home
            for _ in range(addresses):
                self._address(node, space, "launch", step)
            for _ in range(prefixes):
                self._prefix(node, space, "launch", step)
        self._address(node, home, "launch", step)  # card 0's primary ENI, in the node subnet
        self.enis.append(1)
        if self.mode is Mode.PREFIX:
            if pool.custom:
                self.enis[node] = 0
            self._settle(node, pool_space, "launch", step)
        elif self.mode is Mode.SECONDARY:
            self._settle_secondary(node, pool_space, "launch", step)

    # -- the pool ------------------------------------------------------------------------------

    def _settle(self, node: int, space: SubnetSpace, phase: str, step: int) -> None:
        pool = self.pools[self.node_group[node]]
        for _ in range(64):  # a few rounds at most; bounded so a refused subnet cannot spin
            delta = pool.delta(self.pods[node], self.prefix_count[node])
            if delta == 0:
                return
            if delta > 0:
                for _ in range(delta):
                    if self.prefix_count[node] >= self.enis[node] * pool.slots:
                        self.enis[node] += 1
                        self._address(node, space, phase, step)
                    if not self._prefix(node, space, phase, step):
                        return
                    self.prefix_ops += phase == "churn"
            else:
                for _ in range(-delta):
                    space.release_block(self.held[node].pop())
                    self.prefix_count[node] -= 1
                    self.prefix_ops += 1

    def _settle_secondary(self, node: int, space: SubnetSpace, phase: str, step: int) -> None:
        """Hold the VPC CNI's address count: secondaries plus the extra ENIs' primaries."""
        budget = self.groups[self.node_group[node]]
        pool = self.pools[self.node_group[node]]
        ips, enis = secondary_ips(
            self.pods[node],
            self.budget.plan.warm,
            max_pods_value=budget.max_pods,
            max_enis=pool.max_enis,
            slots=pool.slots,
            primary_holds_pods=not pool.custom,
        )
        want = ips + enis - (0 if pool.custom else 1)
        held = self.singles[node]
        while len(held) < want:
            before = len(held)
            self._address(node, space, phase, step, pool=True)
            if len(held) == before:
                return
        while len(held) > want:
            space.release_address_offset(held.pop())

    # -- churn ------------------------------------------------------------------------------------

    def churn(self) -> None:
        nodes = len(self.pods)
        if nodes == 0 or self.mode is Mode.IPV6:
            self.done += self.events
            self._advance(final=True)
            return
        caps = [b.max_pods - HOST_NETWORK_PODS for b in self.groups]
        rand = self.rng.random
        pods, groups, node_space = self.pods, self.node_group, self.node_space
        spaces = self.spaces
        pools = self.pools
        prefix_count = self.prefix_count
        secondary = self.mode is Mode.SECONDARY
        tick, next_tick = self.tick, self.tick
        for event in range(1, self.events + 1):
            r = rand() * nodes
            node = int(r)
            count = pods[node]
            if r - node < 0.5:
                if count >= caps[groups[node]]:
                    continue
                count += 1
            else:
                if count == 0:
                    continue
                count -= 1
            pods[node] = count
            if secondary:
                self._settle_secondary(node, spaces[node_space[node]][0], "churn", event)
            elif pools[groups[node]].delta(count, prefix_count[node]):
                self._settle(node, spaces[node_space[node]][0], "churn", event)
            if event >= next_tick:
                self.done = len(pods) + event
                next_tick += tick
                self._advance(force=True)
        self.done = len(pods) + self.events
        self._advance(final=True)

    def _advance(self, *, force: bool = False, final: bool = False) -> None:
        if not force and not final:
            self.done += 1
            if self.done % self.tick:
                return
        if self.progress is not None:
            self.progress(self.done, self.total)

    # -- the result -------------------------------------------------------------------------------

    def result(self) -> SimResult:
        free = free_blocks = stranded = 0
        for space, role in self.spaces:
            if role == "infra":
                continue
            stats = space.stats()
            free += stats.free
            free_blocks += stats.free_blocks
            stranded += stats.stranded
        short = 0
        if self.mode is Mode.PREFIX:
            for node in range(len(self.pods)):
                if (
                    self.pools[self.node_group[node]].delta(
                        self.pods[node], self.prefix_count[node]
                    )
                    > 0
                ):
                    short += 1
        return SimResult(
            self.scenario,
            len(self.pods),
            self.events,
            self.prefix_failed,
            self.icb,
            self.addr_failed,
            short,
            self.first_icb,
            self.first_failure,
            free,
            free_blocks,
            stranded,
            self.prefix_ops,
        )
