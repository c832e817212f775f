"""The NAU planner in IPv6 mode and the EC2 emulator count an IPv6 node alike.

The planner runs as its command (`ultranet-nau plan --mode ipv6 --json`); the emulator gets
the node as EKS launches it in an IPv6 cluster, through boto3: a subnet with a /64 and
AssignIpv6AddressOnCreation (the node's own IPv6 address), one /80 on the primary
interface from the launch template, and, on p5.48xlarge, the EFA layout of the planner's
default (EFA primary, EFA-only interfaces on the other cards). `ultranet-nau inspect`
reading that VPC through boto3 must count the same. Each reading of the ambiguous EFA row
is checked on every side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv6Network
from typing import Any

import boto3
import pytest
from botocore.config import Config

from ipam.nau.rules import CONSERVATIVE_RULES, DEFAULT_RULES, NauRules
from tools.lab.ec2.server import Ec2Server
from tools.lab.ec2.state import Cloud

READINGS: dict[str, NauRules] = {"adds": CONSERVATIVE_RULES, "restate": DEFAULT_RULES}


def nau_command(*argv: str) -> dict[str, Any]:
    # inspect reads the emulator through boto3, which wants credentials (any will do).
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "lab", "AWS_SECRET_ACCESS_KEY": "lab"}
    done = subprocess.run(
        [sys.executable, "-m", "ipam.nau.cli", *argv, "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=env,
    )
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def planner_nau_per_node(instance_type: str, efa_counting: str, *extra: str) -> int:
    doc = nau_command(
        "plan",
        "--nodes",
        "1",
        "--instance-type",
        instance_type,
        "--mode",
        "ipv6",
        "--efa-counting",
        efa_counting,
        *extra,
    )
    per_node: int = doc["nau_per_node"][instance_type]
    return per_node


@contextmanager
def ipv6_vpc(rules: NauRules) -> Iterator[tuple[Cloud, Any, str, str, str]]:
    """An empty dual-stack VPC served on loopback: (cloud, boto3, url, vpc, subnet)."""
    cloud = Cloud(seed=3, rules=rules)
    vpc = cloud.create_vpc(["100.64.0.0/16"]).vpc_id
    subnet = cloud.create_subnet(vpc, "100.64.0.0/18", "us-west-2a").subnet_id
    server = Ec2Server(cloud)
    try:
        url = server.start()
        ec2 = boto3.client(
            "ec2",
            endpoint_url=url,
            region_name="us-west-2",
            aws_access_key_id="lab",
            aws_secret_access_key="lab",
            config=Config(retries={"total_max_attempts": 1}),
        )
        block = ec2.associate_vpc_cidr_block(VpcId=vpc, AmazonProvidedIpv6CidrBlock=True)
        vpc56 = IPv6Network(block["Ipv6CidrBlockAssociation"]["Ipv6CidrBlock"])
        sub64 = next(vpc56.subnets(new_prefix=64))
        ec2.associate_subnet_cidr_block(SubnetId=subnet, Ipv6CidrBlock=str(sub64))
        ec2.modify_subnet_attribute(SubnetId=subnet, AssignIpv6AddressOnCreation={"Value": True})
        yield cloud, ec2, url, vpc, subnet
    finally:
        server.close()


def emulator_nau(
    efa_counting: str, instance_type: str, primary_type: str, efa_only_cards: int
) -> int:
    """The node's NAU as the emulator counts it, checked against `ultranet-nau inspect`
    reading the same VPC through boto3 (DescribeNetworkInterfaces' Ipv6Prefixes and
    Ipv6Addresses) under the same reading of the EFA row."""
    with ipv6_vpc(READINGS[efa_counting]) as (cloud, ec2, url, vpc, subnet):
        interfaces: list[dict[str, Any]] = [
            {
                "DeviceIndex": 0,
                "NetworkCardIndex": 0,
                "SubnetId": subnet,
                "InterfaceType": primary_type,
                "Ipv6PrefixCount": 1,
            }
        ]
        interfaces += [
            {"DeviceIndex": 1, "NetworkCardIndex": card, "SubnetId": subnet,
             "InterfaceType": "efa-only"}
            for card in range(1, efa_only_cards + 1)
        ]  # fmt: skip
        instance = ec2.run_instances(
            InstanceType=instance_type, MinCount=1, MaxCount=1, NetworkInterfaces=interfaces
        )["Instances"][0]
        primary = instance["NetworkInterfaces"][0]
        assert len(primary["Ipv6Prefixes"]) == 1 and len(primary["Ipv6Addresses"]) == 1
        assert len(instance["NetworkInterfaces"]) == 1 + efa_only_cards
        inspected = nau_command(
            "inspect",
            "--vpc",
            vpc,
            "--endpoint-url",
            url,
            "--region",
            "us-west-2",
            "--efa-counting",
            efa_counting,
        )
        used = cloud.nau_used(vpc)
        assert inspected["nau_total"] == used
        return used


@pytest.mark.parametrize("efa_counting", sorted(READINGS))
def test_m5_large_ipv6_node(efa_counting: str) -> None:
    emulated = emulator_nau(efa_counting, "m5.large", "interface", 0)
    assert emulated == 3  # its IPv4, its IPv6 address, its /80
    assert planner_nau_per_node("m5.large", efa_counting) == emulated


@pytest.mark.parametrize("efa_counting", sorted(READINGS))
def test_p5_48xlarge_ipv6_node_with_the_default_efa_layout(efa_counting: str) -> None:
    emulated = emulator_nau(efa_counting, "p5.48xlarge", "efa", 31)
    planned = planner_nau_per_node("p5.48xlarge", efa_counting, "--efa-primary", "--efa-only", "31")
    assert planned == emulated
    # The primary (IPv4 + IPv6 + /80 + EFA) is 4; 31 EFA-only interfaces 1 or 2 each.
    assert emulated == 4 + 31 * (2 if efa_counting == "adds" else 1)


def test_p5_48xlarge_ipv6_node_plain_primary() -> None:
    emulated = emulator_nau("restate", "p5.48xlarge", "interface", 0)
    assert planner_nau_per_node("p5.48xlarge", "restate") == emulated == 3
