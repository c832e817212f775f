"""In-process: the pooled, pipelined TCP upstream (``tcpupstream.TcpPool``) against the test
authoritative server on loopback. Waits are on the answers themselves."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Iterator

import dnslib
import pytest

from dnscache.config import Address
from dnscache.errors import UpstreamError
from dnscache.tcpupstream import TcpPool
from dnscache.testing import AuthServer
from dnscache.upstream import Exchanger
from dnscache.wire import fast_query

from .test_wire import q as query_bytes


@pytest.fixture
def auth() -> Iterator[AuthServer]:
    with AuthServer("test.", wildcard_a=True) as server:
        yield server


def address_of(server: AuthServer) -> Address:
    return (ipaddress.ip_address("127.0.0.1"), server.port)


def pool_for(server: AuthServer, spoofed: list[int] | None = None, **sizes: float) -> TcpPool:
    counter = spoofed if spoofed is not None else []
    return TcpPool(address_of(server), lambda: 1232, lambda: counter.append(1), **sizes)  # type: ignore[arg-type]


def q(name: str) -> bytes:
    """The cache key of an A query for ``name``: what the resolver hands the exchanger."""
    found = fast_query(query_bytes(name), 1232)
    assert found is not None
    return found[0]


def name_of(answer: bytes) -> str:
    return str(dnslib.DNSRecord.parse(answer).q.qname)


def test_concurrent_queries_share_a_bounded_number_of_connections(auth: AuthServer) -> None:
    async def main() -> list[str]:
        pool = pool_for(auth, connections=2)
        try:
            names = [f"n{i}.test." for i in range(60)]
            burst = await asyncio.gather(*(pool.query(q(n), 2.0) for n in names))
            after = [await pool.query(q(f"s{i}.test."), 2.0) for i in range(20)]
            return [name_of(a) for a in burst + after]
        finally:
            pool.close()

    got = asyncio.run(main())
    assert got == [f"n{i}.test." for i in range(60)] + [f"s{i}.test." for i in range(20)]
    assert 1 <= auth.tcp_accepted <= 2
    assert auth.count("n7.test", proto="tcp") == 1


def test_answers_that_come_out_of_order_reach_their_queries(auth: AuthServer) -> None:
    auth.slow["slow.test."] = 0.3

    async def main() -> tuple[list[str], str]:
        pool = pool_for(auth, connections=1)
        try:
            finished: list[str] = []

            async def ask(name: str) -> str:
                answer = name_of(await pool.query(q(name), 2.0))
                finished.append(answer)
                return answer

            slow = asyncio.create_task(ask("slow.test."))
            await asyncio.sleep(0)  # the slow query goes first on the one connection
            fast = await ask("fast.test.")
            return finished + [await slow], fast
        finally:
            pool.close()

    finished, fast = asyncio.run(main())
    assert fast == "fast.test."
    assert finished == ["fast.test.", "slow.test.", "slow.test."]
    assert auth.tcp_accepted == 1


def test_queries_are_pipelined_not_sent_one_after_another(auth: AuthServer) -> None:
    for i in range(20):
        auth.slow[f"p{i}.test."] = 0.3

    async def main() -> list[str]:
        pool = pool_for(auth, connections=1)
        try:
            answers = await asyncio.gather(*(pool.query(q(f"p{i}.test."), 5.0) for i in range(20)))
            return [name_of(a) for a in answers]
        finally:
            pool.close()

    started = time.monotonic()
    assert asyncio.run(main()) == [f"p{i}.test." for i in range(20)]
    assert time.monotonic() - started < 3.0  # one after another: 6 s
    assert auth.tcp_accepted == 1


def test_a_full_pipeline_makes_queries_wait_for_room(auth: AuthServer) -> None:
    for i in range(3):
        auth.slow[f"w{i}.test."] = 0.2

    async def main() -> list[str]:
        pool = pool_for(auth, connections=1, pipeline=2)
        try:
            answers = await asyncio.gather(*(pool.query(q(f"w{i}.test."), 3.0) for i in range(3)))
            return [name_of(a) for a in answers]
        finally:
            pool.close()

    started = time.monotonic()
    assert asyncio.run(main()) == ["w0.test.", "w1.test.", "w2.test."]
    assert time.monotonic() - started >= 0.4  # the third could only start after the first two
    assert auth.tcp_accepted == 1


def test_an_upstream_closing_an_idle_connection_costs_no_query(auth: AuthServer) -> None:
    async def main() -> str:
        pool = pool_for(auth, connections=1)
        try:
            await pool.query(q("first.test."), 2.0)
            auth.close_tcp()  # the server's idle timer fires
            return name_of(await pool.query(q("second.test."), 2.0))
        finally:
            pool.close()

    assert asyncio.run(main()) == "second.test."
    assert auth.tcp_accepted == 2


def test_idle_connections_are_closed_by_the_sweep(auth: AuthServer) -> None:
    async def main() -> tuple[int, int, int]:
        pool = pool_for(auth, idle=5.0)
        try:
            await pool.query(q("a.test."), 2.0)
            pool.sweep(time.monotonic() + 1.0)  # not idle long enough
            kept = len(pool)
            pool.sweep(time.monotonic() + 5.0)
            swept = len(pool)
            await pool.query(q("b.test."), 2.0)
            return kept, swept, len(pool)
        finally:
            pool.close()

    assert asyncio.run(main()) == (1, 0, 1)
    assert auth.tcp_accepted == 2


def test_a_connection_that_goes_silent_is_dropped_after_a_timeout(auth: AuthServer) -> None:
    async def main() -> tuple[str, int, str]:
        pool = pool_for(auth, connections=1)
        try:
            await pool.query(q("up.test."), 2.0)
            auth.down = True  # reads, never answers
            with pytest.raises(UpstreamError) as timed_out:
                await pool.query(q("lost.test."), 0.2)
            left = len(pool)
            auth.down = False
            return str(timed_out.value), left, name_of(await pool.query(q("back.test."), 2.0))
        finally:
            pool.close()

    error, left, back = asyncio.run(main())
    assert "no answer in 0.2 s" in error
    assert left == 0 and back == "back.test."
    assert auth.tcp_accepted == 2


def test_an_answer_to_another_question_is_counted_and_ignored(auth: AuthServer) -> None:
    # A reply with our ID but not our question: counted as spoofed, the real one still awaited.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        addr = (ipaddress.ip_address("127.0.0.1"), listener.getsockname()[1])

        async def fake_upstream() -> None:
            loop = asyncio.get_running_loop()
            conn, _ = await loop.sock_accept(listener)
            with conn:
                size = int.from_bytes(await loop.sock_recv(conn, 2), "big")
                query = dnslib.DNSRecord.parse(await loop.sock_recv(conn, size))
                wrong = dnslib.DNSRecord.question("other.test.")
                wrong.header.id = query.header.id
                for reply in (wrong.reply(), query.reply()):
                    data = reply.pack()
                    await loop.sock_sendall(conn, len(data).to_bytes(2, "big") + data)
                await loop.sock_recv(conn, 1)  # until the pool closes

        async def main() -> tuple[str, list[int]]:
            spoofed: list[int] = []
            pool = TcpPool(addr, lambda: 1232, lambda: spoofed.append(1))
            server = asyncio.create_task(fake_upstream())
            try:
                return name_of(await pool.query(q("mine.test."), 2.0)), spoofed
            finally:
                pool.close()
                await server

        name, spoofed = asyncio.run(main())
    assert name == "mine.test." and spoofed == [1]


def test_a_refused_connection_is_an_upstream_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        addr = (ipaddress.ip_address("127.0.0.1"), closed.getsockname()[1])

        async def main() -> None:
            pool = TcpPool(addr, lambda: 1232, lambda: None)
            try:
                await pool.query(q("x.test."), 2.0)
            finally:
                pool.close()

        with pytest.raises(UpstreamError, match="tcp: .*refused"):
            asyncio.run(main())


def test_the_exchanger_keeps_one_pool_per_upstream_and_reload_resizes_it(
    auth: AuthServer,
) -> None:
    async def main() -> tuple[int, tuple[int, int, float]]:
        exchanger = Exchanger(asyncio.get_running_loop(), 1232)
        exchanger.configure_tcp(1, 10, 5.0)
        try:
            for i in range(5):
                await exchanger.tcp(address_of(auth), q(f"r{i}.test."), 2.0)
            exchanger.configure_tcp(3, 50, 1.0)  # a reload
            (pool,) = exchanger._tcp_pools.values()
            return exchanger.tcp_connections_opened(), (pool.connections, pool.pipeline, pool.idle)
        finally:
            exchanger.close()

    assert asyncio.run(main()) == (1, (3, 50, 1.0))
    assert auth.tcp_accepted == 1
