"""Metrics of ``ultranet-ipamd``: the README's list is what the daemon's registry exports,
names and labels, and each metric moves by the exact amount its behaviour calls for (here,
or beside the behaviour it counts: the stray sweeps in ``test_daemon_cni.py``, as root).

Values are read from the agent's own registry, the one ``/metrics`` serves."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from cni import transport
from cni.handler import CniHandler
from ipam import agent as agent_module
from ipam.agent import NodeIdentity
from ipam.cni_backend import AgentBackend
from ipam.config import load_config
from ipam.datastore_errors import PoolExhausted
from ipam.ec2 import Ec2Client, Ec2RetriesExhausted, boto3_client
from ipam.metrics import IpamdMetrics
from tests.cni.harness import conf, env
from tests.cni.recording_plumbing import RecordingPlumbing
from tests.ipam.agentenv import POD, AgentRun, ManualClock, key
from tests.ipam.cloudnode import CloudNode, agent_on_cloud, cloud_node
from tools.lab.ec2.faults import FaultKind, FaultRule
from tools.lab.lab import CNI_SUBNET_TAG, LabConfig, SubnetSpec

REPO = Path(__file__).resolve().parents[2]
README = REPO / "ipam" / "README.md"
TESTS = REPO / "tests" / "ipam"
ASSIGN = "AssignPrivateIpAddresses"


@pytest.fixture
def m5() -> Iterator[CloudNode]:
    """An m5.large (one card, 9 prefixes per ENI) launched with one prefix."""
    with cloud_node(LabConfig(instance_type="m5.large", prefixes_per_card=1)) as node:
        yield node


def sample(run: AgentRun, name: str, **labels: str) -> float | None:
    """A sample of the agent's registry; None while the labelled child does not exist."""
    return run.agent.metrics.registry.get_sample_value(name, labels)


# -- the README's list --------------------------------------------------------------------


def readme_metrics() -> dict[str, tuple[str, ...]]:
    """Name -> label names, from the Metrics section: the first name is written out and
    the others as ``_suffix`` of its prefix (``ultranet_ipamd``)."""
    section = README.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"`(ultranet_ipamd)?(_[a-z0-9_]+)(?:\{([a-z_,]*)\})?`", section)
    assert found and found[0][0], "the first metric of the section is written in full"
    return {
        "ultranet_ipamd" + suffix: tuple(labels.split(",")) if labels else ()
        for _, suffix, labels in found
    }


def exported(metrics: IpamdMetrics) -> dict[str, tuple[str, ...]]:
    """Name (a counter with its ``_total``, as a scrape shows it) -> label names."""
    families = {
        f.name + ("_total" if f.type == "counter" else "") for f in metrics.registry.collect()
    }
    collectors = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    labelled = {
        c._name + ("_total" if c._type == "counter" else ""): tuple(c._labelnames)
        for c in collectors
    }
    # Every family registered is one of these objects: none comes with no labels known.
    assert families == set(labelled)
    return labelled


def test_the_readme_lists_every_exported_metric_with_its_labels_and_no_other(
    m5: CloudNode, tmp_path: Path
) -> None:
    with agent_on_cloud(m5, tmp_path) as run:
        assert exported(run.agent.metrics) == readme_metrics()


def test_every_metric_in_the_readme_is_asserted_by_a_test() -> None:
    asserted: set[str] = set()
    for path in TESTS.glob("test_*.py"):
        asserted |= set(re.findall(r"\"(ultranet_ipamd_[a-z0-9_]+)\"", path.read_text()))
    asserted |= {re.sub(r"_(count|sum|bucket)$", "", name) for name in asserted}
    missing = set(readme_metrics()) - asserted
    assert not missing, f"no test asserts: {sorted(missing)}"


# -- the pool -------------------------------------------------------------------------------


