"""An IPv6 /80 for a lab node's primary ENI, as the IPv6 lab tests give it."""

from __future__ import annotations

from tools.lab.lab import Lab

VPC_56 = "fd12:3456:789a:1000::/56"
SUBNET_64 = "fd12:3456:789a:1000::/64"


def give_primary_eni_an_ipv6_prefix(lab: Lab) -> None:
    """The VPC's /56 and the subnet's /64 associated, then one /80 on the primary ENI."""
    (primary,) = lab.cloud.enis_of(lab.instance_id)
    lab.cloud.associate_vpc_ipv6_cidr(lab.vpc_id, VPC_56)
    lab.cloud.associate_subnet_ipv6_cidr(primary.subnet_id, SUBNET_64)
    lab.cloud.assign_ipv6_addresses(primary.eni_id, prefix_count=1)
