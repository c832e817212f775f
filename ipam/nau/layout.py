"""CIDR layout: subnets per AZ, prefix reservations, and VPC CIDR blocks to hold them.

Pure arithmetic over EC2's rules (``ipam/nau/README.md``, Sources): a subnet is /16../28
and loses five addresses; a /28 prefix needs an aligned, fully free block, so in an empty
/n subnet ``2^(28-n) - 2`` blocks can become prefixes (our arithmetic: the first holds
the four reserved head addresses, the last the broadcast address); automatic address
assignment never draws from a ``prefix`` CIDR reservation, and automatic prefix
assignment draws from it first.

A subnet that holds both single addresses (node primaries, secondary ENIs' primaries)
and prefixes is laid out as a singles area of ``2^j`` addresses at the bottom and the
rest reserved for prefixes, the CIDRs of ``[2^j, 2^(32-n))``; ``j`` is chosen to hold
the most nodes. Without reservations the same subnet is sized by address count alone,
which is what fragmentation then defeats (``ultranet-nau simulate`` measures by how much).

VPC IPv4 blocks are /16 at most, 5 per VPC by default and 50 at most. Node subnets come
from the primary block's range first; with custom networking, pod subnets come from
100.64.0.0/10 (RFC 6598), which any RFC 1918 primary may add. 198.19.0.0/16 is left out:
a 10.0.0.0/8 primary cannot add it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network

from ipam.nau.errors import PlanError
from ipam.nau.rules import (
    SUBNET_RESERVED_ADDRESSES,
    SUBNETS_PER_VPC_DEFAULT,
    VPC_CIDR_BLOCKS_DEFAULT,
    VPC_CIDR_BLOCKS_MAX,
)
from ipam.nau.subnet_space import AWS_RESERVED_HEAD, BLOCK

BLOCK_BITS = 16  # a VPC block is at most a /16
BLOCK_SIZE = 1 << (32 - BLOCK_BITS)
CGNAT = IPv4Network("100.64.0.0/10")
# EKS puts up to 4 cross-account ENIs in the cluster subnets and more during upgrades (EKS
# Best Practices, "VPC and Subnet Considerations"); we allow twice that.
EKS_CLUSTER_ENIS = 8


@dataclass(frozen=True, slots=True)
class SubnetNeed:
    """One class of subnet: every node of ``group`` takes ``singles`` + ``prefixes`` here."""

    group: str
    role: str  # nodes, pods (custom networking) or infra
    singles: int
    prefixes: int
    nodes: int  # across all AZs; for infra, the addresses per AZ


@dataclass(frozen=True, slots=True)
class Sizing:
    prefixlen: int
    nodes: int  # nodes one such subnet holds
    singles_bits: int | None  # the singles area is 2^bits addresses; None: no reservation


@dataclass(frozen=True, slots=True)
class SubnetPlan:
    group: str
    role: str
    az: int
    cidr: IPv4Network
    nodes: int  # nodes placed here
    capacity: int  # nodes it could hold
    reservations: tuple[IPv4Network, ...]  # prefix CIDR reservations
    singles_bits: int | None = None  # the singles area is the first 2^bits addresses

    @property
    def singles_area(self) -> IPv4Network | None:
        if self.singles_bits is None:
            return None
        return IPv4Network((int(self.cidr.network_address), 32 - self.singles_bits))


@dataclass(frozen=True, slots=True)
class Layout:
    subnets: tuple[SubnetPlan, ...]
    blocks: tuple[IPv4Network, ...]  # VPC CIDR blocks, primary first
    addresses_needed: int  # IPv4 addresses the nodes and infrastructure take
    addresses_planned: int  # IPv4 addresses in the planned subnets

    @property
    def fits_default(self) -> bool:
        return len(self.blocks) <= VPC_CIDR_BLOCKS_DEFAULT and self.fits_subnets

    @property
    def fits_max(self) -> bool:
        return len(self.blocks) <= VPC_CIDR_BLOCKS_MAX

    @property
    def fits_subnets(self) -> bool:
        return len(self.subnets) <= SUBNETS_PER_VPC_DEFAULT

    def per_az(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for subnet in self.subnets:
            out[subnet.az] = out.get(subnet.az, 0) + 1
        return out


def sizing(prefixlen: int, singles: int, prefixes: int, *, reservations: bool) -> Sizing:
    """How many nodes one /``prefixlen`` subnet holds, and its singles area."""
    size = 1 << (32 - prefixlen)
    usable = size - SUBNET_RESERVED_ADDRESSES
    if prefixes == 0:
        return Sizing(prefixlen, usable // singles if singles else 0, None)
    blocks_empty = size // BLOCK - 2
    if not reservations or singles == 0:
        nodes = min(usable // (singles + BLOCK * prefixes), blocks_empty // prefixes)
        return Sizing(prefixlen, nodes, None)
    best = Sizing(prefixlen, 0, None)
    for bits in range(4, 32 - prefixlen):
        singles_cap = (1 << bits) - AWS_RESERVED_HEAD
        blocks = (size - (1 << bits)) // BLOCK - 1  # the last block holds the broadcast
        nodes = min(singles_cap // singles, blocks // prefixes)
        if nodes > best.nodes:
            best = Sizing(prefixlen, nodes, bits)
    return best


def smallest_fitting(need: SubnetNeed, nodes: int, *, reservations: bool) -> Sizing:
    """The smallest subnet holding ``nodes``, or the /16 if none does."""
    for prefixlen in range(28, BLOCK_BITS - 1, -1):
        fit = sizing(prefixlen, need.singles, need.prefixes, reservations=reservations)
        if fit.nodes >= nodes:
            return fit
    fit = sizing(BLOCK_BITS, need.singles, need.prefixes, reservations=reservations)
    if fit.nodes == 0:
        raise PlanError(
            f"one node of group {need.group} needs {need.singles} addresses and "
            f"{need.prefixes} prefixes: more than a /16 subnet holds"
        )
    return fit


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _subnets_for(need: SubnetNeed, azs: int, reservations: bool) -> list[tuple[int, Sizing, int]]:
    """(az, sizing, nodes placed) for every subnet of one class."""
    out: list[tuple[int, Sizing, int]] = []
    per_az = [need.nodes] * azs if need.role == "infra" else _split(need.nodes, azs)
    for az, nodes in enumerate(per_az):
        if nodes == 0:
            continue
        full = sizing(BLOCK_BITS, need.singles, need.prefixes, reservations=reservations)
        if full.nodes == 0:
            smallest_fitting(need, nodes, reservations=reservations)  # raises
        while nodes > full.nodes:
            out.append((az, full, full.nodes))
            nodes -= full.nodes
        out.append((az, smallest_fitting(need, nodes, reservations=reservations), nodes))
    return out


def _same_range_blocks(primary: IPv4Network) -> Iterator[IPv4Network]:
    """/16s in the primary's RFC 1918 range that a VPC may add ("VPC CIDR blocks")."""
    first = int(primary.network_address)
    if primary.subnet_of(IPv4Network("10.0.0.0/8")):
        starts = range(0x0A000000, 0x0B000000, BLOCK_SIZE)
    elif primary.subnet_of(IPv4Network("172.16.0.0/12")):
        starts = range(0xAC100000, 0xAC1F0000, BLOCK_SIZE)  # 172.31.0.0/16 is refused
    else:
        starts = range(0)
    for start in starts:
        if start != first:
            yield IPv4Network((start, BLOCK_BITS))


