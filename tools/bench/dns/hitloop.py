"""The UDP hit loop alone: ``Worker._udp_ready`` over a cache of ``--names`` names, with the
batch's ``recvmmsg`` and ``sendmmsg`` replaced by slots filled beforehand, so that only the
interpreter's work per hit is timed (no kernel, no load generator, no second core).

    python -m tools.bench.dns.hitloop --names 1000 --queries 200000 --rounds 7
    # deterministic: instructions per hit, the difference of two runs under valgrind
    valgrind --tool=cachegrind --cache-sim=no python -m tools.bench.dns.hitloop --rounds 0
    valgrind --tool=cachegrind --cache-sim=no python -m tools.bench.dns.hitloop --rounds 2

The queries follow Zipf (s=1) over the names, as the full benchmark's ``zipf`` phase does,
without EDNS, as dnsperf sends them. ``--repo DIR`` times another checkout's ``dnscache``.
Filling the slots is outside the timed calls but inside a valgrind count, in both runs alike.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import socket
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--names", type=int, default=1000, help="cached names (default 1000)")
    p.add_argument("--queries", type=int, default=20_000, help="queries per round")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm round")
    p.add_argument("--repo", type=Path, help="a checkout whose dnscache to time")
    args = p.parse_args(argv)
    if args.repo is not None:
        sys.path.insert(0, str(args.repo.resolve()))
    per_hit = run(args.names, args.queries, args.rounds)
    import dnscache

    print(f"dnscache from {Path(dnscache.__file__).parent}")
    if args.repo is not None and not Path(dnscache.__file__).is_relative_to(args.repo.resolve()):
        raise SystemExit(f"--repo {args.repo} was not the dnscache imported")
    if per_hit:
        rounded = sorted(round(t, 3) for t in per_hit)
        print(f"names {args.names}: µs per hit, median {statistics.median(per_hit):.3f} {rounded}")
    return 0


def run(names: int, queries: int, rounds: int) -> list[float]:
    import dnslib

    from dnscache.cache import Entry, classify
    from dnscache.config import parse
    from dnscache.server import Worker
    from dnscache.wire import fast_query, make_upstream_query, walk_response

    cfg = parse(
        {"zones": {".": {"upstreams": ["127.0.0.1:9"]}}, "cache": {"capacity": 200_000}},
        cpu_count=1,
    )
    loop = asyncio.new_event_loop()
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        srv.bind(("127.0.0.1", 0))
        srv.setblocking(False)
        worker = Worker(cfg, loop, [srv], [])
        now = time.monotonic()
        for i in range(names):
            name = f"n{i}.bench."
            key = fast_query(_query(dnslib, name), cfg.max_udp_payload)[0]  # type: ignore[index]
            reply = dnslib.DNSRecord.parse(make_upstream_query(1, key, 1232)).reply()
            reply.add_answer(*dnslib.RR.fromZone(f"{name} 3600 A 198.18.{i >> 8 & 255}.{i & 255}"))
            wire = bytes(reply.pack())
            w = walk_response(wire, len(key) - 1)
            e = Entry(w, classify(w, cfg.cache, len(wire)), now, ".", cfg.serve_stale, cfg.prefetch)
            worker.resolver.cache.put(key, e)
        rng = random.Random(3)
        ranks = rng.choices(range(names), [1 / (k + 1) for k in range(names)], k=queries)
        stream = [_query(dnslib, f"n{r}.bench.") for r in ranks]
        batch = worker.batches[srv.fileno()]
        sender = struct.pack("=HH4s8x", socket.AF_INET, 5353, socket.inet_aton("127.0.0.1"))
        for slot in range(batch.slots):
            batch.names[slot * batch.NAME : slot * batch.NAME + len(sender)] = sender
        filled = [0]

        def receive() -> int:
            count, filled[0] = filled[0], 0
            return count

        batch.receive = receive  # type: ignore[method-assign]
        batch.send = lambda count: 0  # type: ignore[method-assign]

        def one_round() -> float:
            spent = 0.0
            for at in range(0, len(stream), batch.slots):
                part = stream[at : at + batch.slots]
                for slot, query in enumerate(part):
                    start = slot * batch.size
                    batch.view[start : start + len(query)] = query
                    batch.lengths[slot * batch.MSG_WORDS + batch.LEN_WORD] = len(query)
                filled[0] = len(part)
                t0 = time.perf_counter()
                worker._udp_ready(srv)
                spent += time.perf_counter() - t0
            return spent / len(stream) * 1e6

        one_round()  # fills the hit memo
        stats = worker.stats  # checkouts before the memo's count slots have no udp_requests
        served = sum(
            (stats.udp_requests() if hasattr(stats, "udp_requests") else stats.udp).values()
        )
        if served != len(stream):
            raise SystemExit(f"{served} of {len(stream)} warm-up queries were answered")
        gc.freeze()
        result = [one_round() for _ in range(rounds)]
        worker.resolver.exchanger.close()
        return result
    finally:
        srv.close()
        loop.close()


def _query(dnslib: Any, name: str) -> bytes:
    return bytes(dnslib.DNSRecord.question(name, "A").pack())


if __name__ == "__main__":
    raise SystemExit(main())
