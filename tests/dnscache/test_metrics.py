"""Metrics: the README's table is what ``/metrics`` exports, and each metric in it moves in a
test (here, or beside the behaviour it counts, in the other test files)."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable

import dnslib

from tools.bench.dns.authserver import AuthServer

from .helpers import REPO, DnsProcess, ask, base_doc, make_query, tcp_exchange, wait_for

Factory = Callable[..., DnsProcess]
README = REPO / "dnscache" / "README.md"
TESTS = REPO / "tests" / "dnscache"


def readme_metrics() -> set[str]:
    text = README.read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`((?:coredns|ultranet)_[a-z_]+)`", section))


def exported(dns: DnsProcess) -> set[str]:
    """Metric names as a scrape shows them (a counter with its ``_total``)."""
    names = set()
    for line in dns.http("/metrics")[1].splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name.removesuffix("_total") + "_total" if kind == "counter" else name)
    return names


def test_the_readme_lists_every_exported_metric_and_no_other(
    auth: AuthServer, dns_factory: Factory
) -> None:
    dns = dns_factory(base_doc(auth.address))
    ask(dns.port, "www.test")
    assert exported(dns) == readme_metrics()


def test_every_metric_in_the_readme_is_asserted_by_a_test() -> None:
    asserted = set()
    for path in TESTS.glob("test_*.py"):
        asserted |= set(re.findall(r"metric\(\s*\"([a-z_]+)\"", path.read_text()))
    asserted |= {re.sub(r"_(count|sum|bucket)$", "", name) for name in asserted}
    missing = readme_metrics() - asserted
    assert not missing, f"no test asserts: {sorted(missing)}"


def test_tcp_clients_are_counted_while_open_and_refused_over_the_limit(
    auth: AuthServer, dns_factory: Factory
) -> None:
    dns = dns_factory(base_doc(auth.address, tcp_max_connections=1))
    with socket.create_connection(("127.0.0.1", dns.port), timeout=5) as first:
        query = bytes(make_query("www.test").pack())
        first.sendall(len(query).to_bytes(2, "big") + query)
        assert first.recv(2)  # answered: the connection is the worker's now
        assert dns.metric("ultranet_dns_tcp_open") == 1
        assert dns.metric("ultranet_dns_tcp_connections_total") == 1
        with socket.create_connection(("127.0.0.1", dns.port), timeout=5) as second:
            second.sendall(len(query).to_bytes(2, "big") + query)
            try:  # closed unanswered: over tcp_max_connections (a reset if our query was in)
                assert second.recv(2) == b""
            except ConnectionResetError:
                pass
        assert dns.metric("ultranet_dns_tcp_rejected_total") == 1
    wait_for(lambda: dns.metric("ultranet_dns_tcp_open") == 0, what="the connection closed")
    assert tcp_exchange(dns.port, [query])  # a place again once the first one left
    assert dns.metric("ultranet_dns_tcp_connections_total") == 2


def test_resolutions_in_flight_and_refusals_over_max_concurrent(
    auth: AuthServer, dns_factory: Factory
) -> None:
    auth.down = True  # the upstream hears and never answers
    dns = dns_factory(base_doc(auth.address, upstream={"timeout": 10.0, "max_concurrent": 1}))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waiting:
        waiting.sendto(bytes(make_query("www.test").pack()), ("127.0.0.1", dns.port))
        wait_for(lambda: auth.count("www.test") == 1, what="the upstream query")
        assert dns.metric("ultranet_dns_inflight") == 1
        refused = ask(dns.port, "mx.test")
        assert refused.header.rcode == dnslib.RCODE.REFUSED
        assert dns.metric("coredns_forward_max_concurrent_rejects_total") == 1


def test_a_full_cache_evicts_and_every_query_is_a_cache_request(
    auth: AuthServer, dns_factory: Factory
) -> None:
    doc = base_doc(auth.address)
    doc["cache"] = {"capacity": 2}
    dns = dns_factory(doc)
    for name in ("www.test", "mx.test", "sub.deep.test", "www.test"):
        assert ask(dns.port, name).header.rcode == 0
    assert dns.metric("coredns_cache_entries") == 2
    assert dns.metric("coredns_cache_evictions_total") == 2  # www, then mx, made room
    assert dns.metric("coredns_cache_requests_total") == 4
    assert dns.metric("coredns_cache_misses_total") == 4  # www was evicted before its return


def test_udp_wakeups_count_readable_events_not_queries(
    auth: AuthServer, dns_factory: Factory
) -> None:
    dns = dns_factory(base_doc(auth.address))
    assert dns.metric("ultranet_dns_udp_wakeups_total") == 0
    for _ in range(4):
        ask(dns.port, "www.test")
    assert dns.metric("coredns_dns_requests_total", proto="udp") == 4
    # One query at a time: each wake-up finds one (a burst would find several per wake-up).
    assert dns.metric("ultranet_dns_udp_wakeups_total") == 4
