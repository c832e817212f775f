"""The VPC CNI baseline, injected faults, bursts and the JSON shape of a fleet run: small
waves of real boto3 clients and IMDS over HTTP against the emulator, bounded in time."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest

from ipam.ec2 import boto3_client
from ipam.imds import ImdsClient
from ipam.instance_types import lookup
from ipam.nau.launch import LaunchConfig
from ipam.nau.launch import run as run_model
from ipam.nau.maxpods import Mode, max_pods
from ipam.nau.vpccni_calls import NodeShape, node_calls
from tools.fleet import vpccni_agent
from tools.fleet.__main__ import main
from tools.fleet.vpccni_agent import Ec2CallFailed, VpcCniAgent, VpcCniSettings
from tools.lab.ec2.faults import FaultKind, FaultRule
from tools.lab.ec2.server import Ec2Server
from tools.lab.ec2.state import Cloud, LaunchInterface

KEYS = {  # issue 15 item 6: what every scenario object carries
    "nodes",
    "nodes_ready",
    "prefixes_at_launch",
    "ec2_calls_per_node",
    "ec2_calls_by_action",
    "throttled_calls",
    "ready_p50_s",
    "ready_p99_s",
    "ready_max_s",
    "pods_running_p99_s",
}
QUICK_SWEEP = "--vpccni-cleanup-delay-max=0.2"  # the leaked-ENI sweep, 0..0.2 s after start


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, dict[str, object]]:
    code = main([*args, "--json"])
    results: dict[str, dict[str, object]] = json.loads(capsys.readouterr().out)
    assert code == 0, {n: r["errors"] for n, r in results.items()}
    return results


def _per_node(result: dict[str, object]) -> dict[str, tuple[float, int]]:
    by_action = result["ec2_calls_by_action"]
    assert isinstance(by_action, dict)
    return {a: (v["per_node_mean"], v["per_node_max"]) for a, v in by_action.items()}


def test_each_vpc_cni_node_makes_the_calls_its_source_says(
    capsys: pytest.CaptureFixture[str],
) -> None:
    results = _run(
        capsys,
        "--nodes=3",
        "--rate=6000/min",
        "--pods-per-node=10",
        "--prefixes-at-launch=2",
        "--scenario=vpc-cni",
        "--scenario=vpc-cni-reactive",
        "--no-throttle",
        QUICK_SWEEP,
        "--timeout=60",
    )
    itype = lookup("m5.large")
    shape = NodeShape(
        itype.max_prefixes_per_eni,
        itype.max_enis_default_card,
        max_pods(itype, Mode.PREFIX).value,
    )
    for name, at_launch in (("vpc-cni", 2), ("vpc-cni-reactive", 0)):
        result = results[name]
        assert result["agent"] == "vpc-cni" and result["nodes_ready"] == 3
        expected = node_calls(shape, at_launch, pods=10)
        # Every node made exactly the data file's calls (mean == max == expected).
        assert _per_node(result) == {a: (float(n), n) for a, n in expected.items()}, name
        assert result["ec2_requests_seen_by_emulator"] == 3 * sum(expected.values())
        # This machine's side, second by second, for the model's LabHost: the requests'
        # answer times and how late the agents' own timers (back-off, pool passes) ended.
        for key in ("request_latency_by_second_s", "sleep_lag_by_second_s"):
            seconds = result[key]
            # Without prefixes at launch the node waits for pool passes (its own timers).
            assert any(seconds) or (name, key) == ("vpc-cni", "sleep_lag_by_second_s")
            for deciles in seconds:
                assert deciles == [] or (len(deciles) == 11 and deciles == sorted(deciles))
            assert all(d[0] >= 0 for d in seconds if d)
    # With prefixes at launch the start still describes, tags and modifies the ENI...
    launched = _per_node(results["vpc-cni"])
    assert {"DescribeNetworkInterfaces", "CreateTags", "ModifyNetworkInterfaceAttribute"} <= set(
        launched
    )
    assert "AssignPrivateIpAddresses" not in launched
    # ...and without them it also assigns one to become Ready and one as the pods land.
    assign = results["vpc-cni-reactive"]["ec2_calls_by_action"]["AssignPrivateIpAddresses"]  # type: ignore[index]
    assert (assign["start"], assign["pods"]) == (3, 3)


def test_baseline_json_and_chart(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    chart = tmp_path / "ready.png"
    results = _run(
        capsys,
        "--nodes=4",
        "--rate=6000/min",
        "--pods-per-node=2",
        "--scenario=ultranet",
        "--baseline=vpc-cni",
        QUICK_SWEEP,
        f"--chart={chart}",
        "--timeout=60",
    )
    assert list(results) == ["ultranet", "vpc-cni"]
    for name, result in results.items():
        assert KEYS <= set(result), KEYS - set(result)
        assert result["nodes_ready"] == result["nodes"] == 4
        assert result["agent"] == name
        assert result["prefixes_at_launch"] == 2  # the same launch template for both
        curve = result["ready_curve"]
        assert isinstance(curve, list) and curve[-1][1] == 4
        assert "fresh request buckets" in str(result["account"])
    assert results["ultranet"]["ec2_calls_per_node"] == 0
    assert results["vpc-cni"]["ec2_calls_per_node"] == 4  # DescribeENIs, tag, SGs, sweep
    assert chart.read_bytes().startswith(b"\x89PNG")


def test_a_mass_restart_of_aws_node_starts_again_from_the_checkpoint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Rolling the aws-node DaemonSet (issue 15 (e)): a new process on every node runs
    # nodeInit again: DescribeAllENIs, each ENI's security groups (RefreshSGIDs' cache
    # starts empty) and the leaked-ENI sweep, but no CreateTags (the ENI has its tag) and
    # no Assign or Unassign: the checkpoint gives the pool its pods back.
    results = _run(
        capsys,
        "--nodes=3",
        "--rate=6000/min",
        "--pods-per-node=10",
        "--prefixes-at-launch=2",
        "--scenario=ultranet",
        "--baseline=vpc-cni",
        "--restart",
        "--no-throttle",
        QUICK_SWEEP,
        "--timeout=60",
    )
    restart = results["vpc-cni"]["restart"]
    assert isinstance(restart, dict)
    assert restart["nodes"] == restart["nodes_ready_again"] == 3
    assert restart["ec2_calls_by_action"] == {
        "DescribeNetworkInterfaces": 2 * 3,
        "ModifyNetworkInterfaceAttribute": 3,
    }
    assert restart["ec2_requests_seen_by_emulator"] == 9
    assert restart["allocations_before"] == 3 * 10
    assert restart["allocations_lost"] == restart["addresses_duplicated"] == 0
    assert restart["throttled_calls"] == restart["vpccni_init_failures"] == 0
    # One shape for both agents, and the model's (its clock keys aside).
    ultranet = results["ultranet"]["restart"]
    assert isinstance(ultranet, dict) and set(restart) == set(ultranet)
    model = run_model(
        LaunchConfig(
            nodes=3,
            rate_per_min=6000,
            prefixes_at_launch=2,
            agent="vpc-cni",
            restart=True,
            vpccni_cleanup_delay_max_s=0.2,
        )
    )["restart"]
    assert set(model) - {"simulated_s"} == set(restart) - {
        "ec2_requests_seen_by_emulator",
        "wall_s",
    }
    assert model["ec2_calls_by_action"] == restart["ec2_calls_by_action"]


def test_the_checkpoint_keeps_the_pods_whose_prefix_the_node_still_holds(
    tmp_path: Path,
) -> None:
    # datastore.ReadBackingStore: each pod back on the prefix holding its address; one
    # whose prefix is gone is dropped as stale, and the file rewritten without it.
    checkpoint = tmp_path / "ipam.json"

    async def agent(prefixes: list[str]) -> VpcCniAgent:
        node = VpcCniAgent(
            ImdsClient("http://127.0.0.1:9"),  # not reached
            lambda region: None,
            _Stats(),
            VpcCniSettings(NodeShape(max_prefixes_per_eni=9, max_enis=3)),
            _NoJitter(),
            checkpoint=checkpoint,
        )
        node._enis = [vpccni_agent._Eni("eni-1", 0, {p: {} for p in prefixes})]
        await node._restore()
        return node

    async def restarts() -> None:
        first = await agent(["100.64.0.16/28", "100.64.0.32/28"])
        await asyncio.gather(
            *(
                first.allocate(f"pod-{pod}", None, multi_nic=False, origin="cni")
                for pod in range(17)
            )
        )
        held = first.allocations_held()
        assert len(set(held.values())) == 17  # one address each, 16 in the first prefix
        assert (await agent(["100.64.0.16/28", "100.64.0.32/28"])).allocations_held() == held
        kept = {pod: a for pod, a in held.items() if int(a.split(".")[3]) < 32}
        assert len(kept) == 16
        assert (await agent(["100.64.0.16/28"])).allocations_held() == kept
        assert (await agent(["100.64.0.16/28", "100.64.0.32/28"])).allocations_held() == kept

    asyncio.run(restarts())


def test_injected_5xx_are_retried_and_latency_slows_every_call(
    capsys: pytest.CaptureFixture[str],
) -> None:
    results = _run(
        capsys,
        "--nodes=4",
        "--rate=6000/min",
        "--pods-per-node=2",
        "--scenario=ultranet-reactive",
        "--baseline=vpc-cni",
        "--faults=5xx=0.3,latency=100ms",
        QUICK_SWEEP,
        "--timeout=120",
    )
    for result in results.values():
        assert result["nodes_ready"] == 4
        assert result["faults"] == [
            {"kind": "latency", "probability": 1.0, "latency_s": 0.1},
            {"kind": "internal", "probability": 0.3, "latency_s": 0.0},
        ]
        errors = result["ec2_errors"]
        assert isinstance(errors, dict) and errors.get("InternalError", 0) > 0
        assert isinstance(result["retries"], int) and result["retries"] > 0
        # Each injected 500 is EC2's own answer, counted alike on both sides.
        assert result["ec2_errors_answered_by_emulator"] == errors
        assert result["clients_and_emulator_disagree"] == []
    # The VPC CNI makes four calls in a row before Ready (describe, tag, groups, assign),
    # each at least 100 ms now.
    ready = results["vpc-cni-reactive"]["ready_p50_s"]
    assert isinstance(ready, float) and ready >= 0.4


def test_bursts_launch_n_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    results = _run(
        capsys,
        "--nodes=4",
        "--burst=2/1s",
        "--pods-per-node=1",
        "--scenario=ultranet",
        "--timeout=60",
    )
    result = results["ultranet"]
    assert result["launch"] == "bursts of 2 every 1 s"
    times = [t for t, _ in result["ready_curve"]]  # type: ignore[union-attr]
    # Two launched at 0 s, two at 1 s; each Ready within a fraction of a second.
    assert sum(1 for t in times if t < 0.9) == 2
    assert sum(1 for t in times if t >= 1.0) == 2
    # A burst's instances are launched one after another: the second of each is behind
    # its slot by the first's launch, and the JSON says by how much.
    lag = result["launch_lag_max_s"]
    assert isinstance(lag, float) and 0.0 < lag < 0.9


def test_bad_fault_and_burst_specs_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("--faults=5xx=2", "--faults=teapot=0.1", "--burst=0/1s", "--burst=10"):
        with pytest.raises(SystemExit) as caught:
            main(["--nodes=2", bad])
        assert caught.value.code == 2
        assert capsys.readouterr().err
    assert main(["--nodes=2", "--vpccni-env=MAX_ENI=2"]) == 2
    assert "WARM_PREFIX_TARGET" in capsys.readouterr().err


class _NoJitter(random.Random):
    """Every random back-off at its lower bound: the SDK's full jitter sleeps 0 s."""

    def uniform(self, a: float, b: float) -> float:
        return a


