"""``python -m tools.bench.ipam``: the node daemon's figures, measured in the lab.

1. **pairs/s**: allocate + release pairs per second through the Unix socket, with
   concurrent clients, against the real ``ultranet-ipamd`` process in a lab node (every
   allocation durable: journal line + fdatasync, grouped), in two rows:
   ``defaults``: the shipped defaults (IP_COOLDOWN_PERIOD 30 s, WARM_PREFIX_TARGET 1) on a
   fresh m5.large launched with no prefix, the pool growing through EC2; a released
   address then sits out 30 s, so the rate is bounded by the pool's size over 30 s and
   allocations past it are refused (counted); ``static``: cooldown 0 and a fixed pool of
   the nine launch prefixes (MINIMUM_IP_TARGET=144, MAX_ENI=1), the daemon's own
   throughput, a departure from the defaults that its row says.
2. **exec → ready** on a p5.48xlarge launched with pre-assigned prefixes (32 cards,
   ENABLE_MULTI_NIC), and the EC2 calls the daemon made to get there.
3. **EC2 calls per node** when N nodes start at once against one emulated EC2 that
   throttles like EC2 (a token bucket per action), with and without prefixes
   pre-assigned at launch: N in-process agents, each with its own IMDS.
4. ``--crash-trials N``: the soak behind the crash-safety bar: kill -9 at a random point
   of a 200-allocation burst, restart, count duplicates and leaks.

``--json`` prints the configuration (flags, each row's daemon effective config and lab,
git commit and dirty paths, Python, machine, load before and after) and the results: per
pairs row every run and the median and range of pairs/s and of the CPU each side spent per
pair (on a shared machine the rate moves with the load, the CPU per pair much less).
``--runs N`` repeats each pairs row; ``--only pairs|ready|fleet`` runs one part.
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

from ipam.client import AsyncIpamClient, IpamClientError
from tools.bench.conditions import code, load, machine
from tools.lab.daemon import IpamdProcess, allocate_then_kill
from tools.lab.lab import Lab, LabConfig

STATIC_POOL = {  # nine launch prefixes on an m5.large, kept and never grown
    "IP_COOLDOWN_PERIOD": "0",
    "MINIMUM_IP_TARGET": "144",
    "WARM_IP_TARGET": "1",
    "MAX_ENI": "1",
}
# The pairs rows: (lab launch prefixes, daemon environment, what the row's label says).
PAIRS_ROWS: dict[str, tuple[int, dict[str, str], str]] = {
    "defaults": (
        0,
        {},
        "shipped defaults: IP_COOLDOWN_PERIOD 30 s, WARM_PREFIX_TARGET 1, fresh m5.large "
        "with no prefix at launch, the pool grown through EC2",
    ),
    "static": (
        9,
        STATIC_POOL,
        "NOT the defaults: IP_COOLDOWN_PERIOD 0 and a fixed pool (nine launch prefixes, "
        "MINIMUM_IP_TARGET 144, MAX_ENI 1): the daemon's own throughput",
    ),
}
REFUSED_BACKOFF_S = 0.01  # a client refused (pool dry) tries again after this


async def _pairs(
    daemon: IpamdProcess, clients: int, seconds: float, tag: str
) -> tuple[int, int, float]:
    """(pairs, refused allocations, elapsed): each client allocates and releases a new
    container in a loop; an allocation refused because the pool is dry is counted and
    retried after REFUSED_BACKOFF_S (a runtime retries a failed ADD too)."""
    deadline = time.monotonic() + seconds
    counts = [0] * clients
    refusals = [0] * clients

    async def loop(index: int) -> None:
        async with AsyncIpamClient(daemon.socket) as client:
            n = 0
            while time.monotonic() < deadline:
                container = f"{tag}-{index}-{n}"
                try:
                    await client.allocate(container)
                except IpamClientError as err:
                    if err.code != "exhausted":
                        raise
                    refusals[index] += 1
                    await asyncio.sleep(REFUSED_BACKOFF_S)
                    continue
                await client.release(container)
                n += 1
            counts[index] = n

    started = time.monotonic()
    await asyncio.gather(*(loop(i) for i in range(clients)))
    return sum(counts), sum(refusals), time.monotonic() - started


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bench_pairs(work: Path, row: str, clients: int, seconds: float, run: int) -> dict[str, Any]:
    """One run of a pairs row: pairs per second, and the CPU each side spent per pair: on a
    shared machine the rate moves with the load, the CPU per pair much less (it bounds the
    rate one core can sustain: 1e6 / daemon_cpu_us_per_pair).

    The static row warms up for 0.5 s first (connections, caches); the defaults row does
    not, since its pool is meant to start empty and grow while it is measured.
    """
    prefixes, env, _ = PAIRS_ROWS[row]
    lab_config = LabConfig(instance_type="m5.large", prefixes_per_card=prefixes)
    with Lab(lab_config) as lab:
        daemon = IpamdProcess(lab, work / f"pairs-{row}-{run}", env)
        effective = daemon.effective_config()
        daemon.start()
        try:
            daemon.wait_ready(timeout=60)
            assert daemon.process is not None
            if row == "static":
                asyncio.run(_pairs(daemon, clients, 0.5, "warm"))
            lab.cloud.requests.clear()
            daemon_cpu, own_cpu = _process_cpu_s(daemon.process.pid), _own_cpu_s()
            pairs, refused, elapsed = asyncio.run(_pairs(daemon, clients, seconds, "bench"))
            daemon_cpu = _process_cpu_s(daemon.process.pid) - daemon_cpu
            own_cpu = _own_cpu_s() - own_cpu
            ec2_calls = dict(lab.cloud.requests.counts())
            (primary, *others) = lab.cloud.enis_of(lab.instance_id)
            prefixes_at_end = len(primary.prefixes) + sum(len(e.prefixes) for e in others)
        finally:
            daemon.stop()
    return {
        "row": row,
        "pairs": pairs,
        "refused_exhausted": refused,
        "seconds": round(elapsed, 3),
        "pairs_per_s": round(pairs / elapsed),
        "daemon_cpu_us_per_pair": round(1e6 * daemon_cpu / pairs) if pairs else None,
        "client_cpu_us_per_pair": round(1e6 * own_cpu / pairs) if pairs else None,
        "ec2_calls_while_measured": ec2_calls,
        "prefixes_at_end": prefixes_at_end,
        "enis_at_end": 1 + len(others),
        "load_after": load(),
        "lab": {"instance_type": lab_config.instance_type, "prefixes_at_launch": prefixes},
        "daemon_environment": env,
        "daemon_effective_config": effective,
    }


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def bench_pairs_rows(
    work: Path, rows: list[str], clients: int, seconds: float, runs: int
) -> dict[str, Any]:
    """Every pairs row ``runs`` times, interleaved (row A, row B, row A, ...) so a change in
    the machine's load falls on both rows alike; each row's median and full range."""
    results: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}
    for run in range(runs):
        for row in rows:
            results[row].append(bench_pairs(work, row, clients, seconds, run))
    summary: dict[str, Any] = {}
    for row, measured in results.items():
        summary[row] = {
            "label": PAIRS_ROWS[row][2],
            "runs": measured,
            "pairs_per_s": _spread([r["pairs_per_s"] for r in measured]),
            "refused_exhausted": _spread([r["refused_exhausted"] for r in measured]),
            "daemon_cpu_us_per_pair": _spread(
                [r["daemon_cpu_us_per_pair"] for r in measured if r["pairs"]]
            ),
            "client_cpu_us_per_pair": _spread(
                [r["client_cpu_us_per_pair"] for r in measured if r["pairs"]]
            ),
        }
    return summary


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
        "ready_daemon_environment": {"ENABLE_MULTI_NIC": "true"},
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
    parser.add_argument("--runs", type=int, default=3, help="runs of each pairs row")
    parser.add_argument(
        "--pairs-row",
        action="append",
        choices=list(PAIRS_ROWS),
        help="pairs rows to run (repeatable; default: all)",
    )
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
        parts = set(args.only or PARTS)
        result: dict[str, Any] = {
            "configuration": {
                "command": [sys.executable, "-m", "tools.bench.ipam", *(argv or sys.argv[1:])],
                "flags": vars(args),
                "parts": sorted(parts),
                "code": code(),
                "python": sys.version.replace("\n", " "),
                "machine": machine(),
                "load_before": load(),
            }
        }
        if "pairs" in parts:
            rows = args.pairs_row or list(PAIRS_ROWS)
            result["pairs"] = bench_pairs_rows(work, rows, args.clients, args.seconds, args.runs)
        if "ready" in parts:
            result.update(bench_ready(work, args.ready_runs))
        if "fleet" in parts:
            result["fleet_preassigned"] = bench_fleet(args.fleet, prefixes_at_launch=1)
            result["fleet_empty"] = bench_fleet(args.fleet, prefixes_at_launch=0)
        if args.crash_trials:
            result.update(bench_crash(work, args.crash_trials))
        result["configuration"]["load_after"] = load()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for row, summary in result.get("pairs", {}).items():
            rate, cpu = summary["pairs_per_s"], summary["daemon_cpu_us_per_pair"]
            refused = summary["refused_exhausted"]
            print(
                f"pairs/s [{row}: {summary['label']}]: median {rate['median']:,} "
                f"({rate['min']:,}-{rate['max']:,}) over {len(summary['runs'])} runs, "
                f"{args.clients} clients; daemon CPU per pair median {cpu.get('median')} us "
                f"({cpu.get('min')}-{cpu.get('max')}); refused (pool dry) median "
                f"{refused['median']}"
            )
        print(f"load before: {result['configuration']['load_before']['uptime']}")
        print(f"load after: {result['configuration']['load_after']['uptime']}")
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
