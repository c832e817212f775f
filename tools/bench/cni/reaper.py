"""Where a burst of DELs' veth deletions spends its time: the kernel, per request.

``python -m tools.bench.cni.reaper [-n 50] [--runs 3] [--output FILE]`` (root). Per run and
per family (an IPv4 pod's veth: its /32 on the pod end and the host's /32 route; an IPv6
pod's: /128s, ``nodad``), ``n`` pod namespaces with a veth each into one host namespace (named
``ul-rb<tag>-*`` and recorded as a lab's are, removed after), then every host end deleted
at once two ways, each timed from the first request to the last answer:

* ``per_link``: one ``RTM_DELLINK`` per veth on four threads, each with its own socket
  (``cni.netlink.delete_link``), as the reaper did before its batches;
* ``batched``: ``cni.netlink.LinkReaper.delete_all``, as a DEL burst queues them now (the
  links put in the reaper's device group, then one request deletes the group).

A microbenchmark of the kernel path, not of a node: no daemon, no DEL; the DEL burst as a
node sees it is ``--mode ipv6`` of ``python -m tools.bench.cni``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cni.netlink import LinkReaper, delete_link, socket_in
from tools.bench.cni import conditions
from tools.lab import netns
from tools.lab.lab import STATE_ROOT, LabRecord
from tools.lab.owner import process_start

FAMILIES = ("ipv4", "ipv6")
THREADS = 4  # the reaper's workers before its batches
NAMESPACE_PREFIX = f"{netns.PREFIX}rb"  # ul-rb<tag>-...: a lab's id is hex, never "rb..."


def _pod_address(family: str, index: int) -> tuple[str, int]:
    if family == "ipv4":
        return f"100.64.{index // 250}.{index % 250 + 1}", 32
    return f"fd00:64::{index + 1:x}", 128


def _plumb(host: str, pods: list[str], family: str) -> list[str]:
    names = []
    with netns.iproute(host) as ipr:
        for i, pod in enumerate(pods):
            name = f"rb{i}"
            ipr.link("add", ifname=name, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod})
            (index,) = ipr.link_lookup(ifname=name)
            ipr.link("set", index=index, state="up")
            address, length = _pod_address(family, i)
            ipr.route("add", dst=f"{address}/{length}", oif=index)
            names.append(name)
    for i, pod in enumerate(pods):
        with netns.iproute(pod) as ipr:
            (index,) = ipr.link_lookup(ifname="eth0")
            ipr.link("set", index=index, state="up")
            address, length = _pod_address(family, i)
            extra = {"flags": 0x02} if family == "ipv6" else {}  # IFA_F_NODAD, as ADD does
            ipr.addr("add", index=index, address=address, prefixlen=length, **extra)
    return names


def _per_link(host: str, names: list[str]) -> float:
    sockets = [socket_in(f"/run/netns/{host}") for _ in range(THREADS)]
    try:

        def work(worker: int) -> None:
            for seq, name in enumerate(names[worker::THREADS], start=1):
                code = delete_link(sockets[worker], name, seq)
                if code != 0:
                    raise OSError(code, f"delete {name}")

        start = time.perf_counter()
        with ThreadPoolExecutor(THREADS) as pool:
            for done in [pool.submit(work, w) for w in range(THREADS)]:
                done.result()
        return time.perf_counter() - start
    finally:
        for sock in sockets:
            sock.close()


def _batched(host: str, names: list[str]) -> float:
    async def burst() -> float:
        reaper = LinkReaper(f"/run/netns/{host}")
        try:
            start = time.perf_counter()
            codes = await asyncio.gather(*reaper.delete_all(names))
            elapsed = time.perf_counter() - start
            if any(codes):
                raise OSError(f"batched deletion answered {codes}")
            return elapsed
        finally:
            reaper.close()

    return asyncio.run(burst())


STRATEGIES = {"per_link": _per_link, "batched": _batched}


@contextlib.contextmanager
def _recorded(lab_id: str, namespaces: list[str]) -> Iterator[None]:
    """A lab record for our namespaces while they exist: a lab starting meanwhile (another
    test, another benchmark) removes every ``ul-`` namespace no live record claims, and
    one that starts after this process was killed removes ours."""
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    path = STATE_ROOT / f"{lab_id}.json"
    pid = os.getpid()
    record = LabRecord(lab_id, pid, process_start(pid), namespaces)
    path.write_text(json.dumps(dataclasses.asdict(record)))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def one(family: str, strategy: str, pods: int) -> float:
    lab_id = f"rb{uuid.uuid4().hex[:6]}"
    host = f"{netns.PREFIX}{lab_id}-host"
    pod_names = [f"{netns.PREFIX}{lab_id}-p{i}" for i in range(pods)]
    made = []
    with _recorded(lab_id, [host, *pod_names]):
        try:
            for name in [host, *pod_names]:
                netns.create(name)
                made.append(name)
            names = _plumb(host, pod_names, family)
            return STRATEGIES[strategy](host, names)
        finally:
            for name in reversed(made):
                netns.delete(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench.cni.reaper", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("-n", "--pods", type=int, default=50, help="veths deleted at once")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", type=Path, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    load_before = conditions.load()
    samples: dict[str, dict[str, list[float]]] = {f: {s: [] for s in STRATEGIES} for f in FAMILIES}
    for run in range(args.runs):
        for family in FAMILIES:
            order = list(STRATEGIES) if run % 2 == 0 else list(STRATEGIES)[::-1]
            for strategy in order:
                samples[family][strategy].append(1e3 * one(family, strategy, args.pods))
    result: dict[str, Any] = {
        "config": {
            "command": ["python", "-m", "tools.bench.cni.reaper", *(argv or sys.argv[1:])],
            "flags": {"pods": args.pods, "runs": args.runs},
            "per_link_threads": THREADS,
            "code": conditions.code(),
            "machine": conditions.machine(),
        },
        "load": {"before": load_before, "after": conditions.load()},
        "ms_to_delete_all": {
            f: {
                s: {
                    "median": round(statistics.median(v), 1),
                    "min": round(min(v), 1),
                    "max": round(max(v), 1),
                    "runs": [round(x, 1) for x in v],
                }
                for s, v in by.items()
            }
            for f, by in samples.items()
        },
    }
    for family in FAMILIES:
        row = result["ms_to_delete_all"][family]
        print(
            f"{family}: {args.pods} veths, per link on {THREADS} threads "
            f"{row['per_link']['median']} ms [{row['per_link']['min']}-{row['per_link']['max']}]"
            f", batched {row['batched']['median']} ms "
            f"[{row['batched']['min']}-{row['batched']['max']}]"
        )
    print(f"load {load_before['loadavg'][0]} -> {result['load']['after']['loadavg'][0]}")
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
