"""In-process: the callback-driven UDP exchanger (sockets, timeouts, reuse) under the worker's
``FastSelector`` loop and under a plain asyncio loop, the selector itself, the hit-path memo
of query bytes, and the GC policy. Real loopback sockets; waits are on events."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import math
import select
import socket
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator

import pytest

from dnscache.cache import Entry, classify
from dnscache.config import Address, Config, parse
from dnscache.errors import UpstreamError
from dnscache.eventloop import FastSelector, new_loop
from dnscache.gcpolicy import GcPolicy
from dnscache.resolver import splice
from dnscache.server import Worker, _Hit
from dnscache.upstream import Exchanger
from dnscache.wire import fast_query, make_upstream_query, walk_response

from .test_wire import q, upstream_reply


@pytest.fixture(params=["fast", "nested"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[None]]], None]:
    """Runs a test's coroutine on the worker's loop (``FastSelector``: the exchanger's sockets
    served from the loop's own epoll) or on asyncio's default loop (a nested epoll set)."""

    def runner(main: Callable[[], Awaitable[None]]) -> None:
        async def wrapped() -> None:
            await main()

        if request.param == "fast":
            selector = FastSelector()
            with asyncio.Runner(loop_factory=lambda: new_loop(selector)) as r:
                r.run(wrapped())
        else:
            asyncio.run(wrapped())

    return runner


def new_exchanger(reuse: int = 1) -> Exchanger:
    """An exchanger on the running loop, on its ``FastSelector`` when it has one."""
    loop = asyncio.get_running_loop()
    selector = getattr(loop, "_selector", None)
    return Exchanger(loop, 1232, reuse, selector if isinstance(selector, FastSelector) else None)


@pytest.fixture
def upstream() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    try:
        yield s
    finally:
        s.close()


Runner = Callable[[Callable[[], Awaitable[None]]], None]


def address(s: socket.socket) -> Address:
    host, port = s.getsockname()
    return ipaddress.ip_address(host), port


def key_of(name: str) -> bytes:
    found = fast_query(q(name), 1232)
    assert found is not None
    return found[0]


def answer(up: socket.socket, name: str) -> int:
    """Answer one query waiting on ``up``; returns the source port it came from."""
    data, peer = up.recvfrom(4096)
    up.sendto(upstream_reply(data, [f"{name}. 300 A 198.18.0.9"]), peer)
    return int(peer[1])


async def exchange(ex: Exchanger, up: socket.socket, name: str) -> tuple[bytes, int]:
    """One query through ``ex``, answered by the test: (response, our source port)."""
    up.settimeout(5)  # the answering thread waits for the query (bounded)
    task = asyncio.ensure_future(ex.udp(address(up), key_of(name), 5.0))
    port = await asyncio.get_running_loop().run_in_executor(None, answer, up, name)
    return await task, port


def test_udp_reply_reaches_the_callback_and_the_socket_is_closed(
    upstream: socket.socket, run: Runner
) -> None:
    async def main() -> None:
        ex = new_exchanger()
        resp, _ = await exchange(ex, upstream, "a.test")
        assert resp[3] & 0x0F == 0 and b"\x01a\x04test" in resp
        assert not ex._pending and not any(p.idle for p in ex._peers.values())
        ex.close()

    run(main)


def test_sockets_are_reused_at_most_socket_reuse_times(
    upstream: socket.socket, run: Runner
) -> None:
    async def main() -> None:
        ex = new_exchanger(reuse=2)
        _, first = await exchange(ex, upstream, "a.test")
        [peer] = ex._peers.values()
        assert len(peer.idle) == 1  # answered: back in the pool, still connected
        _, second = await exchange(ex, upstream, "b.test")
        assert second == first and peer.idle == []  # used twice: closed
        ex.close()

    run(main)


def test_a_datagram_on_an_idle_socket_is_counted_and_retires_it(
    upstream: socket.socket, run: Runner
) -> None:
    async def main() -> None:
        ex = new_exchanger(reuse=3)
        _, port = await exchange(ex, upstream, "a.test")
        [peer] = ex._peers.values()
        [(sock, fd, _, _)] = peer.idle
        upstream.sendto(b"late duplicate", ("127.0.0.1", port))  # from the upstream's address
        assert select.select([fd], [], [], 5)[0]  # readable: wait for the datagram, not a time
        ex._on_fd(fd)  # what the loop does with it
        assert ex.spoofed == 1
        assert peer.idle == [] and sock.fileno() == -1  # whoever sent it knows the port
        resp, _ = await exchange(ex, upstream, "b.test")  # a fresh socket answers
        assert b"\x01b\x04test" in resp and len(peer.idle) == 1
        ex.close()

    run(main)


def test_a_socket_that_saw_a_forged_reply_is_not_reused(
    upstream: socket.socket, run: Runner
) -> None:
    async def main() -> None:
        ex = new_exchanger(reuse=3)
        upstream.settimeout(5)
        task = asyncio.ensure_future(ex.udp(address(upstream), key_of("a.test"), 5.0))
        loop = asyncio.get_running_loop()
        data, peer = await loop.run_in_executor(None, upstream.recvfrom, 4096)
        forged = bytearray(upstream_reply(data, ["a.test. 300 A 203.0.113.1"]))
        forged[0] ^= 0xFF  # a wrong ID
        upstream.sendto(bytes(forged), peer)
        upstream.sendto(upstream_reply(data, ["a.test. 300 A 198.18.0.9"]), peer)
        assert bytes([198, 18, 0, 9]) in await task and ex.spoofed == 1
        assert all(not p.idle for p in ex._peers.values())  # closed, not pooled
        _, port = await exchange(ex, upstream, "b.test")  # an unforged exchange is pooled
        assert [s[1] for p in ex._peers.values() for s in p.idle] != []
        ex.close()

    run(main)


def test_sweep_closes_sockets_idle_too_long(
    upstream: socket.socket, run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dnscache.upstream

    async def main() -> None:
        ex = new_exchanger(reuse=3)
        await exchange(ex, upstream, "a.test")
        [peer] = ex._peers.values()
        [(sock, _, _, _)] = peer.idle
        assert ex.sweep() == 0  # just idled: kept
        monkeypatch.setattr(dnscache.upstream, "IDLE_MAX_AGE", -1.0)  # "now" is past its age
        assert ex.sweep() == 1 and peer.idle == [] and sock.fileno() == -1
        assert ex._idle_fds == {}
        ex.close()

    run(main)


def test_timeouts_fire_in_deadline_order_across_timeout_values(
    upstream: socket.socket, run: Runner
) -> None:
    async def main() -> None:
        ex = new_exchanger()
        slow = asyncio.ensure_future(ex.udp(address(upstream), key_of("slow.test"), 0.4))
        fast = asyncio.ensure_future(ex.udp(address(upstream), key_of("fast.test"), 0.05))
        done, _ = await asyncio.wait({slow, fast}, return_when=asyncio.FIRST_COMPLETED)
        assert done == {fast}
        with pytest.raises(UpstreamError, match="no answer in 0.05 s"):
            fast.result()
        with pytest.raises(UpstreamError, match="no answer in 0.4 s"):
            await slow
        assert not ex._pending
        ex.close()

    run(main)


def test_wrong_id_is_ignored_and_the_real_reply_accepted(
    upstream: socket.socket, run: Runner
) -> None:
    async def main() -> None:
        ex = new_exchanger()
        upstream.settimeout(5)
        task = asyncio.ensure_future(ex.udp(address(upstream), key_of("a.test"), 5.0))
        loop = asyncio.get_running_loop()
        data, peer = await loop.run_in_executor(None, upstream.recvfrom, 4096)
        forged = bytearray(upstream_reply(data, ["a.test. 300 A 203.0.113.1"]))
        forged[0] ^= 0xFF
        upstream.sendto(bytes(forged), peer)
        upstream.sendto(upstream_reply(data, ["a.test. 300 A 198.18.0.9"]), peer)
        resp = await task
        assert bytes([198, 18, 0, 9]) in resp and ex.spoofed == 1
        ex.close()

    run(main)


# -- the worker's selector ----------------------------------------------------------------------


def test_fast_selector_serves_its_fds_from_select_beside_asyncio() -> None:
    selector = FastSelector()
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(4)]
    (fast, fast_peer), (bad, bad_peer), (watched, watched_peer), (plain, plain_peer) = pairs
    got: list[tuple[str, bytes]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        three = loop.create_future()

        def note(kind: str, data: bytes) -> None:
            got.append((kind, data))
            if len(got) == 3:
                three.set_result(None)

        def fails(sock: socket.socket) -> None:
            sock.recv(100)
            raise RuntimeError("a bug in a callback")

        selector.add_fast(fast.fileno(), lambda s: note("fast", s.recv(100)), fast)
        selector.add_fast(bad.fileno(), fails, bad)
        poller = selector.poller(lambda fd: note(f"watched {fd}", watched.recv(100)))
        poller.watch(watched.fileno())
        loop.add_reader(plain.fileno(), lambda: note("asyncio", plain.recv(100)))
        for peer, data in ((bad_peer, b"x"), (fast_peer, b"1"), (watched_peer, b"2")):
            peer.send(data)
        plain_peer.send(b"3")
        await asyncio.wait_for(three, 5)  # the failing callback did not stop the loop
        assert sorted(got) == [
            ("asyncio", b"3"),
            ("fast", b"1"),
            (f"watched {watched.fileno()}", b"2"),
        ]
        selector.remove_fast(fast.fileno())
        loop.remove_reader(plain.fileno())
        again = loop.create_future()
        loop.add_reader(plain.fileno(), lambda: again.set_result(plain.recv(100)))
        fast_peer.send(b"4")  # before the next one: it would be in the same epoll_wait
        plain_peer.send(b"5")
        assert await asyncio.wait_for(again, 5) == b"5"
        assert len(got) == 3 and fast.recv(100, socket.MSG_DONTWAIT) == b"4"  # left unread
        loop.remove_reader(plain.fileno())
        poller.close()

    try:
        with asyncio.Runner(loop_factory=lambda: new_loop(selector)) as r:
            r.run(main())
    finally:
        for a, b in pairs:
            a.close()
            b.close()


# -- the hit path's memo of query bytes ---------------------------------------------------------


def config() -> Config:
    return parse({"zones": {".": {"upstreams": ["127.0.0.1:53"]}}}, cpu_count=1)


def entry(cfg: Config, name: str, addr: str, inserted: float) -> tuple[bytes, Entry]:
    key = key_of(name)
    resp = upstream_reply(make_upstream_query(1, key, 1232), [f"{name}. 3600 A {addr}"])
    w = walk_response(resp, len(key) - 1)
    e = Entry(w, classify(w, cfg.cache, len(resp)), inserted, ".", cfg.serve_stale, cfg.prefetch)
    e.label = (".", "A", "success", "NOERROR")
    return key, e


class UdpWorker:
    """A ``Worker`` on one loopback UDP socket, and a client that asks it one query at a time
    (``_udp_ready`` called directly, so whatever it sends has been sent when ``ask`` reads)."""

    def __init__(self, cfg: Config, family: int = socket.AF_INET, host: str = "127.0.0.1"):
        self.loop = asyncio.new_event_loop()
        self.srv = socket.socket(family, socket.SOCK_DGRAM)
        self.srv.bind((host, 0))
        self.srv.setblocking(False)
        self.worker = Worker(cfg, self.loop, [self.srv], [])

    def ask(self, query: bytes, client: socket.socket) -> None:
        client.sendto(query, self.srv.getsockname()[:2])
        select.select([self.srv], [], [], 5)
        self.worker._udp_ready(self.srv)

    def close(self) -> None:
        self.worker.resolver.exchanger.close()
        self.srv.close()
        self.loop.close()


@contextlib.contextmanager
def udp_worker(cfg: Config) -> Iterator[tuple[UdpWorker, Callable[[bytes], bytes]]]:
    """``UdpWorker`` and an ``ask(query) -> reply`` from one IPv4 client; all closed after."""
    w = UdpWorker(cfg)
    cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cli.settimeout(5)

    def ask(query: bytes) -> bytes:
        w.ask(query, cli)
        return cli.recv(4096)

    try:
        yield w, ask
    finally:
        cli.close()
        w.close()


def upstream_config(upstream: socket.socket, **doc: object) -> Config:
    """Zone ``.`` forwarded to the test's ``upstream`` socket, which reads what is sent."""
    host, port = upstream.getsockname()
    return parse({"zones": {".": {"upstreams": [f"{host}:{port}"]}}, **doc}, cpu_count=1)


def test_repeated_query_bytes_are_answered_from_the_memo_and_follow_the_cache() -> None:
    cfg = config()
    with udp_worker(cfg) as (w, ask):
        worker = w.worker
        key, e = entry(cfg, "www.test", "198.18.0.1", time.monotonic() - 100)
        worker.resolver.cache.put(key, e)
        query = q("www.TeSt")
        first = ask(query)
        assert len(worker.hits) == 1  # remembered after the first hit
        second = ask(b"\x99\x98" + query[2:])  # same bytes, another ID
        assert second == b"\x99\x98" + first[2:]
        assert b"\x03www\x04TeSt" in second  # the client's case, echoed
        assert (3500).to_bytes(4, "big") in second or (3499).to_bytes(4, "big") in second
        newer_key, newer = entry(cfg, "www.test", "198.18.0.2", time.monotonic())
        worker.resolver.cache.put(newer_key, newer)  # a refresh replaced the entry
        third = ask(query)
        assert bytes([198, 18, 0, 2]) in third and (3600).to_bytes(4, "big") in third
        assert e.hits == 2 and newer.hits == 1
        # the first and third through the general path, the second through the memo's slot
        assert worker.stats.udp == {e.label: 2} and worker.stats.udp_requests() == {e.label: 3}
        worker.reconfigure(cfg)
        assert worker.hits == {}


class Node:
    me: object


def test_gc_policy_freezes_survivors_and_runs_full_collections() -> None:
    loop = asyncio.new_event_loop()
    policy = GcPolicy(loop, full_every=3600)
    before = gc.get_threshold()
    try:
        policy.start()
        frozen = gc.get_freeze_count()
        assert frozen > 0 and gc.get_threshold()[1] == 2
        keep = [[i] for i in range(1000)]  # tracked survivors
        gc.collect(1)
        assert gc.get_freeze_count() >= frozen + len(keep)
        node = Node()
        node.me = node  # a cycle, alive when frozen, garbage afterwards
        gone = weakref.ref(node)
        gc.collect(1)
        del node
        gc.collect()
        assert gone() is not None  # frozen: out of the collector's sight
        policy.full()
        assert gone() is None and policy.full_collections == 1 and gc.get_freeze_count() > 0
    finally:
        policy.stop()
        assert policy._on_gc not in gc.callbacks
        gc.unfreeze()
        gc.set_threshold(*before)
        loop.close()


def test_the_memo_is_bounded_and_forgets_the_quarter_least_recently_refreshed() -> None:
    cfg = config()
    with udp_worker(cfg) as (w, ask):
        worker = w.worker
        assert worker.hits_max == max(65536, cfg.cache.capacity)
        worker.hits_max = 4
        names = [f"n{i}.test" for i in range(5)]
        for name in names:
            worker.resolver.cache.put(*entry(cfg, name, "198.18.0.1", time.monotonic()))
        for name in names[:4]:
            assert b"\x02" + name[:2].encode() in ask(q(name))
        # n0's entry is replaced: its next hit refreshes the memo, which moves it to the end
        worker.resolver.cache.put(*entry(cfg, names[0], "198.18.0.9", time.monotonic()))
        assert bytes([198, 18, 0, 9]) in ask(q(names[0]))
        assert b"\x02n4" in ask(q(names[4]))  # full: the least recently refreshed quarter goes
        assert len(worker.hits) == 4
        assert q(names[1])[2:] not in worker.hits
        assert q(names[0])[2:] in worker.hits and q(names[4])[2:] in worker.hits


def test_a_memo_hit_whose_entry_left_the_cache_is_not_answered_from_the_memo(
    upstream: socket.socket,
) -> None:
    """The memo skips the cache lookup while its entry is cached; an evicted entry must
    send the query on as a miss (here to an upstream socket the test reads), not answer."""
    upstream.settimeout(5)
    cfg = upstream_config(upstream, cache={"capacity": 1})
    with udp_worker(cfg) as (w, ask):
        key, e = entry(cfg, "www.test", "198.18.0.1", time.monotonic())
        w.worker.resolver.cache.put(key, e)
        assert bytes([198, 18, 0, 1]) in ask(q("www.test")) and len(w.worker.hits) == 1
        w.worker.resolver.cache.put(*entry(cfg, "other.test", "198.18.0.2", time.monotonic()))
        assert not e.cached  # evicted: the cache holds one entry
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with contextlib.closing(client):
            w.ask(q("www.test"), client)
            assert b"\x03www\x04test\x00" in upstream.recv(4096) and e.hits == 1
            client.setblocking(False)
            with pytest.raises(BlockingIOError):  # nothing answered the client from the memo
                client.recv(4096)


def test_memo_hits_past_the_prefetch_clock_start_a_prefetch_once_popular_enough(
    upstream: socket.socket,
) -> None:
    """A memo hit answers without a lookup only until its entry's prefetch clock: after it,
    every hit asks for a prefetch, which starts at the third hit (``prefetch.hits``)."""
    upstream.settimeout(5)
    cfg = upstream_config(upstream, prefetch={"hits": 3, "percent": 10})
    with udp_worker(cfg) as (w, ask):
        # TTL 3600, 3300 s old: 300 s left, inside the last tenth, so the clock is past.
        key, e = entry(cfg, "www.test", "198.18.0.1", time.monotonic() - 3300)
        assert e.prefetch_after < time.monotonic() < e.expires
        w.worker.resolver.cache.put(key, e)
        for hit in (1, 2, 3):
            assert bytes([198, 18, 0, 1]) in ask(q("www.test")) and e.hits == hit
            assert len(w.worker.hits) == 1  # the second and third came from the memo
            assert w.worker.stats.counters["prefetch"] == (1 if hit == 3 else 0)
        assert b"\x03www\x04test\x00" in upstream.recv(4096)  # the prefetch's query


@pytest.mark.parametrize(
    ("family", "server", "acl", "answered", "refused"),
    [
        (socket.AF_INET, "127.0.0.1", "127.0.0.2/32", ["127.0.0.2"], ["127.0.0.3"]),
        (socket.AF_INET6, "::1", "::1/128", ["::1"], []),
        (socket.AF_INET6, "::1", "::2/128", [], ["::1"]),
    ],
)
def test_the_hit_path_checks_each_sender_against_the_acl(
    family: int, server: str, acl: str, answered: list[str], refused: list[str]
) -> None:
    """IPv4 senders are looked up as integers, IPv6 ones as bytes: each allowed sender is
    answered and each other one refused, the first time and again from the ACL memo."""
    cfg = parse({"zones": {".": {"upstreams": ["127.0.0.1:53"]}}, "acl": [acl]}, cpu_count=1)
    w = UdpWorker(cfg, family, server)
    clients: list[socket.socket] = []
    try:
        w.worker.resolver.cache.put(*entry(cfg, "www.test", "198.18.0.1", time.monotonic()))
        for source in answered + refused:
            c = socket.socket(family, socket.SOCK_DGRAM)
            clients.append(c)
            c.bind((source, 0))
            c.settimeout(5)
        for _ in range(2):
            for c in clients:
                w.ask(q("www.test"), c)
                w.loop.run_until_complete(asyncio.sleep(0))  # a refusal leaves by the queue
                reply = c.recv(4096)
                rcode = reply[3] & 0x0F
                if c.getsockname()[0] in answered:
                    assert rcode == 0 and bytes([198, 18, 0, 1]) in reply
                else:
                    assert rcode == 5  # REFUSED
        assert w.worker.stats.counters["acl_rejected"] == 2 * len(refused)
    finally:
        for c in clients:
            c.close()
        w.close()


START = 1_000_000.25  # a fixed clock for the worker, with seconds and expiry not aligned


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """``time.monotonic`` as the test sets it: ``clock[0] = ...``."""
    now = [START]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    return now


def last_ttl(reply: bytes) -> int:
    return int.from_bytes(reply[-10:-6], "big")  # the last record: TTL, RDLENGTH, an A


def test_memo_replies_age_like_a_fresh_splice_from_second_to_second(
    upstream: socket.socket, clock: list[float]
) -> None:
    """Through the worker's own hit path: the memo's reply in a new second, in the same
    second and near expiry is the general path's splice, byte for byte."""
    cfg = upstream_config(upstream)
    with udp_worker(cfg) as (w, ask):
        key, e = entry(cfg, "www.test", "198.18.0.1", START)
        w.worker.resolver.cache.put(key, e)
        query = q("www.test")
        found = fast_query(query, cfg.max_udp_payload)
        assert found is not None
        _, qend, limit = found
        clock[0] = START + 10.5
        assert last_ttl(ask(query)) == 3590 and len(w.worker.hits) == 1
        for later in (10.6, 20.5, 21.9, 3599.0):
            clock[0] = START + later
            fresh = splice(e, e.with_ttl(e.shown_ttl(clock[0])), query, qend, limit, limit or 512)
            assert ask(query)[2:] == fresh[2:], later
        assert e.hits == 5


def test_an_expired_entry_still_cached_is_not_answered_from_the_memo(
    upstream: socket.socket, clock: list[float]
) -> None:
    """Past expiry, inside its stale window, the entry is still cached: the memo must hand
    the query to the resolver (here: a refresh upstream), not answer it with TTL 0."""
    upstream.settimeout(5)
    cfg = upstream_config(upstream)
    with udp_worker(cfg) as (w, ask):
        key, e = entry(cfg, "www.test", "198.18.0.1", START)
        w.worker.resolver.cache.put(key, e)
        clock[0] = START + 3599.5
        assert last_ttl(ask(q("www.test"))) == 1 and len(w.worker.hits) == 1
        clock[0] = START + 3600.5
        assert e.cached
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with contextlib.closing(client):
            w.ask(q("www.test"), client)
            assert b"\x03www\x04test\x00" in upstream.recv(4096)  # a refresh, not an answer
            client.setblocking(False)
            with pytest.raises(BlockingIOError):
                client.recv(4096)
        assert e.hits == 1


def test_the_memo_bound_follows_the_cache_capacity() -> None:
    cfg = parse(
        {"zones": {".": {"upstreams": ["127.0.0.1:53"]}}, "cache": {"capacity": 200_000}},
        cpu_count=1,
    )
    loop = asyncio.new_event_loop()
    try:
        worker = Worker(cfg, loop, [], [])
        assert worker.hits_max == 200_000
        worker.resolver.exchanger.close()
    finally:
        loop.close()


def test_one_read_of_hits_around_a_bad_query_answers_every_client() -> None:
    """Three queries in one recvmmsg: the middle one leaves the batch (its FORMERR waits in
    the socket's ReplyQueue for the end of the loop's turn), and the hit after it is sent
    from its own slot to its own client."""
    cfg = config()
    w = UdpWorker(cfg)
    worker, srv = w.worker, w.srv
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        for name, addr in (("a.test", "198.18.0.1"), ("b.test", "198.18.0.2")):
            worker.resolver.cache.put(*entry(cfg, name, addr, time.monotonic()))
        bad = b"\x77\x77\x01\x00\x00\x02" + bytes(6) + b"\x01a\x00\x00\x01\x00\x01"  # 2 questions
        queries = (q("a.test"), bad, b"\x55\x66" + q("b.test")[2:])
        for c, query in zip(clients, queries, strict=True):
            c.settimeout(5)
            c.sendto(query, srv.getsockname())
        assert worker._udp_ready(srv)  # all three read at once, and the socket left empty
        assert worker.replies[srv.fileno()].waiting == 1
        w.loop.run_until_complete(asyncio.sleep(0))  # one turn: the queue is flushed
        assert worker.replies[srv.fileno()].waiting == 0
        first, middle, last = (c.recv(4096) for c in clients)
        assert first[:2] == queries[0][:2] and bytes([198, 18, 0, 1]) in first
        assert middle[:2] == b"\x77\x77" and middle[3] & 0x0F == 1  # FORMERR
        assert last[:2] == b"\x55\x66" and bytes([198, 18, 0, 2]) in last
    finally:
        for c in clients:
            c.close()
        w.close()


@pytest.mark.parametrize(
    ("records", "payload"),
    [(1, 1232), (3, 1232), (3, None), (40, None)],  # the last one truncates (TC, no records)
)
def test_a_new_second_ages_the_memo_reply_exactly_as_a_fresh_splice(
    records: int, payload: int | None
) -> None:
    cfg = config()
    name = "www.TeSt"
    query = q(name, payload=payload)
    found = fast_query(query, cfg.max_udp_payload)
    assert found is not None
    key, qend, limit = found
    lines = [f"www.test. 3600 A 198.18.0.{i + 1}" for i in range(records)]
    resp = upstream_reply(make_upstream_query(1, key, 1232), lines)
    w = walk_response(resp, len(key) - 1)
    start = time.monotonic()
    e = Entry(w, classify(w, cfg.cache, len(resp)), start, ".", cfg.serve_stale, cfg.prefetch)
    cap = limit or 512
    tail = splice(e, e.render(start), query, qend, limit, cap)[2:]
    hit = _Hit(key, qend, limit, e, int(start), tail, 0)
    for later in (1.2, 7.9, 3599.5, 4000.0):  # the last one past expiry: TTL 0
        now = start + later
        hit.age(now, int(now))
        remaining = max(0, math.ceil(e.expires - now))
        assert hit.tail == splice(e, e.with_ttl(remaining), query, qend, limit, cap)[2:]
    assert bool(hit.ttl_at) == (records < 40 or payload is not None)
