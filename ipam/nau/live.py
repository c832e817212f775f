"""``inspect``: the current NAU of a live VPC, by resource.

Two halves: :func:`read_vpc` is the I/O (boto3 EC2 calls, paginated, ``ClientError``
translated into one-line ``InspectError``), :func:`count_nau` is pure and prices what was
read with the rule table.

Load balancers are read through EC2, not elbv2: each NLB and GWLB has one
requester-managed interface per AZ (``InterfaceType`` ``network_load_balancer`` /
``gateway_load_balancer``), which is exactly the unit the NAU rule counts ("per AZ"), and
needs no elbv2 permission. ALBs show as ``interface`` with an ``ELB app/`` description;
they are not on AWS's NAU list and are reported with 0. NAT gateways and endpoints are
counted from DescribeNatGateways / DescribeVpcEndpoints (their interfaces are skipped so
nothing counts twice). Lambda, EFS and Transit Gateway interfaces are recognised by type
or description; Lambda is counted per interface, an upper bound where several functions
share one Hyperplane interface (AWS counts per function, which EC2 cannot see).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ipam.nau.errors import InspectError
from ipam.nau.rules import InterfaceType, ManagedResource, NauRules

INSTANCE_TYPES = {"interface", "efa", "efa-only", "trunk", "branch"}
_TGW = re.compile(r"tgw-attach-[0-9a-f]+")


@dataclass(frozen=True, slots=True)
class InterfaceRecord:
    eni_id: str
    interface_type: str
    requester_managed: bool
    description: str
    instance_id: str | None
    card: int
    device: int
    private_ipv4: int
    public_ipv4: int
    ipv6: int
    prefixes: int  # IPv4 /28 and IPv6 /80


@dataclass(frozen=True, slots=True)
class Inventory:
    vpc_id: str
    cidrs: tuple[str, ...]
    subnets: tuple[tuple[str, str, str, int], ...]  # id, cidr, az, free addresses
    interfaces: tuple[InterfaceRecord, ...]
    nat_gateways: tuple[tuple[str, str], ...]  # id, state
    endpoints: tuple[tuple[str, str, int, str], ...]  # id, type, subnets, state


@dataclass(frozen=True, slots=True)
class Row:
    resource: str
    count: int
    nau: int
    note: str = ""


def _record(raw: dict[str, Any]) -> InterfaceRecord:
    attachment = raw.get("Attachment") or {}
    public = sum(1 for a in raw.get("PrivateIpAddresses") or [] if a.get("Association"))
    return InterfaceRecord(
        eni_id=raw["NetworkInterfaceId"],
        interface_type=raw.get("InterfaceType", "interface"),
        requester_managed=bool(raw.get("RequesterManaged")),
        description=raw.get("Description", ""),
        instance_id=attachment.get("InstanceId"),
        card=int(attachment.get("NetworkCardIndex", 0)),
        device=int(attachment.get("DeviceIndex", 0)),
        private_ipv4=len(raw.get("PrivateIpAddresses") or []),
        public_ipv4=public,
        ipv6=len(raw.get("Ipv6Addresses") or []),
        prefixes=len(raw.get("Ipv4Prefixes") or []) + len(raw.get("Ipv6Prefixes") or []),
    )


def read_vpc(ec2: Any, vpc_id: str) -> Inventory:
    """Everything ``count_nau`` needs, through paginated EC2 calls."""
    from botocore.exceptions import BotoCoreError, ClientError

    vpc_filter = [{"Name": "vpc-id", "Values": [vpc_id]}]

    def pages(op: str, key: str, **kwargs: Any) -> list[dict[str, Any]]:
        paginator = ec2.get_paginator(op)
        return [item for page in paginator.paginate(**kwargs) for item in page[key]]

    try:
        vpcs = ec2.describe_vpcs(VpcIds=[vpc_id])["Vpcs"]
        subnets = pages("describe_subnets", "Subnets", Filters=vpc_filter)
        enis = pages(
            "describe_network_interfaces",
            "NetworkInterfaces",
            Filters=vpc_filter,
            PaginationConfig={"PageSize": 1000},
        )
        nats = pages("describe_nat_gateways", "NatGateways", Filter=vpc_filter)
        endpoints = pages("describe_vpc_endpoints", "VpcEndpoints", Filters=vpc_filter)
    except ClientError as err:
        error = err.response.get("Error", {})
        raise InspectError(
            f"{err.operation_name}: {error.get('Code')}: {error.get('Message')}"
        ) from None
    except BotoCoreError as err:
        raise InspectError(f"EC2 could not be reached: {err}") from None
    cidrs = tuple(a["CidrBlock"] for a in vpcs[0].get("CidrBlockAssociationSet") or [])
    return Inventory(
        vpc_id,
        cidrs,
        tuple(
            (
                s["SubnetId"],
                s["CidrBlock"],
                s["AvailabilityZone"],
                int(s["AvailableIpAddressCount"]),
            )
            for s in subnets
        ),
        tuple(_record(e) for e in enis),
        tuple((n["NatGatewayId"], n["State"]) for n in nats),
        tuple(
            (e["VpcEndpointId"], e["VpcEndpointType"], len(e.get("SubnetIds") or []), e["State"])
            for e in endpoints
        ),
    )


class _Tally:
    def __init__(self) -> None:
        self.rows: dict[str, list[int]] = {}
        self.notes: dict[str, str] = {}

    def add(self, resource: str, nau: int, note: str = "", count: int = 1) -> None:
        row = self.rows.setdefault(resource, [0, 0])
        row[0] += count
        row[1] += nau
        if note:
            self.notes[resource] = note


def _instance_interface(rec: InterfaceRecord, rules: NauRules, tally: _Tally) -> None:
    if rec.instance_id is None:
        tally.add("unattached interfaces", 0, "not counted until attached")
        return
    kind = {"efa": InterfaceType.EFA, "efa-only": InterfaceType.EFA_ONLY}.get(
        rec.interface_type, InterfaceType.INTERFACE
    )
    primary = (rec.card, rec.device) == (0, 0)
    units = rules.interface_units(
        kind,
        primary=primary,
        addresses=rec.private_ipv4 + rec.public_ipv4 + rec.ipv6,
        prefixes=rec.prefixes,
    )
    if kind is InterfaceType.EFA_ONLY:
        name = "instance EFA-only interfaces"
    elif kind is InterfaceType.EFA:
        name = "instance EFA interfaces"
    else:
        name = "instance primary interfaces" if primary else "instance additional interfaces"
    tally.add(name, units)


def _managed_interface(rec: InterfaceRecord, rules: NauRules, tally: _Tally, tgw: set[str]) -> None:
    kind, desc = rec.interface_type, rec.description
    if kind in ("natGateway", "vpc_endpoint", "gateway_load_balancer_endpoint"):
        return  # counted from DescribeNatGateways / DescribeVpcEndpoints
    if kind == "network_load_balancer":
        tally.add("Network Load Balancer AZs", rules.resource_units(ManagedResource.NLB))
    elif kind == "gateway_load_balancer":
        tally.add("Gateway Load Balancer AZs", rules.resource_units(ManagedResource.GWLB))
    elif kind == "lambda":
        tally.add(
            "Lambda interfaces",
            rules.resource_units(ManagedResource.LAMBDA),
            "counted per interface: an upper bound (AWS counts per function)",
        )
    elif kind == "transit_gateway":
        found = _TGW.search(desc)
        key = found.group(0) if found else rec.eni_id
        if key not in tgw:
            tgw.add(key)
            tally.add(
                "Transit Gateway attachments", rules.resource_units(ManagedResource.TGW_ATTACHMENT)
            )
    elif desc.startswith("EFS mount target"):
        tally.add("EFS mount targets", rules.resource_units(ManagedResource.EFS_MOUNT_TARGET))
    elif desc.startswith("ELB app/"):
        tally.add("Application Load Balancer AZs", 0, "not on AWS's NAU list")
    else:
        tally.add(f"other requester-managed ({kind})", 0, "not on AWS's NAU list")


def count_nau(inv: Inventory, rules: NauRules) -> tuple[list[Row], int]:
    """NAU by resource and in total, priced with ``rules``."""
    tally = _Tally()
    tgw: set[str] = set()
    for rec in inv.interfaces:
        if rec.requester_managed or rec.interface_type not in INSTANCE_TYPES:
            _managed_interface(rec, rules, tally, tgw)
        else:
            _instance_interface(rec, rules, tally)
    for _, state in inv.nat_gateways:
        if state in ("pending", "available"):
            tally.add("NAT gateways", rules.resource_units(ManagedResource.NAT_GATEWAY))
    for _, kind, subnets, state in inv.endpoints:
        if state in ("deleted", "deleting", "failed", "rejected"):
            continue
        if kind == "Gateway":
            tally.add("VPC endpoints (Gateway)", 0, "no interface, no AZ: not counted")
        else:
            tally.add(
                "VPC endpoint AZs",
                subnets * rules.resource_units(ManagedResource.VPC_ENDPOINT),
                count=subnets,
            )
    rows = [Row(name, c, n, tally.notes.get(name, "")) for name, (c, n) in tally.rows.items()]
    rows.sort(key=lambda r: -r.nau)
    return rows, sum(r.nau for r in rows)
