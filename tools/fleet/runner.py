"""A launch wave of real node agents against one emulated, throttled EC2 account.

Each node is an instance launched into one VPC of the emulator at the wave's rate, running
the real ``ipam.agent.NodeAgent`` (``ultranet-ipamd``'s agent, shipped defaults unless
``env`` says otherwise) with:

* its own IMDS, over HTTP, on its own loopback port (``imds_mux.ImdsMux``);
* the cloud, its EC2 endpoint and the IMDS servers in a child process
  (``emulator.EmulatorProcess``), on the other core;
* its own EC2 client, ``ipam.ec2.Ec2Client`` over real boto3 and HTTP to the emulator's
  EC2 endpoint, which throttles the account as EC2 does (``ipam.nau.throttle``);
* its own state directory (journal, fdatasync'd) under a tmpfs root;
* host networking in memory (``tools.lab.memory_host``): the one departure from the
  production path, because thousands of namespaces do not fit on one machine.

A node is Ready when its agent's warm pool is met (``wait_ready``; the daemon writes the
CNI conflist at that moment). Its pods then become schedulable: a cluster-wide scheduler
hands them out at ``pod_rate_per_s``, and each lands through ``NodeAgent.allocate`` (the
CNI ADD path minus the socket). A pod refused because the pool ran dry is retried after
``pod_retry_s``, as the kubelet retries a failed sandbox.

Everything runs in real time: the agents on one event loop in this process, their EC2
calls and IMDS reads on worker threads; the emulator in the child. ``loop_lag_*``,
``cpu_s``, ``emulator_cpu_s`` and ``agent_errors`` (an IMDS timeout is the machine's
limit) say when the machine, not EC2, was the bottleneck.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import random
import resource
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni.keys import IpamKey, PodRef
from ipam.agent import AgentError, NodeAgent, NodeIdentity
from ipam.config import load_config
from ipam.datastore_errors import PoolExhausted
from ipam.ec2 import THROTTLE_CODES, Ec2Client, boto3_client
from ipam.hostnet import HostNetworkPort
from ipam.imds import ImdsClient
from ipam.instance_types import lookup
from ipam.metrics import IpamdMetrics
from ipam.nau.launch import call_counts, percentile, wave_times
from ipam.nau.maxpods import Mode, max_pods
from ipam.nau.throttle import ThrottleTable
from ipam.nau.vpccni_calls import DEFAULT_WARM_PREFIX_TARGET, TIMERS, NodeShape
from tools.fleet.emulator import EmulatorProcess, FaultSpec, RequestSummary
from tools.fleet.vpccni_agent import VpcCniAgent, VpcCniSettings
from tools.lab.memory_host import MemoryHost

log = logging.getLogger("ultranet.fleet")

SUBNET_SIZE = 65536  # each subnet is a /16, the largest EC2 allows
# When a call was made: before Ready; from Ready on (pods landing and the top-ups they
# cause); during a mass restart.
PHASES = ("start", "pods", "restart")
SETTLE_POLL_S = 0.1
LAG_TICK_S = 0.05
SHM = "/dev/shm"  # tmpfs: each agent's journal fdatasync costs no disk I/O here
READY_CURVE_POINTS = 200
ULTRANET = "ultranet"
VPC_CNI = "vpc-cni"
AGENTS = (ULTRANET, VPC_CNI)


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    prefixes_at_launch: int
    agent: str = ULTRANET  # or VPC_CNI: the AWS VPC CNI's calls (vpccni_agent)


@dataclass(frozen=True, slots=True)
class FleetConfig:
    nodes: int
    rate_per_min: float
    instance_type: str = "m5.large"
    pods_per_node: int = 2
    pod_rate_per_s: float = 500.0
    env: Mapping[str, str] = field(default_factory=dict)  # ipamd settings, VPC CNI names
    throttle: ThrottleTable | None = None  # None: EC2 never throttles
    subnets: int | None = None  # /16 subnets in the AZ; None: sized from the wave
    timeout_s: float = 600.0
    pod_retry_s: float = 1.0
    state_root: Path | None = None  # None: a directory on /dev/shm (tmpfs)
    seed: int = 1
    efa_only_cards: bool = False  # an efa-only interface on every card but 0 at launch
    restart: bool = False  # once settled, restart every agent at once (a DaemonSet roll)
    # Karpenter-like bursts: (N, every_s) launches N instances at once every every_s
    # seconds; None: the steady rate_per_min.
    burst: tuple[int, float] | None = None
    faults: tuple[FaultSpec, ...] = ()  # injected into every EC2 request of the run
    vpccni_env: Mapping[str, str] = field(default_factory=dict)  # the VPC CNI's settings
    vpccni_cleanup_delay_max_s: float = TIMERS.leaked_eni_cleanup_delay_max_s


class NodeStats:
    """The agent's EC2 calls by phase, as its client reports them (an ``Ec2Stats``), teed
    into the agent's own metrics."""

    def __init__(self, metrics: IpamdMetrics) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self.phase = "start"
        self.calls: dict[str, Counter[str]] = {p: Counter() for p in PHASES}
        self.throttled: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()  # by code, throttling included
        self.succeeded: dict[str, Counter[str]] = {p: Counter() for p in PHASES}  # by action
        self.client_wait_s = 0.0  # in the agent's own client-side rate limit
        self.first_request_at: float | None = None  # when its first EC2 request left
        self.latencies: list[float] = []  # each request's, call -> answer, s (not a restart's)
        # (sent at, latency) per request and (due at, lateness) per back-off sleep, not a
        # restart's: the model replays this machine's side second by second (LabHost).
        self.sent: list[tuple[float, float]] = []
        self.sleep_lags: list[tuple[float, float]] = []

    def request(self, action: str, latency_s: float, error_code: str | None) -> None:
        self.metrics.request(action, latency_s, error_code)
        with self._lock:
            if self.first_request_at is None:
                self.first_request_at = time.monotonic() - latency_s
            if self.phase != "restart":
                self.latencies.append(latency_s)
                self.sent.append((time.monotonic() - latency_s, latency_s))
            self.calls[self.phase][action] += 1
            if error_code is None:
                self.succeeded[self.phase][action] += 1
            else:
                self.errors[error_code] += 1
                if error_code in THROTTLE_CODES:
                    self.throttled[self.phase] += 1

    def slept(self, due_at: float, lateness_s: float) -> None:
        """A back-off sleep due at ``due_at`` (monotonic) ended ``lateness_s`` late."""
        with self._lock:
            if self.phase != "restart":
                self.sleep_lags.append((due_at, lateness_s))

    def retry(self, action: str, code: str, delay_s: float) -> None:
        self.metrics.retry(action, code, delay_s)
        with self._lock:
            self.retries[self.phase] += 1

    def rate_limited(self, action: str, wait_s: float) -> None:
        self.metrics.rate_limited(action, wait_s)
        with self._lock:
            self.client_wait_s += wait_s