def test_pool_gauges_follow_allocations_cooldown_prefixes_and_enis(
    m5: CloudNode, tmp_path: Path
) -> None:
    clock = ManualClock()
    with agent_on_cloud(m5, tmp_path, {"IP_COOLDOWN_PERIOD": "30"}, clock) as run:

        def gauges() -> tuple[float | None, ...]:
            """(assigned, cooldown, total, prefixes, ENIs) of card 0."""
            return (
                sample(run, "ultranet_ipamd_addresses_assigned", card="0"),
                sample(run, "ultranet_ipamd_addresses_cooldown", card="0"),
                sample(run, "ultranet_ipamd_addresses_total", card="0"),
                sample(run, "ultranet_ipamd_prefixes", card="0"),
                sample(run, "ultranet_ipamd_enis", card="0"),
            )

        assert gauges() == (0, 0, 16, 1, 1)  # the launch prefix, on the primary ENI
        run.allocate_pods(20)  # the pool grows past its first prefix
        run.converge()
        prefixes = len(m5.cloud.eni(m5.primary_eni()).prefixes)
        assert prefixes == 3  # 20 pods and one prefix warm
        assert gauges() == (20, 0, 16 * prefixes, prefixes, 1)
        for n in range(5):
            run.run(run.agent.release(key(n)))
        run.run(run.agent.step())  # the pool pass publishes the gauges
        assert gauges() == (15, 5, 16 * prefixes, prefixes, 1)
        clock.advance(30)
        run.run(run.agent.step())
        assert gauges()[:2] == (15, 0)


def test_second_eni_is_counted_in_enis(m5: CloudNode, tmp_path: Path) -> None:
    # Nine prefixes fill the primary ENI (m5.large): the tenth needs another ENI.
    with agent_on_cloud(m5, tmp_path, {"WARM_PREFIX_TARGET": "10"}) as run:
        assert sample(run, "ultranet_ipamd_enis", card="0") == 1
        run.converge()
        assert sample(run, "ultranet_ipamd_enis", card="0") == 2
        assert sample(run, "ultranet_ipamd_prefixes", card="0") == 10
        assert sample(run, "ultranet_ipamd_addresses_total", card="0") == 160


def test_ready_turns_1_once_the_warm_target_is_met(m5: CloudNode, tmp_path: Path) -> None:
    with agent_on_cloud(m5, tmp_path, {"WARM_PREFIX_TARGET": "3"}) as run:
        assert sample(run, "ultranet_ipamd_ready") == 0  # one prefix of three
        run.converge()
        assert sample(run, "ultranet_ipamd_ready") == 1


# -- whole CNI commands -----------------------------------------------------------------


def test_cni_command_seconds_counts_each_answered_command_by_command_and_code(
    m5: CloudNode, tmp_path: Path
) -> None:
    # The daemon's composition: the handler on the agent, served with the metrics as the
    # transport's observer (ipam/cli.py); the plumbing recorded, so no root is needed.
    with agent_on_cloud(m5, tmp_path / "state") as run:
        handler = CniHandler(AgentBackend(run.agent), RecordingPlumbing())
        sock = tmp_path / "cni.sock"
        server = run.run(transport.serve(sock, handler.handle, run.agent.metrics.cni_command))
        assert isinstance(server, transport.CniServer)

        def call(variables: dict[str, str], stdin: bytes = conf()) -> int:
            code, _ = run.run(transport.call(sock, variables, stdin))
            assert isinstance(code, int)
            return code

        try:
            for n in range(3):
                assert call(env("ADD", f"c{n}", f"/run/netns/c{n}")) == 0
            no_pod_name = env("ADD", "c9", "/run/netns/c9", CNI_ARGS="K8S_POD_NAMESPACE=a")
            assert call(no_pod_name) == 1  # code 4, CNI_ARGS lacks K8S_POD_NAME
            for n in range(2):
                assert call(env("DEL", f"c{n}", f"/run/netns/c{n}")) == 0
            assert call(env("CHECK", "c2", "/run/netns/c2")) == 1  # code 7: no prevResult
            assert call(env("VERSION")) == 0
            assert call(env("FROB")) == 1  # code 4, counted as "other"
        finally:
            server.close()
            run.run(server.wait_closed())  # every answer sent has been observed

    def count(command: str, code: str) -> float | None:
        name = "ultranet_ipamd_cni_command_seconds_count"
        return sample(run, name, command=command, code=code)

    assert count("ADD", "0") == 3
    assert count("ADD", "4") == 1
    assert count("DEL", "0") == 2
    assert count("CHECK", "7") == 1
    assert count("VERSION", "0") == 1
    assert count("other", "4") == 1
    counted = sum(
        s.value
        for family in run.agent.metrics.registry.collect()
        if family.name == "ultranet_ipamd_cni_command_seconds"
        for s in family.samples
        if s.name.endswith("_count")
    )
    assert counted == 9  # and no other command or code
    # Each sample is one command's time: the ADDs' sum is the sum of three positive times.
    added = sample(run, "ultranet_ipamd_cni_command_seconds_sum", command="ADD", code="0")
    assert added is not None and added > 0


