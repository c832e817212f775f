"""``python -m tools.bench.ipam``: the node daemon's figures, measured in the lab.

1. **pairs/s**: allocate + release pairs per second through the Unix socket, with
   concurrent clients, against the real ``ultranet-ipamd`` process in a lab node (every
   allocation durable: journal line + fdatasync, grouped).
2. **exec → ready** on a p5.48xlarge launched with pre-assigned prefixes (32 cards,
   ENABLE_MULTI_NIC), and the EC2 calls the daemon made to get there.
3. **EC2 calls per node** when N nodes start at once against one emulated EC2 that
   throttles like EC2 (a token bucket per action), with and without prefixes
   pre-assigned at launch: N in-process agents, each with its own IMDS.
4. ``--crash-trials N``: the soak behind the crash-safety bar: kill -9 at a random point
   of a 200-allocation burst, restart, count duplicates and leaks.

``--json`` prints ``{"pairs_per_s", "ready_s", "ready_ec2_calls", ...}``, with the CPU each
side spent per pair and the load average: on a shared machine the rate moves with the load,
the CPU per pair much less. ``--only pairs|ready|fleet`` runs one part.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ipam.client import AsyncIpamClient
from tools.lab.daemon import IpamdProcess, allocate_then_kill
from tools.lab.lab import Lab, LabConfig

STATIC_POOL = {  # nine launch prefixes on an m5.large, kept and never grown
    "IP_COOLDOWN_PERIOD": "0",
    "MINIMUM_IP_TARGET": "144",
    "WARM_IP_TARGET": "1",
    "MAX_ENI": "1",
}


async def _pairs(daemon: IpamdProcess, clients: int, seconds: float) -> tuple[int, float]:
    deadline = time.monotonic() + seconds
    counts = [0] * clients

    async def loop(index: int) -> None:
        async with AsyncIpamClient(daemon.socket) as client:
            n = 0
            while time.monotonic() < deadline:
                container = f"bench-{index}-{n}"
                await client.allocate(container)
                await client.release(container)
                n += 1
            counts[index] = n

    started = time.monotonic()
    await asyncio.gather(*(loop(i) for i in range(clients)))
    return sum(counts), time.monotonic() - started


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bench_pairs(work: Path, clients: int, seconds: float) -> dict[str, Any]:
    """Pairs per second, and the CPU each side spent per pair: on a shared machine the
    rate moves with the load, the CPU per pair much less (it bounds the rate one core
    can sustain: 1e6 / daemon_cpu_us_per_pair)."""
    with Lab(LabConfig(instance_type="m5.large", prefixes_per_card=9)) as lab:
        daemon = IpamdProcess(lab, work / "pairs", STATIC_POOL)
        daemon.start()
        try:
            daemon.wait_ready()
            assert daemon.process is not None
            asyncio.run(_pairs(daemon, clients, 0.5))  # warm-up: connections, caches
            daemon_cpu, own_cpu = _process_cpu_s(daemon.process.pid), _own_cpu_s()
            pairs, elapsed = asyncio.run(_pairs(daemon, clients, seconds))
            daemon_cpu = _process_cpu_s(daemon.process.pid) - daemon_cpu
            own_cpu = _own_cpu_s() - own_cpu
        finally:
            daemon.stop()
    return {
        "pairs": pairs,
        "seconds": round(elapsed, 3),
        "clients": clients,
        "pairs_per_s": round(pairs / elapsed),
        "daemon_cpu_us_per_pair": round(1e6 * daemon_cpu / pairs),
        "client_cpu_us_per_pair": round(1e6 * own_cpu / pairs),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def bench_ready(work: Path, runs: int) -> dict[str, Any]:
    times = []
    calls = []
    inside = []
    with Lab(LabConfig(instance_type="p5.48xlarge", prefixes_per_card=1)) as lab:
        for run in range(runs):
            lab.cloud.requests.clear()
            daemon = IpamdProcess(lab, work / f"ready{run}", {"ENABLE_MULTI_NIC": "true"})
            started = time.monotonic()
            daemon.start()
            try:
                status = daemon.wait_ready()
                times.append(time.monotonic() - started)
                inside.append(float(str(status["ready_after_s"])))
                calls.append(lab.cloud.requests.count())
            finally:
                daemon.stop()
    return {
        "ready_s": round(statistics.median(times), 3),
        "ready_s_runs": [round(t, 3) for t in times],
        "ready_after_start_s": round(statistics.median(inside), 3),
        "ready_ec2_calls": max(calls),
        "instance_type": "p5.48xlarge",
        "cards": 32,
    }


def bench_fleet(nodes: int, prefixes_at_launch: int) -> dict[str, Any]:
    """N agents starting at once against one EC2 that throttles as EC2 does."""
    from ipam.agent import NodeAgent
    from ipam.config import load_config
    from ipam.ec2 import Ec2Client, boto3_client
    from ipam.imds import ImdsClient
    from tools.lab.ec2.server import Ec2Server, ImdsServer
    from tools.lab.ec2.state import Cloud, LaunchInterface

    cloud = Cloud(seed=3)
    vpc = cloud.create_vpc(["100.64.0.0/16"])
    subnet = cloud.create_subnet(
        vpc.vpc_id, "100.64.0.0/17", "us-west-2a", {"kubernetes.io/role/cni": "1"}
    )
    # EC2's published defaults are a bucket of 100 (burst) refilled at 20/s for mutating calls.
    cloud.faults.rate_limit("*", rate_per_s=20.0, burst=100)
    ec2 = Ec2Server(cloud)
    url = ec2.start()
    servers: list[Ec2Server | ImdsServer] = [ec2]
    agents = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for n in range(nodes):
                instance = cloud.launch_instance(
                    "m5.large",
                    subnet.subnet_id,
                    interfaces=[LaunchInterface(0, 0, ipv4_prefix_count=prefixes_at_launch)],
                )
                imds = ImdsServer(cloud, instance.instance_id)
                servers.append(imds)
                imds_url = imds.start()
                config = load_config(
                    {"ULTRANET_STATE_DIR": f"{tmp}/{n}", "WARM_PREFIX_TARGET": "1"}
                )

                def factory(node: Any, metrics: Any) -> Ec2Client:
                    return Ec2Client(
                        node.region,
                        endpoint_url=url,
                        stats=metrics,
                        client_factory=functools.partial(
                            boto3_client, aws_access_key_id="lab", aws_secret_access_key="lab"
                        ),
                    )

                agents.append(NodeAgent(config, imds=ImdsClient(imds_url), ec2_factory=factory))

            async def start_all() -> float:
                started = time.monotonic()
                await asyncio.gather(*(a.start() for a in agents))
                ok = await asyncio.gather(*(a.wait_ready(120) for a in agents))
                assert all(ok), "some nodes never became ready"
                took = time.monotonic() - started
                await asyncio.gather(*(a.stop() for a in agents))
                return took

            cloud.requests.clear()
            took = asyncio.run(start_all())
        finally:
            for server in servers:
                server.close()
    counts = cloud.requests.counts()
    throttled = sum(1 for r in cloud.requests.records() if r.error_code == "RequestLimitExceeded")
    return {
        "nodes": nodes,
        "prefixes_at_launch": prefixes_at_launch,
        "ec2_calls_per_node": round(sum(counts.values()) / nodes, 2),
        "throttled": throttled,
        "by_action": dict(counts),
        "all_ready_s": round(took, 2),
    }


async def _crash_once(daemon: IpamdProcess, trial: int) -> tuple[int, int]:
    keys = [f"c{trial}-{n:03d}" for n in range(200)]
    stop_after = random.Random(trial).randrange(1, 190)
    acked = await allocate_then_kill(daemon, keys, stop_after)
    daemon.start()
    await daemon._wait_ready(30)
    async with AsyncIpamClient(daemon.socket) as client:
        held = {a["container_id"]: a["interfaces"][0]["address"] for a in await client.list()}
        lost = sum(1 for k, a in acked.items() if held.get(k) != a)
        duplicates = len(held) - len(set(held.values()))
        for k in keys:
            await client.release(k)
        status = await client.status()
    leaked = 9 * 16 - int(status["free_addresses"]["0"])
    return lost + duplicates, leaked


def bench_crash(work: Path, trials: int) -> dict[str, Any]:
    bad = leaks = 0
    with Lab(LabConfig(instance_type="m5.large", prefixes_per_card=9)) as lab:
        daemon = IpamdProcess(lab, work / "crash", STATIC_POOL)
        daemon.start()
        try:
            daemon.wait_ready()
            for trial in range(trials):
                lost_or_dup, leaked = asyncio.run(_crash_once(daemon, trial))
                bad += lost_or_dup
                leaks += leaked
        finally:
            daemon.stop()
    return {"crash_trials": trials, "lost_or_duplicated": bad, "leaked": leaks}


PARTS = ("pairs", "ready", "fleet")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.ipam", description=__doc__)
    parser.add_argument("--clients", type=int, default=128, help="at most 144 (the pool)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--ready-runs", type=int, default=5)
    parser.add_argument("--fleet", type=int, default=50, help="nodes starting at once")
    parser.add_argument("--crash-trials", type=int, default=0)
    parser.add_argument(
        "--only", action="append", choices=PARTS, help="run only this part (repeatable)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (the lab uses network namespaces)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ultranet-bench-") as tmp:
        work = Path(tmp)
        result: dict[str, Any] = {}
        parts = set(args.only or PARTS)
        if "pairs" in parts:
            result.update(bench_pairs(work, args.clients, args.seconds))
        if "ready" in parts:
            result.update(bench_ready(work, args.ready_runs))
        if "fleet" in parts:
            result["fleet_preassigned"] = bench_fleet(args.fleet, prefixes_at_launch=1)
            result["fleet_empty"] = bench_fleet(args.fleet, prefixes_at_launch=0)
        if args.crash_trials:
            result.update(bench_crash(work, args.crash_trials))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        if "pairs_per_s" in result:
            print(
                f"allocate+release pairs/s through the socket: {result['pairs_per_s']:,} "
                f"({result['clients']} clients; CPU per pair: daemon "
                f"{result['daemon_cpu_us_per_pair']} us, load generator "
                f"{result['client_cpu_us_per_pair']} us; load {result['load_average']})"
            )
        if "ready_s" in result:
            print(
                f"exec -> ready, p5.48xlarge with pre-assigned prefixes: {result['ready_s']} s "
                f"(median of {len(result['ready_s_runs'])}), EC2 calls: {result['ready_ec2_calls']}"
            )
        for name in ("fleet_preassigned", "fleet_empty"):
            if name not in result:
                continue
            fleet = result[name]
            print(
                f"{fleet['nodes']} nodes at once, {fleet['prefixes_at_launch']} prefix(es) at "
                f"launch: {fleet['ec2_calls_per_node']} EC2 calls/node, {fleet['throttled']} "
                f"throttled, all ready in {fleet['all_ready_s']} s"
            )
        if args.crash_trials:
            print(
                f"kill -9 trials: {result['crash_trials']}, lost or duplicated "
                f"{result['lost_or_duplicated']}, leaked {result['leaked']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
