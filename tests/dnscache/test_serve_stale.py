"""RFC 8767 serve-stale and prefetch, against an upstream that goes down."""

from __future__ import annotations

from collections.abc import Callable

import dnslib

from tools.bench.dns.authserver import AuthServer

from .helpers import DnsProcess, ask, base_doc, wait_for

Factory = Callable[..., DnsProcess]


def test_upstream_down_gives_stale_answers_then_rechecks_late(dns_factory: Factory) -> None:
    with AuthServer("test.", ["www.test. A 198.18.0.5"], ttl=1) as auth:
        doc = base_doc(
            auth.address,
            cache={"min_ttl": 0},
            serve_stale={"client_timeout": 0.3, "failure_recheck": 30},
        )
        dns = dns_factory(doc)
        assert ask(dns.port, "www.test").rr[0].ttl == 1
        auth.down = True
        stale = wait_for(
            lambda: (r := ask(dns.port, "www.test")).rr and r.rr[0].ttl == 30 and r,
            what="a stale answer",
        )
        assert str(stale.rr[0].rdata) == "198.18.0.5" and stale.header.rcode == 0
        wait_for(
            lambda: dns.metric("ultranet_dns_upstream_queries_total", outcome="udp_error") >= 1,
            what="the refresh to fail",
        )
        asked = auth.count("www.test")
        for _ in range(5):  # within failure_recheck: stale at once, upstream not asked
            assert ask(dns.port, "www.test").rr[0].ttl == 30
        assert auth.count("www.test") == asked
        assert dns.metric("coredns_cache_served_stale_total") >= 6


def test_no_stale_data_means_servfail(dns_factory: Factory) -> None:
    with AuthServer("test.", ["www.test. A 198.18.0.5"]) as auth:
        auth.down = True
        dns = dns_factory(base_doc(auth.address, upstream={"timeout": 0.3}))
        assert ask(dns.port, "www.test").header.rcode == dnslib.RCODE.SERVFAIL


def test_popular_entries_are_prefetched_before_expiry(dns_factory: Factory) -> None:
    with AuthServer("test.", ["www.test. A 198.18.0.5"], ttl=2) as auth:
        doc = base_doc(auth.address, cache={"min_ttl": 0}, prefetch={"hits": 2, "percent": 50})
        dns = dns_factory(doc)
        for _ in range(3):
            ask(dns.port, "www.test")
        # Hits in the last half of the TTL start a refresh; no client ever sees a miss.
        wait_for(
            lambda: ask(dns.port, "www.test") and auth.count("www.test") == 2,
            timeout=5,
            what="a prefetch",
        )
        assert dns.metric("coredns_cache_prefetch_total") >= 1
        assert dns.metric("coredns_cache_misses_total") == 1
