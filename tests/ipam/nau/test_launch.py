"""The launch model: the agents' calls, EC2's buckets, and the CLI around them."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from ipam.instance_types import lookup
from ipam.nau import launch
from ipam.nau import vpccni_calls as vpccni
from ipam.nau.cli import main
from ipam.nau.launch import Faults, LabHost, LaunchConfig, Timings, draw, load_timings, run
from ipam.nau.throttle import BucketSpec, load_table

KEYS = {  # what issue 15 asks every scenario object to carry, as tools/fleet does
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
    "ready_nodes_per_min",
    "nau_used",
    "subnet_addresses_used",
}
TIMINGS = Timings(start_s=0.01, ec2_client_s=0.02, ec2_call_s=0.001, allocate_s=0.002)


def _calls(result: dict[str, object]) -> dict[str, int]:
    by_action = result["ec2_calls_by_action"]
    assert isinstance(by_action, dict)
    return {a: v["total"] for a, v in by_action.items()}


# 1 prefix with MINIMUM_IP_TARGET=16 holds 10 pods (auto's m5.large choice).
AUTO_WAVE = LaunchConfig(
    nodes=300,
    rate_per_min=2000,
    pods_per_node=10,
    prefixes_at_launch=1,
    env={"MINIMUM_IP_TARGET": "16"},
    throttle=load_table(),
    timings=TIMINGS,
)


def test_prefixes_at_launch_the_warm_plan_keeps_make_no_call() -> None:
    config = AUTO_WAVE
    result = run(config)
    assert result["nodes_ready"] == 300 and not result["timed_out"]
    assert result["ec2_calls_per_node"] == 0 and result["throttled_calls"] == 0
    assert result["ready_p99_s"] == TIMINGS.start_s
    # The planner's units: the primary address and one prefix (2 NAU), 1 + 16 addresses.
    assert (result["nau_used"], result["subnet_addresses_used"]) == (600, 300 * 17)


def test_shipped_warm_target_gives_back_a_spare_launch_prefix_before_slow_pods() -> None:
    # Two at launch, WARM_PREFIX_TARGET=1: the pass 5 s after Ready releases one, and the
    # pods, bound at 10/s over 20 s, need it again (tools/fleet measured the same).
    config = LaunchConfig(
        nodes=20,
        rate_per_min=6000,
        pods_per_node=10,
        pod_rate_per_s=10,
        prefixes_at_launch=2,
        timings=TIMINGS,
    )
    calls = _calls(run(config))
    assert calls["UnassignPrivateIpAddresses"] > 0
    assert calls["AssignPrivateIpAddresses"] == calls["UnassignPrivateIpAddresses"]
    pinned = run(replace(config, env={"MINIMUM_IP_TARGET": "26"}))
    assert pinned["ec2_calls_per_node"] == 0


def test_reactive_node_calls_once_to_be_ready_and_once_when_its_pods_land() -> None:
    config = LaunchConfig(nodes=40, rate_per_min=600, pods_per_node=10, timings=TIMINGS)
    result = run(config)
    assert _calls(result) == {"AssignPrivateIpAddresses": 80}
    assert result["ec2_calls_by_action"]["AssignPrivateIpAddresses"]["start"] == 40
    # start, the EC2 client, one request: nothing else stands between launch and Ready.
    expected = TIMINGS.start_s + TIMINGS.ec2_client_s + TIMINGS.ec2_call_s
    assert result["ready_max_s"] == pytest.approx(expected, abs=1e-3)


def test_the_accounts_bucket_sets_the_pace_of_a_reactive_wave() -> None:
    # 300 nodes need 600 Assigns; the bucket gives 100 at once, then 5 a second, so the
    # last can come no sooner than (600 - 100) / 5 = 100 s after the first.
    table = load_table()
    config = LaunchConfig(
        nodes=300, rate_per_min=6000, pods_per_node=10, throttle=table, timings=TIMINGS
    )
    result = run(config)
    spec = table.limit("AssignPrivateIpAddresses").spec
    earliest = (600 - spec.capacity) / spec.refill_per_s
    assert result["nodes_ready"] == 300
    assert _calls(result)["AssignPrivateIpAddresses"] == 600 + result["throttled_calls"]
    assert result["throttled_calls"] > 0
    assert result["simulated_s"] >= earliest  # the wave settles with its last Assign
    # The pacer keeps the storm down: a handful of refusals per success, not dozens.
    assert result["throttled_calls"] / 600 < 3
    raised = run(
        replace(
            config, throttle=table.with_buckets({"AssignPrivateIpAddresses": BucketSpec(1000, 100)})
        )
    )
    assert raised["throttled_calls"] == 0
    assert raised["ready_max_s"] < 1.0


def test_vpc_cni_counts_match_the_call_table_when_nothing_is_throttled() -> None:
    itype = lookup("m5.large")
    shape = vpccni.NodeShape(itype.max_prefixes_per_eni, itype.card(0).max_interfaces)
    for prefixes in (0, 2):
        config = LaunchConfig(
            nodes=30,
            rate_per_min=600,
            pods_per_node=10,
            prefixes_at_launch=prefixes,
            agent="vpc-cni",
            timings=TIMINGS,
        )
        result = run(config)
        expected = vpccni.node_calls(shape, prefixes, 10)
        assert _calls(result) == {a: n * 30 for a, n in expected.items()}, prefixes


def test_server_errors_are_retried_and_every_node_gets_ready() -> None:
    config = LaunchConfig(
        nodes=200,
        rate_per_min=6000,
        pods_per_node=10,
        faults=Faults(internal=0.2, unavailable=0.1, latency_s=0.5),
        timings=TIMINGS,
    )
    result = run(config)
    assert result["nodes_ready"] == 200
    assert result["retries"] > 0 and result["throttled_calls"] == 0
    # Every node's start Assign takes at least the injected latency.
    assert result["ready_p50_s"] >= 0.5


def test_bursts_launch_nodes_together() -> None:
    config = LaunchConfig(nodes=100, rate_per_min=600, pods_per_node=0, burst=50, timings=TIMINGS)
    result = run(config)
    # Two bursts: at 0 s and 5 s (50 nodes at 10 a second).
    assert result["ready_nodes_by_minute"] == [100]
    assert result["simulated_s"] >= 5.0


def test_a_real_runs_launches_are_replayed_as_made() -> None:
    # A real wave on a loaded machine launches late; the model, held to it, plays the
    # launches it made. Replaying a steady schedule is that schedule; replaying a late
    # one spreads the wave, so fewer requests meet an empty bucket.
    table = load_table().with_buckets({"AssignPrivateIpAddresses": BucketSpec(20, 5)})
    steady = LaunchConfig(
        nodes=100, rate_per_min=2000, pods_per_node=2, throttle=table, timings=TIMINGS
    )
    on_time = tuple(i * 60.0 / 2000 for i in range(100))
    late = tuple(i * 0.2 for i in range(100))
    scheduled, replayed = run(steady), run(replace(steady, launch_at_s=on_time))
    keys = ("ec2_calls_by_action", "throttled_calls", "ready_p50_s", "ready_p99_s")
    assert {k: replayed[k] for k in keys} == {k: scheduled[k] for k in keys}
    assert scheduled["throttled_calls"] > 0
    spread = run(replace(steady, launch_at_s=late))
    assert spread["nodes_ready"] == 100
    assert spread["throttled_calls"] < scheduled["throttled_calls"]
    assert "replayed" in spread["launch"]
    with pytest.raises(ValueError, match="launch times"):
        replace(steady, launch_at_s=on_time[:10])
    with pytest.raises(ValueError, match="launch order"):
        replace(steady, launch_at_s=tuple(reversed(on_time)))


# The VPC CNI's start storm of the calibration test, small: 150 nodes at 2,000/min against
# AWS's DescribeNetworkInterfaces bucket (50, 10/s), 2 prefixes at launch, no pods.
VPCCNI_STORM = LaunchConfig(
    nodes=150,
    rate_per_min=2000,
    pods_per_node=0,
    prefixes_at_launch=2,
    agent="vpc-cni",
    throttle=load_table(),
    vpccni_cleanup_delay_max_s=5.0,
    timings=TIMINGS,
)


def _lab(first: float, latency: float, lag: float, nodes: int = 150) -> LabHost:
    return LabHost((first,) * nodes, ((latency, latency),), ((lag, lag),))


def test_a_lab_like_the_timings_plays_the_same_wave() -> None:
    # The lab's host replayed with the shipped timings' values (first request after
    # start and client, every answer ec2_call_s, sleeps on time) is the wave as before.
    same = _lab(TIMINGS.start_s + TIMINGS.ec2_client_s, TIMINGS.ec2_call_s, 0.0)
    keys = ("ec2_calls_by_action", "throttled_calls", "ready_p50_s", "ready_p99_s")
    before, replayed = run(VPCCNI_STORM), run(replace(VPCCNI_STORM, lab=same))
    assert {k: replayed[k] for k in keys} == {k: before[k] for k in keys}
    assert before["throttled_calls"] > VPCCNI_STORM.nodes  # the storm this is about


def test_the_labs_first_requests_answers_and_late_sleeps_are_replayed() -> None:
    calm = replace(VPCCNI_STORM, throttle=None)
    # Unthrottled: Ready = the first request + DescribeAllENIs, CreateTags, Modify.
    late = run(replace(calm, lab=_lab(2.0, 0.25, 0.0)))
    assert late["ready_p50_s"] == pytest.approx(2.0 + 3 * 0.25)
    assert late["ready_p99_s"] == pytest.approx(2.0 + 3 * 0.25)

    # In the storm, a node that waits longer between its attempts makes fewer of them
    # while the bucket's 10 tokens a second set who is Ready when.
    def describes(result: dict[str, object]) -> float:
        by_action = result["ec2_calls_by_action"]
        assert isinstance(by_action, dict)
        return float(by_action["DescribeNetworkInterfaces"]["per_node_mean"])

    on_time = run(replace(VPCCNI_STORM, lab=_lab(0.03, 0.001, 0.0)))
    lagging = run(replace(VPCCNI_STORM, lab=_lab(0.03, 0.001, 0.5)))
    assert describes(lagging) < 0.92 * describes(on_time)
    # Nodes whose first request comes late meet a bucket that refilled meanwhile.
    spread = LabHost(tuple(i * 0.1 for i in range(150)), ((0.001, 0.001),), ((0.0, 0.0),))
    assert run(replace(VPCCNI_STORM, lab=spread))["throttled_calls"] < on_time["throttled_calls"]


def test_a_labs_answers_are_as_slow_as_in_that_second_of_the_real_wave() -> None:
    # Answers sent in second 0 (and 1: empty, it takes its neighbour's) took 0.5 s, later
    # ones none: the first node's three start calls take 1.5 s, the later half's none.
    slow_start = LabHost((0.0,) * 150, ((0.5, 0.5), (), (0.0, 0.0)), ((0.0, 0.0),))
    result = run(replace(VPCCNI_STORM, throttle=None, lab=slow_start))
    assert result["ready_max_s"] == pytest.approx(TIMINGS.start_s + 1.5)
    assert result["ready_p50_s"] == pytest.approx(TIMINGS.start_s)


def test_a_lab_from_a_fleet_wave_takes_its_seconds_where_it_has_them() -> None:
    wave = {
        "first_request_after_launch_s": [0.1, None],
        "request_latency_s": [0.0, 1.0],
        "loop_lag_s": [0.0, 0.1],
        "request_latency_by_second_s": [[0.5, 0.6], []],
        "sleep_lag_by_second_s": [],
    }
    lab = LabHost.from_fleet(wave)
    assert lab.first_request_s == (0.1, None)
    assert lab.request_latency_s == ((0.5, 0.6), (0.5, 0.6))  # the empty second filled
    assert lab.timer_lag_s == ((0.0, 0.1),)  # no sleep by second: the ticker's, whole
    del wave["request_latency_by_second_s"]
    assert LabHost.from_fleet(wave).request_latency_s == ((0.0, 1.0),)


def test_a_labs_draws_follow_its_quantiles() -> None:
    rng = random.Random(1)
    quantiles = (0.0, 0.1, 1.0)  # half the mass below 0.1, half in 0.1-1.0
    values = [draw(quantiles, rng) for _ in range(4000)]
    assert 0.45 < sum(v < 0.1 for v in values) / len(values) < 0.55
    assert min(values) >= 0.0 and max(values) <= 1.0


def test_a_lab_must_fit_the_wave() -> None:
    with pytest.raises(ValueError, match="first requests for 150 nodes"):
        replace(VPCCNI_STORM, lab=_lab(0.1, 0.1, 0.0, nodes=10))
    with pytest.raises(ValueError, match="ascending"):
        LabHost((0.1,), ((0.2, 0.1),), ((0.0, 0.0),))
    with pytest.raises(ValueError, match="no second"):
        LabHost((0.1,), ((), ()), ((0.0, 0.0),))
    with pytest.raises(ValueError, match=">= 0"):
        LabHost((-1.0,), ((0.1, 0.2),), ((0.0, 0.0),))
    with pytest.raises(ValueError, match="played in full"):
        replace(VPCCNI_STORM, lab=_lab(0.1, 0.1, 0.0), sample=2)


def test_a_timeout_reports_the_nodes_not_ready() -> None:
    config = LaunchConfig(
        nodes=400,
        rate_per_min=60000,
        pods_per_node=10,
        throttle=load_table(),
        timeout_s=20.0,
        timings=TIMINGS,
    )
    result = run(config)
    assert result["timed_out"] and result["nodes_ready"] < 400


def test_same_seed_same_wave() -> None:
    config = LaunchConfig(
        nodes=150, rate_per_min=6000, pods_per_node=10, throttle=load_table(), seed=7
    )
    assert run(config)["ec2_calls_by_action"] == run(config)["ec2_calls_by_action"]


def test_the_shipped_timings_say_where_they_come_from() -> None:
    timings = load_timings()
    assert "tools/bench/nau/launch_timings.py" in timings.source["command"]
    assert len(timings.source["commit"]) == 40
    assert 0 < timings.ec2_call_s < timings.ec2_client_s < 1
    assert 0 < timings.start_s < 1


def test_cli_json_is_keyed_by_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "launch",
            "--nodes=50",
            "--rate=2000/min",
            "--pods-per-node=10",
            "--prefixes-at-launch=auto",
            "--baseline=vpc-cni",
            "--json",
        ]
    )
    results = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(results) == {"ultranet", "vpc-cni"}
    for result in results.values():
        assert KEYS <= set(result), KEYS - set(result)
        assert result["clock"] == "simulated"
    ultranet = results["ultranet"]
    assert ultranet["prefixes_at_launch"] == 1
    assert ultranet["prefixes_at_launch_auto"]["warm_settings_added"] == {"MINIMUM_IP_TARGET": "16"}
    assert ultranet["ec2_calls_per_node"] == 0
    # The VPC CNI's start still describes, tags and modifies the ENI.
    assert set(Counter(_calls(results["vpc-cni"]))) >= {
        "DescribeNetworkInterfaces",
        "CreateTags",
        "ModifyNetworkInterfaceAttribute",
    }


def test_cli_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["launch", "--nodes=20", "--scenario=ultranet-reactive"])
    out = capsys.readouterr().out
    assert code == 0
    assert "ultranet-reactive" in out and "EC2 calls per node" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nodes=0"], "give a whole number >= 1"),
        (["--nodes=5", "--rate=fast"], "give a rate such as 2000/min"),
        (["--nodes=5", "--instance-type=m0.tiny"], "unknown instance type"),
        (["--nodes=5", "--prefixes-at-launch=10"], "holds at most 9"),
        (["--nodes=5", "--prefixes-at-launch=-1"], "give a count >= 0, or auto"),
        (["--nodes=5", "--faults=5xx=1.5"], "a probability in (0, 1]"),
        (["--nodes=5", "--faults=slow"], "give NAME=VALUE"),
        (["--nodes=5", "--faults=latency=2"], "give a duration such as 50ms"),
        (["--nodes=5", "--burst=500"], "give N/EVERY"),
        (["--nodes=5", "--env=WARM_PREFIX_TARGET=lots"], "WARM_PREFIX_TARGET"),
        (["--nodes=5", "--scenario=vpc-cni"], "needs --baseline vpc-cni"),
        (["--nodes=5", "--bucket=Assign"], "ACTION=CAPACITY:REFILL_PER_S"),
        (["--nodes=5", "--chart=out.gif"], "must end in .png or .svg"),
        (["--nodes=5", "--vpccni-env=WARM_IP_TARGET=1"], "one of WARM_PREFIX_TARGET"),
        (["--nodes=5", "--vpccni-env=WARM_PREFIX_TARGET=x"], "a count >= 0"),
        (["--nodes=5", "--pods-per-node=160", "--prefixes-at-launch=auto"], "at most 9"),
        (["--nodes=5", "--sample=6"], "must be at most --nodes (5)"),
        (["--nodes=5", "--sample=0"], "give a whole number >= 1"),
        (["--nodes=500", "--sample=60"], "at most 50 with these buckets"),
    ],
)
def test_cli_errors_are_one_clear_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["launch", *argv])
    except SystemExit as exc:  # argparse's own checks exit, as every planner command's
        code = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "wave.svg"
    code = main(["launch", "--nodes=30", "--baseline=vpc-cni", f"--chart={out}", "--json"])
    assert code == 0
    assert "<svg" in out.read_text()[:400]
    assert set(json.loads(capsys.readouterr().out)) == {"ultranet", "vpc-cni"}


def test_cli_faults_and_bursts_as_tools_fleet_spells_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "launch",
            "--nodes=20",
            "--burst=10/5s",
            "--prefixes-at-launch=0",
            "--faults=5xx=0.2,503=0.1,latency=50ms",
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out)["ultranet"]
    assert code == 0
    assert result["launch"] == "bursts of 10 every 5 s"
    assert result["faults"] == [
        {"kind": "latency", "probability": 1.0, "latency_s": 0.05},
        {"kind": "internal", "probability": 0.2, "latency_s": 0.0},
        {"kind": "unavailable", "probability": 0.1, "latency_s": 0.0},
    ]
    assert result["nodes_ready"] == 20 and result["retries"] > 0


def test_baseline_adds_each_scenarios_vpc_cni_twin(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["launch", "--nodes=30", "--scenario=ultranet-reactive", "--baseline=vpc-cni"]
    code = main([*argv, "--vpccni-env=DISABLE_LEAKED_ENI_CLEANUP=true", "--json"])
    results = json.loads(capsys.readouterr().out)
    assert code == 0
    assert list(results) == ["ultranet-reactive", "vpc-cni-reactive"]
    twin = results["vpc-cni-reactive"]
    assert twin["env"] == {"DISABLE_LEAKED_ENI_CLEANUP": "true"}
    # No leaked-ENI sweep: the only DescribeNetworkInterfaces is nodeInit's, one a node.
    assert twin["ec2_calls_by_action"]["DescribeNetworkInterfaces"]["total"] == 30


def test_vpc_cni_warm_prefix_target_is_its_own() -> None:
    # WARM_PREFIX_TARGET=2 for the VPC CNI: 2 free prefixes kept, so a reactive node's
    # start asks for 2 at once (one Assign) and its 10 pods trigger one more Assign.
    config = LaunchConfig(
        nodes=10,
        rate_per_min=600,
        pods_per_node=10,
        agent="vpc-cni",
        vpccni_env={"WARM_PREFIX_TARGET": "2"},
        timings=TIMINGS,
    )
    result = run(config)
    assert result["nau_used"] == 10 * (1 + 3)  # 3 prefixes at the end: 2 free + 1 used


# The keys of tools/fleet's restart result the model carries too (the emulator's request
# count and the wall time are the real run's only).
RESTART_KEYS = {
    "nodes",
    "nodes_ready_again",
    "failures",
    "ec2_calls",
    "ec2_calls_by_action",
    "allocations_before",
    "allocations_lost",
    "addresses_duplicated",
    "ready_p50_s",
    "ready_p99_s",
    "ready_max_s",
}


def test_a_restarted_ultranet_fleet_is_ready_again_with_no_call() -> None:
    # A throttled reactive wave, settled, then every agent restarted at once: the agent
    # finds its pool (journal and IMDS agree) warm, so its plan asks EC2 for nothing.
    config = LaunchConfig(
        nodes=200,
        rate_per_min=6000,
        pods_per_node=10,
        throttle=load_table(),
        timings=TIMINGS,
        restart=True,
    )
    result = run(config)
    restart = result["restart"]
    assert RESTART_KEYS <= set(restart), RESTART_KEYS - set(restart)
    assert restart["nodes"] == restart["nodes_ready_again"] == 200
    assert restart["ec2_calls"] == 0 and restart["throttled_calls"] == 0
    assert restart["allocations_before"] == 200 * 10
    assert restart["allocations_lost"] == restart["addresses_duplicated"] == 0
    assert restart["ready_max_s"] == TIMINGS.start_s
    # The restart's calls are its own: the wave's are those of a run without it.
    assert (
        result["ec2_calls_by_action"] == run(replace(config, restart=False))["ec2_calls_by_action"]
    )


def test_a_restarted_vpc_cni_repeats_its_start_sequence() -> None:
    # aws-node's nodeInit again: DescribeAllENIs, the security groups of each ENI (its
    # cache starts empty), the leaked-ENI sweep; the ENI keeps its tag and the pool its
    # pods (the checkpoint), so no CreateTags and no Assign.
    nodes = 30
    config = LaunchConfig(
        nodes=nodes,
        rate_per_min=600,
        pods_per_node=10,
        prefixes_at_launch=2,
        agent="vpc-cni",
        timings=TIMINGS,
        restart=True,
    )
    restart = run(config)["restart"]
    assert restart["nodes_ready_again"] == nodes
    assert restart["ec2_calls_by_action"] == {
        "DescribeNetworkInterfaces": 2 * nodes,
        "ModifyNetworkInterfaceAttribute": nodes,
    }
    # A new process, a new EC2 client: Ready again after start, client and 2 requests.
    expected = TIMINGS.start_s + TIMINGS.ec2_client_s + 2 * TIMINGS.ec2_call_s
    assert restart["ready_max_s"] == pytest.approx(expected, abs=1e-3)
    # All at once against the unfiltered describe bucket (50, 10/s): a storm of its own.
    throttled = run(replace(config, nodes=200, rate_per_min=6000, throttle=load_table()))
    assert throttled["restart"]["throttled_calls"] > 0
    assert throttled["restart"]["nodes_ready_again"] == 200


def test_no_restart_after_a_wave_that_timed_out() -> None:
    config = LaunchConfig(
        nodes=400,
        rate_per_min=60000,
        pods_per_node=10,
        throttle=load_table(),
        timeout_s=20.0,
        timings=TIMINGS,
        restart=True,
    )
    assert "restart" not in run(config)


def test_efa_only_cards_cost_one_nau_each_and_no_call() -> None:
    # p5.48xlarge: 32 network cards, an efa-only interface on each of cards 1-31. Neither
    # agent puts pods on them (no address), so only the NAU count moves.
    itype = lookup("p5.48xlarge")
    config = LaunchConfig(
        nodes=50,
        rate_per_min=2000,
        instance_type=itype.name,
        pods_per_node=12,
        timings=TIMINGS,
    )
    for agent in ("ultranet", "vpc-cni"):
        plain = run(replace(config, agent=agent))
        efa = run(replace(config, agent=agent, efa_only_cards=True))
        assert efa["efa_only_cards"] and not plain["efa_only_cards"]
        assert efa["ec2_calls_by_action"] == plain["ec2_calls_by_action"], agent
        assert efa["subnet_addresses_used"] == plain["subnet_addresses_used"]
        extra = len(itype.network_cards) - 1
        assert efa["nau_used"] - plain["nau_used"] == 50 * extra, agent


def test_cli_restart_and_efa_only_cards_as_tools_fleet_spells_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["launch", "--nodes=20", "--instance-type=p5.48xlarge", "--prefixes-at-launch=auto"]
    code = main([*argv, "--efa-only-cards", "--restart", "--json"])
    result = json.loads(capsys.readouterr().out)["ultranet"]
    assert code == 0
    assert result["efa_only_cards"] is True
    assert RESTART_KEYS <= set(result["restart"])
    assert result["restart"]["nodes_ready_again"] == 20
    code = main([*argv, "--restart"])
    assert code == 0
    assert "ultranet: mass restart of 20 agents: 20 Ready again" in capsys.readouterr().out


def test_the_waves_the_calibration_holds_are_played_in_full_as_before() -> None:
    # tests/fleet/test_launch_calibration.py's inputs (seed 1), and the figures the model
    # gave for them before large waves were sampled (commit 561dca0): unchanged.
    table = load_table().with_buckets({"AssignPrivateIpAddresses": BucketSpec(20, 5)})
    reactive = run(LaunchConfig(nodes=400, rate_per_min=2000, pods_per_node=0, throttle=table))
    timings = replace(load_timings(), ec2_client_s=0.9, ec2_call_s=0.1)
    vpc_cni = run(
        LaunchConfig(
            nodes=400,
            rate_per_min=2000,
            pods_per_node=0,
            prefixes_at_launch=2,
            agent="vpc-cni",
            throttle=table,
            vpccni_cleanup_delay_max_s=5.0,
            timings=timings,
        )
    )
    keys = ("ec2_calls_per_node", "throttled_calls", "retries", "ready_p50_s", "ready_p99_s")
    assert [reactive[k] for k in keys] == [4.322, 1329, 1018, 44.049, 116.59]
    assert [vpc_cni[k] for k in keys] == [14.82, 4038, 2826, 10.289, 33.003]
    assert reactive["sample"]["one_node_in"] == vpc_cni["sample"]["one_node_in"] == 1


def test_a_throttled_wave_larger_than_played_nodes_is_sampled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A storm's throttled requests grow with the square of the wave, each an event. Above
    # PLAYED_NODES (10,000; 1,600 here) a throttled wave is played one node in N against
    # buckets, launches and scheduler divided by N: per-node figures as the full play's.
    monkeypatch.setattr(launch, "PLAYED_NODES", 1600)  # N = (5,000 / 1,600)^2 -> 10
    config = LaunchConfig(nodes=5000, rate_per_min=2000, pods_per_node=12, throttle=load_table())
    full = run(replace(config, sample=1))
    sampled = run(config)
    assert sampled["sample"]["one_node_in"] == 10 and sampled["sample"]["nodes_played"] == 500
    assert sampled["events"] < full["events"] / 8
    assert sampled["nodes"] == sampled["nodes_ready"] == 5000
    for key in ("ec2_calls_per_node", "throttled_calls", "ready_p50_s", "ready_p99_s"):
        assert sampled[key] == pytest.approx(full[key], rel=0.05), key
    assert sampled["ready_nodes_per_min"] == pytest.approx(full["ready_nodes_per_min"], rel=0.05)
    calls = _calls(sampled)
    assert calls["AssignPrivateIpAddresses"] == pytest.approx(
        _calls(full)["AssignPrivateIpAddresses"], rel=0.05
    )


def test_a_large_wave_ec2_never_throttles_is_played_in_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(launch, "PLAYED_NODES", 100)
    config = AUTO_WAVE
    result = run(config)
    assert result["sample"] == {"one_node_in": 1, "nodes_played": 300, "how": "every node"}
    assert result["ec2_calls_per_node"] == 0
    # Reactive, the same wave meets the Assign bucket: sampled, one node in (300 / 100)^2.
    reactive = run(replace(config, prefixes_at_launch=0, env={}))
    assert reactive["sample"]["one_node_in"] == 9 and reactive["nodes_ready"] == 300


def test_a_sample_keeps_each_bucket_a_token_and_one_per_agent_loop() -> None:
    # The tokens of a bucket divided by N come N times further apart, against timers that
    # stay: AWS's 5-a-second Assign bucket keeps one per 5-s pool pass at one node in 25
    # (at one in 50, 100,000 VPC CNI nodes made half the calls: README, "launch").
    config = LaunchConfig(nodes=10_000_000, rate_per_min=2000, throttle=load_table())
    assert launch.sample_for(config) == 25
    # The 100,000-node wave: one in 25, 4,000 nodes played.
    assert launch.sample_for(replace(config, nodes=100_000)) == 25
    small = load_table().with_buckets({"AssignPrivateIpAddresses": BucketSpec(20, 5)})
    assert launch.sample_for(replace(config, throttle=small)) == 20
    slow = load_table().with_buckets({"CreateTags": BucketSpec(100, 2)})
    assert launch.sample_for(replace(config, throttle=slow)) == 10
    assert launch.sample_for(replace(config, nodes=launch.PLAYED_NODES)) == 1
    assert launch.sample_for(replace(config, nodes=2 * launch.PLAYED_NODES)) == 4


def test_vpc_cni_max_pods_is_eks_for_the_instance_type() -> None:
    # The VPC CNI stops topping up once a node holds max-pods addresses: EKS's prefix-mode
    # value for the type (250 for a p5.48xlarge, as tools/fleet), not the 110 of small
    # types, so 120 pods all land.
    itype = lookup("p5.48xlarge")
    config = LaunchConfig(
        nodes=5,
        rate_per_min=600,
        instance_type=itype.name,
        pods_per_node=120,
        agent="vpc-cni",
        timeout_s=600.0,
        timings=TIMINGS,
    )
    result = run(config)
    assert not result["timed_out"] and result["pods_running_max_s"] is not None
    shape = vpccni.NodeShape(itype.max_prefixes_per_eni, itype.card(0).max_interfaces, 250)
    expected = vpccni.node_calls(shape, 0, 120)
    assert _calls(result) == {a: n * 5 for a, n in expected.items()}


def test_a_sampled_vpc_cni_keeps_its_back_to_back_requests_apart() -> None:
    # Each pool pass of a VPC CNI node whose pool is low sends an Assign and, 1 ms after a
    # throttled answer, its 1-prefix fallback. Played one node in 25, the others' requests
    # come 25 times sparser; answered in 1 ms the fallback would almost never find a token,
    # so nodes wait more passes (calls per node +13%, top-up Assigns +53% here). The
    # sample answers in 25 ms. README: at 10,000 and 100,000 nodes it holds far better.
    config = LaunchConfig(
        nodes=5000, rate_per_min=2000, pods_per_node=12, agent="vpc-cni", throttle=load_table()
    )
    full = run(replace(config, sample=1))
    sampled = run(replace(config, sample=25))

    def top_ups(result: dict[str, object]) -> float:
        by_action = result["ec2_calls_by_action"]
        assert isinstance(by_action, dict)
        return float(by_action["AssignPrivateIpAddresses"]["pods"])

    assert sampled["ec2_calls_per_node"] == pytest.approx(full["ec2_calls_per_node"], rel=0.1)
    assert top_ups(sampled) == pytest.approx(top_ups(full), rel=0.35)
    assert sampled["ready_p99_s"] == pytest.approx(full["ready_p99_s"], rel=0.05)
    assert sampled["timings"] == full["timings"]  # the result says the shipped timings
