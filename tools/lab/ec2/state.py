"""The emulated cloud: VPCs, subnets, instances and network interfaces, with EC2's rules.

Pure state and rules, no I/O: the EC2 Query API (``api.py``) and IMDS (``imds.py``)
are views of it, and the namespaced node (``tools/lab/node.py``) follows its events.

EC2 semantics modelled (the AWS pages listed in ``ipam/nau/README.md``, Sources):

* subnets are ``ipam.nau.subnet_space.SubnetSpace``: five reserved addresses, /28
  prefixes only from aligned fully free blocks (``InsufficientCidrBlocks`` on a
  fragmented subnet), ``prefix`` CIDR reservations used first;
* an ENI has ``ipv4_per_eni`` address slots (its type's ``Ipv4AddressesPerInterface``);
  its primary address, each secondary address and each /28 prefix take one
  (``PrivateIpAddressLimitExceeded`` beyond). An unattached ENI is held to the largest
  limit of any type, and to its instance type's when attached;
* interfaces attach per network card (``NetworkCardIndex``), at most the card's
  ``MaximumNetworkInterfaces`` each (``AttachmentLimitExceeded``), EFA types only on
  EFA-capable types and up to their EFA count; the primary interface cannot be
  detached; efa-only interfaces have no IP address at all;
* NAU is counted per VPC over interfaces attached to instances (the calls that fail
  at the quota are RunInstances, AttachNetworkInterface and AssignPrivateIpAddresses;
  CreateNetworkInterface is not among them: the NAU page), with ``ipam.nau.rules``;
  ``NetworkAddressUsageLimitExceeded`` refuses a change that would pass the quota;
* IMDS can lag EC2 by a set number of seconds (``set_imds_lag``), as real IMDS does
  after attach, detach and address changes;
* IPv6 (``tools/lab/ec2/ipv6.py``): a VPC takes /56 blocks (unique-local only), a subnet
  one /64 of them, an interface /128 addresses and /80 prefixes up to its type's
  ``Ipv6AddressesPerInterface`` (each address and each prefix one slot, as in IPv4);
  each counts 1 NAU, as each IPv4 address and /28 do.

Every public method holds one lock; listeners are called under it, after the change and
before the method returns, so the API answers only once the node has followed.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from ipam.errors import SubnetSpaceError, UnknownInstanceType
from ipam.instance_types import InstanceType, catalog, lookup
from ipam.nau.rules import (
    DEFAULT_RULES,
    NAU_QUOTA_DEFAULT,
    InterfaceType,
    ManagedResource,
    NauRules,
)
from ipam.nau.subnet_space import ReservationKind, SubnetSpace
from ipam.nau.throttle import AccountThrottle
from tools.lab.ec2.errors import Ec2Error, combination, invalid, not_found
from tools.lab.ec2.faults import Faults, RequestLog
from tools.lab.ec2.imds import JsonLeaf
from tools.lab.ec2.ipv6 import (
    SUBNET_PREFIXLEN,
    VPC_PREFIXLEN,
    Ipv6SubnetSpace,
    parse_block,
    random_vpc_block,
)
from tools.lab.ec2.ipv6 import parse_address as parse_ipv6_address
from tools.lab.ec2.ipv6 import parse_prefix as parse_ipv6_prefix
from tools.lab.events import CloudListener, EniView

OWNER_ID = "111122223333"
DEFAULT_SECURITY_GROUP = "sg-0a1b2c3d4e5f60789"


VPC_IPV6_BLOCKS_MAX = 5  # IPv6 CIDR blocks per VPC ("Amazon VPC quotas"; not adjustable)


@dataclass(frozen=True, slots=True)
class Ipv6Block:
    """An IPv6 CIDR block associated with a VPC or a subnet."""

    association_id: str
    cidr: IPv6Network


@dataclass(slots=True)
class Vpc:
    vpc_id: str
    cidrs: list[IPv4Network]
    nau_quota: int = NAU_QUOTA_DEFAULT
    tags: dict[str, str] = field(default_factory=dict)
    ipv6_blocks: list[Ipv6Block] = field(default_factory=list)

    @property
    def ipv6_cidrs(self) -> list[IPv6Network]:
        return [b.cidr for b in self.ipv6_blocks]


@dataclass(frozen=True, slots=True)
class CidrReservation:
    reservation_id: str
    subnet_id: str
    cidr: IPv4Network
    kind: ReservationKind
    description: str
    tags: dict[str, str]


@dataclass(slots=True)
class Subnet:
    subnet_id: str
    vpc_id: str
    cidr: IPv4Network
    availability_zone: str
    availability_zone_id: str
    space: SubnetSpace
    tags: dict[str, str] = field(default_factory=dict)
    reservations: dict[str, CidrReservation] = field(default_factory=dict)
    ipv6_block: Ipv6Block | None = None
    ipv6_space: Ipv6SubnetSpace | None = None
    # ModifySubnetAttribute AssignIpv6AddressOnCreation: a new interface gets one IPv6
    # address unless the request asks for a count (0 included), as EKS IPv6 subnets do.
    assign_ipv6_on_creation: bool = False

    @property
    def gateway(self) -> IPv4Address:
        return self.space.gateway

    @property
    def ipv6_cidr(self) -> IPv6Network | None:
        return self.ipv6_block.cidr if self.ipv6_block is not None else None


@dataclass(slots=True)
class Attachment:
    attachment_id: str
    instance_id: str
    device_index: int
    network_card_index: int
    attach_time: datetime
    delete_on_termination: bool

    @property
    def primary(self) -> bool:
        return self.device_index == 0 and self.network_card_index == 0


@dataclass(slots=True)
class Eni:
    eni_id: str
    subnet_id: str
    vpc_id: str
    availability_zone: str
    mac: str
    interface_type: InterfaceType
    primary_ip: IPv4Address | None  # None for efa-only
    description: str = ""
    groups: list[str] = field(default_factory=lambda: [DEFAULT_SECURITY_GROUP])
    secondary_ips: list[IPv4Address] = field(default_factory=list)
    prefixes: list[IPv4Network] = field(default_factory=list)
    ipv6_addresses: list[IPv6Address] = field(default_factory=list)
    ipv6_prefixes: list[IPv6Network] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    source_dest_check: bool = True
    attachment: Attachment | None = None
    # Requester-managed interfaces (NAT gateways, endpoints, load balancers): the EC2
    # InterfaceType they show (natGateway, vpc_endpoint, network_load_balancer, ...) and
    # the service that owns them. None for interfaces the account created.
    managed_type: str | None = None
    requester_id: str | None = None

    @property
    def status(self) -> str:
        if self.managed_type is not None:
            return "in-use"
        return "in-use" if self.attachment is not None else "available"

    @property
    def shown_type(self) -> str:
        """The InterfaceType EC2 reports for it."""
        return self.managed_type if self.managed_type is not None else str(self.interface_type)

    @property
    def addresses(self) -> list[IPv4Address]:
        """Primary first, then secondaries in assignment order."""
        return ([self.primary_ip] if self.primary_ip is not None else []) + self.secondary_ips

    @property
    def slots_used(self) -> int:
        return len(self.addresses) + len(self.prefixes)

    @property
    def ipv6_slots_used(self) -> int:
        """Against ``Ipv6AddressesPerInterface``: each IPv6 address and each /80 one."""
        return len(self.ipv6_addresses) + len(self.ipv6_prefixes)

    @property
    def nau_addresses(self) -> int:
        """Addresses NAU counts: every IPv4 and every IPv6 address on the interface."""
        return len(self.addresses) + len(self.ipv6_addresses)

    @property
    def nau_prefixes(self) -> int:
        """Prefixes NAU counts: IPv4 /28s and IPv6 /80s alike."""
        return len(self.prefixes) + len(self.ipv6_prefixes)


@dataclass(slots=True)
class Instance:
    instance_id: str
    instance_type: InstanceType
    subnet_id: str
    vpc_id: str
    availability_zone: str
    launch_time: datetime
    image_id: str = "ami-0123456789abcdef0"
    state: str = "running"
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class NatGateway:
    nat_gateway_id: str
    subnet_id: str
    vpc_id: str
    eni_id: str
    create_time: datetime
    state: str = "available"
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class VpcEndpoint:
    vpc_endpoint_id: str
    vpc_id: str
    service_name: str
    endpoint_type: str  # Interface, Gateway or GatewayLoadBalancer
    subnet_ids: list[str]
    eni_ids: list[str]
    create_time: datetime
    state: str = "available"
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class LoadBalancer:
    """What EC2 sees of an ELB: one requester-managed interface per subnet (AZ)."""

    arn: str
    name: str
    kind: str  # network, gateway or application
    vpc_id: str
    eni_ids: list[str]


LB_INTERFACE = {  # EC2 InterfaceType and the description prefix ELB gives each kind
    "network": ("network_load_balancer", "net"),
    "gateway": ("gateway_load_balancer", "gwy"),
    "application": ("interface", "app"),
}
ENDPOINT_TYPES = ("Interface", "Gateway", "GatewayLoadBalancer")


@dataclass(frozen=True, slots=True)
class LaunchInterface:
    """One entry of a launch template's NetworkInterfaces."""

    network_card: int
    device_index: int
    interface_type: str = "interface"
    ipv4_prefix_count: int = 0
    secondary_ip_count: int = 0
    subnet_id: str | None = None  # None: the instance's subnet
    delete_on_termination: bool = True
    ipv6_prefix_count: int = 0
    # None: the subnet's AssignIpv6AddressOnCreation decides (1 or 0), as EC2 does
    ipv6_address_count: int | None = None


