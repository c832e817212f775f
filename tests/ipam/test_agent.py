"""The node agent's netlink wiring, in the lab's namespaces: what the agent asks of its host
port reaches the kernel as ``HostNetwork``, and the kernel ends up where the recording port
of the logic tests (``test_agent_logic.py``, no root) says it does."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from contextlib import AbstractContextManager
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from ipam import agent as agent_module
from ipam.hostnet import ENI_RULE_PRIORITY, EniLink, HostNetwork
from tests.conftest import LabFactory
from tests.ipam.agentenv import POD, AgentRun, ManualClock, agent_on, key
from tests.ipam.recording_hostnet import RecordedHost, RecordingHostPort
from tools.lab.lab import Lab, LabConfig

pytestmark = pytest.mark.netns

Routes = set[tuple[int, IPv4Network, IPv4Address | None, str]]


class TeeHostPort:
    """The real ``HostNetwork`` in the node namespace, and a recording port told the same
    calls (knowing each link by the kernel's name for it)."""

    def __init__(self, netns: str, recorded: RecordedHost) -> None:
        self.real = HostNetwork(netns=netns)
        self.recorded: RecordingHostPort = recorded.open()

    def _learn(self, mac: str) -> None:
        name = self.real.find_link(mac)
        if name is not None:
            self.recorded.host.links[mac] = name

    def find_link(self, mac: str) -> str | None:
        self._learn(mac)
        return self.recorded.find_link(mac)

    def setup_eni(self, eni: EniLink) -> None:
        self._learn(eni.mac)
        self.real.setup_eni(eni)
        self.recorded.setup_eni(eni)

    def setup_enis(self, enis: Sequence[EniLink]) -> None:
        for eni in enis:
            self._learn(eni.mac)
        self.real.setup_enis(enis)
        self.recorded.setup_enis(enis)

    def teardown_eni(self, eni: EniLink) -> None:
        self.real.teardown_eni(eni)
        self.recorded.teardown_eni(eni)

    def close(self) -> None:
        self.real.close()
        self.recorded.close()


def kernel(ns: str) -> tuple[set[tuple[IPv4Address, int]], Routes]:
    """The ENIs' source rules (address, table) and the routes of their tables."""
    with IPRoute(netns=ns) as ipr:
        found = [
            (IPv4Address(r.get("src")), int(r.get("FRA_TABLE") or r["table"]))
            for r in ipr.get_rules(family=socket.AF_INET)
            if r.get("priority") == ENI_RULE_PRIORITY
        ]
        names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
        routes: Routes = set()
        for _, table in found:
            for r in ipr.get_routes(family=socket.AF_INET, table=table):
                dst = IPv4Network(f"{r.get('dst') or '0.0.0.0'}/{r['dst_len']}")
                gw = r.get("gateway")
                via = None if gw is None else IPv4Address(gw)
                routes.add((table, dst, via, names[r.get("oif")]))
    return set(found), routes


def recorded(host: RecordedHost) -> tuple[set[tuple[IPv4Address, int]], Routes]:
    return (
        {(r.src, r.table) for r in host.rules},
        {(r.table, r.dst, r.gateway, r.link) for r in host.routes},
    )


def agent_with_tee(
    lab: Lab, host: RecordedHost, tmp_path: Path, env: dict[str, str], clock: ManualClock
) -> AbstractContextManager[AgentRun]:
    return agent_on(lab, lambda: TeeHostPort(lab.node_ns, host), tmp_path, env, clock)


def test_multi_nic_start_plumbs_the_kernel_as_recorded(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(
        LabConfig(instance_type="p5.48xlarge", prefixes_per_card=1, other_cards="efa")
    )
    host = RecordedHost(instance_id=lab.instance_id)
    with agent_with_tee(lab, host, tmp_path, {"ENABLE_MULTI_NIC": "true"}, ManualClock()):
        rules, routes = kernel(lab.node_ns)
        assert len(rules) == 31 and len(routes) == 62  # gateway and default, per ENI table
        assert (rules, routes) == recorded(host)


def _grow_to_two_enis_then_empty(run: AgentRun) -> str:
    """150 pods take a second ENI; once they are gone its prefixes go back first."""
    run.allocate_pods(150)
    run.converge()
    pool = run.agent.pool.card(0)  # type: ignore[union-attr]
    assert len(pool.enis) == 2
    second = pool.enis[1].eni_id
    for n in range(150):
        run.run(run.agent.release(key(n)))
    run.converge()
    assert pool.prefixes_of(second) == []
    return second


def test_a_new_eni_is_plumbed_and_an_idle_one_unplumbed_as_recorded(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=1))
    host = RecordedHost(instance_id=lab.instance_id)
    clock = ManualClock()
    with agent_with_tee(lab, host, tmp_path, {"IP_COOLDOWN_PERIOD": "0"}, clock) as run:
        second = _grow_to_two_enis_then_empty(run)
        rules, routes = kernel(lab.node_ns)
        assert {table for _, table in rules} == {2}  # the new ENI, hot-plugged at device 1
        assert (rules, routes) == recorded(host)

        clock.advance(agent_module.IDLE_ENI_S)
        run.run(run.agent.step())
        assert second not in {e.eni_id for e in lab.cloud.enis()}  # detached and deleted
        assert kernel(lab.node_ns) == recorded(host) == (set(), set())
        # The pool still works, and grows a new ENI when it must.
        run.run(run.agent.allocate(key(1000), POD, multi_nic=False))
