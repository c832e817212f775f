"""A discrete-event model of a launch wave: N node agents against one throttled EC2 account.

``tools/fleet`` runs the real ``ultranet-ipamd`` agent on thousands of nodes; this plays
the same wave for 100,000 nodes in seconds, on a simulated clock, with state machines
that make the calls the agents make:

* **nodes** launched at ``rate_per_min``, one at a time, or ``burst`` at once every
  ``burst_every_s`` (a Karpenter-like provisioner), each with ``prefixes_at_launch``
  /28s on its primary ENI (the launch template's ``Ipv4PrefixCount``);
* **ultranet**: the agent's own loop (``ipam.agent.NodeAgent``): start from IMDS
  (``Timings.start_s``); Ready at once if the warm plan (``ipam.warm.plan``, the function
  the agent runs) asks for nothing, else an urgent pool step; the manager re-plans when
  an allocation wakes it (after ``MANAGE_DEBOUNCE_S``, none when the pool ran dry) or
  every ``MANAGE_INTERVAL_S``; a failed step backs off ``ERROR_BACKOFF_S`` (constants
  imported from ``ipam.agent``). Each EC2 request goes through the client's own bucket
  and the per-action AIMD pacer (``ipam.ec2.TokenBucket`` and ``ThrottlePacer``, the
  daemon's classes driven by the simulated clock, with ``Ec2Client``'s defaults), gives up
  after 3 throttled or 8 failed attempts with the client's full-jitter backoff;
* **vpc-cni**: the AWS VPC CNI's ``ipamd`` in prefix mode as ``ipam.nau.vpccni_calls``
  reads it from its source: start-up (DescribeNetworkInterfaces, CreateTags per ENI,
  ModifyNetworkInterfaceAttribute per ENI, a pre-scaling Assign when the launch prefixes
  leave the pool too low; a failed start exits and the kubelet restarts it after 10 s,
  doubling to 300 s), a pool pass every 5 s (first 2.5 s after start) that tops up or
  (at most every 30 s) releases, the leaked-ENI scan at a random 0-300 s, and the Go SDK's
  standard retryer (3 attempts, full jitter, a 500-token retry quota per client);
* **EC2**: the account's token bucket per action (``ipam.nau.throttle``, AWS's published
  numbers), ``RequestLimitExceeded`` when empty; optional ``Faults`` on the requests it
  admits, as the emulator injects them: extra latency, ``InternalError``, ``Unavailable``;
* **pods**: once a node is Ready its pods are bound by one cluster-wide scheduler at
  ``pod_rate_per_s`` in the order nodes became Ready; a pod lands if the node's pool has
  a free address, else it is retried after ``pod_retry_s`` (the kubelet retrying the
  sandbox), and the dry pool wakes the agent.

A scenario ends when every pod runs and every agent's pool is settled (the heap of events
is empty), or at ``timeout_s`` of simulated time. Latencies (``Timings``) come from
``data/launch-timings.json``, measured on the real agents (the file says how).

What it leaves out: host networking, IMDS lag (the reconcile's DescribeNetworkInterfaces
when IMDS and the pool disagree), pods leaving (no cooldown churn), subnet exhaustion,
multi-NIC, the machine's own CPU (every node runs on its own), and instance launches
(``RunInstances`` is the launcher's, not the CNI's). Pure: no I/O but the data file.
``LabHost`` is how a real lab run's machine is put back, for holding the model to that
run: its nodes' first requests, answer latencies and late sleeps, replayed.

Its cost is one event per EC2 request, throttled ones included, and a few per node and
pod: a wave with no calls plays 100,000 nodes in seconds. A throttle storm costs what
its requests cost, and they grow with the square of the wave (each of twice the nodes
waits twice as long, retrying): 100,000 reactive nodes would make 10^7 (ultranet) to
10^8 (the VPC CNI) throttled requests, and the first request after each refill takes the
token, so none can be skipped exactly. A throttled wave of more than ``PLAYED_NODES`` is
therefore played one node in N (``run``, ``sample_for``): launches, scheduler and the
account's buckets divided by N, each node as it is; the README says how close that
comes to playing every node.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import inspect
import json
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from typing import Any, TypeVar

from ipam import warm
from ipam.agent import ERROR_BACKOFF_S, MANAGE_DEBOUNCE_S, MANAGE_INTERVAL_S
from ipam.config import load_config
from ipam.ec2 import THROTTLE_CODES, Ec2Client, ThrottlePacer, TokenBucket
from ipam.instance_types import lookup
from ipam.nau import vpccni_calls as vpccni
from ipam.nau.maxpods import Mode, max_pods
from ipam.nau.rules import DEFAULT_RULES, InterfaceType
from ipam.nau.throttle import BucketSpec, ThrottleTable
from ipam.nau.throttle import TokenBucket as AccountBucket

__all__ = [
    "Faults",
    "LaunchConfig",
    "Timings",
    "call_counts",
    "load_timings",
    "percentile",
    "run",
    "wave_times",
]

T = TypeVar("T")
TIMINGS_FILE = "launch-timings.json"
AGENTS = ("ultranet", "vpc-cni")
VPCCNI_SETTINGS = ("WARM_PREFIX_TARGET", "DISABLE_LEAKED_ENI_CLEANUP")  # as tools/fleet
READY_CURVE_POINTS = 200  # as tools/fleet: at most this many [seconds, nodes Ready] points
# A throttled wave of more nodes is played one node in N = (nodes / PLAYED_NODES)^2 (``run``):
# its throttled requests, each an event, grow as nodes^2 / N, so a sampled wave costs what
# PLAYED_NODES played in full cost (5-15 s in a storm).
PLAYED_NODES = 10_000
# A sample spaces each bucket's tokens further apart; it keeps them at least one per
# agent loop: the VPC CNI's pool pass (ipamd's 5 s), ultranet's MANAGE_INTERVAL_S. Checked
# at 100,000 VPC CNI nodes: one in 5, 10 and 25 agree; one in 50 (a token every 10 s)
# halves the calls per node.
SHORTEST_LOOP_S = min(vpccni.TIMERS.pool_pass_s, MANAGE_INTERVAL_S)
# The actions the agents call, with and without a filter: the buckets a sample divides.
AGENT_ACTIONS = (
    "AssignPrivateIpAddresses",
    "UnassignPrivateIpAddresses",
    "CreateNetworkInterface",
    "AttachNetworkInterface",
    "DeleteNetworkInterface",
    "ModifyNetworkInterfaceAttribute",
    "DescribeSubnets",
    "DescribeNetworkInterfaces",
    "DescribeInstances",
    "CreateTags",
)
SUBNET_CACHE_S = 300.0  # Ec2Client.subnets_in's cache (subnet_cache_ttl_s)
TAG_BACKOFF_MAX_S = 60.0  # TagENI's retry.NWithBackoff caps its delay here


def _client_defaults() -> dict[str, Any]:
    """``Ec2Client``'s retry and pacer defaults, read from its signature: the model plays
    the numbers the daemon ships, not a copy of them."""
    params = inspect.signature(Ec2Client.__init__).parameters
    names = (
        "max_attempts",
        "max_throttled_attempts",
        "throttle_min_rate_per_s",
        "throttle_decrease",
        "throttle_increase_per_s",
        "base_delay_s",
        "max_delay_s",
    )
    return {n: params[n].default for n in names}


CLIENT = _client_defaults()


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds, as measured on the real agents (``data/launch-timings.json``)."""

    start_s: float  # launch -> the agent's first plan (IMDS discovery, journal, pool)
    ec2_client_s: float  # the first EC2 call builds the client
    ec2_call_s: float  # one EC2 request, there and back
    allocate_s: float  # one pod's allocation, the CNI ADD path
    source: Mapping[str, Any] = field(default_factory=dict, hash=False)


