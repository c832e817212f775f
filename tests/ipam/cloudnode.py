"""A lab node without namespaces: the cloud emulator's EC2 and IMDS on loopback, one
launched instance, and a ``RecordedHost`` in place of the node's kernel.

The same VPC, subnets and launch as ``tools.lab.lab.Lab`` (``LabConfig``), so a test of
the agent's logic runs here without root, and the netns tests keep only the netlink
wiring. The agent reaches the emulator over real boto3 and HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipam.instance_types import lookup
from tests.ipam.agentenv import AgentRun, Ec2Factory, ManualClock, agent_on
from tests.ipam.recording_hostnet import RecordedHost
from tests.lab.helpers import ec2_client
from tools.lab.ec2.server import Ec2Server, ImdsServer
from tools.lab.ec2.state import Cloud
from tools.lab.lab import LabConfig, launch_interfaces


@dataclass
class CloudNode:
    """What a test needs of a ``Lab``, minus its namespaces (``ec2_url``, ``imds_url``,
    ``cloud``, ``instance_id``, ``subnet_ids`` mean the same)."""

    config: LabConfig
    cloud: Cloud
    host: RecordedHost
    vpc_id: str
    subnet_ids: list[str]
    instance_id: str
    ec2_url: str
    imds_url: str

    def ec2(self) -> Any:
        """A boto3 client, for changes made behind the agent's back."""
        return ec2_client(self)  # type: ignore[arg-type]  # needs only ec2_url

    def primary_eni(self) -> str:
        return self.cloud.enis_of(self.instance_id)[0].eni_id


@contextmanager
def cloud_node(config: LabConfig | None = None) -> Iterator[CloudNode]:
    config = config or LabConfig(instance_type="m5.large")
    lookup(config.instance_type)
    cloud = Cloud(seed=config.seed)
    host = RecordedHost()
    cloud.subscribe(host)
    vpc = cloud.create_vpc(list(config.vpc_cidrs))
    if config.nau_quota is not None:
        cloud.set_nau_quota(vpc.vpc_id, config.nau_quota)
    subnet_ids = [
        cloud.create_subnet(vpc.vpc_id, s.cidr, s.availability_zone, dict(s.tags)).subnet_id
        for s in config.subnets
    ]
    interfaces = launch_interfaces(
        config.instance_type, config.prefixes_per_card, config.other_cards
    )
    instance = cloud.launch_instance(config.instance_type, subnet_ids[0], interfaces=interfaces)
    with ExitStack() as servers:
        ec2 = Ec2Server(cloud)
        servers.callback(ec2.close)
        ec2_url = ec2.start()
        imds = ImdsServer(cloud, instance.instance_id)
        servers.callback(imds.close)
        imds_url = imds.start()
        yield CloudNode(
            config, cloud, host, vpc.vpc_id, subnet_ids, instance.instance_id, ec2_url, imds_url
        )


@contextmanager
def agent_on_cloud(
    node: CloudNode,
    state_dir: Path,
    env: Mapping[str, str] | None = None,
    clock: ManualClock | None = None,
    ec2: Ec2Factory | None = None,
) -> Iterator[AgentRun]:
    """An agent on the node, its host network the node's ``RecordedHost``."""
    with agent_on(node, node.host.open, state_dir, env, clock, ec2) as run:
        yield run
