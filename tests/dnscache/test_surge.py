"""A surge upgrade on one host (the deployment's DaemonSet runs the new pod beside the old one,
both on the host network): the new instance binds the same DNS and HTTP ports while the old
one runs (SO_REUSEPORT on all of them), and the old one, on SIGTERM, first closes its
listening sockets, so every new query reaches the new instance, then answers what it had
already read, from the address the client asked, then exits."""

from __future__ import annotations

import select
import signal
import socket
from collections.abc import Callable
from typing import Any

import dnslib

from tools.bench.dns.authserver import AuthServer

from .helpers import DnsProcess, ask, base_doc, make_query
from .test_wire import upstream_reply

Factory = Callable[..., DnsProcess]


def old_instance_client(
    port: int, held: socket.socket
) -> tuple[socket.socket, dnslib.DNSRecord, bytes, Any]:
    """A client socket whose queries the old instance reads (the kernel spreads clients over
    the group by their address and port): its query shows up at ``held``, the old instance's
    upstream, instead of being answered by the new instance. Returns the client, its query,
    and the forwarded query with its source, left unanswered."""
    for i in range(64):  # each try is a coin toss between the two instances
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.connect(("127.0.0.1", port))  # the kernel drops replies from any other source
        query = make_query(f"held{i}.test")
        client.send(bytes(query.pack()))
        ready, _, _ = select.select([client, held], [], [], 5)
        if held in ready:
            data, peer = held.recvfrom(4096)
            return client, query, data, peer
        assert ready, "neither instance answered"
        client.recv(4096)  # the new instance's answer
        client.close()
    raise AssertionError("the old instance never got a client")


def test_surge_upgrade_hands_queries_to_the_new_instance(dns_factory: Factory) -> None:
    with (
        AuthServer("test.", [], wildcard_a=True) as auth,  # the new instance's upstream
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held,  # the old one's: the test
    ):
        held.bind(("127.0.0.1", 0))
        held.settimeout(10)
        old_doc = base_doc(
            f"127.0.0.1:{held.getsockname()[1]}", upstream={"timeout": 20.0}, drain_timeout=20.0
        )
        old = dns_factory(old_doc)
        new = dns_factory(
            base_doc(auth.address, listen=[f"127.0.0.1:{old.port}"], metrics=old.metrics)
        )
        assert new.port == old.port and new.metrics == old.metrics  # both bound
        client, query, forwarded, peer = old_instance_client(old.port, held)
        try:
            old.signal(signal.SIGTERM)
            old.wait_event("draining")  # its listening sockets are closed
            for i in range(20):  # from 20 fresh client ports: none may reach the old one
                reply = ask(new.port, f"after{i}.test")
                assert str(reply.rr[0].rdata) == "198.18.0.1"
            assert old.proc.poll() is None  # still finishing what it read
            held.sendto(upstream_reply(forwarded, [f"{query.q.qname} 300 A 198.18.0.99"]), peer)
            client.settimeout(10)
            reply = dnslib.DNSRecord.parse(client.recv(4096))
            assert reply.header.id == query.header.id
            assert str(reply.rr[0].rdata) == "198.18.0.99"
        finally:
            client.close()
        assert old.proc.wait(20) == 0
        assert new.http("/health") == (200, "OK")
        assert str(ask(new.port, "later.test").rr[0].rdata) == "198.18.0.1"