@dataclass(slots=True)
class NodeRun:
    index: int
    instance_id: str
    launched_at: float
    agent: NodeAgent | VpcCniAgent
    host: MemoryHost
    imds: ImdsClient
    stats: NodeStats
    imds_url: str
    state_dir: Path
    ready_at: float | None = None
    pods_running: int = 0
    pods_done_at: float | None = None
    pods_refused: int = 0  # allocations refused (pool dry), retried
    error: str | None = None


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def quantiles(values: list[float]) -> list[float]:
    """The 0th, 1st, ... 100th percentiles (nearest rank), s; [] for no values."""
    ordered = sorted(values)
    count = len(ordered)
    if not count:
        return []
    return [round(ordered[max(1, math.ceil(q / 100 * count)) - 1], 5) for q in range(101)]


def deciles_by_second(samples: list[tuple[float, float]], start: float) -> list[list[float]]:
    """Per whole second since ``start``, the 11 deciles (0, 10, ... 100 %, nearest rank)
    of the values whose time falls in it; [] for a second with none, [] for no samples."""
    bins: dict[int, list[float]] = {}
    for at, value in samples:
        bins.setdefault(max(0, int(at - start)), []).append(value)
    if not bins:
        return []
    out = []
    for second in range(max(bins) + 1):
        ordered = sorted(bins.get(second, []))
        count = len(ordered)
        out.append(
            [round(ordered[max(1, math.ceil(q / 100 * count)) - 1], 5) for q in range(0, 101, 10)]
            if count
            else []
        )
    return out


