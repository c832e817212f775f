"""``python -m tools.fleet.costs``: what one more agent costs a fleet run, measured.

The fleet runs thousands of agents in one process on a small machine; whether real time
is affordable, or a scaled clock is needed, depends on these costs (CPU in this process,
both sides of each HTTP exchange counted, since the emulator runs here too):

* building a boto3 EC2 client (the first, and each one after: botocore caches the model);
* one EC2 call through boto3 to the emulator and back;
* an m5.large agent's IMDS discovery over HTTP (token, identity, one interface);
* a journal line with fdatasync on tmpfs and on the disk the repo is on;
* a thread started and joined; an asyncio task run.

Prints one JSON object; each figure is the median of ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ipam.ec2 import boto3_client
from ipam.imds import ImdsClient
from tools.fleet.imds_mux import ImdsMux
from tools.lab.ec2.server import Ec2Server
from tools.lab.ec2.state import Cloud, LaunchInterface


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _per_op(fn: Callable[[], None], count: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per call of ``fn``."""
    wall, cpu = time.perf_counter(), _cpu_s()
    for _ in range(count):
        fn()
    return (time.perf_counter() - wall) / count * 1e3, (_cpu_s() - cpu) / count * 1e3


def _fdatasync(directory: Path, count: int) -> tuple[float, float]:
    with tempfile.NamedTemporaryFile(dir=directory) as journal:

        def line() -> None:
            journal.write(b"x" * 120 + b"\n")
            journal.flush()
            os.fdatasync(journal.fileno())

        return _per_op(line, count)


def measure(rounds: int) -> dict[str, Any]:
    cloud = Cloud(seed=1)
    vpc = cloud.create_vpc(["100.64.0.0/16"])
    subnet = cloud.create_subnet(vpc.vpc_id, "100.64.0.0/18", "us-west-2a", {})
    instance = cloud.launch_instance(
        "m5.large", subnet.subnet_id, interfaces=[LaunchInterface(0, 0, ipv4_prefix_count=1)]
    )
    server = Ec2Server(cloud)
    url = server.start()
    mux = ImdsMux(cloud)
    samples: dict[str, list[tuple[float, float]]] = {}
    try:
        first_wall, first_cpu = time.perf_counter(), _cpu_s()
        client = boto3_client(
            "us-west-2", url, aws_access_key_id="lab", aws_secret_access_key="lab"
        )
        first = ((time.perf_counter() - first_wall) * 1e3, (_cpu_s() - first_cpu) * 1e3)
        clients: list[Any] = [client]
        imds_url = mux.add(instance.instance_id)

        def new_client() -> None:
            clients.append(
                boto3_client("us-west-2", url, aws_access_key_id="lab", aws_secret_access_key="lab")
            )

        def describe() -> None:
            client.describe_subnets(SubnetIds=[subnet.subnet_id])

        imds_requests: list[int] = []

        def discover() -> None:
            with ImdsClient(imds_url) as imds:
                identity = imds.identity()
                imds.interfaces(primary_mac=identity.primary_mac)
                imds_requests.append(imds.requests)

        def thread() -> None:
            started = threading.Thread(target=lambda: None)
            started.start()
            started.join()

        def tasks() -> None:
            async def nothing() -> None:
                await asyncio.sleep(0)

            async def many() -> None:
                await asyncio.gather(*(nothing() for _ in range(1000)))

            asyncio.run(many())

        describe()  # connection and first-use caches
        for _ in range(rounds):
            samples.setdefault("boto3_client", []).append(_per_op(new_client, 10))
            samples.setdefault("ec2_call", []).append(_per_op(describe, 50))
            samples.setdefault("imds_discovery", []).append(_per_op(discover, 10))
            samples.setdefault("fdatasync_tmpfs", []).append(_fdatasync(Path("/dev/shm"), 200))
            samples.setdefault("fdatasync_disk", []).append(_fdatasync(Path.cwd(), 200))
            samples.setdefault("thread", []).append(_per_op(thread, 200))
            wall, cpu = _per_op(tasks, 5)
            samples.setdefault("asyncio_task", []).append((wall / 1000, cpu / 1000))
        for made in clients:
            made.close()
    finally:
        mux.close()
        server.close()
    result: dict[str, Any] = {
        "boto3_first_client": {"wall_ms": round(first[0], 2), "cpu_ms": round(first[1], 2)}
    }
    for name, values in samples.items():
        result[name] = {
            "wall_ms": round(statistics.median(v[0] for v in values), 4),
            "cpu_ms": round(statistics.median(v[1] for v in values), 4),
        }
    result["imds_requests_per_discovery"] = max(imds_requests)
    result["rounds"] = rounds
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.fleet.costs", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.rounds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
