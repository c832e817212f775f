"""The EC2 Query API over the emulated cloud: one request in, EC2's XML out.

``Ec2Api.handle`` takes the form-encoded body boto3 sends and returns the status and
XML EC2 would. Parameters are decoded and results rendered by ``wire.py`` from
botocore's own model of EC2, so handlers work with the same dicts a boto3 caller
passes and gets back. Each request is logged (``Cloud.requests``) and may be hit by a
fault (``Cloud.faults``) before it reaches the state, as a throttled EC2 call never
reaches EC2's state either.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ipam.errors import UnknownInstanceType
from ipam.instance_types import InstanceType, catalog, lookup
from tools.lab.ec2.errors import Ec2Error, combination, invalid, throttled
from tools.lab.ec2.state import (
    OWNER_ID,
    Cloud,
    Eni,
    Instance,
    Ipv6Block,
    LaunchInterface,
    NatGateway,
    Subnet,
    VpcEndpoint,
)
from tools.lab.ec2.wire import WireError, decode_params, parse_form, render_error, render_response

log = logging.getLogger("ultranet.lab.ec2")

Params = dict[str, Any]
Result = dict[str, Any]
Handler = Callable[[Params], Result]


@dataclass(frozen=True, slots=True)
class ApiResponse:
    status: int
    body: bytes
    action: str
    error_code: str | None


def _request_id() -> str:
    raw = secrets.token_hex(16)
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


# -- filters and pages ---------------------------------------------------------------

FilterFields = Mapping[str, Callable[[Any], Iterable[str]]]


def _matches(values: Iterable[str], patterns: Sequence[str]) -> bool:
    # EC2 filter values take * and ? wildcards and OR together (API reference, "Filter").
    candidates = list(values)
    return any(fnmatch.fnmatchcase(v, p) for p in patterns for v in candidates)


def _tag_fields(tags: Mapping[str, str], name: str) -> Iterable[str] | None:
    if name.startswith("tag:"):
        key = name[4:]
        return [tags[key]] if key in tags else []
    if name == "tag-key":
        return list(tags)
    return None


def _apply_filters(
    items: Iterable[Any],
    filters: Sequence[Mapping[str, Any]] | None,
    fields: FilterFields,
    tags_of: Callable[[Any], Mapping[str, str]],
) -> list[Any]:
    chosen = list(items)
    for spec in filters or []:
        name = spec.get("Name", "")
        patterns = list(spec.get("Values") or [])
        if name not in fields and _tag_fields({}, name) is None:
            raise invalid(f"The filter '{name}' is invalid")
        if not patterns:
            raise invalid(f"The filter '{name}' needs at least one value")

        def keep(item: Any, name: str = name, patterns: list[str] = patterns) -> bool:
            tagged = _tag_fields(tags_of(item), name)
            values = tagged if tagged is not None else fields[name](item)
            return _matches(values, patterns)

        chosen = [item for item in chosen if keep(item)]
    return chosen


def _page(
    items: list[Any],
    key: Callable[[Any], str],
    params: Params,
    *,
    max_limit: int,
    min_limit: int = 5,
    ids_given: bool = False,
) -> tuple[list[Any], str | None]:
    """EC2 pagination: MaxResults in [min, max], an opaque NextToken after the last key."""
    limit = params.get("MaxResults")
    token = params.get("NextToken")
    if limit is None and token is None:
        return items, None
    if ids_given and limit is not None:
        raise combination("The parameter MaxResults cannot be used with resource IDs")
    if limit is not None and not min_limit <= limit <= max_limit:
        raise invalid(f"MaxResults must be between {min_limit} and {max_limit}, not {limit}")
    ordered = sorted(items, key=key)
    if token:
        try:
            after = json.loads(base64.urlsafe_b64decode(token.encode()))["after"]
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise invalid(f"The NextToken '{token}' is invalid") from None
        ordered = [item for item in ordered if key(item) > after]
    size = limit or max_limit
    page, rest = ordered[:size], ordered[size:]
    if not rest:
        return page, None
    marker = json.dumps({"after": key(page[-1])}).encode()
    return page, base64.urlsafe_b64encode(marker).decode()


def _tags(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


def _tag_specs(specs: Sequence[Mapping[str, Any]] | None, resource_type: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for spec in specs or []:
        if spec.get("ResourceType") not in (None, resource_type):
            raise invalid(
                f"TagSpecification resource type '{spec.get('ResourceType')}' is not valid "
                f"here; use '{resource_type}'"
            )
        for tag in spec.get("Tags") or []:
            tags[tag["Key"]] = tag.get("Value", "")
    return tags


# -- views ---------------------------------------------------------------------------


def _group_list(eni: Eni) -> list[dict[str, str]]:
    return [
        {"GroupId": g, "GroupName": "default" if i == 0 else g} for i, g in enumerate(eni.groups)
    ]


def _private_ips(eni: Eni) -> list[dict[str, Any]]:
    return [{"PrivateIpAddress": str(a), "Primary": a == eni.primary_ip} for a in eni.addresses]


def _ipv6_addresses(eni: Eni) -> list[dict[str, Any]]:
    # EnablePrimaryIpv6 is not modelled: no address is the interface's primary IPv6.
    return [{"Ipv6Address": str(a), "IsPrimaryIpv6": False} for a in eni.ipv6_addresses]


def _eni_view(eni: Eni) -> dict[str, Any]:
    out: dict[str, Any] = {
        "AvailabilityZone": eni.availability_zone,
        "Description": eni.description,
        "Groups": _group_list(eni),
        "InterfaceType": eni.shown_type,
        "Ipv6Addresses": _ipv6_addresses(eni),
        "Ipv6Native": False,
        "MacAddress": eni.mac,
        "NetworkInterfaceId": eni.eni_id,
        "OwnerId": OWNER_ID,
        "PrivateIpAddresses": _private_ips(eni),
        "RequesterManaged": eni.managed_type is not None,
        "SourceDestCheck": eni.source_dest_check,
        "Status": eni.status,
        "SubnetId": eni.subnet_id,
        "TagSet": _tags(eni.tags),
        "VpcId": eni.vpc_id,
    }
    if eni.primary_ip is not None:
        out["PrivateIpAddress"] = str(eni.primary_ip)
    if eni.prefixes:
        out["Ipv4Prefixes"] = [{"Ipv4Prefix": str(p)} for p in eni.prefixes]
    if eni.ipv6_prefixes:
        out["Ipv6Prefixes"] = [{"Ipv6Prefix": str(p)} for p in eni.ipv6_prefixes]
    if eni.requester_id is not None:
        out["RequesterId"] = eni.requester_id
    if eni.attachment is not None:
        a = eni.attachment
        out["Attachment"] = {
            "AttachTime": a.attach_time,
            "AttachmentId": a.attachment_id,
            "DeleteOnTermination": a.delete_on_termination,
            "DeviceIndex": a.device_index,
            "NetworkCardIndex": a.network_card_index,
            "InstanceId": a.instance_id,
            "InstanceOwnerId": OWNER_ID,
            "Status": "attached",
        }
    return out


def _instance_eni_view(eni: Eni) -> dict[str, Any]:
    """An ENI as DescribeInstances nests it (InstanceNetworkInterface)."""
    assert eni.attachment is not None
    a = eni.attachment
    out: dict[str, Any] = {
        "Attachment": {
            "AttachTime": a.attach_time,
            "AttachmentId": a.attachment_id,
            "DeleteOnTermination": a.delete_on_termination,
            "DeviceIndex": a.device_index,
            "NetworkCardIndex": a.network_card_index,
            "Status": "attached",
        },
        "Description": eni.description,
        "Groups": _group_list(eni),
        "InterfaceType": str(eni.interface_type),
        "MacAddress": eni.mac,
        "NetworkInterfaceId": eni.eni_id,
        "OwnerId": OWNER_ID,
        "PrivateIpAddresses": _private_ips(eni),
        "SourceDestCheck": eni.source_dest_check,
        "Status": eni.status,
        "SubnetId": eni.subnet_id,
        "VpcId": eni.vpc_id,
    }
    if eni.primary_ip is not None:
        out["PrivateIpAddress"] = str(eni.primary_ip)
    if eni.prefixes:
        out["Ipv4Prefixes"] = [{"Ipv4Prefix": str(p)} for p in eni.prefixes]
    if eni.ipv6_addresses:
        out["Ipv6Addresses"] = _ipv6_addresses(eni)
    if eni.ipv6_prefixes:
        out["Ipv6Prefixes"] = [{"Ipv6Prefix": str(p)} for p in eni.ipv6_prefixes]
    return out


def _cidr_association(block: Ipv6Block) -> dict[str, Any]:
    return {
        "AssociationId": block.association_id,
        "Ipv6CidrBlock": str(block.cidr),
        "Ipv6CidrBlockState": {"State": "associated"},
    }


def _vpc_ipv6_association(block: Ipv6Block, region: str) -> dict[str, Any]:
    return {
        **_cidr_association(block),
        "Ipv6Pool": "Amazon",
        "NetworkBorderGroup": region,
    }


def _subnet_view(subnet: Subnet) -> dict[str, Any]:
    return {
        "AssignIpv6AddressOnCreation": subnet.assign_ipv6_on_creation,
        "Ipv6CidrBlockAssociationSet": (
            [_cidr_association(subnet.ipv6_block)] if subnet.ipv6_block is not None else []
        ),
        "Ipv6Native": False,
        "AvailabilityZone": subnet.availability_zone,
        "AvailabilityZoneId": subnet.availability_zone_id,
        "AvailableIpAddressCount": subnet.space.stats().free,
        "CidrBlock": str(subnet.cidr),
        "DefaultForAz": False,
        "MapPublicIpOnLaunch": False,
        "OwnerId": OWNER_ID,
        "State": "available",
        "SubnetArn": f"arn:aws:ec2:{subnet.availability_zone[:-1]}:{OWNER_ID}:subnet/"
        f"{subnet.subnet_id}",
        "SubnetId": subnet.subnet_id,
        "Tags": _tags(subnet.tags),
        "VpcId": subnet.vpc_id,
    }


def _endpoint_view(endpoint: VpcEndpoint) -> dict[str, Any]:
    return {
        "CreationTimestamp": endpoint.create_time,
        "NetworkInterfaceIds": list(endpoint.eni_ids),
        "OwnerId": OWNER_ID,
        "RequesterManaged": False,
        "ServiceName": endpoint.service_name,
        "State": endpoint.state,
        "SubnetIds": list(endpoint.subnet_ids),
        "Tags": _tags(endpoint.tags),
        "VpcEndpointId": endpoint.vpc_endpoint_id,
        "VpcEndpointType": endpoint.endpoint_type,
        "VpcId": endpoint.vpc_id,
    }


def _instance_type_view(itype: InstanceType) -> dict[str, Any]:
    network: dict[str, Any] = {
        "DefaultNetworkCardIndex": itype.default_network_card_index,
        "EfaSupported": bool(itype.efa_supported),
        "EnaSupport": "required" if itype.nitro else "unsupported",
        "Ipv4AddressesPerInterface": itype.ipv4_per_eni,
        "Ipv6Supported": bool(itype.ipv6_per_eni),
        "MaximumNetworkCards": len(itype.network_cards),
        "MaximumNetworkInterfaces": itype.max_enis_total,
        "NetworkCards": [
            {
                "NetworkCardIndex": card.index,
                "MaximumNetworkInterfaces": card.max_interfaces,
                **(
                    {"BaselineBandwidthInGbps": card.baseline_gbps}
                    if card.baseline_gbps is not None
                    else {}
                ),
            }
            for card in itype.network_cards
        ],
    }
    if itype.ipv6_per_eni is not None:
        network["Ipv6AddressesPerInterface"] = itype.ipv6_per_eni
    if itype.efa_supported:
        network["EfaInfo"] = {"MaximumEfaInterfaces": itype.max_efa_interfaces or 0}
    out: dict[str, Any] = {
        "BareMetal": itype.bare_metal,
        "Hypervisor": itype.hypervisor if itype.hypervisor in ("nitro", "xen") else None,
        "InstanceType": itype.name,
        "NetworkInfo": network,
    }
    if itype.vcpus is not None:
        out["VCpuInfo"] = {"DefaultVCpus": itype.vcpus}
    return {k: v for k, v in out.items() if v is not None}


def _instance_view(instance: Instance, enis: list[Eni]) -> dict[str, Any]:
    primary = enis[0] if enis else None
    out: dict[str, Any] = {
        "ImageId": instance.image_id,
        "InstanceId": instance.instance_id,
        "InstanceType": instance.instance_type.name,
        "LaunchTime": instance.launch_time,
        "NetworkInterfaces": [_instance_eni_view(e) for e in enis],
        "Placement": {"AvailabilityZone": instance.availability_zone, "Tenancy": "default"},
        "State": {"Code": _STATE_CODES[instance.state], "Name": instance.state},
        "SubnetId": instance.subnet_id,
        "Tags": _tags(instance.tags),
        "VpcId": instance.vpc_id,
    }
    if primary is not None and primary.primary_ip is not None:
        out["PrivateIpAddress"] = str(primary.primary_ip)
    return out


_STATE_CODES = {"running": 16, "terminated": 48}


def _resource_count(action: str, flat: Mapping[str, str]) -> int:
    """Resource tokens a request takes (EC2's resource rate limiting): instances."""
    if action in ("RunInstances", "StartInstances"):
        try:
            return max(0, int(flat.get("MaxCount", "0")))
        except ValueError:
            return 0  # the parameter check refuses it next
    if action in ("TerminateInstances", "StopInstances"):
        return sum(1 for k in flat if k.startswith("InstanceId."))
    return 0


# -- the API ---------------------------------------------------------------------------


class Ec2Api:
    """Serves EC2 Query API requests from a ``Cloud``."""

    def __init__(self, cloud: Cloud, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.cloud = cloud
        self._sleep = sleep
        self._throttle_lock = threading.Lock()
        self.filter_names: dict[str, frozenset[str]] = {}
        self._handlers: dict[str, Handler] = {
            "AssignIpv6Addresses": self.assign_ipv6_addresses,
            "AssignPrivateIpAddresses": self.assign_private_ip_addresses,
            "AssociateSubnetCidrBlock": self.associate_subnet_cidr_block,
            "AssociateVpcCidrBlock": self.associate_vpc_cidr_block,
            "AttachNetworkInterface": self.attach_network_interface,
            "CreateNetworkInterface": self.create_network_interface,
            "CreateSubnetCidrReservation": self.create_subnet_cidr_reservation,
            "CreateTags": self.create_tags,
            "DeleteNetworkInterface": self.delete_network_interface,
            "DeleteSubnetCidrReservation": self.delete_subnet_cidr_reservation,
            "DeleteTags": self.delete_tags,
            "DescribeInstanceTypes": self.describe_instance_types,
            "DescribeInstances": self.describe_instances,
            "DescribeNatGateways": self.describe_nat_gateways,
            "DescribeVpcEndpoints": self.describe_vpc_endpoints,
            "DescribeVpcs": self.describe_vpcs,
            "DescribeNetworkInterfaces": self.describe_network_interfaces,
            "DescribeSubnets": self.describe_subnets,
            "DetachNetworkInterface": self.detach_network_interface,
            "GetSubnetCidrReservations": self.get_subnet_cidr_reservations,
            "ModifyNetworkInterfaceAttribute": self.modify_network_interface_attribute,
            "ModifySubnetAttribute": self.modify_subnet_attribute,
            "RunInstances": self.run_instances,
            "TerminateInstances": self.terminate_instances,
            "UnassignIpv6Addresses": self.unassign_ipv6_addresses,
            "UnassignPrivateIpAddresses": self.unassign_private_ip_addresses,
        }

    @property
    def actions(self) -> list[str]:
        return sorted(self._handlers)

    def _filter(
        self,
        action: str,
        items: Iterable[Any],
        filters: Sequence[Mapping[str, Any]] | None,
        fields: FilterFields,
        tags_of: Callable[[Any], Mapping[str, str]],
    ) -> list[Any]:
        # Kept so a test can hold every accepted filter name to EC2's documented list.
        self.filter_names[action] = frozenset(fields)
        return _apply_filters(items, filters, fields, tags_of)

    def handle(self, body: bytes, query: str = "") -> ApiResponse:
        request_id = _request_id()
        action = "?"
        try:
            flat = parse_form(body, query)
            action = flat.pop("Action", "")
            flat.pop("Version", None)
            if not action:
                raise Ec2Error("MissingAction", "The request must contain the parameter Action")
            handler = self._handlers.get(action)
            if handler is None:
                raise Ec2Error(
                    "InvalidAction", f"The action {action} is not valid for this web service."
                )
            self._throttle(action, flat)
            decision = self.cloud.faults.decide(action)
            if decision.latency_s:
                self._sleep(decision.latency_s)
            if decision.error is not None:
                raise decision.error
            params = decode_params(action, flat)
            if params.pop("DryRun", False):
                # Permissions are not modelled, so a dry run always "would have succeeded".
                raise Ec2Error(
                    "DryRunOperation",
                    "Request would have succeeded, but DryRun flag is set.",
                    status=412,
                )
            with self.cloud.lock:  # one consistent view while reading and rendering
                result = handler(params)
                body = render_response(action, result, request_id)
            response = ApiResponse(200, body, action, None)
        except WireError as err:
            response = ApiResponse(
                400, render_error(err.code, err.message, request_id), action, err.code
            )
        except Ec2Error as err:
            response = ApiResponse(
                err.status, render_error(err.code, err.message, request_id), action, err.code
            )
        self.cloud.requests.record(action, response.error_code)
        if response.error_code is not None:
            log.info("ec2 %s -> %s", action, response.error_code)
        return response

    def _throttle(self, action: str, flat: Mapping[str, str]) -> None:
        """EC2's account throttling (``Cloud.throttle``), before anything else is looked at:
        a throttled request never reaches EC2's state, nor its parameter checks."""
        throttle = self.cloud.throttle
        if throttle is None:
            return
        narrowed = any(k.startswith("Filter.") or k in ("MaxResults", "NextToken") for k in flat)
        with self._throttle_lock:
            verdict = throttle.admit(
                action, filtered_or_paginated=narrowed, resources=_resource_count(action, flat)
            )
        if not verdict.allowed:
            raise throttled()

    # -- instances and types ---------------------------------------------------------

    def run_instances(self, params: Params) -> Result:
        """RunInstances with NetworkInterfaces, as a launch template gives them (each may
        carry ``Ipv4PrefixCount``): ``MaxCount`` instances, all or none (EC2 may launch
        fewer, down to ``MinCount``; the emulator has no capacity to run out of)."""
        if params.get("LaunchTemplate"):
            raise combination(
                "the emulator takes a launch template's NetworkInterfaces as RunInstances "
                "parameters; LaunchTemplate is not modelled"
            )
        count = params["MaxCount"]
        if not 1 <= params["MinCount"] <= count:
            raise invalid("MinCount must be >= 1 and <= MaxCount")
        specs = params.get("NetworkInterfaces") or []
        subnet_id = params.get("SubnetId") or next(
            (s.get("SubnetId") for s in specs if s.get("DeviceIndex") == 0), None
        )
        if not subnet_id:
            raise Ec2Error("MissingParameter", "RunInstances needs a SubnetId")
        for spec in specs:
            if spec.get("Ipv6Addresses") or spec.get("Ipv6Prefixes"):
                # Named IPv6 addresses or prefixes fit one instance only; the lab takes counts.
                raise invalid(
                    "the emulator takes Ipv6AddressCount and Ipv6PrefixCount at launch, not "
                    "Ipv6Addresses or Ipv6Prefixes"
                )
        top_ipv6 = params.get("Ipv6AddressCount")
        if top_ipv6 is not None and specs:
            raise combination(
                "Network interfaces and an instance-level IPv6 address count may not be "
                "specified on the same request"
            )
        interfaces = [
            LaunchInterface(
                network_card=spec.get("NetworkCardIndex", 0),
                device_index=spec["DeviceIndex"],
                interface_type=spec.get("InterfaceType", "interface"),
                ipv4_prefix_count=spec.get("Ipv4PrefixCount", 0),
                secondary_ip_count=spec.get("SecondaryPrivateIpAddressCount", 0),
                subnet_id=spec.get("SubnetId"),
                delete_on_termination=spec.get("DeleteOnTermination", True),
                ipv6_prefix_count=spec.get("Ipv6PrefixCount", 0),
                ipv6_address_count=spec.get("Ipv6AddressCount"),
            )
            for spec in specs
        ]
        if top_ipv6 is not None:
            interfaces = [LaunchInterface(0, 0, ipv6_address_count=top_ipv6)]
        tags = _tag_specs(params.get("TagSpecifications"), "instance")
        launched = [
            self.cloud.launch_instance(
                params["InstanceType"], subnet_id, interfaces=interfaces, tags=tags
            )
            for _ in range(count)
        ]
        return {
            "ReservationId": "r-" + launched[0].instance_id[2:],
            "OwnerId": OWNER_ID,
            "Instances": [_instance_view(i, self.cloud.enis_of(i.instance_id)) for i in launched],
        }

    def terminate_instances(self, params: Params) -> Result:
        changes = []
        for instance_id in params["InstanceIds"]:
            before = self.cloud.instance(instance_id).state
            self.cloud.terminate_instance(instance_id)
            changes.append(
                {
                    "InstanceId": instance_id,
                    "PreviousState": {"Code": _STATE_CODES[before], "Name": before},
                    "CurrentState": {"Code": _STATE_CODES["terminated"], "Name": "terminated"},
                }
            )
        return {"TerminatingInstances": changes}

    def describe_instances(self, params: Params) -> Result:
        ids = params.get("InstanceIds") or []
        instances = self.cloud.instances()
        if ids:
            known = {i.instance_id for i in instances}
            missing = [i for i in ids if i not in known]
            if missing:
                raise Ec2Error(
                    "InvalidInstanceID.NotFound",
                    f"The instance ID '{missing[0]}' does not exist",
                )
            instances = [i for i in instances if i.instance_id in ids]
        fields: FilterFields = {
            "availability-zone": lambda i: [i.availability_zone],
            "instance-id": lambda i: [i.instance_id],
            "instance-state-name": lambda i: [i.state],
            "instance-type": lambda i: [i.instance_type.name],
            "network-interface.network-interface-id": lambda i: [
                e.eni_id for e in self.cloud.enis_of(i.instance_id)
            ],
            "network-interface.ipv6-addresses.ipv6-address": lambda i: [
                str(a) for e in self.cloud.enis_of(i.instance_id) for a in e.ipv6_addresses
            ],
            "network-interface.ipv6-prefixes.ipv6-prefix": lambda i: [
                str(p) for e in self.cloud.enis_of(i.instance_id) for p in e.ipv6_prefixes
            ],
            "subnet-id": lambda i: [i.subnet_id],
            "vpc-id": lambda i: [i.vpc_id],
        }
        instances = self._filter(
            "DescribeInstances", instances, params.get("Filters"), fields, lambda i: i.tags
        )
        page, token = _page(
            instances, lambda i: i.instance_id, params, max_limit=1000, ids_given=bool(ids)
        )
        reservations = [
            {
                "Instances": [_instance_view(i, self.cloud.enis_of(i.instance_id))],
                "OwnerId": OWNER_ID,
                "ReservationId": "r-" + i.instance_id[2:],
            }
            for i in page
        ]
        return {"Reservations": reservations, "NextToken": token}

    def describe_instance_types(self, params: Params) -> Result:
        names = params.get("InstanceTypes") or []
        if names:
            missing = []
            types = []
            for name in names:
                try:
                    types.append(lookup(name))
                except UnknownInstanceType:
                    missing.append(name)
            if missing:
                raise Ec2Error(
                    "InvalidInstanceType",
                    f"The following supplied instance types do not exist: [{', '.join(missing)}]",
                )
        else:
            types = list(catalog().values())
        fields: FilterFields = {
            "instance-type": lambda t: [t.name],
            "bare-metal": lambda t: [str(t.bare_metal).lower()],
            "hypervisor": lambda t: [t.hypervisor],
            "network-info.efa-supported": lambda t: [str(bool(t.efa_supported)).lower()],
            "network-info.maximum-network-cards": lambda t: [str(len(t.network_cards))],
            "network-info.maximum-network-interfaces": lambda t: [str(t.max_enis_total)],
            "network-info.ipv4-addresses-per-interface": lambda t: [str(t.ipv4_per_eni)],
        }
        types = self._filter(
            "DescribeInstanceTypes", types, params.get("Filters"), fields, lambda t: {}
        )
        # DescribeInstanceTypes pages by 100 at most, unlike the other calls (API reference).
        page, token = _page(types, lambda t: t.name, params, max_limit=100)
        if not params.get("MaxResults") and not params.get("NextToken") and not names:
            page, token = _page(types, lambda t: t.name, {"MaxResults": 100}, max_limit=100)
        return {"InstanceTypes": [_instance_type_view(t) for t in page], "NextToken": token}

    # -- subnets ---------------------------------------------------------------------

    def describe_subnets(self, params: Params) -> Result:
        ids = params.get("SubnetIds") or []
        subnets = self.cloud.subnets()
        if ids:
            known = {s.subnet_id for s in subnets}
            missing = [i for i in ids if i not in known]
            if missing:
                raise Ec2Error(
                    "InvalidSubnetID.NotFound",
                    f"The subnet ID '{missing[0]}' does not exist",
                )
            subnets = [s for s in subnets if s.subnet_id in ids]
        fields: FilterFields = {
            "availability-zone": lambda s: [s.availability_zone],
            "availability-zone-id": lambda s: [s.availability_zone_id],
            "available-ip-address-count": lambda s: [str(s.space.stats().free)],
            "cidr-block": lambda s: [str(s.cidr)],
            "default-for-az": lambda s: ["false"],
            "ipv6-cidr-block-association.association-id": lambda s: (
                [s.ipv6_block.association_id] if s.ipv6_block else []
            ),
            "ipv6-cidr-block-association.ipv6-cidr-block": lambda s: (
                [str(s.ipv6_block.cidr)] if s.ipv6_block else []
            ),
            "ipv6-cidr-block-association.state": lambda s: ["associated"] if s.ipv6_block else [],
            "ipv6-native": lambda s: ["false"],
            "state": lambda s: ["available"],
            "subnet-id": lambda s: [s.subnet_id],
            "vpc-id": lambda s: [s.vpc_id],
        }
        subnets = self._filter(
            "DescribeSubnets", subnets, params.get("Filters"), fields, lambda s: s.tags
        )
        page, token = _page(
            subnets, lambda s: s.subnet_id, params, max_limit=1000, ids_given=bool(ids)
        )
        return {"Subnets": [_subnet_view(s) for s in page], "NextToken": token}

    def create_subnet_cidr_reservation(self, params: Params) -> Result:
        record = self.cloud.create_cidr_reservation(
            params["SubnetId"],
            params["Cidr"],
            params["ReservationType"],
            params.get("Description", ""),
            _tag_specs(params.get("TagSpecifications"), "subnet-cidr-reservation"),
        )
        return {"SubnetCidrReservation": self._reservation_view(record)}

    def delete_subnet_cidr_reservation(self, params: Params) -> Result:
        record = self.cloud.delete_cidr_reservation(params["SubnetCidrReservationId"])
        return {"DeletedSubnetCidrReservation": self._reservation_view(record)}

    def get_subnet_cidr_reservations(self, params: Params) -> Result:
        subnet = self.cloud.subnet(params["SubnetId"])
        records = list(subnet.reservations.values())
        fields: FilterFields = {
            "reservationType": lambda r: [r.kind.name.lower()],
            "subnet-id": lambda r: [r.subnet_id],
        }
        records = self._filter(
            "GetSubnetCidrReservations", records, params.get("Filters"), fields, lambda r: r.tags
        )
        views = [self._reservation_view(r) for r in records]
        return {"SubnetIpv4CidrReservations": views, "SubnetIpv6CidrReservations": []}

    @staticmethod
    def _reservation_view(record: Any) -> dict[str, Any]:
        out = {
            "Cidr": str(record.cidr),
            "OwnerId": OWNER_ID,
            "ReservationType": record.kind.name.lower(),
            "SubnetCidrReservationId": record.reservation_id,
            "SubnetId": record.subnet_id,
            "Tags": _tags(record.tags),
        }
        if record.description:
            out["Description"] = record.description
        return out

    # -- VPCs, NAT gateways and VPC endpoints (for NAU inspection) ---------------------

    def describe_vpcs(self, params: Params) -> Result:
        ids = params.get("VpcIds") or []
        vpcs = self.cloud.vpcs()
        if ids:
            known = {v.vpc_id for v in vpcs}
            missing = [i for i in ids if i not in known]
            if missing:
                raise Ec2Error("InvalidVpcID.NotFound", f"The vpc ID '{missing[0]}' does not exist")
            vpcs = [v for v in vpcs if v.vpc_id in ids]
        fields: FilterFields = {
            "cidr": lambda v: [str(v.cidrs[0])],
            "cidr-block-association.cidr-block": lambda v: [str(c) for c in v.cidrs],
            "ipv6-cidr-block-association.association-id": lambda v: [
                b.association_id for b in v.ipv6_blocks
            ],
            "ipv6-cidr-block-association.ipv6-cidr-block": lambda v: [str(c) for c in v.ipv6_cidrs],
            "ipv6-cidr-block-association.ipv6-pool": lambda v: ["Amazon"] if v.ipv6_blocks else [],
            "ipv6-cidr-block-association.state": lambda v: ["associated"] if v.ipv6_blocks else [],
            "state": lambda v: ["available"],
            "vpc-id": lambda v: [v.vpc_id],
        }
        vpcs = self._filter("DescribeVpcs", vpcs, params.get("Filters"), fields, lambda v: v.tags)
        page, token = _page(vpcs, lambda v: v.vpc_id, params, max_limit=1000, ids_given=bool(ids))
        views = [
            {
                "CidrBlock": str(v.cidrs[0]),
                "CidrBlockAssociationSet": [
                    {
                        "AssociationId": f"vpc-cidr-assoc-{v.vpc_id[4:]}{i}",
                        "CidrBlock": str(c),
                        "CidrBlockState": {"State": "associated"},
                    }
                    for i, c in enumerate(v.cidrs)
                ],
                "InstanceTenancy": "default",
                "Ipv6CidrBlockAssociationSet": [
                    _vpc_ipv6_association(b, self._region()) for b in v.ipv6_blocks
                ],
                "IsDefault": False,
                "OwnerId": OWNER_ID,
                "State": "available",
                "Tags": _tags(v.tags),
                "VpcId": v.vpc_id,
            }
            for v in page
        ]
        return {"Vpcs": views, "NextToken": token}

    def describe_nat_gateways(self, params: Params) -> Result:
        ids = params.get("NatGatewayIds") or []
        nats = self.cloud.nat_gateways()
        if ids:
            missing = [i for i in ids if i not in {n.nat_gateway_id for n in nats}]
            if missing:
                raise Ec2Error("NatGatewayNotFound", f"The Nat Gateway {missing[0]} was not found")
            nats = [n for n in nats if n.nat_gateway_id in ids]
        fields: FilterFields = {
            "nat-gateway-id": lambda n: [n.nat_gateway_id],
            "state": lambda n: [n.state],
            "subnet-id": lambda n: [n.subnet_id],
            "vpc-id": lambda n: [n.vpc_id],
        }
        nats = self._filter(
            "DescribeNatGateways", nats, params.get("Filter"), fields, lambda n: n.tags
        )
        page, token = _page(nats, lambda n: n.nat_gateway_id, params, max_limit=1000)
        return {"NatGateways": [self._nat_view(n) for n in page], "NextToken": token}

    def _nat_view(self, nat: NatGateway) -> dict[str, Any]:
        eni = self.cloud.eni(nat.eni_id)
        return {
            "ConnectivityType": "private",
            "CreateTime": nat.create_time,
            "NatGatewayAddresses": [
                {
                    "IsPrimary": True,
                    "NetworkInterfaceId": eni.eni_id,
                    "PrivateIp": str(eni.primary_ip),
                    "Status": "succeeded",
                }
            ],
            "NatGatewayId": nat.nat_gateway_id,
            "State": nat.state,
            "SubnetId": nat.subnet_id,
            "Tags": _tags(nat.tags),
            "VpcId": nat.vpc_id,
        }

    def describe_vpc_endpoints(self, params: Params) -> Result:
        ids = params.get("VpcEndpointIds") or []
        endpoints = self.cloud.vpc_endpoints()
        if ids:
            missing = [i for i in ids if i not in {e.vpc_endpoint_id for e in endpoints}]
            if missing:
                raise Ec2Error(
                    "InvalidVpcEndpointId.NotFound",
                    f"The Vpc Endpoint Id '{missing[0]}' does not exist",
                )
            endpoints = [e for e in endpoints if e.vpc_endpoint_id in ids]
        fields: FilterFields = {
            "service-name": lambda e: [e.service_name],
            "vpc-endpoint-id": lambda e: [e.vpc_endpoint_id],
            "vpc-endpoint-state": lambda e: [e.state],
            "vpc-endpoint-type": lambda e: [e.endpoint_type],
            "vpc-id": lambda e: [e.vpc_id],
        }
        endpoints = self._filter(
            "DescribeVpcEndpoints", endpoints, params.get("Filters"), fields, lambda e: e.tags
        )
        page, token = _page(endpoints, lambda e: e.vpc_endpoint_id, params, max_limit=1000)
        return {"VpcEndpoints": [_endpoint_view(e) for e in page], "NextToken": token}

    # -- network interfaces ----------------------------------------------------------

    def describe_network_interfaces(self, params: Params) -> Result:
        ids = params.get("NetworkInterfaceIds") or []
        enis = self.cloud.enis()
        if ids:
            known = {e.eni_id for e in enis}
            missing = [i for i in ids if i not in known]
            if missing:
                raise Ec2Error(
                    "InvalidNetworkInterfaceID.NotFound",
                    # One id, as EC2 words it: the VPC CNI parses it out to drop stale ENIs.
                    f"The networkInterface ID '{missing[0]}' does not exist",
                )
            enis = [e for e in enis if e.eni_id in ids]

        def attached(e: Eni, field: Callable[[Any], object]) -> list[str]:
            if e.attachment is None:
                return []
            value = field(e.attachment)
            return [str(value).lower() if isinstance(value, bool) else str(value)]

        fields: FilterFields = {
            "addresses.private-ip-address": lambda e: [str(a) for a in e.addresses],
            "ipv6-addresses.ipv6-address": lambda e: [str(a) for a in e.ipv6_addresses],
            "attachment.attachment-id": lambda e: attached(e, lambda a: a.attachment_id),
            "attachment.delete-on-termination": lambda e: attached(
                e, lambda a: a.delete_on_termination
            ),
            "attachment.device-index": lambda e: attached(e, lambda a: a.device_index),
            "attachment.instance-id": lambda e: attached(e, lambda a: a.instance_id),
            "attachment.instance-owner-id": lambda e: attached(e, lambda a: OWNER_ID),
            "attachment.status": lambda e: attached(e, lambda a: "attached"),
            "availability-zone": lambda e: [e.availability_zone],
            "description": lambda e: [e.description],
            "group-id": lambda e: list(e.groups),
            "interface-type": lambda e: [e.shown_type],
            "mac-address": lambda e: [e.mac],
            "network-interface-id": lambda e: [e.eni_id],
            "owner-id": lambda e: [OWNER_ID],
            "private-ip-address": lambda e: [str(a) for a in e.addresses],
            "addresses.primary": lambda e: ["true"] if e.primary_ip else [],
            "availability-zone-id": lambda e: [self.cloud.subnet(e.subnet_id).availability_zone_id],
            "requester-managed": lambda e: [str(e.managed_type is not None).lower()],
            "source-dest-check": lambda e: [str(e.source_dest_check).lower()],
            "status": lambda e: [e.status],
            "subnet-id": lambda e: [e.subnet_id],
            "vpc-id": lambda e: [e.vpc_id],
        }
        enis = self._filter(
            "DescribeNetworkInterfaces", enis, params.get("Filters"), fields, lambda e: e.tags
        )
        page, token = _page(enis, lambda e: e.eni_id, params, max_limit=1000, ids_given=bool(ids))
        return {"NetworkInterfaces": [_eni_view(e) for e in page], "NextToken": token}

    def create_network_interface(self, params: Params) -> Result:
        primary_ip = params.get("PrivateIpAddress")
        listed = [
            spec["PrivateIpAddress"]
            for spec in params.get("PrivateIpAddresses") or []
            if "PrivateIpAddress" in spec
        ]
        for spec in params.get("PrivateIpAddresses") or []:
            if spec.get("Primary") and primary_ip is None:
                primary_ip = spec["PrivateIpAddress"]
        secondaries = [a for a in listed if a != primary_ip]

        def create() -> str:
            eni = self.cloud.create_network_interface(
                params["SubnetId"],
                interface_type=params.get("InterfaceType", "interface"),
                prefix_count=params.get("Ipv4PrefixCount", 0),
                prefixes=[p["Ipv4Prefix"] for p in params.get("Ipv4Prefixes") or []],
                secondary_count=params.get("SecondaryPrivateIpAddressCount", 0),
                private_ips=secondaries,
                primary_ip=primary_ip,
                description=params.get("Description", ""),
                groups=params.get("Groups"),
                tags=_tag_specs(params.get("TagSpecifications"), "network-interface"),
                ipv6_address_count=params.get("Ipv6AddressCount"),
                ipv6_addresses=[a["Ipv6Address"] for a in params.get("Ipv6Addresses") or []],
                ipv6_prefix_count=params.get("Ipv6PrefixCount", 0),
                ipv6_prefixes=[p["Ipv6Prefix"] for p in params.get("Ipv6Prefixes") or []],
            )
            return eni.eni_id

        fingerprint = repr(sorted((k, repr(v)) for k, v in params.items() if k != "ClientToken"))
        eni_id = self.cloud.idempotent(
            "CreateNetworkInterface", params.get("ClientToken"), fingerprint, create
        )
        result: Result = {"NetworkInterface": _eni_view(self.cloud.eni(eni_id))}
        if params.get("ClientToken"):
            result["ClientToken"] = params["ClientToken"]
        return result

    def attach_network_interface(self, params: Params) -> Result:
        attachment_id = self.cloud.attach_network_interface(
            params["NetworkInterfaceId"],
            params["InstanceId"],
            params["DeviceIndex"],
            params.get("NetworkCardIndex", 0),
        )
        card = self.cloud.eni(params["NetworkInterfaceId"]).attachment
        assert card is not None
        return {"AttachmentId": attachment_id, "NetworkCardIndex": card.network_card_index}

    def detach_network_interface(self, params: Params) -> Result:
        self.cloud.detach_network_interface(params["AttachmentId"], force=bool(params.get("Force")))
        return {}

    def delete_network_interface(self, params: Params) -> Result:
        self.cloud.delete_network_interface(params["NetworkInterfaceId"])
        return {}

    def modify_network_interface_attribute(self, params: Params) -> Result:
        attachment = params.get("Attachment") or {}
        self.cloud.modify_network_interface(
            params["NetworkInterfaceId"],
            description=(params.get("Description") or {}).get("Value"),
            source_dest_check=(params.get("SourceDestCheck") or {}).get("Value"),
            groups=params.get("Groups"),
            attachment_id=attachment.get("AttachmentId"),
            delete_on_termination=attachment.get("DeleteOnTermination"),
        )
        return {}

    def assign_private_ip_addresses(self, params: Params) -> Result:
        eni_id = params["NetworkInterfaceId"]
        assigned = self.cloud.assign_private_ip_addresses(
            eni_id,
            ip_count=params.get("SecondaryPrivateIpAddressCount", 0),
            ips=params.get("PrivateIpAddresses") or [],
            prefix_count=params.get("Ipv4PrefixCount", 0),
            prefixes=params.get("Ipv4Prefixes") or [],
            allow_reassignment=bool(params.get("AllowReassignment")),
        )
        result: Result = {"NetworkInterfaceId": eni_id}
        if assigned.addresses:
            result["AssignedPrivateIpAddresses"] = [
                {"PrivateIpAddress": str(a)} for a in assigned.addresses
            ]
        if assigned.prefixes:
            result["AssignedIpv4Prefixes"] = [{"Ipv4Prefix": str(p)} for p in assigned.prefixes]
        return result

    def assign_ipv6_addresses(self, params: Params) -> Result:
        eni_id = params["NetworkInterfaceId"]
        assigned = self.cloud.assign_ipv6_addresses(
            eni_id,
            address_count=params.get("Ipv6AddressCount", 0),
            addresses=params.get("Ipv6Addresses") or [],
            prefix_count=params.get("Ipv6PrefixCount", 0),
            prefixes=params.get("Ipv6Prefixes") or [],
        )
        result: Result = {"NetworkInterfaceId": eni_id}
        if assigned.addresses:
            result["AssignedIpv6Addresses"] = [str(a) for a in assigned.addresses]
        if assigned.prefixes:
            result["AssignedIpv6Prefixes"] = [str(p) for p in assigned.prefixes]
        return result

    def unassign_ipv6_addresses(self, params: Params) -> Result:
        eni_id = params["NetworkInterfaceId"]
        gone = self.cloud.unassign_ipv6_addresses(
            eni_id,
            addresses=params.get("Ipv6Addresses") or [],
            prefixes=params.get("Ipv6Prefixes") or [],
        )
        result: Result = {"NetworkInterfaceId": eni_id}
        if gone.addresses:
            result["UnassignedIpv6Addresses"] = [str(a) for a in gone.addresses]
        if gone.prefixes:
            result["UnassignedIpv6Prefixes"] = [str(p) for p in gone.prefixes]
        return result

    # -- IPv6 blocks of VPCs and subnets ---------------------------------------------

    def _region(self) -> str:
        subnets = self.cloud.subnets()
        return subnets[0].availability_zone[:-1] if subnets else "us-west-2"

    def associate_vpc_cidr_block(self, params: Params) -> Result:
        """IPv6 only: AmazonProvidedIpv6CidrBlock (the lab picks a unique-local /56) or
        Ipv6CidrBlock (a unique-local /56 the caller names)."""
        if params.get("CidrBlock") or params.get("Ipv4IpamPoolId"):
            raise invalid("the emulator associates IPv6 blocks only; IPv4 blocks are set up front")
        if params.get("Ipv6IpamPoolId"):
            raise invalid("IPAM pools are not modelled; use AmazonProvidedIpv6CidrBlock")
        amazon = bool(params.get("AmazonProvidedIpv6CidrBlock"))
        named = params.get("Ipv6CidrBlock")
        if amazon == bool(named):
            raise Ec2Error(
                "MissingParameter" if not amazon else "InvalidParameterCombination",
                "Specify exactly one of AmazonProvidedIpv6CidrBlock or Ipv6CidrBlock",
            )
        block = self.cloud.associate_vpc_ipv6_cidr(params["VpcId"], named)
        return {
            "Ipv6CidrBlockAssociation": _vpc_ipv6_association(block, self._region()),
            "VpcId": params["VpcId"],
        }

    def associate_subnet_cidr_block(self, params: Params) -> Result:
        if params.get("Ipv6IpamPoolId"):
            raise invalid("IPAM pools are not modelled; name the /64 in Ipv6CidrBlock")
        if not params.get("Ipv6CidrBlock"):
            raise Ec2Error("MissingParameter", "The request must contain Ipv6CidrBlock")
        block = self.cloud.associate_subnet_ipv6_cidr(params["SubnetId"], params["Ipv6CidrBlock"])
        return {
            "Ipv6CidrBlockAssociation": _cidr_association(block),
            "SubnetId": params["SubnetId"],
        }

    def modify_subnet_attribute(self, params: Params) -> Result:
        """AssignIpv6AddressOnCreation only, the one attribute the lab's subnets act on."""
        others = set(params) - {"SubnetId", "AssignIpv6AddressOnCreation"}
        if others:
            raise invalid(
                f"the emulator modifies AssignIpv6AddressOnCreation only, not {sorted(others)}"
            )
        setting = params.get("AssignIpv6AddressOnCreation")
        if setting is None or "Value" not in setting:
            raise Ec2Error("MissingParameter", "The request must contain an attribute to modify")
        self.cloud.set_assign_ipv6_on_creation(params["SubnetId"], bool(setting["Value"]))
        return {}

    def unassign_private_ip_addresses(self, params: Params) -> Result:
        self.cloud.unassign_private_ip_addresses(
            params["NetworkInterfaceId"],
            ips=params.get("PrivateIpAddresses") or [],
            prefixes=params.get("Ipv4Prefixes") or [],
        )
        return {}

    # -- tags ------------------------------------------------------------------------

    def create_tags(self, params: Params) -> Result:
        tags = {t["Key"]: t.get("Value", "") for t in params.get("Tags") or []}
        self.cloud.create_tags(params["Resources"], tags)
        return {}

    def delete_tags(self, params: Params) -> Result:
        keys = {t["Key"]: t.get("Value") for t in params.get("Tags") or []}
        self.cloud.delete_tags(params["Resources"], keys)
        return {}
