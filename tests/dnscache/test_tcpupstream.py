"""In-process: the pooled, pipelined TCP upstream (``tcpupstream.TcpPool``) against the test
authoritative server on loopback. Waits are on the answers themselves."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import closing

import dnslib
import pytest

from dnscache import tcpupstream
from dnscache.config import Address
from dnscache.errors import UpstreamError
from dnscache.tcpupstream import TcpPool
from dnscache.upstream import Exchanger
from dnscache.wire import fast_query
from tools.bench.dns.authserver import AuthServer

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
        with closing(pool_for(auth, connections=2)) as pool:
            names = [f"n{i}.test." for i in range(60)]
            burst = await asyncio.gather(*(pool.query(q(n), 2.0) for n in names))
            after = [await pool.query(q(f"s{i}.test."), 2.0) for i in range(20)]
            return [name_of(a) for a in burst + after]

    got = asyncio.run(main())
    assert got == [f"n{i}.test." for i in range(60)] + [f"s{i}.test." for i in range(20)]
    assert 1 <= auth.tcp_accepted <= 2
    assert auth.count("n7.test", proto="tcp") == 1


def test_answers_that_come_out_of_order_reach_their_queries(auth: AuthServer) -> None:
    auth.slow["slow.test."] = 0.3

    async def main() -> tuple[list[str], str]:
        with closing(pool_for(auth, connections=1)) as pool:
            finished: list[str] = []

            async def ask(name: str) -> str:
                answer = name_of(await pool.query(q(name), 2.0))
                finished.append(answer)
                return answer

            slow = asyncio.create_task(ask("slow.test."))
            await asyncio.sleep(0)  # the slow query goes first on the one connection
            fast = await ask("fast.test.")
            return finished + [await slow], fast

    finished, fast = asyncio.run(main())
    assert fast == "fast.test."
    assert finished == ["fast.test.", "slow.test.", "slow.test."]
    assert auth.tcp_accepted == 1


def test_queries_are_pipelined_not_sent_one_after_another(auth: AuthServer) -> None:
    for i in range(20):
        auth.slow[f"p{i}.test."] = 0.3

    async def main() -> list[str]:
        with closing(pool_for(auth, connections=1)) as pool:
            answers = await asyncio.gather(*(pool.query(q(f"p{i}.test."), 5.0) for i in range(20)))
            return [name_of(a) for a in answers]

    started = time.monotonic()
    assert asyncio.run(main()) == [f"p{i}.test." for i in range(20)]
    assert time.monotonic() - started < 3.0  # one after another: 6 s
    assert auth.tcp_accepted == 1


def test_a_full_pipeline_makes_queries_wait_for_room(auth: AuthServer) -> None:
    for i in range(3):
        auth.slow[f"w{i}.test."] = 0.2

    async def main() -> list[str]:
        with closing(pool_for(auth, connections=1, pipeline=2)) as pool:
            answers = await asyncio.gather(*(pool.query(q(f"w{i}.test."), 3.0) for i in range(3)))
            return [name_of(a) for a in answers]

    started = time.monotonic()
    assert asyncio.run(main()) == ["w0.test.", "w1.test.", "w2.test."]
    assert time.monotonic() - started >= 0.4  # the third could only start after the first two
    assert auth.tcp_accepted == 1


def test_an_upstream_closing_an_idle_connection_costs_no_query(auth: AuthServer) -> None:
    async def main() -> str:
        with closing(pool_for(auth, connections=1)) as pool:
            await pool.query(q("first.test."), 2.0)
            auth.close_tcp()  # the server's idle timer fires
            return name_of(await pool.query(q("second.test."), 2.0))

    assert asyncio.run(main()) == "second.test."
    assert auth.tcp_accepted == 2


def test_idle_connections_are_closed_by_the_sweep(auth: AuthServer) -> None:
    async def main() -> tuple[int, int, int]:
        with closing(pool_for(auth, idle=5.0)) as pool:
            await pool.query(q("a.test."), 2.0)
            pool.sweep(time.monotonic() + 1.0)  # not idle long enough
            kept = len(pool)
            pool.sweep(time.monotonic() + 5.0)
            swept = len(pool)
            await pool.query(q("b.test."), 2.0)
            return kept, swept, len(pool)

    assert asyncio.run(main()) == (1, 0, 1)
    assert auth.tcp_accepted == 2


def test_a_connection_that_goes_silent_is_dropped_after_a_timeout(auth: AuthServer) -> None:
    async def main() -> tuple[str, int, str]:
        with closing(pool_for(auth, connections=1)) as pool:
            await pool.query(q("up.test."), 2.0)
            auth.down = True  # reads, never answers
            with pytest.raises(UpstreamError) as timed_out:
                await pool.query(q("lost.test."), 0.2)
            left = len(pool)
            auth.down = False
            return str(timed_out.value), left, name_of(await pool.query(q("back.test."), 2.0))

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


# -- regressions from review: an in-loop upstream on a port of its own ------------------------


async def fake_upstream(
    delay: Callable[[dnslib.DNSRecord], float] = lambda rec: 0.0,
) -> tuple[asyncio.Server, Address]:
    """Answers A 6.6.6.6 to CD=1 queries and 1.1.1.1 to others, each after ``delay(rec)``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def answer(rec: dnslib.DNSRecord) -> None:
            await asyncio.sleep(delay(rec))
            reply = rec.reply()
            ip = "6.6.6.6" if rec.header.cd else "1.1.1.1"
            reply.add_answer(dnslib.RR(rec.q.qname, rdata=dnslib.A(ip)))
            data = reply.pack()
            writer.write(len(data).to_bytes(2, "big") + data)

        pending = set()
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                task = asyncio.create_task(
                    answer(dnslib.DNSRecord.parse(await reader.readexactly(size)))
                )
                pending.add(task)
                task.add_done_callback(pending.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for task in pending:
                task.cancel()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, (ipaddress.ip_address("127.0.0.1"), server.sockets[0].getsockname()[1])


def cd_key(name: str, cd: bool) -> bytes:
    rec = dnslib.DNSRecord.question(name)
    rec.header.cd = int(cd)
    found = fast_query(bytes(rec.pack()), 1232)
    assert found is not None
    return found[0]


def ip_of(answer: bytes) -> str:
    return str(dnslib.DNSRecord.parse(answer).rr[0].rdata)


def test_a_waiter_cancelled_after_its_wake_up_passes_the_turn_on() -> None:
    async def main() -> float:
        server, addr = await fake_upstream(lambda rec: 0.2 if str(rec.q.qname) == "a.test." else 0)
        pool = TcpPool(addr, lambda: 1232, lambda: None, connections=1, pipeline=1)
        try:
            second: asyncio.Task[bytes] | None = None

            async def first() -> bytes:
                answer = await pool.query(q("a.test."), 5.0)
                assert second is not None
                second.cancel()  # as its own deadline would, in the loop turn it was woken in
                return answer

            one = asyncio.create_task(first())
            await asyncio.sleep(0.05)
            second = asyncio.create_task(pool.query(q("b.test."), 5.0))
            await asyncio.sleep(0)
            third = asyncio.create_task(pool.query(q("c.test."), 2.0))
            await asyncio.sleep(0)
            await one
            started = time.monotonic()
            assert name_of(await third) == "c.test."
            return time.monotonic() - started
        finally:
            pool.close()
            server.close()

    assert asyncio.run(main()) < 1.0  # not left waiting for its 2 s deadline


def test_the_id_of_a_query_that_gave_up_is_not_reused_before_its_late_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The late answer to a CD=1 query must not reach a CD=0 query for the same name that
    # drew the same ID: the draw is forced to repeat it, the pool must draw again.
    draws = iter([0x1234, 0x2222, 0x1234, 0x3333])
    monkeypatch.setattr(tcpupstream, "randbits", lambda bits: next(draws))

    def delay(rec: dnslib.DNSRecord) -> float:
        return (0.5 if rec.header.cd else 1.0) if str(rec.q.qname) == "x.test." else 0.0

    async def main() -> tuple[int, str]:
        server, addr = await fake_upstream(delay)
        pool = TcpPool(addr, lambda: 1232, lambda: None, connections=1)
        try:
            gave_up = asyncio.create_task(pool.query(cd_key("x.test.", True), 0.3))
            await asyncio.sleep(0.01)
            await pool.query(q("k.test."), 1.0)  # the connection answers, so it stays open
            with pytest.raises(UpstreamError, match="no answer"):
                await gave_up
            return len(pool), ip_of(await pool.query(cd_key("x.test.", False), 2.0))
        finally:
            pool.close()
            server.close()

    assert asyncio.run(main()) == (1, "1.1.1.1")


def test_an_upstream_that_accepts_one_connection_still_answers_every_query() -> None:
    # At its connection limit an upstream refuses further connections: queries must go on
    # the open connection, not wait on (and fail with) a connect of their own.
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        addr = (ipaddress.ip_address("127.0.0.1"), listener.getsockname()[1])

        async def one_connection() -> None:
            conn, _ = await loop.sock_accept(listener)
            listener.close()  # no more: later connects are refused
            reader, writer = await asyncio.open_connection(sock=conn)
            try:
                while True:
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    data = dnslib.DNSRecord.parse(await reader.readexactly(size)).reply().pack()
                    writer.write(len(data).to_bytes(2, "big") + data)
            except asyncio.IncompleteReadError:
                pass
            finally:
                writer.close()

        upstream = asyncio.create_task(one_connection())
        pool = TcpPool(addr, lambda: 1232, lambda: None, connections=4)
        try:
            answers = await asyncio.gather(*(pool.query(q(f"n{i}.test."), 1.0) for i in range(8)))
            return [name_of(a) for a in answers]
        finally:
            pool.close()
            await asyncio.wait_for(upstream, 5.0)
            listener.close()

    assert asyncio.run(main()) == [f"n{i}.test." for i in range(8)]


def test_a_closed_pool_opens_nothing_more() -> None:
    async def main() -> tuple[str, int, int]:
        server, addr = await fake_upstream(lambda rec: 1.0 if str(rec.q.qname) == "s.test." else 0)
        pool = TcpPool(addr, lambda: 1232, lambda: None)
        try:
            await pool.query(q("first.test."), 2.0)
            in_flight = asyncio.create_task(pool.query(q("s.test."), 5.0))
            await asyncio.sleep(0.05)
            pool.close()
            with pytest.raises(UpstreamError) as closed:
                await in_flight
            return str(closed.value), len(pool), pool.opened
        finally:
            server.close()

    error, left, opened = asyncio.run(main())
    assert "pool closed" in error or "closed before the answer" in error
    assert (left, opened) == (0, 1)


def test_a_reload_closes_the_pools_of_upstreams_it_dropped(auth: AuthServer) -> None:
    async def main() -> tuple[int, int, int]:
        other, other_addr = await fake_upstream()
        exchanger = Exchanger(asyncio.get_running_loop(), 1232)
        try:
            await exchanger.tcp(address_of(auth), q("a.test."), 2.0)
            await exchanger.tcp(other_addr, q("b.test."), 2.0)
            both = exchanger.tcp_connections_open()
            exchanger.keep_tcp_pools({address_of(auth)})  # the reload dropped the other
            kept = exchanger.tcp_connections_open()
            await exchanger.tcp(address_of(auth), q("c.test."), 2.0)
            return both, kept, len(exchanger._tcp_pools)
        finally:
            exchanger.close()
            other.close()

    assert asyncio.run(main()) == (2, 1, 1)
    assert auth.tcp_accepted == 1
