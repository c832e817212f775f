"""IMDS's IPv6 keys over HTTP, kept in step with EC2 (and lagging it when told to)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv6Address, IPv6Network
from typing import Any

import pytest

from ipam.imds import ImdsClient
from tests.lab.ec2env import Ec2Env, ec2_env, imds_on_loopback
from tools.lab.ec2.server import ImdsServer

MACS = "network/interfaces/macs"


@pytest.fixture
def env() -> Iterator[Ec2Env]:
    with ec2_env() as built:
        yield built


@contextmanager
def imds_of(env: Ec2Env, instance_id: str) -> Iterator[ImdsClient]:
    server = ImdsServer(env.cloud, instance_id)
    try:
        with ImdsClient(server.start()) as client:
            yield client
    finally:
        server.close()


def dual_stack(env: Ec2Env) -> tuple[Any, IPv6Network, IPv6Network]:
    """boto3 client, the VPC's /56 and subnet 0's /64 (AssignIpv6AddressOnCreation on)."""
    ec2 = env.client()
    vpc_block = IPv6Network(
        ec2.associate_vpc_cidr_block(VpcId=env.vpc_id, AmazonProvidedIpv6CidrBlock=True)[
            "Ipv6CidrBlockAssociation"
        ]["Ipv6CidrBlock"]
    )
    subnet_block = next(vpc_block.subnets(new_prefix=64))
    ec2.associate_subnet_cidr_block(SubnetId=env.subnet_ids[0], Ipv6CidrBlock=str(subnet_block))
    ec2.modify_subnet_attribute(
        SubnetId=env.subnet_ids[0], AssignIpv6AddressOnCreation={"Value": True}
    )
    return ec2, vpc_block, subnet_block


def lines(value: str | None) -> list[str]:
    assert value is not None
    return value.splitlines()


def test_a_node_launched_with_an_80_reads_it_from_imds(env: Ec2Env) -> None:
    ec2, vpc_block, subnet_block = dual_stack(env)
    instance = ec2.run_instances(
        InstanceType="m5.large",
        MinCount=1,
        MaxCount=1,
        NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": env.subnet_ids[0], "Ipv6PrefixCount": 1}],
    )["Instances"][0]
    (primary,) = instance["NetworkInterfaces"]
    with imds_of(env, instance["InstanceId"]) as imds:
        mac = imds.require("mac")
        assert mac == primary["MacAddress"]
        keys = lines(imds.get(f"{MACS}/{mac}/"))
        for key in ("ipv6-prefix", "ipv6s", "subnet-ipv6-cidr-blocks", "vpc-ipv6-cidr-blocks"):
            assert key in keys
        assert lines(imds.get(f"{MACS}/{mac}/ipv6-prefix")) == [
            p["Ipv6Prefix"] for p in primary["Ipv6Prefixes"]
        ]
        assert lines(imds.get(f"{MACS}/{mac}/ipv6s")) == [
            a["Ipv6Address"] for a in primary["Ipv6Addresses"]
        ]
        assert lines(imds.get(f"{MACS}/{mac}/subnet-ipv6-cidr-blocks")) == [str(subnet_block)]
        assert lines(imds.get(f"{MACS}/{mac}/vpc-ipv6-cidr-blocks")) == [str(vpc_block)]
        assert IPv6Address(imds.require("ipv6")) in subnet_block
        # The IPv4 keys are still there: the node is dual-stack, as EKS IPv6 nodes are.
        assert imds.get(f"{MACS}/{mac}/local-ipv4s") == primary["PrivateIpAddress"]


def test_ipv6_keys_are_absent_without_ipv6(env: Ec2Env) -> None:
    with imds_on_loopback(env) as url, ImdsClient(url) as imds:
        mac = imds.require("mac")
        keys = lines(imds.get(f"{MACS}/{mac}/"))
        for key in ("ipv6-prefix", "ipv6s", "subnet-ipv6-cidr-blocks", "vpc-ipv6-cidr-blocks"):
            assert key not in keys
            assert imds.get(f"{MACS}/{mac}/{key}") is None  # 404, as IMDS answers
        assert imds.get("ipv6") is None


def test_blocks_associated_later_show_on_running_instances(env: Ec2Env) -> None:
    with imds_on_loopback(env) as url, ImdsClient(url) as imds:
        mac = imds.require("mac")
        ec2, vpc_block, subnet_block = dual_stack(env)
        assert lines(imds.get(f"{MACS}/{mac}/vpc-ipv6-cidr-blocks")) == [str(vpc_block)]
        assert lines(imds.get(f"{MACS}/{mac}/subnet-ipv6-cidr-blocks")) == [str(subnet_block)]
        assert imds.get(f"{MACS}/{mac}/ipv6s") is None  # no address was asked for


def test_imds_follows_assign_and_unassign_with_its_lag(env: Ec2Env) -> None:
    ec2, _, _ = dual_stack(env)
    primary = env.cloud.enis_of(env.instance_id)[0]
    env.clock.advance(10)
    env.cloud.set_imds_lag(2.0)
    with imds_on_loopback(env) as url, ImdsClient(url) as imds:
        path = f"{MACS}/{primary.mac}/ipv6-prefix"
        (prefix,) = ec2.assign_ipv6_addresses(NetworkInterfaceId=primary.eni_id, Ipv6PrefixCount=1)[
            "AssignedIpv6Prefixes"
        ]
        assert imds.get(path) is None  # EC2 has it; IMDS does not yet
        env.clock.advance(1.9)
        assert imds.get(path) is None
        env.clock.advance(0.2)
        assert lines(imds.get(path)) == [prefix]
        ec2.unassign_ipv6_addresses(NetworkInterfaceId=primary.eni_id, Ipv6Prefixes=[prefix])
        assert lines(imds.get(path)) == [prefix]  # still shown for the lag
        env.clock.advance(2.1)
        assert imds.get(path) is None
