"""The NAU rule table: what each VPC resource costs in Network Address Usage units.

Source: VPC User Guide, "Network Address Usage for your VPC" (current text; the NAU page
in ``ipam/nau/README.md``, Sources). AWS has changed this table before (the 2023 text had no
EFA, GWLB or EKS-pod rows), so the table carries a version and both the planner and
the emulator print it. Where AWS's wording is ambiguous the ambiguity is a switch with
a conservative default, never a silent choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

RULES_VERSION = "vpc-ug-2025 (NAU page, current text)"


class InterfaceType(StrEnum):
    """EC2 ``InterfaceType`` values that matter for addresses and NAU."""

    INTERFACE = "interface"  # ENA
    EFA = "efa"  # EFA with ENA: has IP addresses
    EFA_ONLY = "efa-only"  # no IP address at all


@dataclass(frozen=True, slots=True)
class NauRules:
    """Units per resource. Defaults are AWS's published values."""

    address: int = 1  # each private or public IPv4, each IPv6, on an instance's interface
    additional_interface: int = 1  # each network interface beyond the primary
    prefix: int = 1  # each IPv4 /28 or IPv6 /80 prefix, size ignored
    efa_interface: int = 1  # each EFA (with ENA) or EFA-only interface
    nlb_per_az: int = 6
    gwlb_per_az: int = 6
    vpc_endpoint_per_az: int = 6
    tgw_attachment: int = 6
    lambda_function: int = 6
    nat_gateway: int = 6
    efs_mount_target: int = 6
    eks_pod: int = 1  # only pods with their own VPC identity; off unless asked for
    # Ambiguous in AWS's text: does the EFA row add to "additional interface"
    # (2 + IPs for an EFA with ENA) or restate it (1 + IPs)? Default: restate.
    efa_adds_to_interface: bool = False
    # Ambiguous: does an additional interface's own primary IPv4 count on top of the
    # interface unit (an empty extra ENI costs 2) or does the interface unit cover it
    # (costs 1)? Default: it counts, the conservative double count.
    extra_interface_primary_ip: bool = True

    def interface_units(
        self,
        interface_type: InterfaceType,
        *,
        primary: bool,
        addresses: int,
        prefixes: int,
    ) -> int:
        """NAU of one network interface attached to an instance.

        ``addresses`` counts every IPv4 and IPv6 address on it, its own primary included.
        """
        units = addresses * self.address + prefixes * self.prefix
        if not primary and addresses and not self.extra_interface_primary_ip:
            units -= self.address  # the interface unit covers its own primary IPv4
        if interface_type is InterfaceType.INTERFACE:
            return units + (0 if primary else self.additional_interface)
        efa = self.efa_interface
        if self.efa_adds_to_interface and not primary:
            efa += self.additional_interface
        return units + efa

    def table(self) -> list[tuple[str, int]]:
        """The rule table as (resource, units) rows, for printing."""
        return [
            ("IPv4 or IPv6 address on an instance interface", self.address),
            ("additional network interface", self.additional_interface),
            ("prefix (IPv4 /28, IPv6 /80)", self.prefix),
            ("EFA or EFA-only interface", self.efa_interface),
            ("Network Load Balancer, per AZ", self.nlb_per_az),
            ("Gateway Load Balancer, per AZ", self.gwlb_per_az),
            ("VPC endpoint, per AZ", self.vpc_endpoint_per_az),
            ("Transit Gateway attachment", self.tgw_attachment),
            ("Lambda function", self.lambda_function),
            ("NAT gateway", self.nat_gateway),
            ("EFS mount target", self.efs_mount_target),
            ("EKS pod with its own VPC identity", self.eks_pod),
        ]

    def resource_units(self, resource: ManagedResource) -> int:
        """NAU of one VPC resource that is not an instance interface (per AZ where noted)."""
        return {
            ManagedResource.NLB: self.nlb_per_az,
            ManagedResource.GWLB: self.gwlb_per_az,
            ManagedResource.VPC_ENDPOINT: self.vpc_endpoint_per_az,
            ManagedResource.TGW_ATTACHMENT: self.tgw_attachment,
            ManagedResource.LAMBDA: self.lambda_function,
            ManagedResource.NAT_GATEWAY: self.nat_gateway,
            ManagedResource.EFS_MOUNT_TARGET: self.efs_mount_target,
        }[resource]

    def switches(self) -> list[tuple[str, str, str]]:
        """The readings chosen where AWS's text is ambiguous: (switch, chosen, alternative)."""
        return [
            (
                "efa-counting",
                "adds" if self.efa_adds_to_interface else "restate",
                "restate" if self.efa_adds_to_interface else "adds",
            ),
            (
                "extra-eni-primary-ip",
                "counted" if self.extra_interface_primary_ip else "covered",
                "covered" if self.extra_interface_primary_ip else "counted",
            ),
        ]


class ManagedResource(StrEnum):
    """VPC resources the NAU page lists that are not interfaces of an instance."""

    NLB = "network-load-balancer"  # per AZ
    GWLB = "gateway-load-balancer"  # per AZ
    VPC_ENDPOINT = "vpc-endpoint"  # per AZ
    TGW_ATTACHMENT = "transit-gateway-attachment"
    LAMBDA = "lambda-function"
    NAT_GATEWAY = "nat-gateway"
    EFS_MOUNT_TARGET = "efs-mount-target"


DEFAULT_RULES = NauRules()
# The planner's reading: every ambiguity resolved the way that counts more, so a plan
# that fits under it fits under either reading. The emulator keeps DEFAULT_RULES (the
# literal reading, EFA row restating the interface row); ``--efa-counting restate``
# gives the planner the same.
CONSERVATIVE_RULES = NauRules(efa_adds_to_interface=True, extra_interface_primary_ip=True)

# Quotas (VPC User Guide, "Amazon VPC quotas").
NAU_QUOTA_DEFAULT = 64_000
NAU_QUOTA_MAX = 256_000
PEERED_NAU_QUOTA_DEFAULT = 128_000
PEERED_NAU_QUOTA_MAX = 512_000

# Other VPC limits the layout is held to ("Amazon VPC quotas", "VPC CIDR blocks").
VPC_CIDR_BLOCKS_DEFAULT = 5  # IPv4 CIDR blocks per VPC, primary included
VPC_CIDR_BLOCKS_MAX = 50
SUBNETS_PER_VPC_DEFAULT = 200  # adjustable
SUBNET_RESERVED_ADDRESSES = 5  # network, router, DNS, future use, broadcast