def load_timings() -> Timings:
    doc = json.loads(resources.files("ipam.nau").joinpath("data", TIMINGS_FILE).read_text())
    values = doc["timings"]
    return Timings(
        float(values["start_s"]),
        float(values["ec2_client_s"]),
        float(values["ec2_call_s"]),
        float(values["allocate_s"]),
        source=doc["source"],
    )


@dataclass(frozen=True, slots=True)
class Faults:
    """Injected as the emulator injects them (``tools/lab/ec2/faults.py``): a request the
    account's bucket admits first takes ``latency_s`` more, then is answered
    ``InternalError`` (HTTP 500) with probability ``internal``, else ``Unavailable``
    (503) with probability ``unavailable``. A throttled request gets neither."""

    internal: float = 0.0
    unavailable: float = 0.0
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("internal", "unavailable"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} probability {value}: must be in [0, 1]")
        if self.latency_s < 0:
            raise ValueError(f"latency {self.latency_s}: must be >= 0")

    def describe(self) -> list[dict[str, Any]]:
        """As ``tools/fleet``'s JSON lists them."""
        out: list[dict[str, Any]] = []
        if self.latency_s:
            out.append({"kind": "latency", "probability": 1.0, "latency_s": self.latency_s})
        for kind, probability in (("internal", self.internal), ("unavailable", self.unavailable)):
            if probability:
                out.append({"kind": kind, "probability": probability, "latency_s": 0.0})
        return out


Quantiles = tuple[float, ...]


@dataclass(frozen=True, slots=True)
class LabHost:
    """The lab's machine as a real run (``tools/fleet``) measured it, replayed so that the
    model is held to that run on the same inputs. Not EC2, and not what a user's fleet
    sees: there each node is its own machine and ``Timings`` hold. Here hundreds of
    agents share one process on a loaded 2-core machine, and three things depend on its
    load from run to run (``ipam/nau/README.md``, "launch", says how much):

    * ``first_request_s``: each node's first EC2 request, seconds after its launch, in
      launch order (None: the node made none). Client builds and IMDS reads queue for
      the process's one CPU, so late nodes of a storm start seconds after early ones;
    * ``request_latency_s``: for each second of the wave (from its first launch; the
      last entry stands for every later second), evenly spaced quantiles of the
      latencies of the requests sent in it, as the agents saw them (the emulator's
      queue, the HTTP round trip, the agent's resumption): each answer draws one. A
      storm's first seconds answer slowly, its tail at once;
    * ``timer_lag_s``: the same for how late the agents' sleeps woke (the event loop's
      lag), by the second each was due: each back-off and pool-pass sleep draws one.

    An empty second (nothing sent, nothing due) takes its nearest neighbour's."""

    first_request_s: tuple[float | None, ...]
    request_latency_s: tuple[Quantiles, ...]
    timer_lag_s: tuple[Quantiles, ...]

    def __post_init__(self) -> None:
        for name in ("request_latency_s", "timer_lag_s"):
            seconds = getattr(self, name)
            for values in seconds:
                if values and (
                    len(values) < 2
                    or values[0] < 0
                    or any(b < a for a, b in zip(values, values[1:], strict=False))
                ):
                    raise ValueError(f"lab {name}: at least 2 quantiles, >= 0, ascending")
            if not any(seconds):
                raise ValueError(f"lab {name}: no second has any quantiles")
            object.__setattr__(self, name, _nearest_filled(seconds))
        if any(t is not None and t < 0 for t in self.first_request_s):
            raise ValueError("lab first_request_s: seconds after launch, >= 0")

    @classmethod
    def from_fleet(cls, result: Mapping[str, Any]) -> LabHost:
        """From a ``tools/fleet`` wave's JSON: by second where it has them, else the
        whole wave's quantiles for every second."""

        def by_second(key: str, whole: str) -> tuple[Quantiles, ...]:
            seconds = result.get(key) or []
            if any(seconds):
                return tuple(tuple(q) for q in seconds)
            return (tuple(result[whole]) or (0.0, 0.0),)

        return cls(
            tuple(result["first_request_after_launch_s"]),
            by_second("request_latency_by_second_s", "request_latency_s"),
            by_second("sleep_lag_by_second_s", "loop_lag_s"),
        )

    def latency(self, at_s: float, rng: random.Random) -> float:
        return draw(_at_second(self.request_latency_s, at_s), rng)

    def lag(self, due_s: float, rng: random.Random) -> float:
        return draw(_at_second(self.timer_lag_s, due_s), rng)


def _nearest_filled(seconds: tuple[Quantiles, ...]) -> tuple[Quantiles, ...]:
    filled = [tuple(q) for q in seconds]
    known = [i for i, q in enumerate(filled) if q]
    for i, q in enumerate(filled):
        if not q:
            filled[i] = filled[min(known, key=lambda k: (abs(k - i), k))]
    return tuple(filled)


def _at_second(seconds: tuple[Quantiles, ...], at_s: float) -> Quantiles:
    return seconds[min(max(0, int(at_s)), len(seconds) - 1)]


