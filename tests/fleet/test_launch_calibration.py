"""The launch model (``ipam.nau.launch``) held to the real agents (``tools/fleet``).

The same wave at two sizes, once with the real ``ultranet-ipamd`` agents against the
throttled emulator and five times in the model (seeds 1-5, their median): EC2 calls per
node by action equal (the ones EC2 carried out; the throttled ones within 10%), Ready p50
and p99 within 10%.

Why these inputs (the numbers are in ``ipam/nau/README.md``, "launch"):

* reactive, no prefix at launch, so the nodes call EC2; ``AssignPrivateIpAddresses``'
  bucket shrunk to 20 tokens (refill 5/s, AWS's) so 100 and 400 nodes meet it the way
  100,000 meet AWS's 100: most nodes are throttled at start, and their Ready times are
  set by the agent's pacer, retries and pool-loop back-off, not by this machine;
* sizes where p50 and p99 fall inside a cluster of nodes, not on an edge between two.
  Throttled nodes become Ready in rungs about 60 s apart (the pacer's floor is one
  request per 60 s): at 100 nodes with 2 pods each the slowest 25-30% wait out one rung
  and none a second (model, 8 seeds: Ready p99 59.6-64.9 s); at 400 nodes with none, 15-19%
  wait out two (p99 111.5-116.6 s). At 250 nodes with 2 pods 4-7% wait out two, so p99 is
  the third slowest node and flips between rungs: two real runs gave 66.9 and 116.8 s;
* 2 pods a node at 100: their top-up Assigns compete for the bucket (the runner's
  scheduler keeps up with 2 a node; with 10 it binds late when the agents' loop lags);
* ``auto``: 0 calls on both sides. Its Ready times are milliseconds of this machine's
  event loop (IMDS over loopback, the agents in one process): noise at 10%, so only their
  scale is checked.

The AWS VPC CNI's model (``ipam.nau.vpccni_calls``) is held to its real-agent baseline
(``tools/fleet/vpccni_agent.py``) at the same two sizes, 100 and 400 nodes (its own
fixture): 2 prefixes at launch (AWS's 100K configuration), AWS's buckets, no pods, where
its start still describes, tags and modifies the ENI and gives the spare prefix back. At
400 nodes the unfiltered ``DescribeNetworkInterfaces`` bucket (50, 10/s) binds, so Ready
times are set by the throttle and the SDK's back-off; at 100 it binds a few times or not
at all (first requests spread over the 3-s wave and the machine's start-up: 0-3 throttled
in the runs seen), so that size holds the unthrottled call sequence and its timing.
Calls per node by action and Ready p50 and p99, against 30 seeds of the model
(``VPCCNI_SEEDS``):

* the model replays the run's lab machine (``ipam.nau.launch.LabHost``, from the wave's
  JSON): each node's first request after its launch, the answers' latencies and how late
  the agents' sleeps woke, by second of the wave. These, not EC2, are why real runs of
  the same code differ: 400 agents in one process on 2 shared cores queue their client
  builds (first request 0.1 s after launch for the first nodes, 2-3 s for the last),
  answer slowly in the storm's first seconds (~1 s) and at once later, and wake late
  from their back-offs; a later start means a refilled bucket and a shorter wait, a
  slower cycle fewer retries in it. With the model's fixed 0.9 s start and 0.1 s answers
  the real baseline made 7.6-9.7 describes a node in runs at load 1-18 against the
  model's 10.2-10.3; replayed, four runs at load 1-18 (a probe) came within 3% on every
  call, 9% on Ready p50 and 5% on Ready p99 at 400 nodes (README, "launch");
* the bar: within the range of the model's 30 seeds widened by 10% each side (which holds
  10% of the median and more), ``vpccni_within``. The literal 10% of the model's median
  cannot be held by one real run: the model's own seeds, on the same inputs, spread that
  much. At 400 nodes its Ready p50 spread 8.1-9.9 s around 9.0 s in a fresh-clone CI run
  whose real p50 was 10.07 s (+11.7%, beyond all 30 seeds); at 100 nodes Ready p99 is the
  second-slowest node of a short storm (one run's seeds: 2.5-4.9 s around 3.1 s). Ready
  p50 is held at 400 nodes only: at 100 the median node is hardly throttled and its Ready
  time is this machine's start-up, which the replay does not follow (0.020 s real against
  the model's 0.025-0.034 s in one CI run, 1.34 s against 0.96-1.02 s in another run).
  Calls came within 4% in every run but the security-group modify (up to 8.4%). The old
  fixed timings fail this bar in six of eight probe runs. ``CreateTags`` is exactly one a
  node on both sides.

The model replays the launches each real wave made (``launch_at_s``), not the 2,000/min
schedule: on a loaded machine the runner launches late, the wave spreads and the bucket
refills in between (a run at load 12 gave a real Ready p50 of 5.1 s where the schedule's
model gives 11.0 s); held to the launches made, the model is compared on the same input.

The leaked-ENI sweep runs within 5 s of Ready (``vpccni_cleanup_delay_max_s``) instead of
300, so the run settles quickly: one filtered describe a node either way.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import pytest

from ipam.nau.launch import LabHost, LaunchConfig, run
from ipam.nau.launch_auto import choose
from ipam.nau.throttle import BucketSpec, load_table
from tools.fleet.replay import calls_per_node_by_action
from tools.fleet.runner import VPC_CNI, Fleet, FleetConfig, Scenario

RATE_PER_MIN = 2000.0
BUCKETS = {"AssignPrivateIpAddresses": BucketSpec(20, 5)}
SEEDS = range(1, 6)
TOLERANCE = 0.10
VPCCNI_PREFIXES = 2
VPCCNI_CLEANUP_DELAY_MAX_S = 5.0
VPCCNI_SIZES = (100, 400)
# The model's runs of a real VPC CNI wave: enough seeds to show a figure's own spread.
VPCCNI_SEEDS = range(1, 31)
# An action only a handful of nodes make (a spare released before its pods came and
# re-assigned): within this many calls per node.
VPCCNI_RARE_CALLS = 0.05
# Below this size the median node is hardly throttled: its Ready time is this machine's
# start-up, which the model's replay does not follow (Ready p50 at 100 nodes in five runs:
# -30% to +35% of the model's median, 0.02 to 1.3 s), so Ready p50 is held from here up.
VPCCNI_P50_HELD_FROM_NODES = 400


def _table() -> Any:
    return load_table().with_buckets(BUCKETS)


@pytest.fixture(
    scope="module", params=((100, 2), (400, 0)), ids=lambda p: f"{p[0]}-nodes-{p[1]}-pods"
)
def wave(request: pytest.FixtureRequest) -> dict[str, Any]:
    nodes, pods = request.param
    auto = choose("m5.large", pods, {})
    real = {}
    for name, prefixes, env in (("reactive", 0, {}), ("auto", auto.prefixes, auto.env)):
        config = FleetConfig(
            nodes=nodes,
            rate_per_min=RATE_PER_MIN,
            pods_per_node=pods,
            env=env,
            throttle=_table(),
            timeout_s=300,
        )
        real[name] = Fleet(config).run([Scenario(name, prefixes)])[name]
    model = {
        name: _model_runs(real[name], pods, prefixes_at_launch=prefixes, env=env)
        for name, prefixes, env in (("reactive", 0, {}), ("auto", auto.prefixes, auto.env))
    }
    return {"nodes": nodes, "real": real, "model": model}


def _model_runs(
    real: dict[str, Any], pods: int, seeds: range = SEEDS, **settings: Any
) -> list[dict[str, Any]]:
    """The model's runs (``seeds``) of a real wave: its size, its launches as made."""
    base = LaunchConfig(
        nodes=real["nodes"],
        rate_per_min=RATE_PER_MIN,
        pods_per_node=pods,
        throttle=_table(),
        launch_at_s=tuple(real["launch_at_s"]),
        **settings,
    )
    return [run(dataclasses.replace(base, seed=seed)) for seed in seeds]


