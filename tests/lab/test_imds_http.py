"""IMDS over HTTP, from the same state as EC2: the keys, the token flow, staleness."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from ipaddress import IPv4Network
from typing import Any
from urllib.parse import urlsplit

import pytest

from ipam.imds import ImdsClient
from tests.lab.ec2env import Ec2Env, ec2_env, imds_on_loopback
from tools.lab.ec2.state import LaunchInterface

P5_LAUNCH = (
    LaunchInterface(0, 0, ipv4_prefix_count=2),
    LaunchInterface(1, 1, interface_type="efa", ipv4_prefix_count=1),
    LaunchInterface(2, 1, interface_type="efa-only"),
)


@pytest.fixture
def env() -> Iterator[Ec2Env]:
    with ec2_env("p5.48xlarge", interfaces=P5_LAUNCH) as built:
        yield built


@pytest.fixture
def imds_url(env: Ec2Env) -> Iterator[str]:
    with imds_on_loopback(env) as url:
        yield url


def raw(url: str, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_imdsv2_token_flow_over_http(env: Ec2Env, imds_url: str) -> None:
    path = "/latest/meta-data/instance-id"
    assert raw(imds_url, "GET", path, {})[0] == 401
    status, token = raw(
        imds_url, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
    )
    assert status == 200 and token
    assert raw(imds_url, "GET", path, {"X-aws-ec2-metadata-token": token}) == (
        200,
        env.instance_id,
    )
    assert raw(imds_url, "GET", path, {"X-aws-ec2-metadata-token": "forged"})[0] == 401
    assert raw(imds_url, "PUT", "/latest/api/token", {})[0] == 400


def test_imdsv1_only_when_allowed(env: Ec2Env) -> None:
    with imds_on_loopback(env, v1_allowed=True) as url:
        assert raw(url, "GET", "/latest/meta-data/instance-type", {}) == (200, "p5.48xlarge")


def test_every_interface_key_agrees_with_ec2(env: Ec2Env, imds_url: str) -> None:
    ec2 = env.client()
    described = ec2.describe_network_interfaces(
        Filters=[{"Name": "attachment.instance-id", "Values": [env.instance_id]}]
    )["NetworkInterfaces"]
    by_id: dict[str, Any] = {e["NetworkInterfaceId"]: e for e in described}
    with ImdsClient(imds_url) as imds:
        identity = imds.identity()
        interfaces = imds.interfaces()
    assert identity.instance_id == env.instance_id
    assert identity.instance_type == "p5.48xlarge"
    assert identity.availability_zone == "us-west-2a"
    assert [(i.network_card, i.device_number) for i in interfaces] == [(0, 0), (1, 1), (2, 1)]
    assert identity.primary_mac == interfaces[0].mac
    for seen in interfaces:
        eni = by_id[seen.interface_id]
        assert seen.mac == eni["MacAddress"]
        assert seen.network_card == eni["Attachment"]["NetworkCardIndex"]
        assert seen.device_number == eni["Attachment"]["DeviceIndex"]
        assert seen.subnet_id == eni["SubnetId"]
        assert seen.vpc_id == eni["VpcId"] == env.vpc_id
        assert seen.vpc_cidrs == (IPv4Network("100.64.0.0/16"),)
        assert seen.subnet_cidr == IPv4Network("100.64.0.0/20")
        assert list(seen.security_group_ids) == [g["GroupId"] for g in eni["Groups"]]
        assert [str(a) for a in seen.local_ipv4s] == [
            a["PrivateIpAddress"] for a in eni["PrivateIpAddresses"]
        ]
        assert [str(p) for p in seen.ipv4_prefixes] == [
            p["Ipv4Prefix"] for p in eni.get("Ipv4Prefixes", [])
        ]
    assert len(interfaces[0].ipv4_prefixes) == 2
    efa_only = interfaces[2]
    assert efa_only.maybe_efa_only and efa_only.ipv4_prefixes == ()
    assert by_id[efa_only.interface_id]["InterfaceType"] == "efa-only"


def test_imds_follows_changes_made_through_ec2(env: Ec2Env, imds_url: str) -> None:
    ec2 = env.client()
    primary = env.cloud.enis_of(env.instance_id)[0].eni_id
    added = ec2.assign_private_ip_addresses(NetworkInterfaceId=primary, Ipv4PrefixCount=1)[
        "AssignedIpv4Prefixes"
    ][0]["Ipv4Prefix"]
    eni = ec2.create_network_interface(SubnetId=env.subnet_ids[0])["NetworkInterface"]
    ec2.attach_network_interface(
        NetworkInterfaceId=eni["NetworkInterfaceId"],
        InstanceId=env.instance_id,
        DeviceIndex=0,
        NetworkCardIndex=3,
    )
    with ImdsClient(imds_url) as imds:
        interfaces = {i.interface_id: i for i in imds.interfaces()}
    assert IPv4Network(added) in interfaces[primary].ipv4_prefixes
    assert interfaces[eni["NetworkInterfaceId"]].network_card == 3


def test_stale_imds_lags_ec2_by_the_set_time(env: Ec2Env, imds_url: str) -> None:
    ec2 = env.client()
    env.cloud.set_imds_lag(5.0)
    primary = env.cloud.enis_of(env.instance_id)[0].eni_id
    before = len(env.cloud.eni(primary).prefixes)
    env.clock.advance(10)  # the launch state is old enough to be visible
    ec2.assign_private_ip_addresses(NetworkInterfaceId=primary, Ipv4PrefixCount=1)
    assert len(env.cloud.eni(primary).prefixes) == before + 1  # EC2 knows at once

    def imds_prefixes() -> int:
        with ImdsClient(imds_url) as imds:
            return len(
                next(i for i in imds.interfaces() if i.interface_id == primary).ipv4_prefixes
            )

    assert imds_prefixes() == before
    env.clock.advance(4.9)
    assert imds_prefixes() == before
    env.clock.advance(0.2)
    assert imds_prefixes() == before + 1


def test_a_detached_interface_lingers_in_stale_imds(env: Ec2Env, imds_url: str) -> None:
    ec2 = env.client()
    env.clock.advance(10)
    eni = ec2.create_network_interface(SubnetId=env.subnet_ids[0])["NetworkInterface"]
    attachment = ec2.attach_network_interface(
        NetworkInterfaceId=eni["NetworkInterfaceId"],
        InstanceId=env.instance_id,
        DeviceIndex=0,
        NetworkCardIndex=4,
    )["AttachmentId"]
    env.clock.advance(10)
    env.cloud.set_imds_lag(3.0)
    ec2.detach_network_interface(AttachmentId=attachment)
    ec2.delete_network_interface(NetworkInterfaceId=eni["NetworkInterfaceId"])

    def listed() -> bool:
        with ImdsClient(imds_url) as imds:
            return eni["MacAddress"] in imds.macs()

    assert listed()  # IMDS still lists the deleted ENI, as after vpc-cni issue #1340
    env.clock.advance(3.0)
    assert not listed()


def test_instance_identity_document(env: Ec2Env, imds_url: str) -> None:
    import json

    _, token = raw(
        imds_url, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
    )
    status, body = raw(
        imds_url,
        "GET",
        "/latest/dynamic/instance-identity/document",
        {"X-aws-ec2-metadata-token": token},
    )
    assert status == 200
    document = json.loads(body)
    assert document["instanceId"] == env.instance_id
    assert document["region"] == "us-west-2"