def _pool(primary: IPv4Network, *, cgnat_first: bool) -> list[IPv4Network]:
    same = list(_same_range_blocks(primary))
    cgnat = list(CGNAT.subnets(new_prefix=BLOCK_BITS))
    return cgnat + same if cgnat_first else same + cgnat


class _Packer:
    """First-fit of power-of-two subnets into /16 blocks drawn from ordered pools.

    Subnets arrive largest first (after the small infrastructure ones), so a cursor
    rounded up to the subnet's size keeps every subnet aligned.
    """

    def __init__(self, primary: IPv4Network) -> None:
        self.blocks: list[IPv4Network] = [primary]
        self._kind = ["nodes"]
        self._cursor = [0]
        self._taken = {primary}

    def place(self, prefixlen: int, kind: str, pool: list[IPv4Network]) -> IPv4Network:
        size = 1 << (32 - prefixlen)
        for index, block in enumerate(self.blocks):
            if self._kind[index] != kind:
                continue
            start = -(-self._cursor[index] // size) * size
            if start + size <= BLOCK_SIZE:
                self._cursor[index] = start + size
                return IPv4Network((int(block.network_address) + start, prefixlen))
        for block in pool:
            if block not in self._taken:
                self._taken.add(block)
                self.blocks.append(block)
                self._kind.append(kind)
                self._cursor.append(size)
                return IPv4Network((int(block.network_address), prefixlen))
        raise PlanError("no /16 left in the address ranges for the planned subnets")


def _reservation_cidrs(cidr: IPv4Network, bits: int) -> tuple[IPv4Network, ...]:
    base = int(cidr.network_address)
    out = []
    for k in range(bits, 32 - cidr.prefixlen):
        out.append(IPv4Network((base + (1 << k), 32 - k)))
    return tuple(out)


def plan_layout(
    needs: list[SubnetNeed],
    *,
    azs: int,
    primary: IPv4Network,
    custom_networking: bool,
    reservations: bool,
) -> Layout:
    """Subnets for every need, per AZ, packed into VPC CIDR blocks."""
    node_pool = _pool(primary, cgnat_first=not custom_networking)
    pod_pool = _pool(primary, cgnat_first=True)
    packer = _Packer(primary)
    placed: list[SubnetPlan] = []
    entries = []
    needed = 0
    for need in needs:
        per_node = need.singles + BLOCK * need.prefixes
        needed += per_node * need.nodes * (azs if need.role == "infra" else 1)
        for az, fit, nodes in _subnets_for(need, azs, reservations):
            entries.append((need, az, fit, nodes))
    # Infrastructure first, into the primary block; then the largest subnets first.
    entries.sort(key=lambda e: (e[0].role != "infra", e[2].prefixlen))
    for need, az, fit, nodes in entries:
        kind = "pods" if need.role == "pods" else "nodes"
        cidr = packer.place(fit.prefixlen, kind, pod_pool if kind == "pods" else node_pool)
        resv = _reservation_cidrs(cidr, fit.singles_bits) if fit.singles_bits else ()
        placed.append(
            SubnetPlan(need.group, need.role, az, cidr, nodes, fit.nodes, resv, fit.singles_bits)
        )
    planned = sum(s.cidr.num_addresses for s in placed)
    placed.sort(key=lambda s: (s.role != "infra", s.group, s.az, int(s.cidr.network_address)))
    return Layout(tuple(placed), tuple(packer.blocks), needed, planned)
