"""The emulator's requester-managed resources: NAT gateways, VPC endpoints, load balancers'
interfaces and DescribeVpcs, through boto3, and what they add to NAU."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.lab.ec2env import Ec2Env, ec2_env
from tools.lab.ec2.api import Ec2Api
from tools.lab.ec2.errors import Ec2Error


@pytest.fixture
def env() -> Iterator[Ec2Env]:
    with ec2_env() as built:
        yield built


@pytest.fixture
def ec2(env: Ec2Env) -> Any:
    return env.client()


def vpc_filter(env: Ec2Env) -> list[dict[str, Any]]:
    return [{"Name": "vpc-id", "Values": [env.vpc_id]}]


def test_nat_gateway_has_a_requester_managed_interface(env: Ec2Env, ec2: Any) -> None:
    nat = env.cloud.create_nat_gateway(env.subnet_ids[0])
    found = ec2.describe_nat_gateways(Filter=vpc_filter(env))["NatGateways"]
    assert [n["NatGatewayId"] for n in found] == [nat.nat_gateway_id]
    address = found[0]["NatGatewayAddresses"][0]
    eni = ec2.describe_network_interfaces(NetworkInterfaceIds=[address["NetworkInterfaceId"]])[
        "NetworkInterfaces"
    ][0]
    assert eni["InterfaceType"] == "natGateway"
    assert eni["RequesterManaged"] is True and eni["Status"] == "in-use"
    assert eni["PrivateIpAddress"] == address["PrivateIp"]


def test_nat_gateway_not_found(ec2: Any) -> None:
    with pytest.raises(ClientError) as excinfo:
        ec2.describe_nat_gateways(NatGatewayIds=["nat-0000"])
    assert excinfo.value.response["Error"]["Code"] == "NatGatewayNotFound"


def test_endpoints_interface_per_subnet_gateway_none(env: Ec2Env, ec2: Any) -> None:
    a, b = env.subnet_ids[0], env.subnet_ids[2]
    iface = env.cloud.create_vpc_endpoint(
        env.vpc_id, "com.amazonaws.us-west-2.sts", "Interface", [a, b]
    )
    env.cloud.create_vpc_endpoint(env.vpc_id, "com.amazonaws.us-west-2.s3", "Gateway")
    pages = ec2.get_paginator("describe_vpc_endpoints").paginate(
        Filters=vpc_filter(env), PaginationConfig={"PageSize": 5}
    )
    found = {e["VpcEndpointType"]: e for page in pages for e in page["VpcEndpoints"]}
    assert set(found) == {"Interface", "Gateway"}
    assert found["Interface"]["SubnetIds"] == [a, b]
    assert len(found["Interface"]["NetworkInterfaceIds"]) == 2
    assert found["Gateway"]["NetworkInterfaceIds"] == []
    typed = ec2.describe_network_interfaces(
        Filters=[{"Name": "interface-type", "Values": ["vpc_endpoint"]}]
    )["NetworkInterfaces"]
    assert {e["NetworkInterfaceId"] for e in typed} == set(iface.eni_ids)


def test_endpoint_needs_one_subnet_per_az(env: Ec2Env) -> None:
    with pytest.raises(Ec2Error):
        env.cloud.create_vpc_endpoint(env.vpc_id, "svc", "Interface", env.subnet_ids[:2])


def test_load_balancers_show_as_interfaces_per_az(env: Ec2Env, ec2: Any) -> None:
    env.cloud.create_load_balancer("ingress", "network", [env.subnet_ids[0], env.subnet_ids[2]])
    env.cloud.create_load_balancer("web", "application", [env.subnet_ids[0]])
    managed = ec2.describe_network_interfaces(
        Filters=[{"Name": "requester-managed", "Values": ["true"]}]
    )["NetworkInterfaces"]
    kinds = sorted((e["InterfaceType"], e["Description"].split("/")[0]) for e in managed)
    assert kinds == [
        ("interface", "ELB app"),
        ("network_load_balancer", "ELB net"),
        ("network_load_balancer", "ELB net"),
    ]
    assert all(e["RequesterId"] == "amazon-elb" for e in managed)


def test_managed_interfaces_cannot_be_touched(env: Ec2Env, ec2: Any) -> None:
    nat = env.cloud.create_nat_gateway(env.subnet_ids[0])
    for call in (
        lambda: ec2.delete_network_interface(NetworkInterfaceId=nat.eni_id),
        lambda: ec2.assign_private_ip_addresses(
            NetworkInterfaceId=nat.eni_id, SecondaryPrivateIpAddressCount=1
        ),
        lambda: ec2.attach_network_interface(
            NetworkInterfaceId=nat.eni_id, InstanceId=env.instance_id, DeviceIndex=1
        ),
    ):
        with pytest.raises(ClientError) as excinfo:
            call()
        assert excinfo.value.response["Error"]["Code"] == "OperationNotPermitted"


def test_managed_resources_count_toward_nau(env: Ec2Env, ec2: Any) -> None:
    before = env.cloud.nau_used(env.vpc_id)
    env.cloud.create_nat_gateway(env.subnet_ids[0])
    env.cloud.create_vpc_endpoint(
        env.vpc_id, "svc", "Interface", [env.subnet_ids[0], env.subnet_ids[2]]
    )
    env.cloud.create_vpc_endpoint(env.vpc_id, "s3", "Gateway")
    env.cloud.create_load_balancer("n", "network", [env.subnet_ids[0]])
    env.cloud.create_load_balancer("g", "gateway", [env.subnet_ids[2]])
    env.cloud.create_load_balancer("a", "application", [env.subnet_ids[0]])
    # AWS's table: NAT 6, endpoint 6 per AZ, NLB and GWLB 6 per AZ; ALB, Gateway endpoint 0
    assert env.cloud.nau_used(env.vpc_id) - before == 6 + 12 + 6 + 6
    env.cloud.set_nau_quota(env.vpc_id, env.cloud.nau_used(env.vpc_id))
    with pytest.raises(ClientError) as excinfo:
        eni = ec2.describe_network_interfaces(
            Filters=[{"Name": "attachment.instance-id", "Values": [env.instance_id]}]
        )["NetworkInterfaces"][0]
        ec2.assign_private_ip_addresses(
            NetworkInterfaceId=eni["NetworkInterfaceId"], Ipv4PrefixCount=1
        )
    assert excinfo.value.response["Error"]["Code"] == "NetworkAddressUsageLimitExceeded"


def test_describe_vpcs(env: Ec2Env, ec2: Any) -> None:
    vpc = ec2.describe_vpcs(VpcIds=[env.vpc_id])["Vpcs"][0]
    assert vpc["CidrBlock"] == "100.64.0.0/16"
    assert [a["CidrBlock"] for a in vpc["CidrBlockAssociationSet"]] == ["100.64.0.0/16"]
    with pytest.raises(ClientError) as excinfo:
        ec2.describe_vpcs(VpcIds=["vpc-0000"])
    assert excinfo.value.response["Error"]["Code"] == "InvalidVpcID.NotFound"


def test_new_filters_are_ones_ec2_documents(env: Ec2Env) -> None:
    import botocore.session

    api = Ec2Api(env.cloud)
    model = botocore.session.get_session().get_service_model("ec2")
    for action, member in (
        ("DescribeNatGateways", "Filter"),
        ("DescribeVpcEndpoints", "Filters"),
        ("DescribeVpcs", "Filters"),
    ):
        assert api.handle(urllib.parse.urlencode({"Action": action}).encode()).status == 200
        shape = model.operation_model(action).input_shape.members[member]
        documented = set(re.findall(r"<code>([A-Za-z0-9.:-]+)</code>", shape.documentation))
        accepted = api.filter_names[action]
        assert accepted and accepted <= documented, (action, sorted(accepted - documented))