def _held(agent: NodeAgent | VpcCniAgent) -> dict[str, str]:
    """Attachment -> its addresses, as the agent holds them (none if it never started)."""
    if isinstance(agent, VpcCniAgent):
        return agent.allocations_held()
    try:
        allocations = agent.allocations()
    except AgentError:
        return {}
    return {
        str(a.key): ",".join(f"{lease.card}:{lease.address}" for lease in a.leases)
        for a in allocations
    }


class PodPacer:
    """A scheduler's slots, ``rate`` a second: one every ``1/rate`` s while pods wait.

    Slots follow the schedule, not the moment the last sleep ended: a sleep that wakes
    late (an event loop busy with thousands of agents) is made up by the next slots, so
    the rate holds on average. No credit builds while no pod waits."""

    def __init__(self, rate_per_s: float) -> None:
        self.interval = 1.0 / rate_per_s
        self.next_at = -math.inf

    def idle_until(self, now: float) -> None:
        """A pod arrived at ``now`` after none waited: the schedule restarts there."""
        self.next_at = max(self.next_at, now)

    def take(self, now: float) -> float:
        """The next slot; returns how long to wait for it (0 if it has passed)."""
        if self.next_at == -math.inf:
            self.next_at = now
        wait = max(0.0, self.next_at - now)
        self.next_at += self.interval
        return wait


def clients_and_emulator_disagree(
    sent: int,
    succeeded: Mapping[str, int],
    errors: Mapping[str, int],
    emulator: RequestSummary,
) -> list[str]:
    """Where the agents' clients and the emulator's request log differ; empty when every
    request the clients sent got EC2's own answer. A difference is the lab failing (a
    connection refused or timed out, an answer lost on its way): AWS's endpoint does not
    do that to a healthy client, so the wave's figures would then measure this machine.
    A connect timeout shows as a request EC2 never saw and an error code it never gave;
    a read timeout as a call EC2 carried out that its client counts as failed."""
    found = []
    if sent != emulator.requests:
        found.append(f"the clients sent {sent} requests, EC2 answered {emulator.requests}")
    for action in sorted(set(succeeded) | set(emulator.carried_out_by_action)):
        mine, ec2 = succeeded.get(action, 0), emulator.carried_out_by_action.get(action, 0)
        if mine != ec2:
            found.append(f"{action}: the clients saw {mine} succeed, EC2 carried out {ec2}")
    for code in sorted(set(errors) | set(emulator.errors_by_code)):
        mine, ec2 = errors.get(code, 0), emulator.errors_by_code.get(code, 0)
        if mine != ec2:
            found.append(f"error {code}: the clients saw {mine}, EC2 answered {ec2}")
    return found


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Fleet:
    """One emulator (one account, one VPC) and the scenarios run against it in turn."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        count = config.subnets or self._subnets_needed()
        if count > 5:
            raise ValueError(f"{count} /16 subnets needed; a VPC holds 5 CIDR blocks by default")
        self.blocks = [f"100.{64 + i}.0.0/16" for i in range(count)]
        self._boto3_lock = threading.Lock()
        self._boto3_clients: list[Any] = []  # closed after each wave: their keep-alive sockets

    def _subnets_needed(self) -> int:
        per_node = 1 + 16 * (math.ceil(self.config.pods_per_node / 16) + 2)
        return max(1, math.ceil(self.config.nodes * per_node * 1.25 / SUBNET_SIZE))

    def run(self, scenarios: list[Scenario]) -> dict[str, dict[str, Any]]:
        """Each scenario in turn; a scenario's instances are terminated before the next."""
        emulator = EmulatorProcess(
            seed=self.config.seed,
            throttle=self.config.throttle,
            blocks=self.blocks,
            faults=self.config.faults,
        )
        root = Path(tempfile.mkdtemp(prefix="ultranet-fleet-", dir=self.config.state_root or SHM))
        try:
            results = {}
            for scenario in scenarios:
                results[scenario.name] = asyncio.run(
                    _Wave(self, scenario, emulator, root / scenario.name).run()
                )
            return results
        finally:
            emulator.close()
            shutil.rmtree(root, ignore_errors=True)

    def ec2_factory(
        self, url: str, stats: NodeStats
    ) -> Callable[[NodeIdentity, IpamdMetrics], Ec2Client]:
        config = load_config(dict(self.config.env))

        def build(node: NodeIdentity, metrics: IpamdMetrics) -> Ec2Client:
            # boto3's default session is not safe to build clients from on several threads
            # at once (each daemon is its own process in production): one at a time.
            with self._boto3_lock:
                return Ec2Client(
                    node.region,
                    endpoint_url=url,
                    rate_per_s=config.ec2_rate,
                    burst=config.ec2_burst,
                    stats=stats,
                    client_factory=self._boto3_client,
                )

        return build

    def _boto3_client(self, region: str, endpoint: str | None) -> Any:
        client = boto3_client(
            region, endpoint, aws_access_key_id="lab", aws_secret_access_key="lab"
        )
        self._boto3_clients.append(client)
        return client

    def close_clients(self) -> None:
        with self._boto3_lock:
            clients, self._boto3_clients = self._boto3_clients, []
        for client in clients:
            client.close()


