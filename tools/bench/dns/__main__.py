"""DNS cache benchmark: ``python -m tools.bench.dns [--json] [--runs 3] [--duration 10]``.

dnsperf against ultranet-dns and, in the same run, dnsmasq, unbound (1 thread) and dnsdist,
all caching forwarders to one NSD. The server under test is pinned to CPU 0, dnsperf and NSD
to CPU 1. Workloads: ``hot`` (1,000 names, all hits once warm), ``zipf`` (Zipf s=1 over 100K
names, warmed by one pass), ``miss`` (unique names never seen, every query forwarded).
All the servers run at once and every phase goes round them run by run (see
``bench_servers``). Reports QPS at saturation (median and range of ``--runs``), server CPU
µs per answer, p50/p99 at half of each server's own hot saturation rate (median of
``--runs`` fixed-rate runs; one run is at the mercy of a single stall), ultranet's upstream
queries on a Zipf pass with 1 and 2 workers, and the load average (the machine may be
shared). The JSON (``tools/bench/dns/out/last.json``) starts with ``config``: every flag,
the servers and how each was started (argv, config file), the peers' versions, the workloads,
dnsperf's settings, rates and durations, worker counts, cache sizes and in-flight bounds, the
git commit; and ``load``: the load average, ``uptime`` and the CPU steal before and after.
``--servers`` also takes ``baseline`` (ultranet from the checkout given by
``--baseline DIR``, for before/after ratios in one run) and ``ultranet-reuseN``: ultranet with
``upstream.socket_reuse: N`` (``ultranet`` alone: the default, 8; ``ultranet-reuse1``: a
fresh socket and port for every upstream query). ``--phases`` picks phases;
``--upstream-transport tcp`` has every server send every upstream query over TCP (ultranet:
zone ``.`` with ``transport: tcp``; unbound ``forward-tcp-upstream``; dnsdist ``tcpOnly``;
dnsmasq cannot). Results go to ``tools/bench/dns/out/`` (not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from .servers import (
    CACHE_ENTRIES,
    LOAD_CPU,
    MAX_IN_FLIGHT,
    NAMES,
    REPO,
    SERVER_CPU,
    STARTERS,
    ZONE,
    Running,
    check_tools,
    free_port,
    start_nsd,
    start_ultranet,
    versions,
)

OUT = Path(__file__).resolve().parent / "out"
PHASES = ("hot", "zipf", "latency", "miss")  # latency runs at half of the hot phase's rate
DNSPERF_CLIENTS = 4  # -c
DNSPERF_OUTSTANDING = 100  # -q: queries in flight at once, at most
DNSPERF_TIMEOUT = 2  # -t seconds: a query unanswered by then is lost
HOT_NAMES = 1000
ZIPF_QUERIES = 1_000_000
FRESH_RATE_SECONDS = 3  # the saturation run before each fixed-rate run
LATENCY_SECONDS_MAX = 5
UPSTREAM_COUNT_QUERIES = 300_000


def write_queries(path: Path, names: list[str]) -> Path:
    path.write_text("".join(f"{n} A\n" for n in names))
    return path


def zipf_names(count: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) for k in range(NAMES)]
    ranks = rng.choices(range(NAMES), weights, k=count)
    return [f"n{r}.{ZONE}" for r in ranks]


def dnsperf(
    port: int,
    data: Path,
    *,
    seconds: float | None = None,
    once: bool = False,
    qps: int | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    argv = [
        "taskset",
        "-c",
        LOAD_CPU,
        "dnsperf",
        "-s",
        "127.0.0.1",
        "-p",
        str(port),
        "-d",
        str(data),
        "-c",
        str(DNSPERF_CLIENTS),
        "-q",
        str(DNSPERF_OUTSTANDING),
        "-t",
        str(DNSPERF_TIMEOUT),
    ]
    if seconds is not None:
        argv += ["-l", str(seconds)]
    if once:
        argv += ["-n", "1"]
    if qps is not None:
        argv += ["-Q", str(qps)]
    if verbose:
        argv += ["-v"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600).stdout
    res: dict[str, Any] = {
        "completed": int(re.search(r"Queries completed:\s+(\d+)", out).group(1)),  # type: ignore[union-attr]
        "lost": int(re.search(r"Queries lost:\s+(\d+)", out).group(1)),  # type: ignore[union-attr]
        "qps": float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
    }
    if verbose:
        lat = sorted(float(m) for m in re.findall(r"^> \S+ \S+ \S+ ([\d.]+)$", out, re.M))
        if lat:
            res["p50_ms"] = lat[len(lat) // 2] * 1000
            res["p99_ms"] = lat[int(len(lat) * 0.99)] * 1000
    return res


def timed_run(server: Running, data: Path, seconds: float) -> dict[str, Any]:
    """One saturation run: dnsperf's figures plus the server's CPU µs per answer."""
    before = server.cpu_seconds()
    r = dnsperf(server.port, data, seconds=seconds)
    r["cpu_us_per_answer"] = (server.cpu_seconds() - before) / max(1, r["completed"]) * 1e6
    return r


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    qps = [r["qps"] for r in results]
    cpu = [r["cpu_us_per_answer"] for r in results]
    return {
        "qps": statistics.median(qps),
        "qps_range": [min(qps), max(qps)],
        "qps_runs": qps,  # in round order: each round runs every server once, back to back
        "lost": sum(r["lost"] for r in results),
        "cpu_us_per_answer": round(statistics.median(cpu), 2),
        "cpu_us_runs": [round(c, 2) for c in cpu],
    }


def paired_ratios(servers: dict[str, dict[str, Any]], ours: str = "ultranet") -> dict[str, Any]:
    """Ours against each other server, round by round (the two ran seconds apart, so a load
    that drifts over minutes cancels out of each round's ratio): the median over rounds of
    QPS ours / theirs and of CPU per answer theirs / ours, per phase (above 1: ours better)."""
    out: dict[str, Any] = {}
    mine = servers.get(ours, {})
    for name, theirs in servers.items():
        if name == ours:
            continue
        for phase in ("hot", "zipf", "miss"):
            if phase not in mine or phase not in theirs:
                continue
            a, b = mine[phase], theirs[phase]
            qps = [x / y for x, y in zip(a["qps_runs"], b["qps_runs"], strict=True) if y]
            cpu = [y / x for x, y in zip(a["cpu_us_runs"], b["cpu_us_runs"], strict=True) if x]
            out[f"{phase} vs {name}"] = {
                "qps_ratio": round(statistics.median(qps), 3) if qps else None,
                "cpu_ratio": round(statistics.median(cpu), 3) if cpu else None,
                "qps_ratio_runs": [round(r, 3) for r in qps],
            }
    return out


def miss_file(work: Path, seconds: float, tag: str) -> Path:
    """Unique names no server has seen: enough for ``seconds`` at 100K QPS (dnsdist's miss
    rate here is ~77K), so dnsperf does not loop back to names already cached."""
    salt = f"{tag}{random.randrange(1 << 40):x}"
    names = [f"m{i}.{salt}.{ZONE}" for i in range(int(seconds * 100_000))]
    return write_queries(work / f"miss-{tag}.txt", names)


def start(
    name: str,
    work: Path,
    upstream: int,
    loop: str,
    baseline: Path | None = None,
    tcp: bool = False,
) -> Running:
    if name == "baseline":  # ultranet from another checkout, its own defaults
        if baseline is None:
            raise SystemExit("--servers baseline needs --baseline DIR")
        repo = baseline.resolve()
        return start_ultranet(work, upstream, loop=loop, tag=name, repo=repo, tcp=tcp)
    if name.startswith("ultranet"):  # "ultranet-reuseN": upstream.socket_reuse N
        reuse = int(name.removeprefix("ultranet-reuse")) if name != "ultranet" else None
        return start_ultranet(work, upstream, loop=loop, socket_reuse=reuse, tag=name, tcp=tcp)
    return STARTERS[name](work, upstream, tcp)


def bench_servers(
    names: list[str],
    work: Path,
    upstream: int,
    files: dict[str, Path],
    runs: int,
    seconds: float,
    loop: str,
    baseline: Path | None = None,
    phases: tuple[str, ...] = PHASES,
    tcp: bool = False,
    latency_rate: str = "fresh",
) -> dict[str, dict[str, Any]]:
    """Every server runs at once (idle but for its own runs), and each phase goes round the
    servers run by run: on a shared machine the load drifts over minutes, and interleaving
    gives every server the same drift, so their ratios hold better than when each server's
    runs come in one block. ``tcp``: every server sends every upstream query over TCP.
    ``latency_rate``: the p99 phase offers half of a 3 s saturation run made just before each
    fixed-rate run (``fresh``: the server's rate that minute), or half of the hot phase's
    median (``hot-median``, minutes earlier: a lucky hot phase then means a harder test)."""
    servers: dict[str, Running] = {}
    try:
        for name in names:
            servers[name] = start(name, work, upstream, loop, baseline, tcp)
        res: dict[str, dict[str, Any]] = {
            name: {"started_as": {"argv": s.argv, "config": s.config}}
            for name, s in servers.items()
        }
        for phase in [ph for ph in ("hot", "zipf") if ph in phases]:
            for server in servers.values():
                dnsperf(server.port, files[phase], once=True)  # warm: one pass of the mix
            got: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
            for _ in range(runs):
                for name, server in servers.items():
                    got[name].append(timed_run(server, files[phase], seconds))
            for name in names:
                res[name][phase] = summary(got[name])
        lats: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        offered: dict[str, list[int]] = {name: [] for name in names}
        for _ in range(runs if "latency" in phases else 0):
            for name, server in servers.items():
                hot = files["hot"]
                if latency_rate == "fresh":  # this minute's saturation, not the hot phase's
                    half = int(dnsperf(server.port, hot, seconds=FRESH_RATE_SECONDS)["qps"] / 2)
                else:
                    half = int(res[name]["hot"]["qps"] / 2)
                offered[name].append(half)
                lats[name].append(
                    dnsperf(
                        server.port,
                        hot,
                        seconds=min(seconds, LATENCY_SECONDS_MAX),
                        qps=half,
                        verbose=True,
                    )
                )
        for name in names if "latency" in phases else ():
            res[name]["latency_at_half"] = {
                "rate_from": latency_rate,
                "offered_qps_runs": offered[name],
                "offered_qps": int(statistics.median(offered[name])),
                "p50_ms": statistics.median(x.get("p50_ms", 0.0) for x in lats[name]),
                "p99_ms": statistics.median(x.get("p99_ms", 0.0) for x in lats[name]),
                "p99_ms_runs": [x.get("p99_ms") for x in lats[name]],
                "lost": sum(x["lost"] for x in lats[name]),
            }
        misses: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for run in range(runs if "miss" in phases else 0):  # last: dnsmasq wedges on misses
            for name, server in servers.items():
                f = miss_file(work, seconds, f"{name}{run}")
                misses[name].append(timed_run(server, f, seconds))
                f.unlink()
        for name in names if "miss" in phases else ():
            res[name]["miss"] = summary(misses[name])
        return res
    finally:
        for server in servers.values():
            server.stop()


def upstream_counts(work: Path, upstream: int, data: Path) -> dict[str, int]:
    out = {}
    for workers in (1, 2):
        metrics = free_port()
        server = start_ultranet(work, upstream, workers=workers, metrics=metrics)
        try:
            dnsperf(server.port, data, once=True)
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read()
            total = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.decode().splitlines()
                if line.startswith("ultranet_dns_upstream_queries_total{")
            )
            out[f"workers_{workers}"] = int(total)
        finally:
            server.stop()
    return out


def git_commit() -> dict[str, Any]:
    """The commit the run's code is at, and whether the benchmarked paths differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()

    changed = git("status", "--porcelain", "--", "dnscache", "tools/bench/dns").splitlines()
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_in_benchmarked_paths": changed}


def machine_load() -> dict[str, Any]:
    """Load average, ``uptime``'s line, and the CPU counters of ``/proc/stat`` (for steal)."""
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return {"loadavg": list(os.getloadavg()), "uptime": uptime.strip(), "cpu_ticks": cpu}


def steal_fraction(before: dict[str, Any], after: dict[str, Any]) -> float:
    """Share of the CPU time between two ``machine_load`` samples stolen by other VMs."""
    delta = [int(b) - int(a) for a, b in zip(before["cpu_ticks"], after["cpu_ticks"], strict=True)]
    steal = delta[7] if len(delta) > 7 else 0  # user nice system idle iowait irq softirq steal
    return round(steal / max(1, sum(delta[:8])), 4)


def run_config(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Everything a reader needs to re-run this run and know what it measured."""
    flags = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    return {
        "command": " ".join(["python -m tools.bench.dns", *argv]),
        "flags": flags,
        "servers": args.servers.split(","),
        "phases": args.phases.split(","),
        "runs_per_phase": args.runs,
        "saturation_run_seconds": args.duration,
        "p99_method": (
            f"median of {args.runs} fixed-rate dnsperf runs (-Q) of "
            f"min(duration, {LATENCY_SECONDS_MAX}) s on the hot names, each at half of "
            + (
                f"a {FRESH_RATE_SECONDS} s saturation run of the same server just before it"
                if args.latency_rate == "fresh"
                else "the server's hot-phase median QPS"
            )
            + "; p99 from dnsperf -v's per-query latencies"
        ),
        "dnsperf": {
            "clients": DNSPERF_CLIENTS,
            "max_outstanding": DNSPERF_OUTSTANDING,
            "timeout_s": DNSPERF_TIMEOUT,
        },
        "workloads": {
            "hot_names": HOT_NAMES,
            "zipf": f"{ZIPF_QUERIES} queries, Zipf s=1 over {NAMES} names, warmed by one pass",
            "miss": "unique names never asked before, every query forwarded (NXDOMAIN)",
            "zone_names": NAMES,
        },
        "cpus": {"server": SERVER_CPU, "dnsperf_and_nsd": LOAD_CPU, "online": os.cpu_count()},
        "ultranet_workers": 1,
        "upstream_count_workers": [1, 2],
        "cache_entries_each": CACHE_ENTRIES,
        "max_in_flight_each": MAX_IN_FLIGHT,
        "upstream_transport": args.upstream_transport,
        "versions": versions(),
        "kernel": os.uname().release,
        "git": git_commit(),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench.dns")
    p.add_argument("--json", action="store_true", help="print the results as JSON only")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per dnsperf run")
    p.add_argument("--servers", default="ultranet,dnsmasq,unbound,dnsdist")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="a checkout (e.g. a git worktree of an older commit) run as server 'baseline'",
    )
    p.add_argument(
        "--phases",
        default=",".join(PHASES),
        help="which of hot,zipf,latency,miss to run (latency needs hot)",
    )
    p.add_argument(
        "--upstream-transport",
        choices=("udp", "tcp"),
        default="udp",
        help="tcp: every server sends every upstream query over TCP (dnsmasq cannot)",
    )
    p.add_argument(
        "--latency-rate",
        choices=("fresh", "hot-median"),
        default="fresh",
        help="the p99 phase's rate: half of a saturation run just before (fresh) or of the "
        "hot phase's median",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    phases = tuple(args.phases.split(","))
    if not set(phases) <= set(PHASES) or ("latency" in phases and "hot" not in phases):
        p.error(f"--phases: a subset of {','.join(PHASES)}, with hot for latency")
    if args.upstream_transport == "tcp" and "dnsmasq" in args.servers.split(","):
        p.error("--upstream-transport tcp: dnsmasq cannot send every query over TCP")
    missing = check_tools()
    if missing:
        print(
            f"missing tools: {' '.join(missing)} (apt-get install dnsperf nsd dnsmasq-base "
            "unbound dnsdist util-linux)",
            file=sys.stderr,
        )
        return 2
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        work = Path(tmp)
        nsd = start_nsd(work)
        try:
            files = {
                "hot": write_queries(work / "hot.txt", [f"n{i}.{ZONE}" for i in range(HOT_NAMES)]),
                "zipf": write_queries(work / "zipf.txt", zipf_names(ZIPF_QUERIES)),
            }
            up_file = write_queries(
                work / "zipf-300k.txt", zipf_names(UPSTREAM_COUNT_QUERIES, seed=11)
            )
            results: dict[str, Any] = {
                "config": run_config(args, list(argv if argv is not None else sys.argv[1:])),
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "load": {"before": machine_load()},
                "servers": {},
            }
            results["config"]["upstream"] = {"nsd": nsd.argv, "nsd_config": nsd.config}
            names = args.servers.split(",")
            tcp = args.upstream_transport == "tcp"
            results["upstream_transport"] = args.upstream_transport
            results["servers"] = bench_servers(
                names,
                work,
                nsd.port,
                files,
                args.runs,
                args.duration,
                args.loop,
                args.baseline,
                phases,
                tcp,
                args.latency_rate,
            )
            load = results["load"]
            load["after"] = machine_load()
            load["steal_fraction"] = steal_fraction(load["before"], load["after"])
            results["paired"] = paired_ratios(results["servers"])
            if "ultranet" in args.servers and "zipf" in phases and not tcp:
                results["upstream_queries_zipf_300k"] = upstream_counts(work, nsd.port, up_file)
        finally:
            nsd.stop()
    (OUT / "last.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2) if args.json else _table(results))
    return 0


def _spread(values: list[float], fmt: str) -> str:
    return f"{min(values):{fmt}}–{max(values):{fmt}}"


def _table(r: dict[str, Any]) -> str:
    """Medians with their full range in brackets; CPU µs per answer beside each QPS."""
    rows = [
        "| server | hot QPS | hot CPU µs | zipf QPS | zipf CPU µs | miss QPS | miss CPU µs "
        "| p50 / p99 ms at half (p99 range) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in r["servers"].items():
        cells = [name]
        for phase in ("hot", "zipf", "miss"):
            ph = s.get(phase)
            if ph is None:
                cells += ["–", "–"]
                continue
            cells.append(f"{ph['qps']:,.0f} ({_spread(ph['qps_runs'], ',.0f')})")
            cells.append(f"{ph['cpu_us_per_answer']:.2f} ({_spread(ph['cpu_us_runs'], '.2f')})")
        lat = s.get("latency_at_half")
        if lat is None:
            cells.append("–")
        else:
            p99s = [x for x in lat["p99_ms_runs"] if x is not None]
            spread = _spread(p99s, ".2f") if p99s else "–"
            cells.append(f"{lat['p50_ms']:.3f} / {lat['p99_ms']:.3f} ({spread})")
        rows.append("| " + " | ".join(cells) + " |")
    rows.append(f"\nupstream transport: {r['config']['upstream_transport']}")
    rows.append(f"p99: {r['config']['p99_method']}")
    if r.get("paired"):
        rows.append("\nround by round, median (QPS ours/theirs; CPU per answer theirs/ours):")
        for what, pr in r["paired"].items():
            rows.append(
                f"  {what}: QPS {pr['qps_ratio']}x (rounds {pr['qps_ratio_runs']}), "
                f"CPU {pr['cpu_ratio']}x"
            )
    if "upstream_queries_zipf_300k" in r:
        rows.append(f"\nupstream queries, Zipf 300K: {r['upstream_queries_zipf_300k']}")
    load = r["load"]
    rows.append(
        f"\nload average before: {load['before']['loadavg']}, after: "
        f"{load['after']['loadavg']}; CPU steal over the run: {load['steal_fraction']:.1%}"
    )
    rows.append(f"git: {r['config']['git']}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
