"""A node agent running in-process against a lab: IMDS and EC2 of the lab, netlink in the
lab's node namespace (or any host network port: ``agent_on``), the journal in a
temporary directory."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from cni.keys import IpamKey, PodRef
from ipam.agent import NodeIdentity
from ipam.agent6 import agent_class
from ipam.config import IpamdConfig, load_config
from ipam.datastore_errors import PoolExhausted
from ipam.ec2 import Ec2Client, boto3_client
from ipam.egress import Egress
from ipam.hostnet import HostNetwork, HostNetworkPort
from ipam.imds import ImdsClient
from ipam.metrics import IpamdMetrics
from tools.lab.lab import Lab

POD = PodRef("default", "pod")
# Builds the agent's EC2 client (``NodeAgent``'s ``ec2_factory``); ``ec2_factory`` by default.
Ec2Factory = Callable[[NodeIdentity, IpamdMetrics], Ec2Client]


def key(n: int, network: str = "ultranet") -> IpamKey:
    return IpamKey(network, f"c{n:05d}", "eth0")


class ManualClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def config_for(state_dir: Path, env: Mapping[str, str] | None = None) -> IpamdConfig:
    return load_config({"ULTRANET_STATE_DIR": str(state_dir), **(env or {})})


class Endpoints(Protocol):
    """Where the emulator answers: a ``Lab``, or ``tests.ipam.cloudnode.CloudNode``."""

    @property
    def ec2_url(self) -> str: ...

    @property
    def imds_url(self) -> str: ...


def ec2_factory(lab: Endpoints) -> Ec2Factory:
    def build(node: NodeIdentity, metrics: IpamdMetrics) -> Ec2Client:
        return Ec2Client(
            node.region,
            endpoint_url=lab.ec2_url,
            stats=metrics,
            rate_per_s=1000.0,
            burst=1000,
            base_delay_s=0.001,
            client_factory=functools.partial(
                boto3_client, aws_access_key_id="lab", aws_secret_access_key="lab"
            ),
        )

    return build


class AgentRun:
    """An agent and the event loop that drives it, for synchronous tests."""

    def __init__(
        self,
        lab: Endpoints,
        config: IpamdConfig,
        clock: ManualClock,
        hostnet: Callable[[], HostNetworkPort],
        ec2: Ec2Factory | None = None,
        egress: Egress | None = None,
    ) -> None:
        self.lab = lab
        self.loop = asyncio.new_event_loop()
        self.agent = agent_class(config.ipv6)(
            config,
            imds=ImdsClient(lab.imds_url),
            ec2_factory=ec2 or ec2_factory(lab),
            hostnet=hostnet,
            clock=clock,
            egress=egress,
        )
        self.clock = clock

    def run(self, coro: object) -> object:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    def start(self) -> None:
        # Tests drive the pool steps by hand, so no background timing can race them.
        self.run(self.agent.start(manage=False))

    def converge(self, steps: int = 20) -> int:
        """Run pool steps until the plan is steady; returns the steps it took."""
        for n in range(steps):
            plans = [self.agent.plan(c) for c in self.agent.cards]
            if not any(p.add_prefixes or p.release_prefixes for p in plans):
                return n
            self.run(self.agent.step())
        raise AssertionError(f"no steady plan after {steps} steps: {plans}")

    def allocate_pods(self, count: int) -> None:
        """Allocate pods 0..count-1 as a runtime would, retrying an ADD that found the pool
        empty after letting the pool grow (as the runtime retries code 11)."""
        for n in range(count):
            try:
                self.run(self.agent.allocate(key(n), POD, multi_nic=False))
            except PoolExhausted:
                self.converge()
                self.run(self.agent.allocate(key(n), POD, multi_nic=False))

    def close(self) -> None:
        self.run(self.agent.stop())
        self.loop.close()


@contextmanager
def agent_in(
    lab: Lab,
    state_dir: Path,
    env: Mapping[str, str] | None = None,
    clock: ManualClock | None = None,
) -> Iterator[AgentRun]:
    with agent_on(lab, lambda: HostNetwork(netns=lab.node_ns), state_dir, env, clock) as run:
        yield run


@contextmanager
def agent_on(
    endpoints: Endpoints,
    hostnet: Callable[[], HostNetworkPort],
    state_dir: Path,
    env: Mapping[str, str] | None = None,
    clock: ManualClock | None = None,
    ec2: Ec2Factory | None = None,
    egress: Egress | None = None,
) -> Iterator[AgentRun]:
    config = config_for(state_dir, env)
    run = AgentRun(endpoints, config, clock or ManualClock(), hostnet, ec2, egress)
    try:
        run.start()
        yield run
    finally:
        run.close()
