"""inspect end to end: boto3 against the EC2 emulator, NAU by resource."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from ipam.nau.cli import main
from tests.lab.ec2env import Ec2Env, ec2_env
from tools.lab.ec2.state import LaunchInterface


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Ec2Env]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "lab")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "lab")
    interfaces = (
        LaunchInterface(0, 0, ipv4_prefix_count=2),
        LaunchInterface(0, 1, ipv4_prefix_count=1),  # an additional ENI with one prefix
        LaunchInterface(1, 0, "efa-only"),
        LaunchInterface(2, 0, "efa-only"),
    )
    with ec2_env("p5.48xlarge", interfaces=interfaces) as built:
        cloud, a, b = built.cloud, built.subnet_ids[0], built.subnet_ids[2]
        cloud.create_nat_gateway(a)
        cloud.create_vpc_endpoint(
            built.vpc_id, "com.amazonaws.us-west-2.ecr.api", "Interface", [a, b]
        )
        cloud.create_vpc_endpoint(built.vpc_id, "com.amazonaws.us-west-2.s3", "Gateway")
        cloud.create_load_balancer("ingress", "network", [a, b])
        cloud.create_load_balancer("gwlb", "gateway", [a])
        cloud.create_load_balancer("web", "application", [a, b])
        for _ in range(1_010):  # unattached: listed, never counted; forces a second page
            cloud.create_network_interface(a)
        yield built


def inspect(env: Ec2Env, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, object]:
    code = main(
        [
            "inspect",
            "--vpc",
            env.vpc_id,
            "--endpoint-url",
            env.url,
            "--region",
            "us-west-2",
            "--json",
            *extra,
        ]
    )
    assert code == 0
    doc: dict[str, object] = json.loads(capsys.readouterr().out)
    return doc


# Derived from AWS's table by hand: primary ENI 1 IPv4 + 2 prefixes = 3; the extra ENI
# 1 interface + 1 IPv4 + 1 prefix = 3; NAT 6; the Interface endpoint 6 x 2 AZs; NLB 6 x 2;
# GWLB 6 x 1; ALB and the Gateway endpoint 0.
FIXED = 3 + 3 + 6 + 12 + 12 + 6


def test_inspect_counts_every_resource(env: Ec2Env, capsys: pytest.CaptureFixture[str]) -> None:
    doc = inspect(env, capsys)
    rows = {r["resource"]: r for r in doc["resources"]}  # type: ignore[attr-defined]
    assert doc["nau_total"] == FIXED + 2 * 2  # EFA-only: EFA row + interface row, conservative
    assert rows["NAT gateways"]["nau"] == 6
    assert rows["VPC endpoint AZs"]["count"] == 2
    assert rows["Network Load Balancer AZs"]["nau"] == 12
    assert rows["Gateway Load Balancer AZs"]["nau"] == 6
    assert rows["Application Load Balancer AZs"]["nau"] == 0
    assert rows["unattached interfaces"]["count"] == 1_010
    assert rows["instance EFA-only interfaces"]["count"] == 2


def test_inspect_agrees_with_the_emulators_own_count(
    env: Ec2Env, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = inspect(env, capsys, "--efa-counting", "restate")  # the emulator's reading
    assert doc["nau_total"] == FIXED + 2 * 1 == env.cloud.nau_used(env.vpc_id)


def test_inspect_unknown_vpc_is_one_line(env: Ec2Env, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["inspect", "--vpc", "vpc-0000", "--endpoint-url", env.url, "--region", "us-west-2"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "InvalidVpcID.NotFound" in err and len(err.strip().splitlines()) == 1
