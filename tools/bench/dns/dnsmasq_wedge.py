"""dnsmasq's "wedge" on the miss phase, reproduced: misses at dnsmasq until its cache is full.

    python -m tools.bench.dns.dnsmasq_wedge [--cache-size 200000] [--rounds 5] [--seconds 4]

The benchmark's NSD and dnsmasq (same flags, ``servers.dnsmasq_argv``), then ``--rounds``
dnsperf runs of unique names never asked (every query a miss, answered NXDOMAIN with the
zone's SOA, which dnsmasq caches for its TTL, an hour). After each round dnsmasq is sent
SIGUSR1, on which it logs its cache statistics, among them how many insertions had to reuse an
unexpired entry ("cache insertions re-used unexpired cache entries"). Each round prints one
JSON line: QPS, answered and lost queries, dnsmasq's CPU seconds and that count.

What it shows: full speed until the answers cached reach the cache size, then a few dozen
answers a second with dnsmasq's core still busy, and from then on every insertion reuses an
unexpired entry. A smaller cache wedges sooner and less deeply (README, Benchmarks).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import servers
from .__main__ import OUT, dnsperf, miss_file

REUSED = re.compile(r"cache size (\d+), (\d+)/(\d+) cache insertions re-used unexpired")


def cache_stats(proc: subprocess.Popen[bytes], log: Path, before: int) -> tuple[int, int]:
    """SIGUSR1, then the (reused, inserted) pair of the new statistics line (bounded wait)."""
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = REUSED.findall(log.read_text())
        if len(found) > before:
            _, reused, inserted = found[-1]
            return int(reused), int(inserted)
        time.sleep(0.05)
    raise RuntimeError("dnsmasq logged no cache statistics after SIGUSR1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.dns.dnsmasq_wedge")
    p.add_argument("--cache-size", type=int, default=servers.CACHE_ENTRIES)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=4.0, help="seconds per dnsperf run")
    args = p.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        work = Path(tmp)
        nsd = servers.start_nsd(work)
        port = servers.free_port()
        log = work / "dnsmasq.log"
        argv_ = [
            a if not a.startswith("--cache-size=") else f"--cache-size={args.cache_size}"
            for a in servers.dnsmasq_argv(port, nsd.port)
        ] + [f"--log-facility={log}"]
        proc = subprocess.Popen(["taskset", "-c", servers.SERVER_CPU, *argv_])
        dnsmasq = servers.Running("dnsmasq", port, proc)
        try:
            servers.wait_answering(port)
            print(json.dumps({"dnsmasq": argv_, "uptime": _uptime()}), flush=True)
            answered = 0
            for n in range(args.rounds):
                queries = miss_file(work, args.seconds, f"wedge{n}")
                cpu = dnsmasq.cpu_seconds()
                r = dnsperf(port, queries, seconds=args.seconds)
                answered += r["completed"]
                reused, inserted = cache_stats(proc, log, n)
                row = {
                    "round": n + 1,
                    "qps": round(r["qps"]),
                    "answered": r["completed"],
                    "answered_so_far": answered,
                    "lost": r["lost"],
                    "dnsmasq_cpu_s": round(dnsmasq.cpu_seconds() - cpu, 2),
                    "insertions": inserted,
                    "insertions_reusing_unexpired": reused,
                }
                print(json.dumps(row), flush=True)
            print(json.dumps({"uptime": _uptime()}), flush=True)
        finally:
            dnsmasq.stop()
            nsd.stop()
    return 0


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