def _vpccni_wave(nodes: int, pods: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The VPC CNI baseline, real and modelled, 2 prefixes at launch."""
    config = FleetConfig(
        nodes=nodes,
        rate_per_min=RATE_PER_MIN,
        pods_per_node=pods,
        throttle=_table(),
        timeout_s=300,
        vpccni_cleanup_delay_max_s=VPCCNI_CLEANUP_DELAY_MAX_S,
    )
    real = Fleet(config).run([Scenario(VPC_CNI, VPCCNI_PREFIXES, VPC_CNI)])[VPC_CNI]
    model = _model_runs(
        real,
        pods,
        VPCCNI_SEEDS,
        prefixes_at_launch=VPCCNI_PREFIXES,
        agent=VPC_CNI,
        vpccni_cleanup_delay_max_s=VPCCNI_CLEANUP_DELAY_MAX_S,
        lab=LabHost.from_fleet(real),
    )
    return real, model


def _successful_per_node(result: dict[str, Any]) -> dict[str, float]:
    """Calls per node by action that EC2 carried out (a throttled one changes nothing).

    A real wave's are the emulator's own count: a request the agents' client saw fail
    on its way (a connection refused or timed out on this loaded machine) was not
    throttled, yet EC2 never carried it out either. The model has only throttling."""
    calls = result.get("ec2_calls_carried_out_by_emulator")
    if calls is None:
        calls = {a: v["total"] for a, v in result["ec2_calls_by_action"].items()}
        calls["AssignPrivateIpAddresses"] = (
            calls.get("AssignPrivateIpAddresses", 0) - result["throttled_calls"]
        )
    return {a: n / result["nodes"] for a, n in calls.items() if n}


def _median(results: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in results))


def disagreements(real: dict[str, Any], model: list[dict[str, Any]]) -> list[str]:
    """What differs between a real wave and the model's runs of it, beyond the bars."""
    found = []
    if real["nodes_ready"] != real["nodes"] or any(m["nodes_ready"] != m["nodes"] for m in model):
        found.append("not every node became Ready")
    done = _successful_per_node(real)
    for m in model:
        if _successful_per_node(m) != done:
            found.append(
                f"calls per node {_successful_per_node(m)} != real {done}"
                f" (real errors by code {real['ec2_errors']}, NAU used {real['nau_used']})"
            )
            break
    for key in ("ec2_calls_per_node", "ready_p50_s", "ready_p99_s"):
        want, got = real[key], _median(model, key)
        if want == 0 and got == 0:
            continue
        if abs(got - want) > TOLERANCE * want:
            found.append(f"{key}: model {got} vs real {want} (> {TOLERANCE:.0%})")
    return found


def vpccni_figures(result: dict[str, Any]) -> dict[str, float]:
    """What the VPC CNI comparison holds: calls per node by action, Ready p50 and p99."""
    figures = {f"{a} per node": n for a, n in calls_per_node_by_action(result).items()}
    return figures | {key: result[key] for key in ("ready_p50_s", "ready_p99_s")}


def vpccni_within(real: float, seeds: list[float], *, rare: bool = False) -> bool:
    """The bar: within the model's seeds' range (the same inputs, other random draws)
    widened by 10% each side; an action a handful of nodes make within
    ``VPCCNI_RARE_CALLS`` of their median."""
    if rare and abs(real - statistics.median(seeds)) <= VPCCNI_RARE_CALLS:
        return True
    return (1 - TOLERANCE) * min(seeds) <= real <= (1 + TOLERANCE) * max(seeds)


def test_vpccni_bar_is_the_seeds_range_widened_by_ten_percent() -> None:
    seeds = [8.14, 9.02, 9.91]  # Ready p50 at 400 nodes in a CI run: real 10.07
    assert vpccni_within(10.07, seeds)
    assert vpccni_within(9.91 * 1.09, seeds) and vpccni_within(8.14 * 0.91, seeds)
    assert not vpccni_within(9.91 * 1.11, seeds)
    assert not vpccni_within(8.14 * 0.89, seeds)


def _vpccni_result(nodes: int, ready_p50_s: float) -> dict[str, Any]:
    calls = {"CreateTags": {"per_node_mean": 1.0}}
    return {
        "nodes": nodes,
        "nodes_ready": nodes,
        "ec2_calls_by_action": calls,
        "ready_p50_s": ready_p50_s,
        "ready_p99_s": 30.0,
    }


def test_vpccni_ready_p50_is_held_from_400_nodes_up() -> None:
    model = [_vpccni_result(n, 1.0) for n in (100, 100)]
    assert vpccni_disagreements(_vpccni_result(100, 1.34), model) == []
    model = [_vpccni_result(n, 9.0) for n in (400, 400)]
    assert vpccni_disagreements(_vpccni_result(400, 9.5), model) == []
    assert vpccni_disagreements(_vpccni_result(400, 12.0), model) != []


def test_vpccni_bar_lets_a_rare_action_off_by_a_handful_of_nodes() -> None:
    assert vpccni_within(0.04, [0.0, 0.0, 0.01], rare=True)
    assert not vpccni_within(0.04, [0.0, 0.0, 0.01])
    assert not vpccni_within(0.2, [0.0, 0.0, 0.01], rare=True)


def vpccni_disagreements(real: dict[str, Any], model: list[dict[str, Any]]) -> list[str]:
    """What differs between a real VPC CNI wave and the model's runs of it."""
    found = []
    if real["nodes_ready"] != real["nodes"] or any(m["nodes_ready"] != m["nodes"] for m in model):
        found.append("not every node became Ready")
    want = vpccni_figures(real)
    runs = [vpccni_figures(m) for m in model]
    for name in sorted(set(want).union(*runs)):
        seeds = [r.get(name, 0.0) for r in runs]
        real_value = want.get(name, 0.0)
        if name == "ready_p50_s" and real["nodes"] < VPCCNI_P50_HELD_FROM_NODES:
            continue
        if not vpccni_within(real_value, seeds, rare=name.endswith("per node")):
            found.append(
                f"{name}: real {real_value} vs model {statistics.median(seeds)}"
                f" [{min(seeds)}-{max(seeds)}]"
            )
    if any(calls_per_node_by_action(m).get("CreateTags") != 1.0 for m in model):
        found.append("the model does not tag each node's ENI exactly once")
    return found


def _vpccni_report(real: dict[str, Any], model: list[dict[str, Any]]) -> None:
    """Each figure: real, the model's median [range], and how far from the median."""
    want = vpccni_figures(real)
    runs = [vpccni_figures(m) for m in model]
    print(f"  {len(model)} seeds; real / model median [range] (real vs median)")
    for name in sorted(set(want).union(*runs)):
        seeds = sorted(r.get(name, 0.0) for r in runs)
        middle, got = statistics.median(seeds), want.get(name, 0.0)
        off = f"{(got - middle) / middle:+.1%}" if middle else "-"
        print(f"  {name}: {got} / {middle:.3f} [{seeds[0]}-{seeds[-1]}] ({off})")


def _report(name: str, real: dict[str, Any], model: list[dict[str, Any]]) -> None:
    """The figures side by side (``pytest -s`` shows them; the README quotes them)."""
    keys = ("ec2_calls_per_node", "throttled_calls", "ready_p50_s", "ready_p99_s", "ready_max_s")
    print(f"\n{name} {real['nodes']} nodes: real / model median of {len(model)} seeds [range]")
    for key in keys:
        values = sorted(m[key] for m in model)
        print(f"  {key}: {real[key]} / {_median(model, key)} [{values[0]}-{values[-1]}]")


def test_reactive_wave_model_matches_the_real_agents(wave: dict[str, Any]) -> None:
    real, model = wave["real"]["reactive"], wave["model"]["reactive"]
    _report("reactive", real, model)
    assert real["throttled_calls"] > real["nodes"], "the bucket must bind for this to test"
    assert disagreements(real, model) == []


def test_auto_wave_makes_no_call_in_either(wave: dict[str, Any]) -> None:
    real, model = wave["real"]["auto"], wave["model"]["auto"]
    _report("auto", real, model)
    assert real["ec2_calls_per_node"] == 0 == real["ec2_requests_seen_by_emulator"]
    assert all(m["ec2_calls_per_node"] == 0 for m in model)
    assert real["nodes_ready"] == real["nodes"] and all(
        m["nodes_ready"] == wave["nodes"] for m in model
    )
    # Milliseconds on both sides (see the module's docstring for why no 10% here).
    assert real["ready_p99_s"] < 0.5 and _median(model, "ready_p99_s") < 0.5


@pytest.fixture(scope="module", params=VPCCNI_SIZES, ids=lambda n: f"{n}-nodes")
def vpccni_wave(request: pytest.FixtureRequest) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return _vpccni_wave(request.param, 0)


def test_vpccni_wave_model_matches_the_real_baseline(
    vpccni_wave: tuple[dict[str, Any], list[dict[str, Any]]],
) -> None:
    real, model = vpccni_wave
    _report(VPC_CNI, real, model)
    _vpccni_report(real, model)
    if real["nodes"] >= 400:  # at 100 it may not (the module's docstring)
        assert real["throttled_calls"] > 0, "the describe bucket must bind"
    assert vpccni_disagreements(real, model) == []
