"""Prometheus text from the workers' snapshots, with CoreDNS's names where they exist.

The supervisor asks every worker for ``WorkerStats.snapshot`` on each scrape and sums them
here, so ``/metrics`` shows the node, not one worker. A worker that restarts starts its
counters from zero (Prometheus reads that as a counter reset of the sum).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .stats import BUCKETS

_OURS = {
    "coalesced": (
        "ultranet_dns_coalesced_total",
        "Queries that joined an identical one in flight.",
    ),
    "malformed": (
        "ultranet_dns_malformed_total",
        "Malformed queries or upstream answers (FORMERR or dropped).",
    ),
    "acl_rejected": ("ultranet_dns_acl_rejected_total", "Queries from clients outside the ACL."),
    "truncated": (
        "ultranet_dns_truncated_total",
        "UDP answers sent with TC=1 (too large for the client).",
    ),
    "tcp_connections": ("ultranet_dns_tcp_connections_total", "TCP connections accepted."),
    "udp_wakeups": (
        "ultranet_dns_udp_wakeups_total",
        "Times a UDP socket was found readable (queries per wake-up = batching).",
    ),
    "tcp_rejected": (
        "ultranet_dns_tcp_rejected_total",
        "TCP connections refused over tcp_max_connections.",
    ),
}
_COREDNS = {
    "prefetch": ("coredns_cache_prefetch_total", "Prefetches started."),
    "served_stale": ("coredns_cache_served_stale_total", "Answers served stale (RFC 8767)."),
    "max_concurrent_rejects": (
        "coredns_forward_max_concurrent_rejects_total",
        "Queries refused over upstream.max_concurrent.",
    ),
    "healthcheck_broken": (
        "coredns_forward_healthcheck_broken_total",
        "Upstreams marked unhealthy.",
    ),
}


class _Snapshots(Collector):
    def __init__(self, snaps: list[dict[str, Any]], server: str, sup: dict[str, Any]) -> None:
        self.snaps = snaps
        self.server = server
        self.sup = sup

    def collect(self) -> Iterator[Metric]:
        yield from self._requests()
        yield from self._durations()
        yield from self._counters()
        yield from self._upstreams()
        yield from self._gauges()
        yield from self._supervisor()

    def _requests(self) -> Iterable[Metric]:
        s = self.server
        req = CounterMetricFamily(
            "coredns_dns_requests_total",
            "Queries received.",
            labels=["server", "zone", "proto", "type"],
        )
        resp = CounterMetricFamily(
            "coredns_dns_responses_total",
            "Answers sent, by rcode.",
            labels=["server", "zone", "rcode", "plugin"],
        )
        hits = CounterMetricFamily(
            "coredns_cache_hits_total", "Answers from the cache.", labels=["server", "type"]
        )
        misses = CounterMetricFamily(
            "coredns_cache_misses_total", "Queries not answered from cache.", labels=["server"]
        )
        creq = CounterMetricFamily(
            "coredns_cache_requests_total", "Queries seen by the cache.", labels=["server"]
        )
        by_req: Counter[tuple[str, str, str]] = Counter()
        by_resp: Counter[tuple[str, str, str]] = Counter()
        by_hit: Counter[str] = Counter()
        miss = total = 0
        for snap in self.snaps:
            for proto, zone, qtype, kind, rcode, n in snap["requests"]:
                by_req[(zone, proto, qtype)] += n
                plugin = "cache" if kind in ("success", "denial", "servfail") else "forward"
                by_resp[(zone, rcode, plugin if kind != "error" else "")] += n
                if kind == "miss":
                    miss += n
                elif kind != "error":
                    by_hit[kind] += n
                total += n if kind != "error" else 0
        for (zone, proto, qtype), n in sorted(by_req.items()):
            req.add_metric([s, zone, proto, qtype], n)
        for (zone, rcode, plugin), n in sorted(by_resp.items()):
            resp.add_metric([s, zone, rcode, plugin], n)
        for kind in ("success", "denial", "servfail"):
            hits.add_metric([s, kind], by_hit[kind])
        misses.add_metric([s], miss)
        creq.add_metric([s], total)
        return (req, resp, hits, misses, creq)

    def _durations(self) -> Iterable[Metric]:
        h = HistogramMetricFamily(
            "coredns_dns_request_duration_seconds",
            "Time from receiving a query to sending its answer.",
            labels=["server", "proto"],
        )
        for proto in ("udp", "tcp"):
            counts = [0] * (len(BUCKETS) + 1)
            total = 0.0
            for snap in self.snaps:
                c, t = snap["duration"][proto]
                counts = [a + b for a, b in zip(counts, c, strict=True)]
                total += t
            cum, buckets = 0, []
            for bound, n in zip((*(str(b) for b in BUCKETS), "+Inf"), counts, strict=True):
                cum += n
                buckets.append((bound, cum))
            h.add_metric([self.server, proto], buckets, total)
        return (h,)

    def _counters(self) -> Iterable[Metric]:
        for key, (name, doc) in (_COREDNS | _OURS).items():
            c = CounterMetricFamily(name.removesuffix("_total"), doc, labels=["server"])
            c.add_metric([self.server], sum(snap["counters"].get(key, 0) for snap in self.snaps))
            yield c
        # The exchanger counts these itself (UDP and TCP alike), so they come with the gauges.
        spoofed = CounterMetricFamily(
            "ultranet_dns_spoofed_replies",
            "Upstream replies rejected (RFC 5452): a wrong ID or question, or a datagram on an "
            "upstream socket with no query waiting.",
            labels=["server"],
        )
        spoofed.add_metric([self.server], sum(sn["gauges"]["spoofed"] for sn in self.snaps))
        yield spoofed
        opened = CounterMetricFamily(
            "ultranet_dns_upstream_tcp_connections",
            "TCP connections opened to upstreams (pooled and reused: upstream.tcp_*).",
            labels=["server"],
        )
        opened.add_metric(
            [self.server], sum(sn["gauges"]["upstream_tcp_opened"] for sn in self.snaps)
        )
        yield opened
        ev = CounterMetricFamily(
            "coredns_cache_evictions", "Entries evicted when full.", labels=["server"]
        )
        ev.add_metric([self.server], sum(sn["gauges"]["evictions"] for sn in self.snaps))
        yield ev

    def _upstreams(self) -> Iterable[Metric]:
        c = CounterMetricFamily(
            "ultranet_dns_upstream_queries",
            "Upstream exchanges, by upstream and outcome (rcode or error).",
            labels=["to", "outcome"],
        )
        total: Counter[tuple[str, str]] = Counter()
        for snap in self.snaps:
            for to, outcome, n in snap["upstream"]:
                total[(to, outcome)] += n
        for (to, outcome), n in sorted(total.items()):
            c.add_metric([to, outcome], n)
        return (c,)

    def _gauges(self) -> Iterable[Metric]:
        for key, name, doc in (
            ("cache_entries", "coredns_cache_entries", "Entries in the cache (all workers)."),
            ("inflight", "ultranet_dns_inflight", "Resolutions waiting on an upstream."),
            ("tcp_open", "ultranet_dns_tcp_open", "Open TCP client connections."),
            (
                "upstream_tcp_open",
                "ultranet_dns_upstream_tcp_open",
                "Open TCP connections to upstreams.",
            ),
        ):
            g = GaugeMetricFamily(name, doc, labels=["server"])
            g.add_metric([self.server], sum(sn["gauges"][key] for sn in self.snaps))
            yield g

    def _supervisor(self) -> Iterable[Metric]:
        w = GaugeMetricFamily(
            "ultranet_dns_workers", "Worker processes by state.", labels=["state"]
        )
        for state, n in sorted(self.sup["workers"].items()):
            w.add_metric([state], n)
        r = CounterMetricFamily("ultranet_dns_worker_restarts", "Workers restarted after dying.")
        r.add_metric([], self.sup["restarts"])
        rl = CounterMetricFamily("ultranet_dns_reloads", "SIGHUP reloads.", labels=["result"])
        for result in ("ok", "failed"):
            rl.add_metric([result], self.sup["reloads"][result])
        return (w, r, rl)


def render(snaps: list[dict[str, Any]], server: str, sup: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshots(snaps, server, sup))
    return generate_latest(registry)