@dataclass(frozen=True, slots=True)
class Assigned:
    addresses: tuple[IPv4Address, ...]
    prefixes: tuple[IPv4Network, ...]


@dataclass(frozen=True, slots=True)
class Ipv6Assigned:
    addresses: tuple[IPv6Address, ...]
    prefixes: tuple[IPv6Network, ...]


@dataclass(frozen=True, slots=True)
class ImdsInterface:
    """One interface as IMDS shows it: the fabric's view plus what EC2 knows of it."""

    view: EniView
    subnet_id: str
    vpc_id: str
    vpc_cidrs: tuple[IPv4Network, ...]
    security_groups: tuple[str, ...]
    vpc_ipv6_cidrs: tuple[IPv6Network, ...] = ()


@dataclass(frozen=True, slots=True)
class _ImdsSnapshot:
    at: float
    interfaces: tuple[ImdsInterface, ...]


def _az_id(availability_zone: str) -> str:
    """us-west-2a -> usw2-az1: the stable id EC2 pairs with each zone name."""
    region, letter = availability_zone[:-1], availability_zone[-1]
    parts = region.split("-")
    short = parts[0] + "".join(p[0] for p in parts[1:-1]) + parts[-1]
    return f"{short}-az{ord(letter) - ord('a') + 1}"


