"""ipamd in IPv6 prefix mode against the lab's EC2 and IMDS (no root): the /80 from IMDS
with no EC2 call, or one AssignIpv6Addresses; /128s, restart, reconcile."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from ipam.agent import AgentError
from ipam.agent6 import Ipv6NodeAgent
from ipam.datastore_errors import PoolExhausted
from ipam.ec2 import Ec2Error
from tests.ipam.agentenv import POD, AgentRun, ManualClock, config_for, key
from tests.ipam.cloudnode import CloudNode, agent_on_cloud
from tests.ipam.recording_hostnet import RecordedHost
from tools.lab.ec2.server import Ec2Server, ImdsServer
from tools.lab.ec2.state import Cloud, LaunchInterface
from tools.lab.lab import LabConfig

VPC_56 = "fd12:3456:789a:1000::/56"
SUBNET_64 = IPv6Network("fd12:3456:789a:1000::/64")
IPV6 = {"ENABLE_IPv4": "false", "ENABLE_IPv6": "true", "ENABLE_PREFIX_DELEGATION": "true"}


@contextmanager
def ipv6_node(*, prefix_at_launch: bool, ipv6_subnet: bool = True) -> Iterator[CloudNode]:
    """An m5.large in a VPC with an IPv6 /56 and a /64 on its subnet; its primary ENI has
    a /80 from launch when ``prefix_at_launch`` (the launch template's Ipv6PrefixCount)."""
    config = LabConfig(instance_type="m5.large")
    cloud = Cloud(seed=config.seed)
    host = RecordedHost()
    cloud.subscribe(host)
    vpc = cloud.create_vpc(list(config.vpc_cidrs))
    cloud.associate_vpc_ipv6_cidr(vpc.vpc_id, VPC_56)
    subnet_ids = [
        cloud.create_subnet(vpc.vpc_id, s.cidr, s.availability_zone, dict(s.tags)).subnet_id
        for s in config.subnets
    ]
    if ipv6_subnet:
        cloud.associate_subnet_ipv6_cidr(subnet_ids[0], str(SUBNET_64))
    primary = LaunchInterface(0, 0, ipv6_prefix_count=int(prefix_at_launch))
    instance = cloud.launch_instance("m5.large", subnet_ids[0], interfaces=[primary])
    with ExitStack() as servers:
        ec2 = Ec2Server(cloud)
        servers.callback(ec2.close)
        imds = ImdsServer(cloud, instance.instance_id)
        servers.callback(imds.close)
        yield CloudNode(
            config,
            cloud,
            host,
            vpc.vpc_id,
            subnet_ids,
            instance.instance_id,
            ec2.start(),
            imds.start(),
        )


def ec2_ipv6_prefixes(node: CloudNode) -> list[IPv6Network]:
    (eni,) = node.ec2().describe_network_interfaces(NetworkInterfaceIds=[node.primary_eni()])[
        "NetworkInterfaces"
    ]
    return [IPv6Network(p["Ipv6Prefix"]) for p in eni.get("Ipv6Prefixes", [])]


def address(run: AgentRun, n: int) -> IPv6Address:
    allocation = run.run(run.agent.allocate(key(n), POD, multi_nic=False))
    found = allocation.leases[0].address  # type: ignore[attr-defined]
    assert isinstance(found, IPv6Address)
    return found


def ready(run: AgentRun) -> bool:
    return bool(run.run(run.agent.wait_ready(0)))


def test_launched_with_its_80_the_node_is_ready_with_no_ec2_call(tmp_path: Path) -> None:
    with ipv6_node(prefix_at_launch=True) as node:
        (prefix,) = ec2_ipv6_prefixes(node)
        node.cloud.requests.clear()
        with agent_on_cloud(node, tmp_path, IPV6) as run:
            assert isinstance(run.agent, Ipv6NodeAgent)
            assert ready(run)
            pods = [address(run, n) for n in range(3)]
            assert all(a in prefix for a in pods) and len(set(pods)) == 3
            assert run.agent.ready_at is not None
            run.run(run.agent.step())  # the pool manager's pass: nothing to do
            status = run.run(run.agent.status())
            assert status.ready and status.free_addresses[0] > 2**47  # type: ignore[attr-defined]
            assert not run.agent.ec2_used
        assert node.cloud.requests.count() == 0


def test_without_a_prefix_one_assign_ipv6_addresses_gets_it(tmp_path: Path) -> None:
    with ipv6_node(prefix_at_launch=False) as node:
        assert ec2_ipv6_prefixes(node) == []
        with agent_on_cloud(node, tmp_path, IPV6) as run:
            assert not ready(run)
            with pytest.raises(PoolExhausted, match="no IPv6 /80 yet"):
                address(run, 0)  # ADD answers 11 until the /80 is there
            node.cloud.requests.clear()
            run.run(run.agent.step())
            assert ready(run)
            assert node.cloud.requests.counts() == {"AssignIpv6Addresses": 1}
            (prefix,) = ec2_ipv6_prefixes(node)
            assert prefix.subnet_of(SUBNET_64) and prefix.prefixlen == 80
            assert address(run, 0) == prefix.network_address + 1
            node.cloud.requests.clear()
            run.run(run.agent.step())
            assert node.cloud.requests.count() == 0  # once held, never asked again


def test_an_assign_ec2_refuses_fails_the_step_and_the_node_stays_not_ready(
    tmp_path: Path,
) -> None:
    with ipv6_node(prefix_at_launch=False, ipv6_subnet=False) as node:
        with agent_on_cloud(node, tmp_path, IPV6) as run:
            with pytest.raises(Ec2Error, match="AssignIpv6Addresses"):
                run.run(run.agent.step())  # the subnet has no /64
            assert not ready(run)
            assert "no IPv6 /80 yet" in run.run(run.agent.status()).reason  # type: ignore[attr-defined]


def test_throttled_assign_is_retried_through_the_pacer(tmp_path: Path) -> None:
    with ipv6_node(prefix_at_launch=False) as node:
        with agent_on_cloud(node, tmp_path, IPV6) as run:
            node.cloud.requests.clear()
            node.cloud.faults.throttle_next(2, "AssignIpv6Addresses")
            run.run(run.agent.step())
            assert ready(run)
            assert node.cloud.requests.counts() == {"AssignIpv6Addresses": 3}


def test_a_restart_restores_ipv6_allocations_with_no_ec2_call(tmp_path: Path) -> None:
    env = {**IPV6, "IP_COOLDOWN_PERIOD": "30"}
    with ipv6_node(prefix_at_launch=True) as node:
        with agent_on_cloud(node, tmp_path, env) as run:
            held = {n: address(run, n) for n in range(4)}
            run.run(run.agent.release(key(1)))
        node.cloud.requests.clear()
        with agent_on_cloud(node, tmp_path, env) as again:
            assert ready(again)
            for n in (0, 2, 3):
                restored = again.agent.lookup(key(n))
                assert restored is not None and restored.leases[0].address == held[n]
            assert again.agent.lookup(key(1)) is None
            fresh = address(again, 9)
            assert fresh not in held.values() and fresh == max(held.values()) + 1
            assert not again.agent.ec2_used
        assert node.cloud.requests.count() == 0


def test_a_journal_address_imds_does_not_show_is_checked_with_ec2(tmp_path: Path) -> None:
    with ipv6_node(prefix_at_launch=False) as node:
        node.cloud.set_imds_lag(3600.0)  # IMDS keeps showing the launch: no /80
        with agent_on_cloud(node, tmp_path, IPV6) as run:
            run.run(run.agent.step())
            held = address(run, 0)
        with agent_on_cloud(node, tmp_path, IPV6) as again:
            assert again.agent.ec2_used  # IMDS and the journal disagreed: EC2 decided
            assert ready(again)
            restored = again.agent.lookup(key(0))
            assert restored is not None and restored.leases[0].address == held


def test_reconcile_drops_the_pods_of_a_prefix_ec2_took_back(tmp_path: Path) -> None:
    with ipv6_node(prefix_at_launch=True) as node:
        (prefix,) = ec2_ipv6_prefixes(node)
        with agent_on_cloud(node, tmp_path, IPV6) as run:
            address(run, 0)
            run.run(run.agent.reconcile())  # IMDS agrees: nothing changes
            assert run.agent.lookup(key(0)) is not None and not run.agent.ec2_used
            node.ec2().unassign_ipv6_addresses(
                NetworkInterfaceId=node.primary_eni(), Ipv6Prefixes=[str(prefix)]
            )
            run.run(run.agent.reconcile())
            agent = run.agent
            assert isinstance(agent, Ipv6NodeAgent)
            assert agent.lookup(key(0)) is None and agent.pool6.prefix is None
            run.run(agent.step())  # a new /80 from EC2
            (fresh,) = ec2_ipv6_prefixes(node)
            assert agent.pool6.prefix == fresh and fresh != prefix
            assert address(run, 1) in fresh
        with agent_on_cloud(node, tmp_path, IPV6) as again:  # the drop was journaled
            assert again.agent.lookup(key(0)) is None


def test_introspection_names_the_80_and_the_mode(tmp_path: Path) -> None:
    with ipv6_node(prefix_at_launch=True) as node:
        (prefix,) = ec2_ipv6_prefixes(node)
        with agent_on_cloud(node, tmp_path, IPV6) as run:
            address(run, 0)
            doc = run.agent.introspect()
            assert doc["mode"] == "ipv6"
            assert doc["cards"]["0"]["enis"][0]["ipv6_prefixes"] == [str(prefix)]
            assert doc["allocations"][0]["addresses"] == [f"0:{prefix.network_address + 1}"]
            assert doc["allocations"][0]["egress_v4"] == "169.254.172.2"  # ENABLE_V4_EGRESS
            assert doc["v4_egress"]["range"] == "169.254.172.0/22"


def test_the_host_gets_the_vpc_cni_init_ipv6_settings(tmp_path: Path) -> None:
    """IPv6 on, forwarding on, accept_ra=2 on the primary interface (found by MAC), as
    the VPC CNI's aws-vpc-cni-init sets them; here in a stand-in /sys and /proc/sys."""
    with ipv6_node(prefix_at_launch=True) as node:
        (eni,) = node.cloud.enis_of(node.instance_id)
        with agent_on_cloud(node, tmp_path / "state", IPV6) as run:
            agent = run.agent
            assert isinstance(agent, Ipv6NodeAgent)
            sys_net, proc = tmp_path / "sys", tmp_path / "proc"
            for name, mac in (("lo", "00:00:00:00:00:00"), ("ens5", eni.mac)):
                (sys_net / name).mkdir(parents=True)
                (sys_net / name / "address").write_text(mac + "\n")
            for key in ("all/disable_ipv6", "all/forwarding", "ens5/accept_ra"):
                (proc / "net/ipv6/conf" / key).parent.mkdir(parents=True, exist_ok=True)
            (proc / "net/ipv4").mkdir(parents=True)
            written = agent.configure_host(sys_net, proc)
            assert written == {
                "net/ipv6/conf/all/disable_ipv6": "0",
                "net/ipv6/conf/all/forwarding": "1",
                "net/ipv6/conf/ens5/accept_ra": "2",
                "net/ipv4/ip_forward": "1",  # ENABLE_V4_EGRESS: pods' IPv4 to the ENI
            }
            assert (proc / "net/ipv6/conf/ens5/accept_ra").read_text() == "2"
            (sys_net / "ens5" / "address").write_text("02:00:00:00:00:99\n")
            with pytest.raises(AgentError, match="no link has the primary ENI's MAC"):
                agent.configure_host(sys_net, proc)


class RecordingEgress:
    """What the agent asks of ``ipam.egress.Egress`` on an IPv6 node."""

    def __init__(self) -> None:
        self.v4_egress: list[tuple[IPv4Network, IPv4Address]] = []

    def apply_v4_egress(self, node_range: IPv4Network, node_ip: IPv4Address) -> list[str]:
        self.v4_egress.append((node_range, node_ip))
        return ["applied"]


@pytest.mark.parametrize("enabled", [True, False])
def test_the_node_snats_the_node_local_range_and_pods_get_an_egress_ipv4(
    tmp_path: Path, enabled: bool
) -> None:
    env = {**IPV6, "ENABLE_V4_EGRESS": str(enabled).lower()}
    env["ULTRANET_V4_EGRESS_RANGE"] = "198.18.4.0/22"
    with ipv6_node(prefix_at_launch=True) as node:
        (eni,) = node.cloud.enis_of(node.instance_id)
        run = AgentRun(node, config_for(tmp_path, env), ManualClock(), node.host.open)
        egress = RecordingEgress()
        run.agent._egress = egress  # type: ignore[assignment]
        try:
            run.start()
            allocation = run.run(run.agent.allocate(key(0), POD, multi_nic=False))
        finally:
            run.close()
    if enabled:
        assert egress.v4_egress == [(IPv4Network("198.18.4.0/22"), eni.primary_ip)]
        assert allocation.egress_v4 == IPv4Address("198.18.4.2")  # type: ignore[attr-defined]
    else:
        assert egress.v4_egress == []
        assert allocation.egress_v4 is None  # type: ignore[attr-defined]