class _Wave:
    def __init__(
        self, fleet: Fleet, scenario: Scenario, emulator: EmulatorProcess, root: Path
    ) -> None:
        self.fleet = fleet
        self.config = fleet.config
        self.scenario = scenario
        self.emulator = emulator
        self.url = emulator.info.ec2_url
        self.agent_errors: Counter[str] = Counter()
        self.root = root
        self.nodes: list[NodeRun] = []
        self.pending: asyncio.Queue[tuple[NodeRun, int]] = asyncio.Queue()
        self.lags: list[float] = []
        self.launch_lags: list[float] = []  # each instance's launch after its slot, s
        self.tasks: set[asyncio.Task[None]] = set()
        self.done = asyncio.Event()
        self.finished = 0  # nodes with all pods running, or failed

    async def run(self) -> dict[str, Any]:
        config = self.config
        loop = asyncio.get_running_loop()
        # Each agent is its own process in production, with its own worker threads; here they
        # share one pool, sized so an agent sleeping in a backoff never holds up another.
        loop.set_default_executor(
            concurrent.futures.ThreadPoolExecutor(config.nodes + 8, thread_name_prefix="ec2")
        )
        self.root.mkdir(parents=True)
        emulator = self.emulator
        emulator.call("fresh_account")
        requests_before = emulator.call("request_mark")
        load_before = os.getloadavg()
        cpu_before = _cpu_s()
        emulator_cpu_before = emulator.call("cpu_s")
        counting = _ErrorCounter(self.agent_errors)
        logging.getLogger("ultranet.ipamd").addHandler(counting)
        started = time.monotonic()
        ticker = asyncio.create_task(self._lag_ticker())
        scheduler = asyncio.create_task(self._scheduler())
        launcher = asyncio.create_task(self._launch_all(started))
        timed_out = False
        try:
            async with asyncio.timeout(config.timeout_s):
                await launcher
                await self.done.wait()
                pods_wall = time.monotonic() - started
                await self._settle()
        except TimeoutError:
            timed_out = True
            pods_wall = time.monotonic() - started
        wall = time.monotonic() - started
        cpu = _cpu_s() - cpu_before
        emulator_cpu = emulator.call("cpu_s") - emulator_cpu_before
        logging.getLogger("ultranet.ipamd").removeHandler(counting)
        for task in (ticker, scheduler, launcher, *self.tasks):
            task.cancel()
        await asyncio.gather(ticker, scheduler, launcher, *self.tasks, return_exceptions=True)
        requests = emulator.call("requests_since", requests_before)
        result = self._result(wall, cpu, timed_out, load_before, requests)
        result["emulator_cpu_s"] = round(emulator_cpu, 2)
        result["all_pods_running_wall_s"] = round(pods_wall, 2)
        if config.restart and not timed_out:
            result["restart"] = await self._restart_all()
        await asyncio.gather(*(n.agent.stop() for n in self.nodes), return_exceptions=True)
        self.fleet.close_clients()
        emulator.call("terminate", [n.instance_id for n in self.nodes])
        return result

    async def _settle(self) -> None:
        """Wait until every agent's warm pool is met again: the top-ups the last pods
        caused are part of the wave's EC2 calls."""
        while True:
            reasons = [(await n.agent.status()).reason for n in self.nodes if n.error is None]
            if all(r == "warm pool met" for r in reasons):
                return
            await asyncio.sleep(SETTLE_POLL_S)

    async def _lag_ticker(self) -> None:
        while True:
            due = time.monotonic() + LAG_TICK_S
            await asyncio.sleep(LAG_TICK_S)
            self.lags.append(max(0.0, time.monotonic() - due))

    def launch_offset_s(self, index: int) -> float:
        """When instance ``index`` launches, from the wave's start."""
        if self.config.burst is not None:
            size, every = self.config.burst
            return (index // size) * every
        return index * 60.0 / self.config.rate_per_min

    async def _launch_all(self, started: float) -> None:
        for index in range(self.config.nodes):
            due = started + self.launch_offset_s(index)
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            node = self._launch(index)
            # Later than its slot: this machine, not the wave (a starved emulator process
            # answers the launch late); a late launch finds more tokens refilled.
            self.launch_lags.append(max(0.0, node.launched_at - due))
            task = asyncio.create_task(self._node(node), name=f"node-{index}")
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _launch(self, index: int) -> NodeRun:
        config = self.config
        subnets = self.emulator.info.subnet_ids
        instance_id, imds_url = self.emulator.call(
            "launch",
            config.instance_type,
            subnets[index % len(subnets)],
            self.scenario.prefixes_at_launch,
            config.efa_only_cards,
        )
        launched_at = time.monotonic()
        state = self.root / str(index)
        stats = NodeStats(IpamdMetrics())
        host = MemoryHost(self.emulator, instance_id)
        imds = ImdsClient(imds_url)
        agent: NodeAgent | VpcCniAgent
        if self.scenario.agent == VPC_CNI:
            agent = self._vpccni_agent(index, state, imds, stats)
        else:
            agent = self._agent(state, imds, stats, host)
        node = NodeRun(index, instance_id, launched_at, agent, host, imds, stats, imds_url, state)
        self.nodes.append(node)
        return node

    def _agent(
        self, state: Path, imds: ImdsClient, stats: NodeStats, host: MemoryHost
    ) -> NodeAgent:
        agent_config = load_config({**self.config.env, "ULTRANET_STATE_DIR": str(state)})

        def hostnet() -> HostNetworkPort:
            return host

        return NodeAgent(
            agent_config,
            imds=imds,
            ec2_factory=self.fleet.ec2_factory(self.url, stats),
            hostnet=hostnet,
            metrics=stats.metrics,
        )

    def _vpccni_agent(
        self, index: int, state: Path, imds: ImdsClient, stats: NodeStats, generation: int = 0
    ) -> VpcCniAgent:
        """aws-node on node ``index``; ``generation`` counts its restarts (each a new
        process: a new client, its own randomness, the same checkpoint file)."""
        config = self.config
        itype = lookup(config.instance_type)
        env = config.vpccni_env
        shape = NodeShape(
            max_prefixes_per_eni=itype.max_prefixes_per_eni,
            max_enis=itype.max_enis_default_card,
            max_pods=max_pods(itype, Mode.PREFIX).value,
            warm_prefix_target=int(env.get("WARM_PREFIX_TARGET", DEFAULT_WARM_PREFIX_TARGET)),
        )
        settings = VpcCniSettings(
            shape,
            leaked_eni_cleanup=env.get("DISABLE_LEAKED_ENI_CLEANUP", "false") != "true",
            cleanup_delay_max_s=config.vpccni_cleanup_delay_max_s,
        )
        fleet = self.fleet

        def client(region: str) -> Any:
            with fleet._boto3_lock:  # see Fleet.ec2_factory
                return fleet._boto3_client(region, self.url)

        rng = random.Random(config.seed * 1_000_003 + index + generation * 1_000_000_007)
        state.mkdir(parents=True, exist_ok=True)
        return VpcCniAgent(imds, client, stats, settings, rng, checkpoint=state / "ipam.json")

    async def _restart_all(self) -> dict[str, Any]:
        """Stop every agent and start a new one on the same state directory (ultranet's
        journal, the VPC CNI's checkpoint) and IMDS, all at once: what rolling the
        DaemonSet does to a running fleet, at its worst. Its calls are those until every
        new agent is Ready and settled again (the VPC CNI's leaked-ENI sweep included)."""
        nodes = [n for n in self.nodes if n.error is None]
        before = {n.index: _held(n.agent) for n in nodes}
        mark = self.emulator.call("request_mark")
        started = time.monotonic()
        await asyncio.gather(*(n.agent.stop() for n in nodes))
        for node in nodes:
            node.stats.phase = "restart"
            node.imds.close()
            node.imds = ImdsClient(node.imds_url)
            if self.scenario.agent == VPC_CNI:
                node.agent = self._vpccni_agent(
                    node.index, node.state_dir, node.imds, node.stats, generation=1
                )
            else:
                node.host = MemoryHost(self.emulator, node.instance_id)
                node.agent = self._agent(node.state_dir, node.imds, node.stats, node.host)

        async def start(node: NodeRun) -> float | None:
            begun = time.monotonic()
            await node.agent.start()
            if not await node.agent.wait_ready(self.config.timeout_s):
                return None
            assert node.agent.ready_at is not None
            return node.agent.ready_at - begun

        ready = await asyncio.gather(*(start(n) for n in nodes), return_exceptions=True)
        times = [t for t in ready if isinstance(t, float)]
        unsettled = []
        if len(times) == len(nodes):
            try:
                async with asyncio.timeout(self.config.timeout_s):
                    await self._settle()
            except TimeoutError:
                unsettled = [f"not settled again within {self.config.timeout_s:g} s"]
        wall = time.monotonic() - started
        after = {n.index: _held(n.agent) for n in nodes}
        lost = sum(
            1
            for i, held in before.items()
            for key, addr in held.items()
            if after[i].get(key) != addr
        )
        addresses = [a for held in after.values() for a in held.values()]
        calls: Counter[str] = Counter()
        for node in nodes:
            calls.update(node.stats.calls["restart"])
        requests = self.emulator.call("requests_since", mark)
        return {
            "nodes": len(nodes),
            "nodes_ready_again": len(times),
            "failures": unsettled
            + sorted({f"{type(r).__name__}: {r}" for r in ready if isinstance(r, BaseException)})[
                :5
            ],
            "ec2_calls": sum(calls.values()),
            "ec2_calls_by_action": dict(calls),
            "ec2_requests_seen_by_emulator": requests.requests,
            "throttled_calls": sum(n.stats.throttled["restart"] for n in nodes),
            "vpccni_init_failures": sum(
                n.agent.init_failures for n in nodes if isinstance(n.agent, VpcCniAgent)
            ),
            "allocations_before": sum(len(h) for h in before.values()),
            "allocations_lost": lost,
            "addresses_duplicated": len(addresses) - len(set(addresses)),
            "ready_p50_s": _round(percentile(times, 50)),
            "ready_p99_s": _round(percentile(times, 99)),
            "ready_max_s": _round(max(times) if times else None),
            "wall_s": round(wall, 2),
        }

    async def _node(self, node: NodeRun) -> None:
        try:
            await node.agent.start()
            if not await node.agent.wait_ready(self.config.timeout_s):
                raise TimeoutError("not ready before the run's timeout")
        except Exception as err:  # noqa: BLE001 - one node's failure is a result, not a crash
            node.error = f"{type(err).__name__}: {err}"
            log.error("node %d (%s) failed: %s", node.index, node.instance_id, node.error)
            self._finish(node)
            return
        node.ready_at = node.agent.ready_at
        node.stats.phase = "pods"
        if self.config.pods_per_node == 0:
            node.pods_done_at = node.ready_at
            self._finish(node)
            return
        for pod in range(self.config.pods_per_node):
            self.pending.put_nowait((node, pod))

    def _finish(self, node: NodeRun) -> None:
        self.finished += 1
        if self.finished == self.config.nodes:
            self.done.set()

    async def _scheduler(self) -> None:
        """Binds pending pods at the cluster-wide rate, in the order their nodes became
        Ready; each pod then lands on its own."""
        pacer = PodPacer(self.config.pod_rate_per_s)
        while True:
            if self.pending.empty():
                node, pod = await self.pending.get()
                pacer.idle_until(time.monotonic())
            else:
                node, pod = self.pending.get_nowait()
            # Behind the schedule (the loop was busy), bind every overdue pod now, in
            # this loop turn: yielding between two pods would bind one a turn, which on
            # a loaded loop is slower than the rate, and a node's pods would reach it
            # after its first pool pass.
            wait = pacer.take(time.monotonic())
            if wait > 0:
                await asyncio.sleep(wait)
            task = asyncio.create_task(self._land(node, pod))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _land(self, node: NodeRun, pod: int) -> None:
        key = IpamKey("fleet", f"{node.instance_id}-{pod}", "eth0")
        ref = PodRef("fleet", f"pod-{node.index}-{pod}")
        while True:
            try:
                await node.agent.allocate(key, ref, multi_nic=False, origin="cni")
                break
            except PoolExhausted:
                node.pods_refused += 1
                await asyncio.sleep(self.config.pod_retry_s)
        node.pods_running += 1
        if node.pods_running == self.config.pods_per_node:
            node.pods_done_at = time.monotonic()
            self._finish(node)

    def _result(
        self,
        wall: float,
        cpu: float,
        timed_out: bool,
        load_before: tuple[float, float, float],
        requests: RequestSummary,
    ) -> dict[str, Any]:
        config = self.config
        nodes = self.nodes
        succeeded: Counter[str] = Counter()
        for node in nodes:
            for phase in ("start", "pods"):
                succeeded.update(node.stats.succeeded[phase])
        errors = sum((n.stats.errors for n in nodes), Counter())
        sent = sum(sum(n.stats.calls[p].values()) for n in nodes for p in ("start", "pods"))
        ready = [n.ready_at - n.launched_at for n in nodes if n.ready_at is not None]
        running = [n.pods_done_at - n.launched_at for n in nodes if n.pods_done_at is not None]
        count = max(1, len(nodes))
        launched = len(nodes)
        usage = self.emulator.call("usage")
        ready_at = sorted(n.ready_at for n in nodes if n.ready_at is not None)
        first_launch = min((n.launched_at for n in nodes), default=0.0)
        ready_span = (ready_at[-1] - first_launch) if ready_at else 0.0
        per_minute = Counter(int((t - first_launch) // 60) for t in ready_at)
        step = max(1, math.ceil(len(ready_at) / READY_CURVE_POINTS))
        curve = [
            [round(t - first_launch, 3), i + 1]
            for i, t in enumerate(ready_at)
            if i % step == 0 or i == len(ready_at) - 1
        ]
        return {
            "scenario": self.scenario.name,
            "agent": self.scenario.agent,
            "account": "fresh request buckets for this scenario (AWS throttles per account)",
            "launch": (
                f"bursts of {config.burst[0]} every {config.burst[1]:g} s"
                if config.burst
                else f"steady {config.rate_per_min:g}/min"
            ),
            "faults": [
                {"kind": f.kind, "probability": f.probability, "latency_s": f.latency_s}
                for f in config.faults
            ],
            "vpccni_init_failures": sum(
                n.agent.init_failures for n in nodes if isinstance(n.agent, VpcCniAgent)
            ),
            "nodes": config.nodes,
            "nodes_launched": launched,
            "nodes_ready": len(ready),
            "nodes_failed": sum(1 for n in nodes if n.error is not None),
            "timed_out": timed_out,
            "instance_type": config.instance_type,
            "prefixes_at_launch": self.scenario.prefixes_at_launch,
            "efa_only_cards": config.efa_only_cards,
            "pods_per_node": config.pods_per_node,
            "rate_per_min": config.rate_per_min,
            "pod_rate_per_s": config.pod_rate_per_s,
            **call_counts([n.stats.calls for n in nodes]),
            "ec2_requests_seen_by_emulator": requests.requests,
            "throttled_calls": sum(sum(n.stats.throttled.values()) for n in nodes),
            "throttled_calls_seen_by_emulator": requests.throttled,
            "ec2_calls_carried_out_by_emulator": requests.carried_out_by_action,
            "ec2_calls_succeeded_by_clients": dict(succeeded),
            "retries": sum(sum(n.stats.retries.values()) for n in nodes),
            "ec2_errors": dict(errors),
            "ec2_errors_answered_by_emulator": requests.errors_by_code,
            # None: not checked, a wave that timed out may leave requests in flight
            "clients_and_emulator_disagree": (
                None
                if timed_out
                else clients_and_emulator_disagree(sent, succeeded, errors, requests)
            ),
            "client_rate_limit_wait_s": round(sum(n.stats.client_wait_s for n in nodes), 3),
            "pods_refused_pool_dry": sum(n.pods_refused for n in nodes),
            **wave_times(ready, running),
            "ready_nodes_per_min": round(len(ready) / ready_span * 60, 1) if ready_span else None,
            "ready_nodes_by_minute": [
                per_minute[m] for m in range(max(per_minute, default=-1) + 1)
            ],
            "ready_curve": curve,  # [seconds from the first launch, nodes Ready by then]
            "nau_used": usage["nau_used"],
            "subnet_addresses_used": usage["subnet_addresses_used"],
            "agent_errors": dict(self.agent_errors),
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "cpu_ms_per_node": round(cpu / count * 1000, 2),  # the agents' process only
            "loop_lag_p99_ms": _round(
                None if not self.lags else 1000 * (percentile(self.lags, 99) or 0.0), 1
            ),
            "loop_lag_max_ms": _round(1000 * max(self.lags) if self.lags else None, 1),
            # The launch schedule as kept: a run whose launches fell behind is a gentler
            # wave than asked for (the account's buckets refill in between).
            "launch_lag_p99_s": _round(percentile(self.launch_lags, 99)),
            "launch_lag_max_s": _round(max(self.launch_lags) if self.launch_lags else None),
            # The launches as made, seconds after the first: the model replays them
            # (ipam.nau.launch.LaunchConfig.launch_at_s) to be held to this run.
            "launch_at_s": sorted(round(n.launched_at - first_launch, 4) for n in nodes),
            # This machine's side of each node's EC2 calls, for the model to replay: from
            # launch to the first request (in launch order; None: it made none), each
            # request's time there and back, and the event loop's lateness.
            "first_request_after_launch_s": [
                None
                if n.stats.first_request_at is None
                else round(n.stats.first_request_at - n.launched_at, 4)
                for n in sorted(nodes, key=lambda n: n.launched_at)
            ],
            "request_latency_s": quantiles([x for n in nodes for x in n.stats.latencies]),
            "request_latency_by_second_s": deciles_by_second(
                [pair for n in nodes for pair in n.stats.sent], first_launch
            ),
            "sleep_lag_by_second_s": deciles_by_second(
                [pair for n in nodes for pair in n.stats.sleep_lags], first_launch
            ),
            "loop_lag_s": quantiles(self.lags),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "errors": sorted({n.error for n in nodes if n.error is not None})[:5],
        }


class _ErrorCounter(logging.Handler):
    """Counts the agents' error log lines by kind: an IMDS timeout here means the machine,
    not the fleet, ran out of CPU."""

    def __init__(self, counts: Counter[str]) -> None:
        super().__init__(logging.ERROR)
        self._counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "IMDS" in text:
            kind = "imds"
        elif "RequestLimitExceeded" in text:
            kind = "ec2_throttled_every_attempt"
        elif "timeout" in text.lower() or "timed out" in text:
            kind = "ec2_timeout"
        else:
            kind = "other"
        self._counts[kind] += 1


def quiet_agents(verbose: bool) -> None:
    """Thousands of agents log a line per event: warnings and worse only, unless asked."""
    level = logging.INFO if verbose else logging.ERROR
    for name in ("ultranet.ipamd", "ultranet.ipamd.ec2", "ultranet.lab", "ultranet.lab.ec2"):
        logging.getLogger(name).setLevel(level)
    with contextlib.suppress(Exception):
        logging.getLogger("botocore").setLevel(logging.WARNING)