# -- allocations and the journal ------------------------------------------------------------


def test_allocation_seconds_counts_each_allocation_and_release(
    m5: CloudNode, tmp_path: Path
) -> None:
    with agent_on_cloud(m5, tmp_path) as run:
        for n in range(3):
            run.run(run.agent.allocate(key(n), POD, multi_nic=False))
        run.run(run.agent.release(key(0)))
        count = "ultranet_ipamd_allocation_seconds_count"
        assert sample(run, count, op="allocate") == 3
        assert sample(run, count, op="release") == 1


def test_an_allocation_refused_for_an_empty_pool_counts_as_exhausted(
    m5: CloudNode, tmp_path: Path
) -> None:
    with agent_on_cloud(m5, tmp_path) as run:
        errors = "ultranet_ipamd_allocation_errors_total"
        assert sample(run, errors, reason="exhausted") == 0
        for n in range(16):  # the launch prefix, whole
            run.run(run.agent.allocate(key(n), POD, multi_nic=False))
        assert sample(run, errors, reason="exhausted") == 0
        for n in (16, 17):
            with pytest.raises(PoolExhausted):
                run.run(run.agent.allocate(key(n), POD, multi_nic=False))
        assert sample(run, errors, reason="exhausted") == 2
        # A refused ADD is not an allocation: its latency is not observed.
        assert sample(run, "ultranet_ipamd_allocation_seconds_count", op="allocate") == 16