def draw(quantiles: Quantiles, rng: random.Random) -> float:
    """A value of the distribution whose evenly spaced quantiles these are."""
    at = rng.random() * (len(quantiles) - 1)
    i = int(at)
    if i >= len(quantiles) - 1:
        return quantiles[-1]
    return quantiles[i] + (quantiles[i + 1] - quantiles[i]) * (at - i)


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    nodes: int
    rate_per_min: float
    instance_type: str = "m5.large"
    pods_per_node: int = 10
    pod_rate_per_s: float = 500.0
    prefixes_at_launch: int = 0
    agent: str = "ultranet"  # or "vpc-cni"
    env: Mapping[str, str] = field(default_factory=dict)  # ipamd settings, VPC CNI names
    # The VPC CNI's own settings (tools/fleet's --vpccni-env): VPCCNI_SETTINGS only.
    vpccni_env: Mapping[str, str] = field(default_factory=dict)
    vpccni_cleanup_delay_max_s: float = vpccni.TIMERS.leaked_eni_cleanup_delay_max_s
    throttle: ThrottleTable | None = None  # None: EC2 never throttles
    burst: int = 1  # nodes launched together
    burst_every_s: float | None = None  # None: a burst every burst / rate
    faults: Faults = Faults()
    pod_retry_s: float = 1.0
    timeout_s: float | None = None  # simulated seconds; None: until settled
    seed: int = 1
    # An efa-only interface on every network card but 0 at launch, as a GPU launch
    # template gives (tools/fleet's --efa-only-cards): no address, one NAU each.
    efa_only_cards: bool = False
    restart: bool = False  # once settled, restart every agent at once (a DaemonSet roll)
    # Play one node in ``sample`` (see ``run``); None: every node, unless EC2 throttles a
    # wave of more than PLAYED_NODES.
    sample: int | None = None
    timings: Timings | None = None  # None: the shipped data file
    # Each node's launch, seconds after the first, in launch order: a real run's
    # (tools/fleet's ``launch_at_s``) replayed, so a machine that fell behind its launch
    # schedule is compared on the launches it made. None: the rate or the bursts.
    launch_at_s: tuple[float, ...] | None = None
    # The lab's machine as a real run measured it (``LabHost``); None: each node on its
    # own machine, as on AWS (``timings``).
    lab: LabHost | None = None

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"nodes {self.nodes}: must be >= 1")
        if self.rate_per_min <= 0 or self.pod_rate_per_s <= 0:
            raise ValueError("the launch and pod rates must be > 0")
        if self.pods_per_node < 0 or self.prefixes_at_launch < 0 or self.burst < 1:
            raise ValueError("pods per node and prefixes at launch >= 0, burst >= 1")
        unknown = sorted(set(self.vpccni_env) - set(VPCCNI_SETTINGS))
        if unknown:
            raise ValueError(f"VPC CNI setting {unknown[0]}: one of {', '.join(VPCCNI_SETTINGS)}")
        if not self.vpccni_env.get("WARM_PREFIX_TARGET", "1").isdigit():
            raise ValueError("the VPC CNI's WARM_PREFIX_TARGET must be a count >= 0")
        if self.vpccni_env.get("DISABLE_LEAKED_ENI_CLEANUP", "false") not in ("true", "false"):
            raise ValueError("the VPC CNI's DISABLE_LEAKED_ENI_CLEANUP is true or false")
        if self.vpccni_cleanup_delay_max_s < 0:
            raise ValueError("the leaked-ENI sweep's delay must be >= 0")
        if self.burst_every_s is not None and self.burst_every_s <= 0:
            raise ValueError(f"burst period {self.burst_every_s}: must be > 0")
        if self.agent not in AGENTS:
            raise ValueError(f"agent {self.agent!r}: one of {', '.join(AGENTS)}")
        if self.sample is not None and not 1 <= self.sample <= self.nodes:
            raise ValueError(f"sample one node in {self.sample}: must be 1..nodes")
        if self.launch_at_s is not None:
            times = self.launch_at_s
            if len(times) != self.nodes:
                raise ValueError(f"{len(times)} launch times for {self.nodes} nodes")
            if times[0] < 0 or any(b < a for a, b in zip(times, times[1:], strict=False)):
                raise ValueError("launch times must be >= 0 and in launch order")
            if self.sample not in (None, 1):
                raise ValueError("replayed launch times are played in full (sample 1)")
        if self.lab is not None:
            if len(self.lab.first_request_s) != self.nodes:
                raise ValueError(
                    f"lab: {len(self.lab.first_request_s)} first requests for {self.nodes} nodes"
                )
            if self.sample not in (None, 1):
                raise ValueError("a replayed lab is played in full (sample 1)")


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


PHASES = ("start", "pods")  # a node's EC2 calls: until Ready, then while its pods land


def call_counts(per_node: list[Mapping[str, Mapping[str, int]]]) -> dict[str, Any]:
    """A wave's EC2-call keys (shared with ``tools/fleet``), from each node's calls by
    phase (``PHASES``; others, such as a restart's, are not counted) and action."""
    count = max(1, len(per_node))
    by_phase: dict[str, Counter[str]] = {phase: Counter() for phase in PHASES}
    per_node_total: list[int] = []
    per_node_by_action: dict[str, list[int]] = {}
    for calls in per_node:
        combined: Counter[str] = Counter()
        for phase in PHASES:
            by_phase[phase].update(calls.get(phase, {}))
            combined.update(calls.get(phase, {}))
        per_node_total.append(sum(combined.values()))
        for action in combined:
            per_node_by_action.setdefault(action, []).append(combined[action])
    return {
        "ec2_calls_per_node": round(sum(per_node_total) / count, 3),
        "ec2_calls_per_node_max": max(per_node_total, default=0),
        "ec2_calls_by_action": {
            action: {
                "total": sum(values),
                "per_node_mean": round(sum(values) / count, 3),
                "per_node_max": max(values),
                "start": by_phase["start"][action],
                "pods": by_phase["pods"][action],
            }
            for action, values in sorted(per_node_by_action.items())
        },
        "ec2_calls_start_per_node": round(sum(by_phase["start"].values()) / count, 3),
        "ec2_calls_pods_per_node": round(sum(by_phase["pods"].values()) / count, 3),
    }


def wave_times(ready: list[float], running: list[float]) -> dict[str, float | None]:
    """Launch -> Ready and launch -> all pods running, per node (s): the keys shared with
    ``tools/fleet``."""
    return {
        "ready_p50_s": _round(percentile(ready, 50)),
        "ready_p99_s": _round(percentile(ready, 99)),
        "ready_max_s": _round(max(ready) if ready else None),
        "pods_running_p50_s": _round(percentile(running, 50)),
        "pods_running_p99_s": _round(percentile(running, 99)),
        "pods_running_max_s": _round(max(running) if running else None),
    }


class _Node:
    __slots__ = (
        "index",
        "launched_at",
        "ready_at",
        "pods_done_at",
        "enis",
        "assigned",
        "running",
        "refused",
        "wake_set",
        "urgent",
        "wait_token",
        "waiting",
        "phase",
        "restarted_at",
        "ready_again_at",
        "calls",
        "throttled",
        "retries",
        "client",
        "bucket",
        "pacers",
        "subnets_until",
        "quota",
        "owed",
        "tagged",
        "proc",
    )

    def __init__(self, index: int, launched_at: float, prefixes: int) -> None:
        self.index = index
        self.launched_at = launched_at
        self.ready_at: float | None = None
        self.pods_done_at: float | None = None
        self.enis = [prefixes]  # prefixes per pod ENI, the primary first
        self.assigned = 0
        self.running = 0
        self.refused = 0
        self.wake_set = False
        self.urgent = False
        self.wait_token: object | None = None
        self.waiting = False
        self.phase = "start"  # "pods" once Ready, "restart" from a mass restart on
        self.restarted_at: float | None = None
        self.ready_again_at: float | None = None
        self.calls: dict[str, Counter[str]] | None = None
        self.throttled = 0
        self.retries = 0
        self.client = False
        self.bucket: TokenBucket | None = None
        self.pacers: dict[str, ThrottlePacer] = {}
        self.subnets_until = -math.inf
        self.quota = vpccni.SDK.quota_tokens
        self.owed = 0.0  # a failed answer's latency, added to the process's next wait
        self.tagged = False
        self.proc: Generator[Any, None, None] | None = None

    @property
    def prefixes(self) -> int:
        return sum(self.enis)


# What a process yields: a float, sleep that long; or a _Wait, until the node's agent is
# woken (an allocation) or ``timeout`` passes (None: only a wake).
@dataclass(frozen=True, slots=True)
class _Wait:
    timeout: float | None


Proc = Generator[float | _Wait, None, Any]


