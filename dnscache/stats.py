"""Per-worker counters: plain ints and dicts, cheap enough for the hit path.

A worker never touches prometheus-client (a labelled ``inc`` costs about a microsecond under
its lock, a tenth of our budget per answer); it sends ``snapshot()`` to the supervisor, which
sums the workers and renders Prometheus text (``metrics.py``).

Request labels are precomputed per cache entry as ``(zone, qtype, kind, rcode)``, so counting
a hit is one dict update; requests, hits and responses by rcode are all sums of these. The
UDP hit memo counts cheaper still: each memo entry holds its label's slot in ``udp_slots``
(an index into a list: no tuple to hash), and ``snapshot`` adds the slots to ``udp``.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

# CoreDNS's buckets for coredns_dns_request_duration_seconds: 0.25 ms doubling 16 times.
BUCKETS = tuple(0.00025 * 2**i for i in range(16))
Label = tuple[str, str, str, str]  # zone, qtype, kind (success|denial|miss|...), rcode

QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA"}
QTYPES |= {33: "SRV", 35: "NAPTR", 43: "DS", 48: "DNSKEY", 64: "SVCB", 65: "HTTPS", 255: "ANY"}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
RCODES |= {16: "BADVERS"}


def qtype_name(qtype: int) -> str:
    # Unknown types share one label, as CoreDNS does, so labels stay bounded.
    return QTYPES.get(qtype, "other")


def rcode_name(rcode: int) -> str:
    return RCODES.get(rcode, str(rcode))


class Histogram:
    __slots__ = ("counts", "total", "first")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.first = BUCKETS[0]

    def observe(self, seconds: float) -> None:
        self.total += seconds
        self.counts[bisect_left(BUCKETS, seconds) if seconds > self.first else 0] += 1

    def observe_many(self, seconds: float, count: int) -> None:
        """``count`` observations of ``seconds`` each (the queries of one batch)."""
        self.total += seconds * count
        self.counts[bisect_left(BUCKETS, seconds) if seconds > self.first else 0] += count


class WorkerStats:
    def __init__(self) -> None:
        self.udp: dict[Label, int] = {}
        self.udp_slots: list[int] = []  # UDP requests by ``slot_of(label)``, beside ``udp``
        self._slot: dict[Label, int] = {}
        self.tcp: dict[Label, int] = {}
        self.duration = {"udp": Histogram(), "tcp": Histogram()}
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.upstream: dict[tuple[str, str], int] = {}  # (upstream, rcode or error) -> n

    def count(self, proto: str, label: Label) -> None:
        d = self.udp if proto == "udp" else self.tcp
        d[label] = d.get(label, 0) + 1

    def slot_of(self, label: Label) -> int:
        """The index in ``udp_slots`` that counts UDP requests of ``label`` (labels are
        bounded: zones x query types x kinds x rcodes, so the list is too)."""
        slot = self._slot.get(label)
        if slot is None:
            slot = self._slot[label] = len(self.udp_slots)
            self.udp_slots.append(0)
        return slot

    def udp_requests(self) -> dict[Label, int]:
        total = dict(self.udp)
        for label, slot in self._slot.items():
            if self.udp_slots[slot]:
                total[label] = total.get(label, 0) + self.udp_slots[slot]
        return total

    def snapshot(self, gauges: dict[str, int]) -> dict[str, Any]:
        udp = self.udp_requests()
        return {
            "requests": [
                [p, *k, v] for p, d in (("udp", udp), ("tcp", self.tcp)) for k, v in d.items()
            ],
            "duration": {p: [h.counts, h.total] for p, h in self.duration.items()},
            "counters": dict(self.counters),
            "upstream": [[u, r, v] for (u, r), v in self.upstream.items()],
            "gauges": gauges,
        }


COUNTERS = (
    "prefetch",
    "served_stale",
    "coalesced",
    "malformed",
    "acl_rejected",
    "max_concurrent_rejects",
    "healthcheck_broken",
    "truncated",
    "tcp_connections",
    "tcp_rejected",
    "udp_wakeups",
)
