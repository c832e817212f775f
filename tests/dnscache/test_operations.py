"""Operations: metrics, /health and /ready, SIGHUP reload under load, SIGTERM drain, restarts."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import dnslib

from tools.bench.dns.authserver import AuthServer

from .helpers import DnsProcess, ask, base_doc, make_query, wait_for

Factory = Callable[..., DnsProcess]


def test_metrics_use_coredns_names(auth: AuthServer, dns_factory: Factory) -> None:
    dns = dns_factory(base_doc(auth.address, workers=2))
    for _ in range(3):
        ask(dns.port, "www.test")
    ask(dns.port, "missing.test")
    assert dns.metric("coredns_dns_requests_total", proto="udp", type="A") == 4
    assert dns.metric("coredns_cache_hits_total", type="success") == 2
    assert dns.metric("coredns_cache_misses_total") == 2
    assert dns.metric("coredns_dns_responses_total", rcode="NXDOMAIN") == 1
    assert dns.metric("coredns_dns_request_duration_seconds_count", proto="udp") == 4
    assert dns.metric("coredns_cache_entries") == 2
    assert dns.metric("ultranet_dns_workers", state="ready") == 2
    assert dns.http("/health") == (200, "OK") and dns.http("/ready") == (200, "OK")
    assert dns.http("/nope")[0] == 404


def test_sighup_reload_under_load_drops_nothing(auth: AuthServer, dns_factory: Factory) -> None:
    doc = base_doc(auth.address, workers=2)
    dns = dns_factory(doc)
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def load() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            # A dropped query never gets its answer; a slow one (a loaded machine) gets it
            # late, and a late answer would be read as the next query's wrong id: 10 s.
            s.settimeout(10)
            for i in range(20000):  # bounded
                if stop.is_set():
                    return
                q = make_query(f"n{i % 50}.test" if i % 2 else "www.test")
                s.sendto(bytes(q.pack()), ("127.0.0.1", dns.port))
                try:
                    r = dnslib.DNSRecord.parse(s.recv(4096))
                except TimeoutError:
                    failures.append(f"query {i} unanswered")
                    continue
                if r.header.id != q.header.id:
                    failures.append(f"query {i}: wrong id")
                answered[0] += 1

    with AuthServer("other.", ["svc.other. A 198.18.1.1"]) as other:
        t = threading.Thread(target=load)
        t.start()
        try:
            wait_for(lambda: answered[0] > 200, what="load to start")
            doc["zones"]["other"] = {"upstreams": [other.address]}
            dns.write_config(doc)
            dns.signal(signal.SIGHUP)
            wait_for(
                lambda: dns.metric("ultranet_dns_reloads_total", result="ok") == 1,
                what="the reload",
            )
            seen = answered[0]
            wait_for(lambda: answered[0] > seen + 200, timeout=30, what="load after the reload")
        finally:
            stop.set()
            t.join(30)
        assert str(ask(dns.port, "svc.other").rr[0].rdata) == "198.18.1.1"
    assert failures == []


def test_invalid_reload_keeps_the_running_config(auth: AuthServer, dns_factory: Factory) -> None:
    dns = dns_factory(base_doc(auth.address))
    dns.config.write_text("zones: {}\n")
    dns.signal(signal.SIGHUP)
    wait_for(lambda: dns.metric("ultranet_dns_reloads_total", result="failed") == 1, what="reject")
    assert ask(dns.port, "www.test").rr
    assert "reload rejected" in dns.stderr()


def test_sigterm_drains_in_flight_queries(auth: AuthServer, dns_factory: Factory) -> None:
    # The upstream holds the query until every listening socket is closed: the drain must
    # answer a query it read before, whose answer comes after. Timeouts are failure guards
    # (upstream and drain well above the few hundred ms this takes, for a loaded machine).
    doc = base_doc(auth.address, lameduck=0.5, drain_timeout=10.0, upstream={"timeout": 8.0})
    dns = dns_factory(doc)
    auth.hold.add("www.test.")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(20)
        q = make_query("www.test")
        s.sendto(bytes(q.pack()), ("127.0.0.1", dns.port))
        wait_for(lambda: auth.held == 1, what="the upstream query")
        dns.signal(signal.SIGTERM)
        wait_for(lambda: dns.http("/ready")[0] == 503, what="not ready while draining")
        dns.wait_event("draining")  # the sockets are closed, the query still in flight
        auth.release()
        reply = dnslib.DNSRecord.parse(s.recv(4096))
    assert reply.header.id == q.header.id and len(reply.rr) == 2
    assert dns.proc.wait(20) == 0


def _workers(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()]


def test_a_killed_worker_is_restarted_on_the_same_socket(
    auth: AuthServer, dns_factory: Factory
) -> None:
    dns = dns_factory(base_doc(auth.address, workers=2))
    victim = _workers(dns.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: dns.metric("ultranet_dns_worker_restarts_total") == 1, what="the restart")
    wait_for(lambda: dns.http("/ready")[0] == 200, what="ready again")
    assert victim not in _workers(dns.proc.pid)
    for i in range(40):  # names steered to both workers
        assert ask(dns.port, f"n{i}.test").header.rcode == dnslib.RCODE.NXDOMAIN
