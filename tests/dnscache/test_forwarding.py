"""One worker against a real loopback upstream, with real clients (dig, dnslib sockets)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import dnslib
import pytest

from tools.bench.dns.authserver import AuthServer

from .helpers import DnsProcess, ask, base_doc, dig, make_query, tcp_exchange, udp, wait_for

Factory = Callable[..., DnsProcess]


@pytest.fixture
def dns(auth: AuthServer, dns_factory: Factory) -> DnsProcess:
    return dns_factory(base_doc(auth.address))


def test_miss_then_hit_asks_upstream_once(auth: AuthServer, dns: DnsProcess) -> None:
    first = ask(dns.port, "www.test")
    second = ask(dns.port, "www.test")
    assert sorted(str(r.rdata) for r in first.rr) == ["198.18.0.5", "198.18.0.6"]
    assert [str(r.rdata) for r in second.rr] == [str(r.rdata) for r in first.rr]
    assert auth.count("www.test") == 1
    assert second.rr[0].ttl <= first.rr[0].ttl <= 300


def test_0x20_case_is_echoed_and_shares_the_entry(auth: AuthServer, dns: DnsProcess) -> None:
    ask(dns.port, "www.test")
    reply = ask(dns.port, "WwW.TeSt")
    assert str(reply.q.qname) == "WwW.TeSt." and str(reply.rr[0].rname) == "WwW.TeSt."
    assert auth.count("www.test") == 1


def test_nxdomain_and_nodata_are_cached_with_the_soa(auth: AuthServer, dns: DnsProcess) -> None:
    for _ in range(3):
        nx = ask(dns.port, "missing.test")
        nodata = ask(dns.port, "www.test", "AAAA")
    assert nx.header.rcode == dnslib.RCODE.NXDOMAIN and nx.auth[0].rtype == dnslib.QTYPE.SOA
    assert nodata.header.rcode == 0 and nodata.rr == [] and nodata.auth[0].ttl <= 60
    assert auth.count("missing.test") == 1 and auth.count("www.test", "AAAA") == 1
    assert dns.metric("coredns_cache_hits_total", type="denial") == 4


def test_cname_chain(dns: DnsProcess) -> None:
    reply = ask(dns.port, "alias.test")
    assert [dnslib.QTYPE.get(r.rtype) for r in reply.rr] == ["CNAME", "CNAME", "A", "A"]


def test_dig_sees_answers_flags_and_edns(dns: DnsProcess, need_dig: None) -> None:
    out = dig(dns.port, "www.test", "+dnssec")
    assert "status: NOERROR" in out and "198.18.0.5" in out
    assert "flags: do; udp: 1232" in out and " rd ra" in out
    assert "status: NOERROR" in dig(dns.port, "mx.test", "MX", "+norec")


def test_do_and_cd_are_in_the_key(auth: AuthServer, dns: DnsProcess) -> None:
    ask(dns.port, "www.test")
    ask(dns.port, "www.test", do=True)
    ask(dns.port, "www.test", cd=True)
    ask(dns.port, "www.test", do=True)
    assert auth.count("www.test") == 3


def test_truncation_then_tcp(auth: AuthServer, dns: DnsProcess, need_dig: None) -> None:
    small = ask(dns.port, "big.test", "TXT", payload=None)  # 512 bytes without EDNS
    assert small.header.tc == 1 and small.rr == []
    large = ask(dns.port, "big.test", "TXT", payload=4096)  # bounded by our 1232
    assert large.header.tc == 1
    out = dig(dns.port, "big.test", "TXT")  # dig retries over TCP by itself
    assert "Truncated, retrying in TCP mode" in out and out.count('"xxxx') == 8
    assert dns.metric("ultranet_dns_truncated_total") == 3  # ours two, and dig's UDP try
    assert dns.metric("ultranet_dns_tcp_connections_total") == 1  # dig's retry
    q = make_query("big.test", "TXT", payload=None)
    for _ in range(2):  # the same bytes again: still counted (a memo hit would not count)
        assert dnslib.DNSRecord.parse(udp(dns.port, bytes(q.pack()))).header.tc == 1
    assert dns.metric("ultranet_dns_truncated_total") == 5


def test_upstream_truncation_is_retried_over_tcp(auth: AuthServer, dns: DnsProcess) -> None:
    auth.truncate.add("www.test.")
    [raw] = tcp_exchange(dns.port, [bytes(make_query("www.test").pack())])
    assert len(dnslib.DNSRecord.parse(raw).rr) == 2
    assert auth.count("www.test", proto="udp") == 1 and auth.count("www.test", proto="tcp") == 1


def test_tcp_pipelined_answers_out_of_order(auth: AuthServer, dns_factory: Factory) -> None:
    # The first query's upstream answer is held until the second's reply has come back, so
    # only an out-of-order answer gets it back (in order, both would wait for the guard:
    # the 8 s upstream timeout, then the first's SERVFAIL comes first).
    dns = dns_factory(base_doc(auth.address, upstream={"timeout": 8.0}))
    auth.hold.add("mx.test.")
    slow, fast = make_query("mx.test", "MX"), make_query("www.test")
    with socket.create_connection(("127.0.0.1", dns.port), timeout=20) as conn:
        conn.sendall(b"".join(len(m).to_bytes(2, "big") + m for m in (slow.pack(), fast.pack())))
        wait_for(lambda: auth.held == 1, what="the MX query upstream")
        with conn.makefile("rb") as stream:
            first = stream.read(int.from_bytes(stream.read(2), "big"))
            auth.release()
            second = stream.read(int.from_bytes(stream.read(2), "big"))
    replies = [dnslib.DNSRecord.parse(r) for r in (first, second)]
    assert [r.header.id for r in replies] == [fast.header.id, slow.header.id]
    assert [len(r.rr) for r in replies] == [2, 1]


def test_spoofed_replies_are_rejected(auth: AuthServer, dns: DnsProcess) -> None:
    auth.spoof = True  # a wrong-ID and a wrong-question reply come first, then the real one
    reply = ask(dns.port, "www.test")
    assert sorted(str(r.rdata) for r in reply.rr) == ["198.18.0.5", "198.18.0.6"]
    # Declared once, counting what it says (it was declared twice, this name always 0).
    assert dns.metric("ultranet_dns_spoofed_replies_total") == 2
    assert dns.metric("ultranet_dns_upstream_spoofed_total") == 0  # no such metric now


def test_reply_from_another_port_is_not_accepted(auth: AuthServer, dns: DnsProcess) -> None:
    """RFC 5452: a reply with the right ID and question from the wrong port is ignored."""
    auth.down = True
    q = make_query("www.test")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.sendto(bytes(q.pack()), ("127.0.0.1", dns.port))
        wait_for(lambda: auth.count("www.test") == 1, what="the upstream query")
        upstream_query, (_, worker_port) = auth.last
        forged = dnslib.DNSRecord.parse(upstream_query).reply()
        forged.add_answer(*dnslib.RR.fromZone("www.test. 300 A 198.18.66.66"))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            attacker.sendto(bytes(forged.pack()), ("127.0.0.1", worker_port))
        reply = dnslib.DNSRecord.parse(client.recv(4096))
    assert reply.header.rcode == dnslib.RCODE.SERVFAIL and reply.rr == []
    # The connected socket never saw it: the kernel drops a datagram from another source.
    assert dns.metric("ultranet_dns_spoofed_replies_total") == 0


def test_malformed_packets_get_formerr_or_nothing_and_the_worker_lives(dns: DnsProcess) -> None:
    good = make_query("www.test")
    bad = bytearray(good.pack())
    bad[5] = 2  # qdcount 2
    reply = dnslib.DNSRecord.parse(udp(dns.port, bytes(bad)))
    assert reply.header.rcode == dnslib.RCODE.FORMERR and reply.header.id == good.header.id
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(2000):
            s.sendto(os.urandom(i % 300), ("127.0.0.1", dns.port))
    assert ask(dns.port, "www.test").header.rcode == 0
    assert dns.metric("ultranet_dns_malformed_total") > 0


def test_acl_refuses_clients_outside(auth: AuthServer, dns_factory: Factory) -> None:
    dns = dns_factory(base_doc(auth.address, acl=["198.18.0.0/15"]))
    reply = ask(dns.port, "www.test")
    assert reply.header.rcode == dnslib.RCODE.REFUSED and auth.total() == 0
    assert dns.metric("ultranet_dns_acl_rejected_total") == 1


def test_servfail_is_cached_briefly(auth: AuthServer, dns: DnsProcess) -> None:
    auth.servfail.add("www.test.")
    assert ask(dns.port, "www.test").header.rcode == dnslib.RCODE.SERVFAIL
    assert ask(dns.port, "www.test").header.rcode == dnslib.RCODE.SERVFAIL
    assert auth.count("www.test") == 1
    assert dns.metric("coredns_cache_hits_total", type="servfail") == 1


def test_per_zone_upstreams_and_tcp_transport(auth: AuthServer, dns_factory: Factory) -> None:
    with AuthServer(
        "cluster.local.", ["kube-dns.kube-system.svc.cluster.local. A 100.64.0.10"]
    ) as cl:
        doc = base_doc(auth.address)
        doc["zones"]["cluster.local"] = {"upstreams": [cl.address], "transport": "tcp"}
        dns = dns_factory(doc)
        reply = ask(dns.port, "kube-dns.kube-system.svc.cluster.local")
        assert str(reply.rr[0].rdata) == "100.64.0.10"
        assert cl.count("kube-dns.kube-system.svc.cluster.local", proto="tcp") == 1
        assert ask(dns.port, "www.test").rr and auth.count("www.test", proto="udp") == 1


def test_a_tcp_zone_reuses_its_upstream_connections(auth: AuthServer, dns_factory: Factory) -> None:
    # NodeLocal DNSCache's shape: cluster.local over TCP. Forty misses at once and forty
    # after them must not cost eighty connections on the cluster DNS.
    with AuthServer("cluster.local.", wildcard_a=True) as cl:
        doc = base_doc(auth.address, upstream={"timeout": 2.0, "tcp_connections": 2})
        doc["zones"]["cluster.local"] = {"upstreams": [cl.address], "transport": "tcp"}
        dns = dns_factory(doc)
        socks = []
        try:
            for i in range(40):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.settimeout(5.0)
                socks.append(s)
                s.sendto(make_query(f"p{i}.ns.svc.cluster.local").pack(), ("127.0.0.1", dns.port))
            names = {str(dnslib.DNSRecord.parse(s.recv(4096)).q.qname) for s in socks}
        finally:
            for s in socks:
                s.close()
        assert names == {f"p{i}.ns.svc.cluster.local." for i in range(40)}
        for i in range(40):
            assert ask(dns.port, f"q{i}.ns.svc.cluster.local").rr
        assert cl.count("p3.ns.svc.cluster.local", proto="tcp") == 1
        assert 1 <= cl.tcp_accepted <= 2
        assert dns.metric("ultranet_dns_upstream_tcp_connections_total") == cl.tcp_accepted
        assert dns.metric("ultranet_dns_upstream_tcp_open") == cl.tcp_open >= 1  # kept idle


def test_failover_to_the_next_upstream(auth: AuthServer, dns_factory: Factory) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:
        dead.bind(("127.0.0.1", 0))  # bound, never answers
        doc = base_doc(f"127.0.0.1:{dead.getsockname()[1]}", upstream={"timeout": 0.3})
        doc["zones"]["."]["upstreams"].append(auth.address)
        dns = dns_factory(doc)
        for name in ("www.test", "mx.test", "alias.test"):
            assert ask(dns.port, name).header.rcode == 0
        assert dns.metric("coredns_forward_healthcheck_broken_total") == 1


def test_identical_queries_in_flight_are_coalesced(auth: AuthServer, dns_factory: Factory) -> None:
    # The upstream holds the first query until the other 19 have joined it (the 8 s upstream
    # timeout is a failure guard): each of them is coalesced, none waits for a cache hit.
    dns = dns_factory(base_doc(auth.address, upstream={"timeout": 8.0}))
    auth.hold.add("www.test.")
    socks: list[Any] = []
    try:
        for _ in range(20):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(20)
            socks.append(s)
            s.sendto(bytes(make_query("www.test").pack()), ("127.0.0.1", dns.port))
        wait_for(lambda: auth.held == 1, what="the upstream query")
        wait_for(lambda: dns.metric("ultranet_dns_coalesced_total") == 19, what="19 joined")
        auth.release()
        replies = [dnslib.DNSRecord.parse(s.recv(4096)) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert all(len(r.rr) == 2 for r in replies)
    assert auth.count("www.test") == 1
    assert dns.metric("coredns_cache_hits_total", type="success") == 0


def test_reused_upstream_sockets_answer_correctly(dns_factory: Factory) -> None:
    """``upstream.socket_reuse``: sequential misses share a socket, every answer is right."""
    with AuthServer("test.", [], wildcard_a=True) as auth:
        doc = base_doc(auth.address, upstream={"timeout": 1.0, "socket_reuse": 4})
        dns = dns_factory(doc)
        ports = []
        for i in range(4):
            reply = ask(dns.port, f"n{i}.test")
            assert reply.header.rcode == 0 and str(reply.rr[0].rname) == f"n{i}.test."
            ports.append(auth.last[1][1])
        assert len(set(ports)) < len(ports)  # one at a time: the idle socket is taken again