class _Stats:
    def request(self, action: str, latency_s: float, error_code: str | None) -> None:
        pass

    def retry(self, action: str, code: str, delay_s: float) -> None:
        pass

    def slept(self, due_at: float, lateness_s: float) -> None:
        pass


@pytest.mark.parametrize(
    ("failing", "cleanup"),
    [
        ("AttachNetworkInterface", ["DeleteNetworkInterface"]),
        (
            "ModifyNetworkInterfaceAttribute",
            ["DescribeNetworkInterfaces", "DetachNetworkInterface", "DeleteNetworkInterface"],
        ),
    ],
)
def test_an_eni_the_vpc_cni_could_not_set_up_is_freed_as_alloc_eni_does(
    monkeypatch: pytest.MonkeyPatch, failing: str, cleanup: list[str]
) -> None:
    # awsutils.AllocENI: an ENI it cannot attach is deleted (deleteENI); one it cannot
    # mark DeleteOnTermination is detached and deleted (FreeENI). Otherwise it is left in
    # the subnet, holding addresses, and the next pool pass makes another.
    monkeypatch.setattr(vpccni_agent, "SLEEP_AFTER_DETACH_S", 0.0)
    cloud = Cloud(seed=3)
    vpc = cloud.create_vpc(["100.64.0.0/16"])
    subnet = cloud.create_subnet(vpc.vpc_id, "100.64.0.0/20", "us-west-2a", {})
    instance = cloud.launch_instance(
        "m5.large", subnet.subnet_id, interfaces=[LaunchInterface(0, 0, ipv4_prefix_count=1)]
    )
    server = Ec2Server(cloud)
    url = server.start()
    client: Any = None
    try:
        client = boto3_client(
            "us-west-2", url, aws_access_key_id="lab", aws_secret_access_key="lab"
        )
        shape = NodeShape(max_prefixes_per_eni=9, max_enis=3)
        agent = VpcCniAgent(
            ImdsClient("http://127.0.0.1:9"),  # not reached: the failure comes first
            lambda region: client,
            _Stats(),
            VpcCniSettings(shape),
            _NoJitter(),
        )
        agent._client = client
        agent._instance_id, agent._vpc_id = instance.instance_id, vpc.vpc_id
        agent._az, agent._subnet_id = "us-west-2a", subnet.subnet_id
        agent._groups = ("sg-1",)
        (primary,) = (e.eni_id for e in cloud.enis_of(instance.instance_id))
        mark = len(cloud.requests.records())
        cloud.faults.add(FaultRule(FaultKind.INTERNAL, action=failing))
        with pytest.raises(Ec2CallFailed):
            asyncio.run(agent._allocate_eni(1))
        actions = [r.action for r in cloud.requests.records()[mark:]]
        assert actions.count(failing) == 3  # the SDK's attempts
        assert actions[-len(cleanup) :] == cleanup
        # Only the primary ENI is left, attached or not: the new one is gone.
        assert [e.eni_id for e in cloud.enis()] == [primary]
    finally:
        if client is not None:
            client.close()
        server.close()