class Cloud:
    """One region's worth of emulated EC2 state. Thread-safe."""

    def __init__(
        self,
        *,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        rules: NauRules = DEFAULT_RULES,
    ) -> None:
        self._rng = random.Random(seed)
        self._clock = clock
        self.clock = clock
        self._lock = threading.RLock()
        self.lock = self._lock  # the API layer holds it while it reads and renders
        self.rules = rules
        self.faults = Faults(clock=clock, seed=seed)
        self.requests = RequestLog(clock=clock)
        # EC2's account-level throttling (ipam.nau.throttle), applied by the API layer;
        # off unless a caller sets it (the fleet runner does, the single-node lab not).
        self.throttle: AccountThrottle | None = None
        self._vpcs: dict[str, Vpc] = {}
        self._subnets: dict[str, Subnet] = {}
        self._enis: dict[str, Eni] = {}
        self._instances: dict[str, Instance] = {}
        self._attachments: dict[str, str] = {}  # attachment id -> eni id
        self._macs: set[str] = set()
        self._client_tokens: dict[tuple[str, str], tuple[str, str]] = {}  # -> (params, id)
        self._listeners: list[CloudListener] = []
        self._nat_gateways: dict[str, NatGateway] = {}
        self._vpc_endpoints: dict[str, VpcEndpoint] = {}
        self._load_balancers: dict[str, LoadBalancer] = {}
        self._imds_lag_s = 0.0
        self._imds_history: dict[str, list[_ImdsSnapshot]] = {}
        self._imds_trees: dict[str, tuple[tuple[ImdsInterface, ...], dict[str, Any]]] = {}
        self._max_slots = max(t.ipv4_per_eni for t in catalog().values())
        self._max_ipv6_slots = max(t.ipv6_per_eni or 0 for t in catalog().values())

    # -- ids and clocks --------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{self._rng.getrandbits(68):017x}"

    def _new_mac(self) -> str:
        while True:
            # 02: locally administered, unicast; EC2 MACs are in that range too.
            mac = "02:" + ":".join(f"{self._rng.getrandbits(8):02x}" for _ in range(5))
            if mac not in self._macs:
                self._macs.add(mac)
                return mac

    @staticmethod
    def _now() -> datetime:
        return datetime.now(UTC).replace(microsecond=0)

    def idempotent(
        self, action: str, token: str | None, fingerprint: str, create: Callable[[], str]
    ) -> str:
        """EC2's ClientToken: the same token returns the resource the first call made.

        A token reused with different parameters is ``IdempotentParameterMismatch``.
        """
        with self._lock:
            if not token:
                return create()
            key = (action, token)
            if key in self._client_tokens:
                first, resource_id = self._client_tokens[key]
                if first != fingerprint:
                    raise Ec2Error(
                        "IdempotentParameterMismatch",
                        f"The client token {token!r} was used with different parameters",
                    )
                return resource_id
            resource_id = create()
            self._client_tokens[key] = (fingerprint, resource_id)
            return resource_id

    # -- listeners -------------------------------------------------------------------

    def subscribe(self, listener: CloudListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def unsubscribe(self, listener: CloudListener) -> None:
        with self._lock:
            self._listeners.remove(listener)

    # -- VPCs and subnets ------------------------------------------------------------

    def create_vpc(self, cidrs: Sequence[str | IPv4Network]) -> Vpc:
        with self._lock:
            networks = [IPv4Network(c) for c in cidrs]
            if not networks:
                raise invalid("a VPC needs at least one IPv4 CIDR block")
            for net in networks:
                if not 16 <= net.prefixlen <= 28:
                    raise invalid(f"The CIDR '{net}' is invalid: VPC blocks are /16 to /28")
            vpc = Vpc(self._new_id("vpc"), networks)
            self._vpcs[vpc.vpc_id] = vpc
            return vpc

    def vpc(self, vpc_id: str) -> Vpc:
        with self._lock:
            try:
                return self._vpcs[vpc_id]
            except KeyError:
                raise not_found("vpc", vpc_id) from None

    def associate_vpc_ipv6_cidr(self, vpc_id: str, cidr: str | None = None) -> Ipv6Block:
        """AssociateVpcCidrBlock with an IPv6 /56: the given one, or one the lab picks.

        "Amazon-provided" blocks are drawn from fd00::/8 (see ``ipv6.py``); a given block
        must be a unique-local /56 too, and no other VPC of the lab may hold it.
        """
        with self._lock:
            vpc = self.vpc(vpc_id)
            if len(vpc.ipv6_blocks) >= VPC_IPV6_BLOCKS_MAX:
                raise Ec2Error(
                    "CidrLimitExceeded",
                    f"VPC {vpc_id} already has {VPC_IPV6_BLOCKS_MAX} IPv6 CIDR blocks, the "
                    "most a VPC can have",
                )
            taken = {c for v in self._vpcs.values() for c in v.ipv6_cidrs}
            if cidr is None:
                block = random_vpc_block(self._rng, taken)
            else:
                block = parse_block(cidr, VPC_PREFIXLEN, "VPC")
                if block in taken:
                    raise Ec2Error("InvalidVpc.Range", f"The IPv6 CIDR '{block}' is already in use")
            association = Ipv6Block(self._new_id("vpc-cidr-assoc"), block)
            vpc.ipv6_blocks.append(association)
            self._record_vpc_imds(vpc_id)
            return association

    def associate_subnet_ipv6_cidr(self, subnet_id: str, cidr: str) -> Ipv6Block:
        """AssociateSubnetCidrBlock: one /64 of the VPC's IPv6 blocks per subnet."""
        with self._lock:
            subnet = self.subnet(subnet_id)
            vpc = self.vpc(subnet.vpc_id)
            block = parse_block(cidr, SUBNET_PREFIXLEN, "subnet")
            if subnet.ipv6_block is not None:
                raise Ec2Error(
                    "InvalidParameterValue",
                    f"Subnet {subnet_id} already has the IPv6 CIDR block "
                    f"{subnet.ipv6_block.cidr}; a subnet has at most one",
                )
            if not any(block.subnet_of(v) for v in vpc.ipv6_cidrs):
                raise Ec2Error(
                    "InvalidSubnet.Range",
                    f"The IPv6 CIDR '{block}' is not within the IPv6 blocks of {vpc.vpc_id} "
                    f"({', '.join(str(c) for c in vpc.ipv6_cidrs) or 'none'})",
                )
            for other in self._subnets.values():
                if other.vpc_id == vpc.vpc_id and other.ipv6_cidr == block:
                    raise Ec2Error(
                        "InvalidSubnet.Conflict",
                        f"The IPv6 CIDR '{block}' conflicts with subnet {other.subnet_id}",
                    )
            subnet.ipv6_block = Ipv6Block(self._new_id("subnet-cidr-assoc"), block)
            subnet.ipv6_space = Ipv6SubnetSpace(block, random.Random(self._rng.getrandbits(64)))
            for eni in self._enis.values():
                if eni.subnet_id == subnet_id and eni.attachment is not None:
                    self._record_imds(eni.attachment.instance_id)
            return subnet.ipv6_block

    def set_assign_ipv6_on_creation(self, subnet_id: str, enabled: bool) -> None:
        """ModifySubnetAttribute AssignIpv6AddressOnCreation."""
        with self._lock:
            subnet = self.subnet(subnet_id)
            if enabled and subnet.ipv6_block is None:
                raise invalid(
                    f"Subnet {subnet_id} has no IPv6 CIDR block: AssignIpv6AddressOnCreation "
                    "needs one"
                )
            subnet.assign_ipv6_on_creation = enabled

    def _record_vpc_imds(self, vpc_id: str) -> None:
        """IMDS shows the VPC's blocks on every interface of it (vpc-ipv6-cidr-blocks)."""
        instances = {
            e.attachment.instance_id
            for e in self._enis.values()
            if e.vpc_id == vpc_id and e.attachment is not None
        }
        for instance_id in sorted(instances):
            self._record_imds(instance_id)

    def set_nau_quota(self, vpc_id: str, quota: int) -> None:
        with self._lock:
            if quota < 1:
                raise invalid(f"NAU quota must be >= 1, not {quota}")
            self.vpc(vpc_id).nau_quota = quota

    def nau_quota(self, vpc_id: str) -> int:
        with self._lock:
            return self.vpc(vpc_id).nau_quota

    def nau_used(self, vpc_id: str) -> int:
        with self._lock:
            self.vpc(vpc_id)
            instances = sum(self._eni_nau(e) for e in self._enis.values() if e.vpc_id == vpc_id)
            return instances + self._managed_nau(vpc_id)

    def _managed_nau(self, vpc_id: str) -> int:
        """NAT gateways, endpoints per AZ, NLBs and GWLBs per AZ (ALBs are not listed)."""
        rules = self.rules
        units = sum(
            rules.resource_units(ManagedResource.NAT_GATEWAY)
            for n in self._nat_gateways.values()
            if n.vpc_id == vpc_id and n.state in ("pending", "available")
        )
        for endpoint in self._vpc_endpoints.values():
            if endpoint.vpc_id == vpc_id and endpoint.endpoint_type != "Gateway":
                units += len(endpoint.subnet_ids) * rules.resource_units(
                    ManagedResource.VPC_ENDPOINT
                )
        kinds = {"network": ManagedResource.NLB, "gateway": ManagedResource.GWLB}
        for lb in self._load_balancers.values():
            if lb.vpc_id == vpc_id and lb.kind in kinds:
                units += len(lb.eni_ids) * rules.resource_units(kinds[lb.kind])
        return units

    def _eni_nau(self, eni: Eni) -> int:
        """NAU of one ENI; only interfaces attached to an instance count."""
        if eni.attachment is None:
            return 0
        return self.rules.interface_units(
            eni.interface_type,
            primary=eni.attachment.primary,
            addresses=eni.nau_addresses,
            prefixes=eni.nau_prefixes,
        )

    def _check_nau(self, vpc_id: str, extra: int) -> None:
        if extra <= 0:
            return
        vpc = self.vpc(vpc_id)
        used = self.nau_used(vpc_id)
        if used + extra > vpc.nau_quota:
            raise Ec2Error(
                "NetworkAddressUsageLimitExceeded",
                f"The request would bring the Network Address Usage of {vpc_id} to "
                f"{used + extra}, over its quota of {vpc.nau_quota}.",
            )

    def create_subnet(
        self,
        vpc_id: str,
        cidr: str | IPv4Network,
        availability_zone: str,
        tags: dict[str, str] | None = None,
    ) -> Subnet:
        with self._lock:
            vpc = self.vpc(vpc_id)
            net = IPv4Network(cidr)
            if not any(net.subnet_of(block) for block in vpc.cidrs):
                raise Ec2Error(
                    "InvalidSubnet.Range", f"The CIDR '{net}' is invalid for VPC {vpc_id}."
                )
            for other in self._subnets.values():
                if other.vpc_id == vpc_id and other.cidr.overlaps(net):
                    raise Ec2Error(
                        "InvalidSubnet.Conflict", f"The CIDR '{net}' conflicts with another subnet"
                    )
            subnet_id = self._new_id("subnet")
            space = SubnetSpace(net, rng=random.Random(self._rng.getrandbits(64)))
            subnet = Subnet(
                subnet_id,
                vpc_id,
                net,
                availability_zone,
                _az_id(availability_zone),
                space,
                dict(tags or {}),
            )
            self._subnets[subnet_id] = subnet
            return subnet

    def subnet(self, subnet_id: str) -> Subnet:
        with self._lock:
            try:
                return self._subnets[subnet_id]
            except KeyError:
                raise not_found("subnet", subnet_id) from None

    def subnets(self) -> list[Subnet]:
        with self._lock:
            return list(self._subnets.values())

    def vpcs(self) -> list[Vpc]:
        with self._lock:
            return list(self._vpcs.values())

    # -- requester-managed resources (for NAU inspection) -----------------------------

    def _managed_eni(
        self, subnet_id: str, interface_type: str, description: str, requester: str
    ) -> Eni:
        eni = self._create_eni(
            subnet_id, interface_type="interface", description=description, groups=None, tags={}
        )
        eni.managed_type = interface_type
        eni.requester_id = requester
        return eni

    def create_nat_gateway(self, subnet_id: str, tags: dict[str, str] | None = None) -> NatGateway:
        """A private NAT gateway: one requester-managed interface in its subnet."""
        with self._lock:
            subnet = self.subnet(subnet_id)
            nat_id = self._new_id("nat")
            eni = self._managed_eni(
                subnet_id, "natGateway", f"Interface for NAT Gateway {nat_id}", "amazon-nat"
            )
            nat = NatGateway(
                nat_id, subnet_id, subnet.vpc_id, eni.eni_id, self._now(), tags=dict(tags or {})
            )
            self._nat_gateways[nat_id] = nat
            return nat

    def nat_gateways(self) -> list[NatGateway]:
        with self._lock:
            return list(self._nat_gateways.values())

    def create_vpc_endpoint(
        self, vpc_id: str, service_name: str, endpoint_type: str, subnet_ids: Sequence[str] = ()
    ) -> VpcEndpoint:
        """Interface and GWLB endpoints get an interface per subnet; Gateway ones none."""
        with self._lock:
            self.vpc(vpc_id)
            if endpoint_type not in ENDPOINT_TYPES:
                raise invalid(f"VpcEndpointType '{endpoint_type}' is invalid")
            if endpoint_type == "Gateway" and subnet_ids:
                raise combination("A Gateway endpoint takes route tables, not subnets")
            if endpoint_type != "Gateway" and not subnet_ids:
                raise invalid(f"A {endpoint_type} endpoint needs at least one subnet")
            subnets = [self.subnet(s) for s in subnet_ids]
            if any(s.vpc_id != vpc_id for s in subnets):
                raise invalid(f"The subnets of an endpoint must be in {vpc_id}")
            if len({s.availability_zone for s in subnets}) != len(subnets):
                raise invalid("An endpoint takes at most one subnet per Availability Zone")
            endpoint_id = self._new_id("vpce")
            kind = (
                "vpc_endpoint"
                if endpoint_type == "Interface"
                else ("gateway_load_balancer_endpoint")
            )
            enis = [
                self._managed_eni(
                    s.subnet_id, kind, f"VPC Endpoint Interface {endpoint_id}", "amazon-vpce"
                ).eni_id
                for s in subnets
            ]
            endpoint = VpcEndpoint(
                endpoint_id,
                vpc_id,
                service_name,
                endpoint_type,
                list(subnet_ids),
                enis,
                self._now(),
            )
            self._vpc_endpoints[endpoint_id] = endpoint
            return endpoint

    def vpc_endpoints(self) -> list[VpcEndpoint]:
        with self._lock:
            return list(self._vpc_endpoints.values())

    def create_load_balancer(self, name: str, kind: str, subnet_ids: Sequence[str]) -> LoadBalancer:
        """What EC2 shows of an ELB (elbv2 itself is another service, not emulated)."""
        with self._lock:
            if kind not in LB_INTERFACE:
                raise invalid(f"load balancer type '{kind}' is invalid")
            subnets = [self.subnet(s) for s in subnet_ids]
            if not subnets or len({s.vpc_id for s in subnets}) != 1:
                raise invalid("a load balancer needs subnets of one VPC")
            interface_type, short = LB_INTERFACE[kind]
            lb_id = f"{self._rng.getrandbits(64):016x}"
            region = subnets[0].availability_zone[:-1]
            arn = (
                f"arn:aws:elasticloadbalancing:{region}:{OWNER_ID}:loadbalancer/"
                f"{short}/{name}/{lb_id}"
            )
            enis = [
                self._managed_eni(
                    s.subnet_id, interface_type, f"ELB {short}/{name}/{lb_id}", "amazon-elb"
                ).eni_id
                for s in subnets
            ]
            lb = LoadBalancer(arn, name, kind, subnets[0].vpc_id, enis)
            self._load_balancers[arn] = lb
            return lb

    # -- CIDR reservations -----------------------------------------------------------

    def create_cidr_reservation(
        self,
        subnet_id: str,
        cidr: str,
        kind: str,
        description: str = "",
        tags: dict[str, str] | None = None,
    ) -> CidrReservation:
        with self._lock:
            subnet = self.subnet(subnet_id)
            kinds = {"prefix": ReservationKind.PREFIX, "explicit": ReservationKind.EXPLICIT}
            if kind not in kinds:
                raise invalid(f"ReservationType '{kind}' is invalid: use prefix or explicit")
            reservation_kind = kinds[kind]
            try:
                net = IPv4Network(cidr)
            except ValueError as err:
                raise invalid(f"The CIDR '{cidr}' is invalid: {err}") from None
            try:
                subnet.space.reserve(net, reservation_kind)
            except SubnetSpaceError as err:
                raise Ec2Error(err.code, str(err)) from None
            record = CidrReservation(
                self._new_id("scr"), subnet_id, net, reservation_kind, description, tags or {}
            )
            subnet.reservations[record.reservation_id] = record
            return record

    def delete_cidr_reservation(self, reservation_id: str) -> CidrReservation:
        with self._lock:
            for subnet in self._subnets.values():
                record = subnet.reservations.pop(reservation_id, None)
                if record is not None:
                    subnet.space.unreserve(record.cidr)
                    return record
            raise not_found("reservation", reservation_id)

    # -- instances -------------------------------------------------------------------

    def launch_instance(
        self,
        instance_type: str,
        subnet_id: str,
        *,
        interfaces: Sequence[LaunchInterface] = (),
        tags: dict[str, str] | None = None,
    ) -> Instance:
        """RunInstances with a launch template's NetworkInterfaces; all or nothing."""
        with self._lock:
            try:
                itype = lookup(instance_type)
            except UnknownInstanceType as err:
                raise invalid(str(err)) from None
            subnet = self.subnet(subnet_id)
            specs = list(interfaces) or [LaunchInterface(0, 0)]
            placements = {(s.network_card, s.device_index) for s in specs}
            if len(placements) != len(specs):
                raise invalid("two launch interfaces share a network card and device index")
            if (0, 0) not in placements:
                raise invalid("a launch needs an interface at network card 0, device index 0")
            instance = Instance(
                self._new_id("i"),
                itype,
                subnet_id,
                subnet.vpc_id,
                subnet.availability_zone,
                self._now(),
                tags=dict(tags or {}),
            )
            self._instances[instance.instance_id] = instance
            created: list[Eni] = []
            try:
                for spec in sorted(specs, key=lambda s: (s.network_card, s.device_index)):
                    eni = self._create_eni(
                        spec.subnet_id or subnet_id,
                        interface_type=spec.interface_type,
                        prefix_count=spec.ipv4_prefix_count,
                        secondary_count=spec.secondary_ip_count,
                        ipv6_prefix_count=spec.ipv6_prefix_count,
                        ipv6_address_count=spec.ipv6_address_count,
                        description="",
                        groups=None,
                        tags={},
                    )
                    created.append(eni)
                    self._attach(
                        eni,
                        instance,
                        spec.device_index,
                        spec.network_card,
                        spec.delete_on_termination,
                        launching=True,
                    )
            except (Ec2Error, SubnetSpaceError):
                for eni in created:
                    eni.attachment = None
                    self._delete_eni(eni)
                self._attachments = {a: e for a, e in self._attachments.items() if e in self._enis}
                del self._instances[instance.instance_id]
                raise
            self._record_imds(instance.instance_id)
            for eni in created:
                self._emit("eni_attached", eni)
            return instance

    def terminate_instance(self, instance_id: str) -> None:
        """Detach every interface; delete those marked DeleteOnTermination."""
        with self._lock:
            instance = self.instance(instance_id)
            for eni in reversed(self.enis_of(instance_id)):
                assert eni.attachment is not None
                delete = eni.attachment.delete_on_termination
                self._detach(eni)
                if delete:
                    self._delete_eni(eni)
            instance.state = "terminated"
            self._imds_history.pop(instance_id, None)

    def instance(self, instance_id: str) -> Instance:
        with self._lock:
            try:
                return self._instances[instance_id]
            except KeyError:
                raise not_found("instance", instance_id) from None

    def instances(self) -> list[Instance]:
        with self._lock:
            return list(self._instances.values())

    # -- network interfaces ----------------------------------------------------------

    def create_network_interface(
        self,
        subnet_id: str,
        *,
        interface_type: str = "interface",
        prefix_count: int = 0,
        prefixes: Sequence[str] = (),
        secondary_count: int = 0,
        private_ips: Sequence[str] = (),
        primary_ip: str | None = None,
        description: str = "",
        groups: Sequence[str] | None = None,
        tags: dict[str, str] | None = None,
        ipv6_address_count: int | None = None,
        ipv6_addresses: Sequence[str] = (),
        ipv6_prefix_count: int = 0,
        ipv6_prefixes: Sequence[str] = (),
    ) -> Eni:
        with self._lock:
            return self._create_eni(
                subnet_id,
                interface_type=interface_type,
                prefix_count=prefix_count,
                prefixes=prefixes,
                secondary_count=secondary_count,
                private_ips=private_ips,
                primary_ip=primary_ip,
                description=description,
                groups=groups,
                tags=tags or {},
                ipv6_address_count=ipv6_address_count,
                ipv6_addresses=ipv6_addresses,
                ipv6_prefix_count=ipv6_prefix_count,
                ipv6_prefixes=ipv6_prefixes,
            )

    def _create_eni(
        self,
        subnet_id: str,
        *,
        interface_type: str,
        prefix_count: int = 0,
        prefixes: Sequence[str] = (),
        secondary_count: int = 0,
        private_ips: Sequence[str] = (),
        primary_ip: str | None = None,
        description: str,
        groups: Sequence[str] | None,
        tags: dict[str, str],
        ipv6_address_count: int | None = None,
        ipv6_addresses: Sequence[str] = (),
        ipv6_prefix_count: int = 0,
        ipv6_prefixes: Sequence[str] = (),
    ) -> Eni:
        subnet = self.subnet(subnet_id)
        try:
            kind = InterfaceType(interface_type)
        except ValueError:
            raise invalid(
                f"InterfaceType '{interface_type}' is invalid: use interface, efa or efa-only"
            ) from None
        wants_ipv6 = ipv6_address_count or ipv6_addresses or ipv6_prefix_count or ipv6_prefixes
        # The subnet's AssignIpv6AddressOnCreation gives one address unless the request
        # names a count or addresses; it applies beside requested prefixes too (an EKS IPv6
        # node has its own address and the /80 its launch template asks for).
        auto_ipv6 = (
            ipv6_address_count is None
            and not ipv6_addresses
            and subnet.assign_ipv6_on_creation
            and kind is not InterfaceType.EFA_ONLY
        )
        wants_ips = (
            prefix_count or prefixes or secondary_count or private_ips or primary_ip or wants_ipv6
        )
        if kind is InterfaceType.EFA_ONLY and wants_ips:
            raise combination("An EFA-only network interface cannot have IP addresses or prefixes")
        eni = Eni(
            self._new_id("eni"),
            subnet_id,
            subnet.vpc_id,
            subnet.availability_zone,
            self._new_mac(),
            kind,
            None,
            description=description,
            groups=list(groups) if groups else [DEFAULT_SECURITY_GROUP],
            tags=dict(tags),
        )
        try:
            if kind is not InterfaceType.EFA_ONLY:
                eni.primary_ip = self._take_address(subnet, primary_ip)
            self._assign(
                eni,
                ip_count=secondary_count,
                ips=private_ips,
                prefix_count=prefix_count,
                prefixes=prefixes,
                limit=self._max_slots,
            )
            self._assign_ipv6(
                eni,
                address_count=ipv6_address_count or 0,
                addresses=ipv6_addresses,
                prefix_count=ipv6_prefix_count,
                prefixes=ipv6_prefixes,
                limit=self._max_ipv6_slots,
            )
            if auto_ipv6:
                self._assign_ipv6(
                    eni,
                    address_count=1,
                    addresses=(),
                    prefix_count=0,
                    prefixes=(),
                    limit=self._max_ipv6_slots,
                )
        except (Ec2Error, SubnetSpaceError):
            self._release_all(eni)
            self._macs.discard(eni.mac)
            raise
        self._enis[eni.eni_id] = eni
        return eni

    def eni(self, eni_id: str) -> Eni:
        with self._lock:
            try:
                return self._enis[eni_id]
            except KeyError:
                raise not_found("eni", eni_id) from None

    def _own_eni(self, eni_id: str) -> Eni:
        """An interface the account may change: requester-managed ones are refused."""
        eni = self.eni(eni_id)
        if eni.managed_type is not None:
            raise Ec2Error(
                "OperationNotPermitted",
                f"Network interface {eni_id} is managed by {eni.requester_id} and cannot be "
                "modified, attached, detached or deleted by the account",
            )
        return eni

    def enis(self) -> list[Eni]:
        with self._lock:
            return list(self._enis.values())

    def enis_of(self, instance_id: str) -> list[Eni]:
        """The instance's attached interfaces, by (network card, device index)."""
        with self._lock:
            found = [
                e
                for e in self._enis.values()
                if e.attachment is not None and e.attachment.instance_id == instance_id
            ]
            return sorted(found, key=_placement)

    def eni_view(self, eni_id: str) -> EniView:
        with self._lock:
            return self._view(self.eni(eni_id))

    def attach_network_interface(
        self, eni_id: str, instance_id: str, device_index: int, network_card_index: int = 0
    ) -> str:
        with self._lock:
            eni = self._own_eni(eni_id)
            instance = self.instance(instance_id)
            attachment = self._attach(
                eni, instance, device_index, network_card_index, delete_on_termination=False
            )
            return attachment.attachment_id

    def _attach(
        self,
        eni: Eni,
        instance: Instance,
        device_index: int,
        card_index: int,
        delete_on_termination: bool,
        *,
        launching: bool = False,
    ) -> Attachment:
        itype = instance.instance_type
        if instance.state != "running":
            raise Ec2Error(
                "IncorrectInstanceState",
                f"The instance '{instance.instance_id}' is not in a state from which it can "
                "be attached.",
            )
        if eni.attachment is not None:
            raise Ec2Error("InvalidNetworkInterface.InUse", f"Interface: [{eni.eni_id}] in use.")
        if eni.availability_zone != instance.availability_zone:
            raise combination(
                f"You may not attach a network interface to an instance if they are not in "
                f"the same availability zone ({eni.availability_zone} vs "
                f"{instance.availability_zone})"
            )
        if eni.vpc_id != instance.vpc_id:
            raise combination("The network interface and the instance are in different VPCs")
        try:
            card = itype.card(card_index)
        except KeyError:
            raise invalid(
                f"NetworkCardIndex {card_index} is out of range for {itype.name}, which has "
                f"{len(itype.network_cards)} network card(s)"
            ) from None
        attached = self.enis_of(instance.instance_id)
        on_card = [
            e
            for e in attached
            if e.attachment is not None and e.attachment.network_card_index == card_index
        ]
        # Limits first: on a full card every device index is taken, and EC2 answers
        # AttachmentLimitExceeded, which is what the VPC CNI reacts to.
        if len(on_card) >= card.max_interfaces:
            raise Ec2Error(
                "AttachmentLimitExceeded",
                f"Interface count {len(on_card) + 1} exceeds the limit of network card "
                f"{card_index} for {itype.name} ({card.max_interfaces})",
            )
        if len(attached) >= itype.max_enis_total:
            raise Ec2Error(
                "AttachmentLimitExceeded",
                f"Interface count exceeds the limit for {itype.name} ({itype.max_enis_total})",
            )
        if not 0 <= device_index < card.max_interfaces:
            # EC2 accepts any device index below its own bound; the lab names links by
            # (card, device), so it holds the index to the card's interface count.
            raise invalid(
                f"DeviceIndex {device_index} is out of range: network card {card_index} of "
                f"{itype.name} takes device indexes 0..{card.max_interfaces - 1}"
            )
        if any(
            e.attachment is not None and e.attachment.device_index == device_index for e in on_card
        ):
            raise invalid(
                f"Instance '{instance.instance_id}' already has an interface attached at "
                f"device index '{device_index}' on network card {card_index}."
            )
        if eni.interface_type is not InterfaceType.INTERFACE:
            if not itype.efa_supported:
                raise combination(f"Instance type {itype.name} does not support EFA interfaces")
            if not launching:
                # EC2 User Guide, "Attach an EFA": EFAs can be attached only at launch or
                # to a stopped instance, never to a running one.
                raise Ec2Error(
                    "IncorrectInstanceState",
                    f"EFA interface {eni.eni_id} cannot be attached to running instance "
                    f"{instance.instance_id}",
                )
            efa_count = sum(1 for e in attached if e.interface_type is not InterfaceType.INTERFACE)
            if efa_count >= (itype.max_efa_interfaces or 0):
                raise Ec2Error(
                    "AttachmentLimitExceeded",
                    f"EFA interface count exceeds the limit for {itype.name} "
                    f"({itype.max_efa_interfaces})",
                )
        if (card_index, device_index) == (0, 0) and eni.interface_type is InterfaceType.EFA_ONLY:
            raise invalid("The primary network interface cannot be an EFA-only interface")
        if eni.slots_used > itype.ipv4_per_eni:
            raise Ec2Error(
                "PrivateIpAddressLimitExceeded",
                f"Network interface {eni.eni_id} holds {eni.slots_used} addresses and prefixes; "
                f"{itype.name} allows {itype.ipv4_per_eni} per interface",
            )
        _check_ipv6_type(eni, itype, eni.ipv6_slots_used, bool(eni.ipv6_prefixes))
        attachment = Attachment(
            self._new_id("eni-attach"),
            instance.instance_id,
            device_index,
            card_index,
            self._now(),
            delete_on_termination,
        )
        # NAU: the interface counts from the moment it is attached.
        self._check_nau(
            eni.vpc_id,
            self.rules.interface_units(
                eni.interface_type,
                primary=attachment.primary,
                addresses=eni.nau_addresses,
                prefixes=eni.nau_prefixes,
            ),
        )
        eni.attachment = attachment
        self._attachments[attachment.attachment_id] = eni.eni_id
        if not launching:
            self._record_imds(instance.instance_id)
            self._emit("eni_attached", eni)
        return attachment

    def detach_network_interface(self, attachment_id: str, *, force: bool = False) -> None:
        with self._lock:
            eni_id = self._attachments.get(attachment_id)
            if eni_id is None:
                raise not_found("attachment", attachment_id)
            eni = self._enis[eni_id]
            assert eni.attachment is not None
            if eni.attachment.primary:
                raise Ec2Error(
                    "OperationNotPermitted",
                    "The network interface at device index 0 and networkCard index 0 cannot "
                    "be detached.",
                )
            if eni.interface_type is not InterfaceType.INTERFACE:
                raise Ec2Error(
                    "IncorrectInstanceState",
                    f"EFA interface {eni.eni_id} cannot be detached from a running instance",
                )
            self._detach(eni)

    def _detach(self, eni: Eni) -> None:
        assert eni.attachment is not None
        view = self._view(eni)
        instance_id = eni.attachment.instance_id
        del self._attachments[eni.attachment.attachment_id]
        eni.attachment = None
        self._record_imds(instance_id)
        self._emit_view("eni_detached", view)

    def delete_network_interface(self, eni_id: str) -> None:
        with self._lock:
            eni = self._own_eni(eni_id)
            if eni.attachment is not None:
                raise Ec2Error(
                    "InvalidNetworkInterface.InUse",
                    f"Network interface '{eni_id}' is currently in use.",
                )
            self._delete_eni(eni)

    def _delete_eni(self, eni: Eni) -> None:
        self._release_all(eni)
        self._enis.pop(eni.eni_id, None)
        self._macs.discard(eni.mac)

    def modify_network_interface(
        self,
        eni_id: str,
        *,
        description: str | None = None,
        source_dest_check: bool | None = None,
        groups: Sequence[str] | None = None,
        attachment_id: str | None = None,
        delete_on_termination: bool | None = None,
    ) -> None:
        with self._lock:
            eni = self._own_eni(eni_id)
            changes = [
                description is not None,
                source_dest_check is not None,
                groups is not None,
                delete_on_termination is not None,
            ]
            if sum(changes) != 1:
                raise combination(
                    "Exactly one of Description, SourceDestCheck, Groups or Attachment must "
                    "be specified"
                )
            if description is not None:
                eni.description = description
            if source_dest_check is not None:
                eni.source_dest_check = source_dest_check
            if groups is not None:
                if not groups:
                    raise invalid("Groups must name at least one security group")
                eni.groups = list(groups)
                if eni.attachment is not None:
                    self._record_imds(eni.attachment.instance_id)
            if delete_on_termination is not None:
                if eni.attachment is None or eni.attachment.attachment_id != attachment_id:
                    raise not_found("attachment", attachment_id or "")
                eni.attachment.delete_on_termination = delete_on_termination

    # -- addresses and prefixes ------------------------------------------------------

    def assign_private_ip_addresses(
        self,
        eni_id: str,
        *,
        ip_count: int = 0,
        ips: Sequence[str] = (),
        prefix_count: int = 0,
        prefixes: Sequence[str] = (),
        allow_reassignment: bool = False,
    ) -> Assigned:
        with self._lock:
            eni = self._own_eni(eni_id)
            if not (ip_count or ips or prefix_count or prefixes):
                raise Ec2Error(
                    "MissingParameter",
                    "The request must contain one of PrivateIpAddress, "
                    "SecondaryPrivateIpAddressCount, Ipv4Prefix or Ipv4PrefixCount",
                )
            limit = self._max_slots
            if eni.attachment is not None:
                limit = self.instance(eni.attachment.instance_id).instance_type.ipv4_per_eni
            assigned = self._assign(
                eni,
                ip_count=ip_count,
                ips=ips,
                prefix_count=prefix_count,
                prefixes=prefixes,
                limit=limit,
                allow_reassignment=allow_reassignment,
                check_nau=eni.attachment is not None,
            )
            self._changed(eni)
            return assigned

    def _assign(
        self,
        eni: Eni,
        *,
        ip_count: int,
        ips: Sequence[str],
        prefix_count: int,
        prefixes: Sequence[str],
        limit: int,
        allow_reassignment: bool = False,
        check_nau: bool = False,
    ) -> Assigned:
        """Assign addresses and prefixes to ``eni``, all or nothing."""
        if ip_count and ips:
            raise combination(
                "SecondaryPrivateIpAddressCount and PrivateIpAddresses cannot be combined"
            )
        if prefix_count and prefixes:
            raise combination("Ipv4PrefixCount and Ipv4Prefixes cannot be combined")
        # API reference, Ipv4PrefixCount / Ipv4Prefixes: "You can't specify ... if you've
        # specified ... specific private IPv4 addresses, or a count of private IPv4 addresses."
        if (prefix_count or prefixes) and (ip_count or ips):
            raise combination("IPv4 prefixes and private IPv4 addresses cannot be combined")
        if ip_count < 0 or prefix_count < 0:
            raise invalid("address and prefix counts must be positive")
        addresses = [_parse_address(a) for a in ips]
        networks = [_parse_prefix(p) for p in prefixes]
        _refuse_duplicates(addresses, "address")
        _refuse_duplicates(networks, "prefix")
        wanted = ip_count + len(addresses) + prefix_count + len(networks)
        if wanted == 0:
            return Assigned((), ())
        if eni.interface_type is InterfaceType.EFA_ONLY:
            raise combination(f"EFA-only network interface {eni.eni_id} cannot have IP addresses")
        if eni.slots_used + wanted > limit:
            raise Ec2Error(
                "PrivateIpAddressLimitExceeded",
                f"Number of private addresses will exceed limit: {eni.eni_id} has "
                f"{eni.slots_used} of {limit} address slots used and {wanted} were asked for",
            )
        subnet = self.subnet(eni.subnet_id)
        moves = self._reassignments(subnet, addresses, eni) if allow_reassignment else []
        if check_nau:
            # An address moved off another attached ENI of the VPC is already counted.
            already = sum(1 for owner, _ in moves if owner.attachment is not None)
            self._check_nau(
                eni.vpc_id,
                (ip_count + len(addresses) - already) * self.rules.address
                + (prefix_count + len(networks)) * self.rules.prefix,
            )
        for owner, address in moves:
            owner.secondary_ips.remove(address)
            subnet.space.release_address(address)
        new_ips: list[IPv4Address] = []
        new_prefixes: list[IPv4Network] = []
        try:
            for address in addresses:
                new_ips.append(self._take_address(subnet, str(address)))
            for _ in range(ip_count):
                new_ips.append(subnet.space.allocate_address())
            for network in networks:
                new_prefixes.append(_space_call(subnet.space.claim_prefix, network))
            for _ in range(prefix_count):
                new_prefixes.append(subnet.space.allocate_prefix())
        except (Ec2Error, SubnetSpaceError) as err:
            for address in new_ips:
                subnet.space.release_address(address)
            for prefix in new_prefixes:
                subnet.space.release_prefix(prefix)
            for owner, address in moves:  # give moved addresses back to their owners
                subnet.space.claim_address(address)
                owner.secondary_ips.append(address)
            if isinstance(err, SubnetSpaceError):
                raise Ec2Error(err.code, str(err)) from None
            raise
        eni.secondary_ips.extend(new_ips)
        eni.prefixes.extend(new_prefixes)
        for owner in {id(o): o for o, _ in moves}.values():
            self._changed(owner)
        return Assigned(tuple(new_ips), tuple(new_prefixes))

    def _reassignments(
        self, subnet: Subnet, addresses: Sequence[IPv4Address], taker: Eni
    ) -> list[tuple[Eni, IPv4Address]]:
        """AllowReassignment: the secondary addresses to move off the ENIs holding them."""
        moves = []
        for address in addresses:
            for owner in self._enis.values():
                if owner is not taker and owner.subnet_id == subnet.subnet_id:
                    if address in owner.secondary_ips:
                        moves.append((owner, address))
                        break
        return moves

    def unassign_private_ip_addresses(
        self, eni_id: str, *, ips: Sequence[str] = (), prefixes: Sequence[str] = ()
    ) -> None:
        with self._lock:
            eni = self._own_eni(eni_id)
            if not ips and not prefixes:
                raise Ec2Error(
                    "MissingParameter",
                    "The request must contain PrivateIpAddress or Ipv4Prefix",
                )
            addresses = [_parse_address(a) for a in ips]
            networks = [_parse_prefix(p) for p in prefixes]
            _refuse_duplicates(addresses, "address")
            _refuse_duplicates(networks, "prefix")
            for address in addresses:
                if address == eni.primary_ip:
                    raise invalid(f"The primary address {address} of {eni_id} cannot be unassigned")
                if address not in eni.secondary_ips:
                    raise invalid(
                        f"Some of the specified addresses are not assigned to interface "
                        f"{eni_id}: {address}"
                    )
            for network in networks:
                if network not in eni.prefixes:
                    raise invalid(
                        f"Some of the specified prefixes are not assigned to interface "
                        f"{eni_id}: {network}"
                    )
            subnet = self.subnet(eni.subnet_id)
            for address in addresses:
                eni.secondary_ips.remove(address)
                subnet.space.release_address(address)
            for network in networks:
                eni.prefixes.remove(network)
                subnet.space.release_prefix(network)
            self._changed(eni)

    # -- IPv6 addresses and prefixes -------------------------------------------------

    def assign_ipv6_addresses(
        self,
        eni_id: str,
        *,
        address_count: int = 0,
        addresses: Sequence[str] = (),
        prefix_count: int = 0,
        prefixes: Sequence[str] = (),
    ) -> Ipv6Assigned:
        """AssignIpv6Addresses: /128 addresses or /80 prefixes from the subnet's /64."""
        with self._lock:
            eni = self._own_eni(eni_id)
            if not (address_count or addresses or prefix_count or prefixes):
                raise Ec2Error(
                    "MissingParameter",
                    "The request must contain one of Ipv6Addresses, Ipv6AddressCount, "
                    "Ipv6Prefixes or Ipv6PrefixCount",
                )
            limit = self._max_ipv6_slots
            if eni.attachment is not None:
                itype = self.instance(eni.attachment.instance_id).instance_type
                wanted = address_count + len(addresses) + prefix_count + len(prefixes)
                _check_ipv6_type(
                    eni, itype, eni.ipv6_slots_used + wanted, bool(prefix_count or prefixes)
                )
                limit = itype.ipv6_per_eni or 0
            assigned = self._assign_ipv6(
                eni,
                address_count=address_count,
                addresses=addresses,
                prefix_count=prefix_count,
                prefixes=prefixes,
                limit=limit,
                check_nau=eni.attachment is not None,
            )
            self._changed(eni)
            return assigned

    def _assign_ipv6(
        self,
        eni: Eni,
        *,
        address_count: int,
        addresses: Sequence[str],
        prefix_count: int,
        prefixes: Sequence[str],
        limit: int,
        check_nau: bool = False,
    ) -> Ipv6Assigned:
        """Assign IPv6 addresses and /80 prefixes to ``eni``, all or nothing."""
        if address_count and addresses:
            raise combination("Ipv6AddressCount and Ipv6Addresses cannot be combined")
        if prefix_count and prefixes:
            raise combination("Ipv6PrefixCount and Ipv6Prefixes cannot be combined")
        # API reference, Ipv6PrefixCount: not with "specific IPv6 addresses, or a count of
        # IPv6 addresses" (and the other way round).
        if (prefix_count or prefixes) and (address_count or addresses):
            raise combination("IPv6 prefixes and IPv6 addresses cannot be combined")
        if address_count < 0 or prefix_count < 0:
            raise invalid("IPv6 address and prefix counts must be positive")
        wanted_addresses = [parse_ipv6_address(a) for a in addresses]
        wanted_prefixes = [parse_ipv6_prefix(p) for p in prefixes]
        _refuse_duplicates(wanted_addresses, "IPv6 address")
        _refuse_duplicates(wanted_prefixes, "IPv6 prefix")
        wanted = address_count + len(wanted_addresses) + prefix_count + len(wanted_prefixes)
        if wanted == 0:
            return Ipv6Assigned((), ())
        if eni.interface_type is InterfaceType.EFA_ONLY:
            raise combination(f"EFA-only network interface {eni.eni_id} cannot have IP addresses")
        subnet = self.subnet(eni.subnet_id)
        space = subnet.ipv6_space
        if space is None:
            raise invalid(
                f"Subnet {subnet.subnet_id} of {eni.eni_id} has no IPv6 CIDR block; associate "
                "one (AssociateSubnetCidrBlock) before assigning IPv6 addresses or prefixes"
            )
        if eni.ipv6_slots_used + wanted > limit:
            raise invalid(
                f"Number of IPv6 addresses and prefixes will exceed the limit: {eni.eni_id} "
                f"has {eni.ipv6_slots_used} of {limit} used and {wanted} were asked for"
            )
        if check_nau:
            self._check_nau(
                eni.vpc_id,
                (address_count + len(wanted_addresses)) * self.rules.address
                + (prefix_count + len(wanted_prefixes)) * self.rules.prefix,
            )
        new_addresses: list[IPv6Address] = []
        new_prefixes: list[IPv6Network] = []
        try:
            for address in wanted_addresses:
                new_addresses.append(space.claim_address(address))
            for _ in range(address_count):
                new_addresses.append(space.allocate_address())
            for prefix in wanted_prefixes:
                new_prefixes.append(space.claim_prefix(prefix))
            for _ in range(prefix_count):
                new_prefixes.append(space.allocate_prefix())
        except Ec2Error:
            for address in new_addresses:
                space.release_address(address)
            for prefix in new_prefixes:
                space.release_prefix(prefix)
            raise
        eni.ipv6_addresses.extend(new_addresses)
        eni.ipv6_prefixes.extend(new_prefixes)
        return Ipv6Assigned(tuple(new_addresses), tuple(new_prefixes))

    def unassign_ipv6_addresses(
        self, eni_id: str, *, addresses: Sequence[str] = (), prefixes: Sequence[str] = ()
    ) -> Ipv6Assigned:
        """UnassignIpv6Addresses; all named must be on the interface, or nothing changes."""
        with self._lock:
            eni = self._own_eni(eni_id)
            if not addresses and not prefixes:
                raise Ec2Error(
                    "MissingParameter", "The request must contain Ipv6Addresses or Ipv6Prefixes"
                )
            gone_addresses = [parse_ipv6_address(a) for a in addresses]
            gone_prefixes = [parse_ipv6_prefix(p) for p in prefixes]
            _refuse_duplicates(gone_addresses, "IPv6 address")
            _refuse_duplicates(gone_prefixes, "IPv6 prefix")
            for address in gone_addresses:
                if address not in eni.ipv6_addresses:
                    raise invalid(
                        f"Some of the specified addresses are not assigned to interface "
                        f"{eni_id}: {address}"
                    )
            for prefix in gone_prefixes:
                if prefix not in eni.ipv6_prefixes:
                    raise invalid(
                        f"Some of the specified prefixes are not assigned to interface "
                        f"{eni_id}: {prefix}"
                    )
            space = self.subnet(eni.subnet_id).ipv6_space
            assert space is not None  # the interface holds IPv6, so its subnet has a block
            for address in gone_addresses:
                eni.ipv6_addresses.remove(address)
                space.release_address(address)
            for prefix in gone_prefixes:
                eni.ipv6_prefixes.remove(prefix)
                space.release_prefix(prefix)
            self._changed(eni)
            return Ipv6Assigned(tuple(gone_addresses), tuple(gone_prefixes))

    def _take_address(self, subnet: Subnet, wanted: str | None) -> IPv4Address:
        if wanted is None:
            try:
                return subnet.space.allocate_address()
            except SubnetSpaceError as err:
                raise Ec2Error(err.code, str(err)) from None
        address = _parse_address(wanted)
        if address not in subnet.cidr:
            raise invalid(f"Address {address} is not in subnet {subnet.subnet_id} ({subnet.cidr})")
        if subnet.space.is_aws_reserved(address):
            raise invalid(f"Address {address} is in subnet {subnet.cidr}'s reserved address range")
        try:
            return subnet.space.claim_address(address)
        except SubnetSpaceError as err:
            raise Ec2Error("InvalidIPAddress.InUse", str(err)) from None

    def _release_all(self, eni: Eni) -> None:
        subnet = self._subnets[eni.subnet_id]
        for address in eni.addresses:
            subnet.space.release_address(address)
        for prefix in eni.prefixes:
            subnet.space.release_prefix(prefix)
        if subnet.ipv6_space is not None:
            for address6 in eni.ipv6_addresses:
                subnet.ipv6_space.release_address(address6)
            for prefix6 in eni.ipv6_prefixes:
                subnet.ipv6_space.release_prefix(prefix6)
        eni.primary_ip = None
        eni.secondary_ips.clear()
        eni.prefixes.clear()
        eni.ipv6_addresses.clear()
        eni.ipv6_prefixes.clear()

    # -- tags ------------------------------------------------------------------------

    def _taggable(self, resource_id: str) -> dict[str, str]:
        kind = resource_id.split("-", 1)[0]
        tables: dict[str, tuple[str, dict[str, Any]]] = {
            "eni": ("eni", self._enis),
            "subnet": ("subnet", self._subnets),
            "vpc": ("vpc", self._vpcs),
            "i": ("instance", self._instances),
        }
        if kind not in tables:
            raise Ec2Error("InvalidID", f"The ID '{resource_id}' is not valid")
        noun, table = tables[kind]
        resource = table.get(resource_id)
        if resource is None:
            raise not_found(noun, resource_id)
        tags: dict[str, str] = resource.tags
        return tags

    def create_tags(self, resource_ids: Iterable[str], tags: dict[str, str]) -> None:
        with self._lock:
            targets = [self._taggable(r) for r in resource_ids]  # all exist, or nothing changes
            for key in tags:
                if key.startswith("aws:"):
                    raise invalid(f"Tag keys starting with 'aws:' are reserved: {key}")
            for target in targets:
                target.update(tags)

    def delete_tags(self, resource_ids: Iterable[str], keys: dict[str, str | None]) -> None:
        """Remove tags; a key given with a value is removed only when the value matches."""
        with self._lock:
            targets = [self._taggable(r) for r in resource_ids]
            for target in targets:
                if not keys:  # no Tag parameter: every user-defined tag goes
                    for key in [k for k in target if not k.startswith("aws:")]:
                        del target[key]
                for key, value in keys.items():
                    if key in target and value in (None, target[key]):
                        del target[key]

    # -- IMDS ------------------------------------------------------------------------

    def set_imds_lag(self, seconds: float) -> None:
        """From now on IMDS shows the network state as it was ``seconds`` ago."""
        with self._lock:
            if seconds < 0:
                raise ValueError("IMDS lag cannot be negative")
            self._imds_lag_s = seconds

    def _record_imds(self, instance_id: str) -> None:
        interfaces = tuple(
            ImdsInterface(
                self._view(eni),
                eni.subnet_id,
                eni.vpc_id,
                tuple(self._vpcs[eni.vpc_id].cidrs),
                tuple(eni.groups),
                tuple(self._vpcs[eni.vpc_id].ipv6_cidrs),
            )
            for eni in self.enis_of(instance_id)
        )
        history = self._imds_history.setdefault(instance_id, [])
        history.append(_ImdsSnapshot(self._clock(), interfaces))
        self._prune_imds(history)

    def _prune_imds(self, history: list[_ImdsSnapshot]) -> None:
        """Keep the newest snapshot old enough to be shown, and everything newer.

        Raising the lag later cannot go back past what was pruned: IMDS never shows a
        state older than one it has already shown.
        """
        horizon = self._clock() - self._imds_lag_s
        visible = 0
        for index, snapshot in enumerate(history):
            if snapshot.at <= horizon:
                visible = index
        del history[:visible]

    def imds_interfaces(self, instance_id: str) -> tuple[ImdsInterface, ...]:
        """The interfaces IMDS shows now: EC2's state as of ``lag`` seconds ago.

        Before the instance's first change is that old, IMDS shows the launch state.
        """
        with self._lock:
            self.instance(instance_id)
            history = self._imds_history.get(instance_id)
            if not history:
                return ()
            self._prune_imds(history)
            return history[0].interfaces

    def imds_tree(self, instance_id: str) -> dict[str, Any]:
        """The instance's metadata under /latest/, as IMDS serves it (maybe stale).

        Built once per visible snapshot: a node reads ~230 keys at start, and building
        the tree of a 32-card instance for each would make the lab's IMDS far slower
        than EC2's.
        """
        with self._lock:
            interfaces = self.imds_interfaces(instance_id)
            cached = self._imds_trees.get(instance_id)
            if cached is not None and cached[0] is interfaces:
                return cached[1]
            tree = self._build_imds_tree(instance_id, interfaces)
            self._imds_trees[instance_id] = (interfaces, tree)
            return tree

    def _build_imds_tree(
        self, instance_id: str, interfaces: tuple[ImdsInterface, ...]
    ) -> dict[str, Any]:
        instance = self.instance(instance_id)
        primary = next(
            (i.view for i in interfaces if (i.view.network_card, i.view.device_index) == (0, 0)),
            None,
        )
        macs = {i.view.mac: _imds_interface(i) for i in sorted(interfaces, key=_by_mac)}
        meta: dict[str, Any] = {
            "ami-id": instance.image_id,
            "instance-id": instance.instance_id,
            "instance-type": instance.instance_type.name,
            "network": {"interfaces": {"macs": macs}},
            "placement": {
                "availability-zone": instance.availability_zone,
                "availability-zone-id": _az_id(instance.availability_zone),
                "region": instance.availability_zone[:-1],
            },
        }
        if primary is not None:
            meta["mac"] = primary.mac
            if primary.primary_ip is not None:
                meta["local-ipv4"] = str(primary.primary_ip)
            if primary.ipv6_addresses:  # absent (404) without one, as IMDS answers
                meta["ipv6"] = str(primary.ipv6_addresses[0])
        identity = {
            "accountId": OWNER_ID,
            "architecture": "x86_64",
            "availabilityZone": instance.availability_zone,
            "imageId": instance.image_id,
            "instanceId": instance.instance_id,
            "instanceType": instance.instance_type.name,
            "pendingTime": instance.launch_time.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "privateIp": meta.get("local-ipv4"),
            "region": instance.availability_zone[:-1],
            "version": "2017-09-30",
        }
        return {
            "dynamic": {"instance-identity": {"document": JsonLeaf(identity)}},
            "meta-data": dict(sorted(meta.items())),
        }

    # -- events ----------------------------------------------------------------------

    def _view(self, eni: Eni) -> EniView:
        subnet = self._subnets[eni.subnet_id]
        attachment = eni.attachment
        return EniView(
            eni_id=eni.eni_id,
            instance_id=attachment.instance_id if attachment else "",
            mac=eni.mac,
            interface_type=str(eni.interface_type),
            network_card=attachment.network_card_index if attachment else 0,
            device_index=attachment.device_index if attachment else 0,
            subnet=subnet.cidr,
            gateway=subnet.gateway,
            primary_ip=eni.primary_ip,
            secondary_ips=tuple(eni.secondary_ips),
            prefixes=tuple(eni.prefixes),
            ipv6_subnet=subnet.ipv6_cidr,
            ipv6_addresses=tuple(eni.ipv6_addresses),
            ipv6_prefixes=tuple(eni.ipv6_prefixes),
        )

    def _changed(self, eni: Eni) -> None:
        if eni.attachment is not None:
            self._record_imds(eni.attachment.instance_id)
            self._emit("eni_addresses_changed", eni)

    def _emit(self, event: str, eni: Eni) -> None:
        self._emit_view(event, self._view(eni))

    def _emit_view(self, event: str, view: EniView) -> None:
        for listener in list(self._listeners):
            getattr(listener, event)(view)


def _by_mac(interface: ImdsInterface) -> str:
    return interface.view.mac


def _imds_interface(interface: ImdsInterface) -> dict[str, Any]:
    view = interface.view
    node: dict[str, Any] = {
        "device-number": view.device_index,
        "interface-id": view.eni_id,
        "mac": view.mac,
        "network-card": view.network_card,
        "owner-id": OWNER_ID,
        "security-group-ids": list(interface.security_groups),
        "subnet-id": interface.subnet_id,
        "subnet-ipv4-cidr-block": str(view.subnet),
        "vpc-id": interface.vpc_id,
        "vpc-ipv4-cidr-block": str(interface.vpc_cidrs[0]),
        "vpc-ipv4-cidr-blocks": [str(c) for c in interface.vpc_cidrs],
    }
    # IMDS has no local-ipv4s for an efa-only interface and no ipv4-prefix key until a
    # prefix is assigned: clients see absence (404), not an empty value.
    if view.primary_ip is not None:
        node["local-ipv4s"] = [str(view.primary_ip), *(str(a) for a in view.secondary_ips)]
    if view.prefixes:
        node["ipv4-prefix"] = [str(p) for p in view.prefixes]
    # The IPv6 keys follow the same rule: absent until the VPC, subnet or interface has one.
    if interface.vpc_ipv6_cidrs:
        node["vpc-ipv6-cidr-blocks"] = [str(c) for c in interface.vpc_ipv6_cidrs]
    if view.ipv6_subnet is not None:
        node["subnet-ipv6-cidr-blocks"] = [str(view.ipv6_subnet)]
    if view.ipv6_addresses:
        node["ipv6s"] = [str(a) for a in view.ipv6_addresses]
    if view.ipv6_prefixes:
        node["ipv6-prefix"] = [str(p) for p in view.ipv6_prefixes]
    return dict(sorted(node.items()))


def _check_ipv6_type(eni: Eni, itype: InstanceType, slots: int, prefixes: bool) -> None:
    """The instance type's IPv6 limits for what ``eni`` holds or is about to hold."""
    if slots == 0:
        return
    limit = itype.ipv6_per_eni or 0
    if limit == 0:
        raise invalid(f"Instance type {itype.name} does not support IPv6 addresses")
    if prefixes and not itype.nitro:
        # EC2 User Guide, "Assign prefixes": prefixes are for Nitro instances only.
        raise invalid(f"IPv6 prefixes are supported on Nitro instances only, not {itype.name}")
    if slots > limit:
        raise invalid(
            f"Number of IPv6 addresses and prefixes will exceed the limit: {eni.eni_id} "
            f"would hold {slots}; {itype.name} allows {limit} per interface"
        )


def _placement(eni: Eni) -> tuple[int, int]:
    assert eni.attachment is not None
    return (eni.attachment.network_card_index, eni.attachment.device_index)


def _refuse_duplicates(items: Sequence[object], noun: str) -> None:
    seen: set[object] = set()
    for item in items:
        if item in seen:
            raise invalid(f"The {noun} {item} is listed more than once")
        seen.add(item)


def _parse_address(text: str | IPv4Address) -> IPv4Address:
    try:
        return IPv4Address(text)
    except ValueError:
        raise invalid(f"Invalid IPv4 address: {text}") from None


def _parse_prefix(text: str) -> IPv4Network:
    try:
        return IPv4Network(text)
    except ValueError:
        raise invalid(f"Invalid IPv4 prefix: {text}") from None


def _space_call(call: Callable[[IPv4Network], IPv4Network], prefix: IPv4Network) -> IPv4Network:
    try:
        return call(prefix)
    except SubnetSpaceError as err:
        raise Ec2Error(err.code, str(err)) from None