class _Wave:
    def __init__(self, config: LaunchConfig) -> None:
        self.config = config
        self.timings = config.timings or load_timings()
        self.itype = lookup(config.instance_type)
        self.slots = self.itype.max_prefixes_per_eni
        self.max_enis = self.itype.card(0).max_interfaces
        # Neither agent uses them (ipam.agent manages a card only if an interface on it has
        # an address; the VPC CNI card 0's only), so they add NAU and nothing else.
        self.efa_only_interfaces = len(self.itype.network_cards) - 1 if config.efa_only_cards else 0
        if config.prefixes_at_launch > self.slots:
            raise ValueError(
                f"{config.prefixes_at_launch} prefixes at launch: a {self.itype.name}'s "
                f"primary ENI holds at most {self.slots}"
            )
        self.agent_config = load_config(dict(config.env))
        self.targets = self.agent_config.warm_targets()
        self.rng = random.Random(config.seed)
        self.lab_rng = random.Random(config.seed * 7919 + 1)  # the lab's draws: apart
        self.first_launch = config.launch_at_s[0] if config.launch_at_s else 0.0
        self.now = 0.0
        self._seq = 0
        self.heap: list[tuple[float, int, Any, Any, _Node | None]] = []
        # The account's request buckets by name, and by what a request draws from (as
        # ipam.nau.throttle.AccountThrottle.admit, which looks the action up each time).
        self.account: dict[str, AccountBucket] = {}
        self.account_by_request: dict[tuple[str, bool], AccountBucket] = {}
        self.nodes: list[_Node] = []
        self.pending: deque[list[Any]] = deque()  # [node, pods left to bind]
        self.scheduler_busy = False
        self.next_bind = 0.0
        self.events = 0
        self.init_failures = 0  # the VPC CNI's failed starts (aws-node restarted)
        self._plans: dict[tuple[int, tuple[int, ...]], warm.Plan] = {}
        self.vpccni_shape = vpccni.NodeShape(
            self.slots,
            self.max_enis,
            max_pods=max_pods(self.itype, Mode.PREFIX).value,  # as tools/fleet: EKS's
            warm_prefix_target=int(
                config.vpccni_env.get("WARM_PREFIX_TARGET", vpccni.DEFAULT_WARM_PREFIX_TARGET)
            ),
        )
        self.leak_scan = config.vpccni_env.get("DISABLE_LEAKED_ENI_CLEANUP", "false") != "true"
        self.stop_when_throttled = False  # run(): a large wave is played again, sampled

    def clock(self) -> float:
        return self.now

    # -- the engine --------------------------------------------------------------

    def push(self, at: float, target: Any, token: Any = None, node: _Node | None = None) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (at, self._seq, target, token, node))

    def start(self, node: _Node, proc: Proc) -> None:
        node.proc = proc
        self.push(self.now, proc, None, node)

    def _resume(self, proc: Proc, node: _Node | None) -> None:
        try:
            command = next(proc)
        except StopIteration:
            return
        if isinstance(command, _Wait):
            assert node is not None and not node.owed
            token = object()
            node.wait_token = token
            node.waiting = True
            if command.timeout is not None:
                self.push(self.now + command.timeout, proc, token, node)
        elif node is not None and node.owed:
            self.push(self.now + node.owed + command, proc, None, node)
            node.owed = 0.0
        else:
            self.push(self.now + command, proc, None, node)

    def wake(self, node: _Node, *, urgent: bool) -> None:
        node.wake_set = True
        if urgent:
            node.urgent = True
        if node.waiting:
            node.waiting = False
            self.push(self.now, node.proc, node.wait_token, node)

    def play(self, limit: float | None) -> bool:
        """Run until nothing is left to happen; False if ``limit`` (simulated) came first."""
        heap = self.heap
        pop = heapq.heappop
        while heap:
            at, _, target, token, node = pop(heap)
            if limit is not None and at > limit:
                self.now = limit
                return False
            self.now = at
            self.events += 1
            if token is not None:
                assert node is not None
                if node.wait_token is not token:
                    continue  # a timeout overtaken by a wake, or the reverse
                node.wait_token = None
                node.waiting = False
            if node is None:
                target()
            else:
                self._resume(target, node)
        return True

    # -- the wave ------------------------------------------------------------------

    def launch_all(self) -> None:
        self.push(
            self.config.launch_at_s[0] if self.config.launch_at_s else 0.0, self._launch_burst
        )

    def agent(self, node: _Node) -> Proc:
        return self._ultranet(node) if self.config.agent == "ultranet" else self._vpccni(node)

    def restart_all(self) -> dict[str, Any]:
        """Every Ready node's agent stopped and a new one started at once, on the same pool
        (ultranet's journal, the VPC CNI's checkpoint; the ENIs from IMDS): a new process
        with a new EC2 client (its own bucket, pacers, retry quota) that runs its start
        again. Calls count in the node's "restart" phase, not the wave's."""
        began = self.now
        nodes = [n for n in self.nodes if n.ready_at is not None]
        before = {n.index: n.assigned for n in nodes}
        throttled = sum(n.throttled for n in nodes)
        failures = self.init_failures
        for node in nodes:
            node.phase = "restart"
            node.restarted_at = began
            node.client = False
            node.bucket = None
            node.pacers = {}
            node.subnets_until = -math.inf
            node.quota = vpccni.SDK.quota_tokens
            node.wake_set = node.urgent = node.waiting = False
            node.wait_token = None
            self.start(node, self.agent(node))
        limit = None if self.config.timeout_s is None else began + self.config.timeout_s
        settled = self.play(limit)
        again = [n.ready_again_at - began for n in nodes if n.ready_again_at is not None]
        calls: Counter[str] = Counter()
        for node in nodes:
            calls.update((node.calls or {}).get("restart", {}))
        # The model holds counts, not addresses: a pod is lost if its node's pool holds
        # fewer addresses than before, duplicated if more pods than addresses remain.
        held = {n.index: warm.IPS_PER_PREFIX * n.prefixes for n in nodes}
        return {
            "nodes": len(nodes),
            "nodes_ready_again": len(again),
            "failures": [] if settled else [f"stopped at --timeout {self.config.timeout_s} s"],
            "ec2_calls": sum(calls.values()),
            "ec2_calls_by_action": dict(sorted(calls.items())),
            "throttled_calls": sum(n.throttled for n in nodes) - throttled,
            "vpccni_init_failures": self.init_failures - failures,
            "allocations_before": sum(before.values()),
            "allocations_lost": sum(max(0, before[i] - held[i]) for i in before),
            "addresses_duplicated": sum(max(0, n.assigned - held[n.index]) for n in nodes),
            "ready_p50_s": _round(percentile(again, 50)),
            "ready_p99_s": _round(percentile(again, 99)),
            "ready_max_s": _round(max(again) if again else None),
            "simulated_s": round(self.now - began, 3),
        }

    def _launch_burst(self) -> None:
        """``burst`` nodes now; the next burst ``burst_every_s`` (or ``burst / rate``) later."""
        config = self.config
        first = len(self.nodes)
        if config.launch_at_s is not None:
            due = bisect.bisect_right(config.launch_at_s, self.now)
            last = max(first + 1, due)
        else:
            last = first + config.burst
        for index in range(first, min(last, config.nodes)):
            node = _Node(index, self.now, config.prefixes_at_launch)
            self.nodes.append(node)
            self.start(node, self.agent(node))
        if len(self.nodes) < config.nodes:
            if config.launch_at_s is not None:
                at = config.launch_at_s[len(self.nodes)]
            elif config.burst_every_s is None:
                at = len(self.nodes) * 60.0 / config.rate_per_min
            else:
                at = len(self.nodes) // config.burst * config.burst_every_s
            self.push(at, self._launch_burst)

    def ready(self, node: _Node) -> None:
        if node.phase == "restart":
            if node.ready_again_at is None:
                node.ready_again_at = self.now
            return
        if node.ready_at is not None:
            return
        node.ready_at = self.now
        node.phase = "pods"
        if self.config.pods_per_node == 0:
            node.pods_done_at = self.now
            return
        self.pending.append([node, self.config.pods_per_node])
        if not self.scheduler_busy:
            self.scheduler_busy = True
            self.push(max(self.now, self.next_bind), self._bind)

    def _bind(self) -> None:
        """The scheduler binds one pod; the next one ``1 / pod_rate`` later."""
        entry = self.pending[0]
        entry[1] -= 1
        if entry[1] == 0:
            self.pending.popleft()
        self.land(entry[0])
        self.next_bind = self.now + 1.0 / self.config.pod_rate_per_s
        if self.pending:
            self.push(self.next_bind, self._bind)
        else:
            self.scheduler_busy = False

    def land(self, node: _Node) -> None:
        if node.assigned < warm.IPS_PER_PREFIX * node.prefixes:
            node.assigned += 1
            node.running += 1
            if node.running == self.config.pods_per_node:
                node.pods_done_at = self.now + self.timings.allocate_s
            self.wake(node, urgent=False)
            return
        node.refused += 1
        self.wake(node, urgent=True)
        self.push(self.now + self.config.pod_retry_s, lambda: self.land(node))

    # -- EC2 ---------------------------------------------------------------------

    def request(
        self, node: _Node, action: str, *, filtered: bool = True
    ) -> tuple[str | None, float]:
        """One request reaches EC2: counted, admitted or refused by the account's bucket
        (``filtered``: sent with a filter or pagination, see ``ipam.nau.throttle``), then
        the faults. Returns EC2's error code (None: done) and when the answer comes."""
        if node.calls is None:
            node.calls = {"start": Counter(), "pods": Counter()}
        calls = node.calls.get(node.phase)
        if calls is None:
            calls = node.calls[node.phase] = Counter()
        calls[action] += 1
        table = self.config.throttle
        if table is not None:
            bucket = self.account_by_request.get((action, filtered))
            if bucket is None:
                limit = table.limit(action, filtered_or_paginated=filtered)
                bucket = self.account.get(limit.bucket)
                if bucket is None:
                    bucket = self.account[limit.bucket] = AccountBucket(limit.spec)
                self.account_by_request[action, filtered] = bucket
            if not bucket.take(self.now):
                if self.stop_when_throttled:
                    raise _Throttled
                node.throttled += 1
                return "RequestLimitExceeded", self.answer_s()
        faults = self.config.faults
        latency = self.answer_s() + faults.latency_s
        if faults.internal and self.rng.random() < faults.internal:
            return "InternalError", latency
        if faults.unavailable and self.rng.random() < faults.unavailable:
            return "Unavailable", latency
        return None, latency

    def answer_s(self) -> float:
        """One answer's latency: ``Timings``, or a draw of the lab's."""
        lab = self.config.lab
        if lab is None:
            return self.timings.ec2_call_s
        return lab.latency(self.now - self.first_launch, self.lab_rng)

    def slept(self, seconds: float, after: float = 0.0) -> float:
        """An agent's sleep of ``seconds``, ``after`` from now: on the lab's machine it
        wakes late."""
        lab = self.config.lab
        if lab is None:
            return seconds
        return seconds + lab.lag(self.now + after + seconds - self.first_launch, self.lab_rng)

    def client_s(self, node: _Node) -> float:
        """From now until the node's new EC2 client sends its first request."""
        lab = self.config.lab
        first = None if lab is None or node.phase == "restart" else lab.first_request_s[node.index]
        if first is None:
            return self.timings.ec2_client_s
        return max(0.0, node.launched_at + first - self.now)

    def ultranet_call(self, node: _Node, action: str) -> Generator[float | _Wait, None, bool]:
        """``Ec2Client._call``: client bucket and pacer, request, retries; True if done."""
        if not node.client:
            node.client = True
            node.bucket = TokenBucket(
                self.agent_config.ec2_rate, self.agent_config.ec2_burst, self.clock
            )
            yield self.client_s(node)
        assert node.bucket is not None
        pacer = node.pacers.get(action)
        if pacer is None:
            pacer = node.pacers[action] = ThrottlePacer(
                self.agent_config.ec2_rate,
                min(self.agent_config.ec2_rate, CLIENT["throttle_min_rate_per_s"]),
                CLIENT["throttle_decrease"],
                CLIENT["throttle_increase_per_s"],
                self.clock,
                self.rng,
            )
        # Between two requests only this node's own client is involved (its bucket, its
        # pacer, its random back-off), so what it does there is worked out at once on a
        # clock set to when it happens, and each attempt costs the model one event: the
        # request, when it reaches EC2's buckets, which other nodes share.
        attempt = 0
        gap = 0.0  # from now until this attempt starts (the last answer and back-off)
        while True:
            attempt += 1
            wait = self._then(self.now + gap, partial(_pace, node.bucket, pacer))
            if gap + wait > 0:
                yield gap + wait
            code, latency = self.request(node, action)
            if code is None:
                yield latency
                pacer.succeeded()
                return True
            throttled = code in THROTTLE_CODES
            if throttled:
                self._then(self.now + latency, pacer.throttled)
            limit = CLIENT["max_throttled_attempts"] if throttled else CLIENT["max_attempts"]
            if attempt >= limit:
                yield latency
                return False
            cap = min(CLIENT["max_delay_s"], CLIENT["base_delay_s"] * 2 ** (attempt - 1))
            node.retries += 1
            gap = latency + self.slept(self.rng.uniform(0.0, cap), after=latency)

    def _then(self, at: float, work: Callable[[], T]) -> T:
        """``work`` as at simulated time ``at`` (>= now): for a node's own state only."""
        now = self.now
        self.now = at
        try:
            return work()
        finally:
            self.now = now

    def sdk_call(
        self, node: _Node, action: str, *, filtered: bool = True, answer_later: bool = False
    ) -> Generator[float | _Wait, None, bool]:
        """The Go SDK's standard retryer (the VPC CNI's client): 3 attempts, full jitter,
        a retry quota per client. ``answer_later``: a failure returns at once and its
        answer's latency is added to the process's next wait (``_Node.owed``), which
        saves a storm an event per failed call; only for callers that wait (or call
        again) before they read the clock or draw a random number."""
        sdk = vpccni.SDK
        if node.owed:
            yield 0.0  # the last failed answer comes before this request
        if not node.client:
            node.client = True
            yield self.client_s(node)
        attempt = 0
        while True:
            attempt += 1
            code, latency = self.request(node, action, filtered=filtered)
            if code is None:
                yield latency
                if attempt == 1:
                    node.quota = min(sdk.quota_tokens, node.quota + sdk.success_refund)
                else:
                    node.quota = min(sdk.quota_tokens, node.quota + sdk.retry_cost)
                return True
            if attempt >= sdk.max_attempts or node.quota < sdk.retry_cost:
                # Its callers sleep next (a back-off, a pool pass, a restart).
                latency = self.slept(0.0, after=latency) + latency
                if answer_later:
                    node.owed = latency
                else:
                    yield latency
                return False
            node.quota -= sdk.retry_cost
            node.retries += 1
            bound = sdk.backoff_bound_s(attempt)
            backoff = bound if sdk.backoff_is_fixed(attempt) else self.rng.uniform(0.0, bound)
            # The answer, then the back-off: one wait (only this node is involved).
            yield latency + self.slept(backoff, after=latency)

    # -- ultranet's agent ----------------------------------------------------------

    def usage(self, node: _Node) -> warm.CardUsage:
        prefixes = node.prefixes
        held = -(-node.assigned // warm.IPS_PER_PREFIX)
        return warm.CardUsage(
            assigned=node.assigned,
            cooldown=0,
            prefixes=prefixes,
            releasable_prefixes=prefixes - held,
            slots_free=sum(self.slots - p for p in node.enis),
            enis=len(node.enis),
            max_enis=self.max_enis,
            slots_per_eni=self.slots,
        )

    def plan(self, node: _Node) -> warm.Plan:
        """The agent's warm plan; pure in the node's counts, so each is worked out once."""
        key = (node.assigned, tuple(node.enis))
        found = self._plans.get(key)
        if found is None:
            found = self._plans[key] = warm.plan(self.usage(node), self.targets)
        return found

    def _ultranet(self, node: _Node) -> Proc:
        """``NodeAgent.start`` then ``NodeAgent._manage``."""
        yield self.timings.start_s
        if not self.plan(node).add_prefixes:
            self.ready(node)
        else:
            node.wake_set = node.urgent = True
        failures = 0
        while True:
            if not node.wake_set:
                plan = self.plan(node)
                quiet = not plan.add_prefixes and not plan.release_prefixes
                # A pass that would plan nothing does nothing: skip it until a wake.
                yield _Wait(None if quiet else MANAGE_INTERVAL_S)
            if node.wake_set and not node.urgent:
                yield MANAGE_DEBOUNCE_S
            node.wake_set = node.urgent = False
            if (yield from self._step(node)):
                failures = 0
            else:
                failures += 1
                yield min(ERROR_BACKOFF_S[1], ERROR_BACKOFF_S[0] * 2 ** (failures - 1))

    def _step(self, node: _Node) -> Generator[float | _Wait, None, bool]:
        """``NodeAgent._step`` on card 0: grow, or shrink once; False if EC2 failed."""
        stuck = shrunk = False
        for _ in range(2):
            plan = self.plan(node)
            if plan.add_prefixes and not stuck:
                before = node.prefixes
                if not (yield from self._grow(node, plan.add_prefixes)):
                    return False
                stuck = node.prefixes == before
                continue
            if plan.release_prefixes and not shrunk:
                if not (yield from self._shrink(node, plan.release_prefixes)):
                    return False
                shrunk = True
                continue
            break
        if not self.plan(node).add_prefixes:
            self.ready(node)
        return True

    def _grow(self, node: _Node, need: int) -> Generator[float | _Wait, None, bool]:
        for i in range(len(node.enis)):
            if need <= 0:
                return True
            room = self.slots - node.enis[i]
            if room <= 0:
                continue
            count = min(room, need)
            if not (yield from self.ultranet_call(node, "AssignPrivateIpAddresses")):
                return False
            node.enis[i] += count
            need -= count
        while need > 0:
            if len(node.enis) >= self.max_enis:
                return True  # no slot left: the step counts the card stuck
            if self.now >= node.subnets_until:
                if not (yield from self.ultranet_call(node, "DescribeSubnets")):
                    return False
                node.subnets_until = self.now + SUBNET_CACHE_S
            if not (yield from self.ultranet_call(node, "CreateNetworkInterface")):
                return False
            attached = yield from self.ultranet_call(node, "AttachNetworkInterface")
            if attached:
                attached = yield from self.ultranet_call(node, "ModifyNetworkInterfaceAttribute")
            if not attached:
                yield from self.ultranet_call(node, "DeleteNetworkInterface")
                return False
            count = min(need, self.slots)
            node.enis.append(count)
            need -= count
        return True

    def _shrink(self, node: _Node, count: int) -> Generator[float | _Wait, None, bool]:
        """Releasable prefixes, newest ENI first (``AddressPool.releasable_prefixes``);
        pods fill the oldest prefixes first. One Unassign per ENI."""
        used = -(-node.assigned // warm.IPS_PER_PREFIX)
        free_on = []
        for held in node.enis:
            in_use = min(held, used)
            used -= in_use
            free_on.append(held - in_use)
        for i in reversed(range(len(node.enis))):
            take = min(count, free_on[i])
            if not take:
                continue
            node.enis[i] -= take  # out of the pool first: no pod may take them meanwhile
            if not (yield from self.ultranet_call(node, "UnassignPrivateIpAddresses")):
                node.enis[i] += take
                return False
            count -= take
            if not count:
                break
        return True

    # -- the VPC CNI's ipamd -----------------------------------------------------

    def _vpccni(self, node: _Node) -> Proc:
        timers = vpccni.TIMERS
        restart_in = timers.restart_backoff_s
        while True:
            yield self.timings.start_s
            if (yield from self._vpccni_init(node)):
                break
            self.init_failures += 1
            yield restart_in  # aws-node exited; the kubelet's crash-loop back-off
            restart_in = min(timers.restart_backoff_max_s, restart_in * 2)
        self.ready(node)
        self.start_leak_scan(node)
        yield self.slept(timers.first_pass_after_s)
        shape = self.vpccni_shape
        target = shape.warm_prefix_target
        last_decrease = -math.inf
        while True:
            total, assigned = node.prefixes, node.assigned
            over = 0
            if vpccni.pool_too_low(total, assigned, target, shape.max_pods):
                yield from self._vpccni_top_up(node)
            else:
                over = vpccni.prefixes_to_release(vpccni.free_prefixes(total, assigned), target)
                if over and self.now - last_decrease > timers.decrease_interval_s:
                    last_decrease = self.now
                    yield from self._vpccni_release(node, over)
                elif not over:
                    # This pass and every later one do nothing until a pod lands: skip
                    # them, and resume at the first pass after the pod.
                    passed = self.now
                    yield _Wait(None)
                    passes = math.ceil((self.now - passed) / timers.pool_pass_s)
                    yield passed + max(1, passes) * timers.pool_pass_s - self.now
                    continue
            yield self.slept(timers.pool_pass_s)

    def _vpccni_init(self, node: _Node) -> Generator[float | _Wait, None, bool]:
        """``nodeInit``: describe, tag and refresh groups of every ENI, then pre-scale."""
        timers = vpccni.TIMERS
        for attempt in range(timers.describe_all_enis_tries):
            # DescribeAllENIs names the ENIs: neither a filter nor pagination.
            described = yield from self.sdk_call(
                node, "DescribeNetworkInterfaces", filtered=False, answer_later=True
            )
            if described:
                break
            if attempt == timers.describe_all_enis_tries - 1:
                return False
            if attempt:
                yield timers.describe_all_enis_sleep_s * attempt
        if not node.tagged:
            delay = timers.tag_backoff_s
            for attempt in range(1, timers.tag_tries + 1):
                if (yield from self.sdk_call(node, "CreateTags")):
                    node.tagged = True
                    break
                if attempt == timers.tag_tries:
                    return False
                jitter = delay * timers.tag_jitter
                yield delay + self.rng.uniform(-jitter, jitter)
                delay = min(delay * timers.tag_backoff_factor, TAG_BACKOFF_MAX_S)
        for _ in node.enis:
            yield from self.sdk_call(node, "ModifyNetworkInterfaceAttribute")  # errors ignored
        shape = self.vpccni_shape
        # The datastore holds the pods of the checkpoint (none at launch, all at a restart).
        if vpccni.pool_too_low(
            node.prefixes, node.assigned, shape.warm_prefix_target, shape.max_pods
        ):
            return (yield from self._vpccni_top_up(node))
        return True

    def _vpccni_top_up(self, node: _Node) -> Generator[float | _Wait, None, bool]:
        """``increaseDatastorePool``: Assign on the first ENI with room (falling back to
        one prefix), or a new ENI."""
        shape = self.vpccni_shape
        free = vpccni.free_prefixes(node.prefixes, node.assigned)
        need = vpccni.prefixes_to_assign(free, shape.warm_prefix_target)
        for i, held in enumerate(node.enis):
            if held >= self.slots:
                continue
            count = min(need, self.slots - held)
            if (yield from self.sdk_call(node, "AssignPrivateIpAddresses", answer_later=True)):
                node.enis[i] += count
                return True
            if (yield from self.sdk_call(node, "AssignPrivateIpAddresses", answer_later=True)):
                node.enis[i] += 1  # the fallback asks for 1 prefix
                return True
            return False  # the callers wait (pool pass, restart) before anything else
        if len(node.enis) >= self.max_enis:
            return True
        # tryAllocateENI: a failure is logged, never fails the caller (nor nodeInit).
        for action in ("DescribeSubnets", "CreateNetworkInterface", "DescribeInstances"):
            # awsGetFreeDeviceNumber's DescribeInstances names the instance: unfiltered.
            filtered = action != "DescribeInstances"
            if not (yield from self.sdk_call(node, action, filtered=filtered)):
                return True
        if not (yield from self.sdk_call(node, "AttachNetworkInterface")):
            yield from self.sdk_call(node, "DeleteNetworkInterface")
            return True
        yield from self.sdk_call(node, "ModifyNetworkInterfaceAttribute")
        node.enis.append(min(need, self.slots))
        return True

    def _vpccni_release(self, node: _Node, count: int) -> Generator[float | _Wait, None, bool]:
        if not (yield from self.sdk_call(node, "UnassignPrivateIpAddresses")):
            return False
        for i in reversed(range(len(node.enis))):
            taken = min(count, node.enis[i])
            node.enis[i] -= taken
            count -= taken
            if not count:
                break
        return True

    def start_leak_scan(self, node: _Node) -> None:
        """``cleanUpLeakedENIs``: one DescribeNetworkInterfaces at a random 0-300 s."""
        if not self.leak_scan:
            return
        delay = self.rng.uniform(0.0, self.config.vpccni_cleanup_delay_max_s)

        def scan() -> Proc:
            yield delay
            yield from self.sdk_call(node, "DescribeNetworkInterfaces")

        self.push(self.now, scan(), None, node)

    # -- results -------------------------------------------------------------------

    def result(self, settled: bool, wall_s: float) -> dict[str, Any]:
        config = self.config
        nodes = self.nodes
        ready = [n.ready_at - n.launched_at for n in nodes if n.ready_at is not None]
        running = [n.pods_done_at - n.launched_at for n in nodes if n.pods_done_at is not None]
        ready_at = sorted(n.ready_at for n in nodes if n.ready_at is not None)
        span = ready_at[-1] if ready_at else 0.0  # the first launch is at 0
        per_minute = Counter(int(t // 60) for t in ready_at)
        step = max(1, math.ceil(len(ready_at) / READY_CURVE_POINTS))
        curve = [
            [round(t, 3), i + 1]
            for i, t in enumerate(ready_at)
            if i % step == 0 or i == len(ready_at) - 1
        ]
        nau, addresses = self.addresses_used()
        return {
            "scenario": None,  # named by the caller
            "agent": config.agent,
            "account": "fresh request buckets for this scenario (AWS throttles per account)",
            "launch": _launch_text(config),
            "faults": config.faults.describe(),
            "vpccni_init_failures": self.init_failures,
            "nodes": config.nodes,
            "nodes_launched": len(nodes),
            "nodes_ready": len(ready),
            "timed_out": not settled,
            "instance_type": config.instance_type,
            "prefixes_at_launch": config.prefixes_at_launch,
            "efa_only_cards": config.efa_only_cards,
            "pods_per_node": config.pods_per_node,
            "rate_per_min": config.rate_per_min,
            "pod_rate_per_s": config.pod_rate_per_s,
            **call_counts([n.calls or {} for n in nodes]),
            "throttled_calls": sum(n.throttled for n in nodes),
            "retries": sum(n.retries for n in nodes),
            "pods_refused_pool_dry": sum(n.refused for n in nodes),
            **wave_times(ready, running),
            "ready_nodes_per_min": round(len(ready) / span * 60, 1) if span else None,
            "ready_nodes_by_minute": [
                per_minute[m] for m in range(max(per_minute, default=-1) + 1)
            ],
            "ready_curve": curve,  # [seconds from the first launch, nodes Ready by then]
            "nau_used": nau,
            "subnet_addresses_used": addresses,
            "clock": "simulated",
            "simulated_s": round(self.now, 3),
            "events": self.events,
            "model_wall_s": round(wall_s, 2),
            "timings": _timings_doc(self.timings),
        }

    def addresses_used(self) -> tuple[int, int]:
        """NAU (``ipam.nau.rules``, AWS's units) and subnet addresses of every node's pod
        ENIs at the end: each ENI's primary address and its prefixes; and the efa-only
        interfaces of ``efa_only_cards`` (no address)."""
        efa_only = self.efa_only_interfaces * DEFAULT_RULES.interface_units(
            InterfaceType.EFA_ONLY, primary=False, addresses=0, prefixes=0
        )
        nau = addresses = 0
        for node in self.nodes:
            nau += efa_only
            for i, prefixes in enumerate(node.enis):
                nau += DEFAULT_RULES.interface_units(
                    InterfaceType.INTERFACE, primary=i == 0, addresses=1, prefixes=prefixes
                )
                addresses += 1 + warm.IPS_PER_PREFIX * prefixes
        return nau, addresses


def _pace(bucket: TokenBucket, pacer: ThrottlePacer) -> float:
    """``Ec2Client._call``'s wait before a request: its own bucket and the action's pacer."""
    return max(bucket.reserve(), pacer.reserve())


def _timings_doc(timings: Timings) -> dict[str, float]:
    return {
        "start_s": timings.start_s,
        "ec2_client_s": timings.ec2_client_s,
        "ec2_call_s": timings.ec2_call_s,
        "allocate_s": timings.allocate_s,
    }


def _launch_text(config: LaunchConfig) -> str:
    if config.launch_at_s:
        return f"a real run's {config.nodes} launches over {config.launch_at_s[-1]:.3f} s, replayed"
    if config.burst_every_s is not None:
        return f"bursts of {config.burst} every {config.burst_every_s:g} s"
    return f"steady {config.rate_per_min:g}/min"


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


class _Throttled(Exception):
    """EC2 throttled a request of a wave played with ``stop_when_throttled``."""


def run(config: LaunchConfig) -> dict[str, Any]:
    """Play one scenario; the result carries the keys ``tools/fleet`` reports.

    Every node is played, unless ``config.sample`` says otherwise or, with ``sample``
    None, EC2 throttles a request of a wave of more than ``PLAYED_NODES``: a throttled
    request is an event, and a storm's requests grow with the square of the wave (twice
    the nodes, each waiting twice as long), so 100,000 reactive nodes would make 10^7-10^8 of
    them. Such a wave is played again, one node in ``sample_for(config)`` (``_sampled``).
    """
    started = time.perf_counter()
    if config.sample is not None:
        return _play(config, config.sample, started)
    if config.nodes <= PLAYED_NODES or config.throttle is None or config.launch_at_s:
        return _play(config, 1, started)
    try:
        return _play(config, 1, started, stop_when_throttled=True)
    except _Throttled:
        return _play(config, sample_for(config), started)


def sample_for(config: LaunchConfig) -> int:
    """One node in how many a throttled wave is played: (nodes / ``PLAYED_NODES``)^2,
    unless a bucket the agents use would then hold less than a token or refill less than
    one each ``SHORTEST_LOOP_S``."""
    sample = math.ceil((config.nodes / PLAYED_NODES) ** 2)
    if config.throttle is not None:
        specs = _agent_buckets(config.throttle)
        most = min(min(s.capacity, s.refill_per_s * SHORTEST_LOOP_S) for s in specs)
        sample = min(sample, max(1, math.floor(most)))
    return sample


def sample_limit(table: ThrottleTable) -> int:
    """The largest N a wave can be played one node in: each bucket the agents use keeps a
    capacity of one token at least."""
    return max(1, math.floor(min(s.capacity for s in _agent_buckets(table))))


def _agent_buckets(table: ThrottleTable) -> list[BucketSpec]:
    return [
        table.limit(action, filtered_or_paginated=filtered).spec
        for action in AGENT_ACTIONS
        for filtered in (True, False)
    ]


def _sampled(config: LaunchConfig, sample: int) -> LaunchConfig:
    """The wave one node in ``sample`` plays: launches, the scheduler and each bucket the
    agents use (capacity and refill) divided by ``sample``, so that a played node meets
    what a node of the whole wave meets: as many requests queued for each token, the
    same share of the scheduler. Each node's own client, pacer and timers are untouched,
    so the tokens come ``sample`` times further apart against the same timers: which is
    why N stays small (``sample_for``; the README says how far it was checked). One
    timing is scaled: an answer takes ``sample`` times as long, so that a node's
    back-to-back requests (an Assign and its fallback, a retry after a throttled answer)
    stay as far apart, against the others' requests, as in the whole wave: played in 1 ms
    where the others' come N times sparser, the second would almost never find a token.
    """
    throttle = config.throttle
    if throttle is not None:
        table = throttle

        def divided(spec: BucketSpec) -> BucketSpec:
            return BucketSpec(spec.capacity / sample, spec.refill_per_s / sample)

        used = {
            table.limit(action, filtered_or_paginated=filtered).category
            for action in AGENT_ACTIONS
            for filtered in (True, False)
        }
        throttle = dataclasses.replace(  # the buckets no agent draws from stay as they are
            table,
            categories={c: divided(b) if c in used else b for c, b in table.categories.items()},
            uncategorized={
                a: divided(b) if a in AGENT_ACTIONS else b for a, b in table.uncategorized.items()
            },
        )
    timings = config.timings or load_timings()
    return dataclasses.replace(
        config,
        nodes=math.ceil(config.nodes / sample),
        rate_per_min=config.rate_per_min / sample,
        pod_rate_per_s=config.pod_rate_per_s / sample,
        burst=max(1, round(config.burst / sample)),
        throttle=throttle,
        timings=dataclasses.replace(timings, ec2_call_s=timings.ec2_call_s * sample),
        faults=dataclasses.replace(config.faults, latency_s=config.faults.latency_s * sample),
        sample=1,
    )


def _play(
    config: LaunchConfig, sample: int, started: float, *, stop_when_throttled: bool = False
) -> dict[str, Any]:
    played = _sampled(config, sample) if sample > 1 else config
    wave = _Wave(played)
    wave.stop_when_throttled = stop_when_throttled
    wave.launch_all()
    settled = wave.play(config.timeout_s)
    result = wave.result(settled, time.perf_counter() - started)
    if config.restart and settled:  # as tools/fleet: a settled wave only
        result["restart"] = wave.restart_all()
    if sample > 1:
        _scale_to_the_wave(result, config, played.nodes)
        result["faults"] = config.faults.describe()
        result["timings"] = _timings_doc(config.timings or load_timings())
    result["sample"] = {
        "one_node_in": sample,
        "nodes_played": played.nodes,
        "how": "every node"
        if sample == 1
        else "launches, scheduler and the agents' account buckets (capacity and refill) "
        "divided by one_node_in, each answer's latency times one_node_in; per-node figures "
        "and times as played, fleet totals times nodes / nodes_played",
    }
    result["model_wall_s"] = round(time.perf_counter() - started, 2)
    return result


FLEET_TOTALS = (
    "nodes_launched",
    "nodes_ready",
    "throttled_calls",
    "retries",
    "pods_refused_pool_dry",
    "vpccni_init_failures",
    "nau_used",
    "subnet_addresses_used",
)
RESTART_TOTALS = (
    "nodes",
    "nodes_ready_again",
    "ec2_calls",
    "throttled_calls",
    "vpccni_init_failures",
    "allocations_before",
    "allocations_lost",
    "addresses_duplicated",
)


def _scale_to_the_wave(result: dict[str, Any], config: LaunchConfig, played: int) -> None:
    """A sampled wave's result as the whole wave's: counts of the fleet times the nodes
    each played node stands for; means, maxima and times per node as they are."""
    factor = config.nodes / played

    def scaled(value: float) -> int:
        return round(value * factor)

    for key in FLEET_TOTALS:
        result[key] = scaled(result[key])
    for action in result["ec2_calls_by_action"].values():
        for key in ("total", "start", "pods"):
            action[key] = scaled(action[key])
    if result["ready_nodes_per_min"] is not None:
        result["ready_nodes_per_min"] = round(result["ready_nodes_per_min"] * factor, 1)
    result["ready_nodes_by_minute"] = [scaled(n) for n in result["ready_nodes_by_minute"]]
    result["ready_curve"] = [[t, scaled(n)] for t, n in result["ready_curve"]]
    restart = result.get("restart")
    if restart is not None:
        for key in RESTART_TOTALS:
            restart[key] = scaled(restart[key])
        restart["ec2_calls_by_action"] = {
            a: scaled(n) for a, n in restart["ec2_calls_by_action"].items()
        }
    result.update(
        nodes=config.nodes,
        rate_per_min=config.rate_per_min,
        pod_rate_per_s=config.pod_rate_per_s,
        launch=_launch_text(config),
    )
