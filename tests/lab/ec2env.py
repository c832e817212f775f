"""A cloud emulator served on loopback, without namespaces: for EC2 and IMDS API tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config

from tools.lab.ec2.server import Ec2Server, ImdsServer
from tools.lab.ec2.state import Cloud, LaunchInterface

CNI_TAG = "kubernetes.io/role/cni"


class ManualClock:
    """A clock tests move by hand, so time-dependent behaviour needs no sleeping."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Ec2Env:
    cloud: Cloud
    clock: ManualClock
    url: str
    vpc_id: str
    subnet_ids: list[str]  # 0, 1: us-west-2a (tagged for the CNI); 2: us-west-2b (untagged)
    instance_id: str

    def client(self, *, retries: int = 1) -> Any:
        return boto3.client(
            "ec2",
            endpoint_url=self.url,
            region_name="us-west-2",
            aws_access_key_id="lab",
            aws_secret_access_key="lab",
            config=Config(retries={"total_max_attempts": retries, "mode": "standard"}),
        )


@contextmanager
def ec2_env(
    instance_type: str = "m5.large",
    *,
    interfaces: tuple[LaunchInterface, ...] = (LaunchInterface(0, 0, ipv4_prefix_count=1),),
    subnet_cidrs: tuple[str, ...] = ("100.64.0.0/20", "100.64.16.0/24", "100.64.32.0/24"),
    seed: int = 7,
) -> Iterator[Ec2Env]:
    clock = ManualClock()
    cloud = Cloud(seed=seed, clock=clock)
    vpc = cloud.create_vpc(["100.64.0.0/16"])
    zones = ("us-west-2a", "us-west-2a", "us-west-2b")
    subnet_ids = []
    for index, cidr in enumerate(subnet_cidrs):
        tags = {CNI_TAG: "1", "Name": f"lab-{index}"} if index < 2 else {"Name": f"lab-{index}"}
        subnet_ids.append(cloud.create_subnet(vpc.vpc_id, cidr, zones[index % 3], tags).subnet_id)
    instance = cloud.launch_instance(instance_type, subnet_ids[0], interfaces=interfaces)
    server = Ec2Server(cloud)
    try:
        url = server.start()
        yield Ec2Env(cloud, clock, url, vpc.vpc_id, subnet_ids, instance.instance_id)
    finally:
        server.close()


@contextmanager
def imds_on_loopback(env: Ec2Env, *, v1_allowed: bool = False) -> Iterator[str]:
    server = ImdsServer(env.cloud, env.instance_id, v1_allowed=v1_allowed)
    try:
        yield server.start()
    finally:
        server.close()