def test_journal_sync_seconds_counts_each_group_commit_by_where_it_ran(
    m5: CloudNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs = "ultranet_ipamd_journal_sync_seconds_count"
    with agent_on_cloud(m5, tmp_path) as run:
        for n in range(3):
            run.run(run.agent.allocate(key(n), POD, multi_nic=False))
        assert sample(run, syncs, mode="inline") == 3
        assert sample(run, syncs, mode="thread") == 0
        monkeypatch.setattr(agent_module, "SLOW_SYNC_S", 0.0)  # every inline sync is slow
        run.run(run.agent.allocate(key(3), POD, multi_nic=False))  # slow: the next go off-loop
        run.run(run.agent.release(key(0)))
        run.run(run.agent.allocate(key(4), POD, multi_nic=False))
        assert sample(run, syncs, mode="inline") == 4
        assert sample(run, syncs, mode="thread") == 2


# -- EC2 ------------------------------------------------------------------------------------


def test_ec2_requests_latency_errors_and_retries_of_throttled_calls(
    m5: CloudNode, tmp_path: Path
) -> None:
    with agent_on_cloud(m5, tmp_path, {"WARM_PREFIX_TARGET": "4"}) as run:
        m5.cloud.requests.clear()
        m5.cloud.faults.throttle_next(2, ASSIGN)  # a call retries a throttle twice at most
        run.converge()
        calls = m5.cloud.requests.counts()
        assert calls[ASSIGN] == 3  # 2 throttled, then 1 that asked for all 3
        for action, count in calls.items():  # each attempt is a request, as EC2 saw it
            assert sample(run, "ultranet_ipamd_ec2_requests_total", action=action) == count
            assert sample(run, "ultranet_ipamd_ec2_request_seconds_count", action=action) == count
        code = "RequestLimitExceeded"
        assert sample(run, "ultranet_ipamd_ec2_errors_total", action=ASSIGN, code=code) == 2
        assert sample(run, "ultranet_ipamd_ec2_retries_total", action=ASSIGN, code=code) == 2
        assert sample(run, "ultranet_ipamd_ec2_request_seconds_sum", action=ASSIGN) > 0  # type: ignore[operator]


def test_a_call_that_fails_every_attempt_counts_one_retry_fewer_than_errors(
    m5: CloudNode, tmp_path: Path
) -> None:
    with agent_on_cloud(m5, tmp_path, {"WARM_PREFIX_TARGET": "3"}) as run:
        m5.cloud.requests.clear()
        m5.cloud.faults.add(FaultRule(FaultKind.UNAVAILABLE, ASSIGN))
        with pytest.raises(Ec2RetriesExhausted):
            run.run(run.agent.step())
        attempts = m5.cloud.requests.count(ASSIGN)
        assert attempts == 8  # the client's max_attempts
        errors = sample(run, "ultranet_ipamd_ec2_errors_total", action=ASSIGN, code="Unavailable")
        retries = sample(run, "ultranet_ipamd_ec2_retries_total", action=ASSIGN, code="Unavailable")
        assert (errors, retries) == (attempts, attempts - 1)
        assert sample(run, "ultranet_ipamd_ec2_requests_total", action=ASSIGN) == attempts


def test_insufficient_cidr_blocks_counts_per_subnet_and_is_not_retried(tmp_path: Path) -> None:
    # The instance's subnet is a /27: its first /28 holds EC2's reserved addresses and the
    # instance's, its last one the broadcast address, so no /28 is left for a prefix and
    # the agent has to take an ENI in the other subnet.
    subnets = (
        SubnetSpec("100.64.0.0/27", "us-west-2a", {CNI_SUBNET_TAG: "1"}),
        SubnetSpec("100.64.1.0/24", "us-west-2a", {CNI_SUBNET_TAG: "1"}),
    )
    config = LabConfig(instance_type="m5.large", prefixes_per_card=0, subnets=subnets)
    with cloud_node(config) as node, agent_on_cloud(node, tmp_path) as run:
        full, other = node.subnet_ids
        run.converge()
        assert sample(run, "ultranet_ipamd_insufficient_cidr_blocks_total", subnet=full) == 1
        assert sample(run, "ultranet_ipamd_insufficient_cidr_blocks_total", subnet=other) is None
        code = "InsufficientCidrBlocks"
        assert sample(run, "ultranet_ipamd_ec2_errors_total", action=ASSIGN, code=code) == 1
        assert sample(run, "ultranet_ipamd_ec2_retries_total", action=ASSIGN, code=code) is None
        assert sample(run, "ultranet_ipamd_enis", card="0") == 2


class SteppedClock:
    """The EC2 client's clock: it moves only when the client sleeps, so each wait on
    the token bucket is exactly what the bucket asked for."""

    def __init__(self) -> None:
        self.now = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def test_ec2_rate_limited_seconds_add_up_the_client_buckets_waits(
    m5: CloudNode, tmp_path: Path
) -> None:
    env = {"ULTRANET_EC2_RATE": "4", "ULTRANET_EC2_BURST": "1", "WARM_PREFIX_TARGET": "4"}
    config = load_config({"ULTRANET_STATE_DIR": str(tmp_path), **env})
    clock = SteppedClock()

    def limited_client(node: NodeIdentity, metrics: IpamdMetrics) -> Ec2Client:
        return Ec2Client(
            node.region,
            endpoint_url=m5.ec2_url,
            stats=metrics,
            rate_per_s=config.ec2_rate,
            burst=config.ec2_burst,
            base_delay_s=0.0,  # a retry sleeps 0 s: only the bucket moves the clock
            clock=clock,
            sleep=clock.sleep,
            client_factory=lambda region, url: boto3_client(
                region, url, aws_access_key_id="lab", aws_secret_access_key="lab"
            ),
        )

    with agent_on_cloud(m5, tmp_path, env, ec2=limited_client) as run:
        m5.cloud.requests.clear()
        # 5xx, not throttles: a throttle would also slow the action's pacer
        m5.cloud.faults.add(FaultRule(FaultKind.INTERNAL, ASSIGN, count=3))
        run.converge()
        assert m5.cloud.requests.counts() == {ASSIGN: 4}
        # One token: the first call goes at once, each other waits 1/rate = 0.25 s.
        waited = sample(run, "ultranet_ipamd_ec2_rate_limited_seconds_total", action=ASSIGN)
        assert waited == 3 * 0.25 == clock.now


# -- EC2 taking things away -----------------------------------------------------------------


def test_force_removed_counts_pods_on_an_eni_ec2_says_is_gone(
    m5: CloudNode, tmp_path: Path
) -> None:
    env = {"IP_COOLDOWN_PERIOD": "0", "WARM_PREFIX_TARGET": "0", "WARM_IP_TARGET": "1"}
    with agent_on_cloud(m5, tmp_path, env) as run:
        ec2 = m5.ec2()
        extra = ec2.create_network_interface(SubnetId=m5.subnet_ids[0], Ipv4PrefixCount=1)[
            "NetworkInterface"
        ]["NetworkInterfaceId"]
        attachment = ec2.attach_network_interface(
            NetworkInterfaceId=extra, InstanceId=m5.instance_id, DeviceIndex=1
        )["AttachmentId"]
        run.run(run.agent.reconcile())  # adopted
        run.allocate_pods(32)  # both prefixes, whole
        on_extra = [a for a in run.agent.allocations() if a.leases[0].eni_id == extra]
        assert len(on_extra) == 16
        assert sample(run, "ultranet_ipamd_force_removed_allocations_total") == 0
        ec2.detach_network_interface(AttachmentId=attachment)
        run.run(run.agent.reconcile())
        assert sample(run, "ultranet_ipamd_force_removed_allocations_total") == 16


def test_force_removed_counts_pods_on_a_prefix_ec2_took_back(m5: CloudNode, tmp_path: Path) -> None:
    with agent_on_cloud(m5, tmp_path, {"WARM_PREFIX_TARGET": "2"}) as run:
        run.converge()
        for n in range(20):  # 16 on the first prefix, 4 on the second
            run.run(run.agent.allocate(key(n), POD, multi_nic=False))
        prefix = run.agent.lookup(key(19)).leases[0].prefix  # type: ignore[union-attr]
        m5.ec2().unassign_private_ip_addresses(
            NetworkInterfaceId=m5.primary_eni(), Ipv4Prefixes=[str(prefix)]
        )
        run.run(run.agent.reconcile())
        assert sample(run, "ultranet_ipamd_force_removed_allocations_total") == 4


def test_force_removed_counts_journal_allocations_dropped_at_restart(
    m5: CloudNode, tmp_path: Path
) -> None:
    with agent_on_cloud(m5, tmp_path) as run:
        for n in range(3):
            run.run(run.agent.allocate(key(n), POD, multi_nic=False))
        assert sample(run, "ultranet_ipamd_force_removed_allocations_total") == 0
        (prefix,) = m5.cloud.eni(m5.primary_eni()).prefixes
    # Taken back while the daemon was down: IMDS and EC2 agree it is gone.
    m5.ec2().unassign_private_ip_addresses(
        NetworkInterfaceId=m5.primary_eni(), Ipv4Prefixes=[str(prefix)]
    )
    with agent_on_cloud(m5, tmp_path) as again:
        assert again.agent.allocations() == []
        assert sample(again, "ultranet_ipamd_force_removed_allocations_total") == 3
