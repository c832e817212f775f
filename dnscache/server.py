"""One worker's sockets: the UDP hit loop and the TCP server (RFC 7766).

UDP sockets are served from the loop's epoll (``eventloop.py``, or ``add_reader``) and drained
with non-blocking ``recvmmsg`` until empty (at most ``BATCH`` per wake-up), not through an
asyncio datagram transport: one wake-up serves many packets, one system call reads up to
``UDP_SLOTS`` queries and one sends their hits' replies (``udpbatch.py``), and a memo hit
allocates only its key and its sender's address. Misses and everything unusual go to
``Resolver``.

TCP: each connection reads length-prefixed queries and hands each one on at once, so pipelined
queries are answered concurrently and out of order (RFC 7766 §6.2.1.1); a reply is written with
its length prefix in one call. Connections idle for ``tcp_idle_timeout`` are closed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from .cache import Entry
from .config import Config
from .errors import WireError
from .eventloop import FastSelector
from .resolver import DatagramSender, Resolver, Send, Waiter, splice
from .stats import WorkerStats
from .udpbatch import ReplyQueue, UdpBatch, sockaddr_tuple
from .wire import Rcode, error_reply, fast_query, parse_query

log = logging.getLogger("ultranet.dns")
BATCH = 256  # queries served per wake-up of one socket, at most
UDP_SLOTS = 64  # datagrams per recvmmsg / sendmmsg
RECV_SIZE = 4096  # a query never needs more, nor a UDP reply (max_udp_payload <= 4096)
TCP_CAP = 65535
SWEEP_EVERY = 1.0
# Remembered queries (``_Hit``, ~400 B each): at least this many, or as many as the cache
# holds entries (a Zipf load over more names than this thrashed the memo); when full, the
# quarter least recently refreshed goes.
HITS_MAX = 65536


class Worker:
    def __init__(
        self,
        cfg: Config,
        loop: asyncio.AbstractEventLoop,
        udp: list[socket.socket],
        tcp: list[socket.socket],
        selector: FastSelector | None = None,
    ) -> None:
        """With ``selector`` (the loop's own, ``eventloop.py``) the UDP sockets and upstream
        sockets are served straight from its ``epoll_wait``; without, through ``add_reader``."""
        self.cfg = cfg
        self.loop = loop
        self.selector = selector
        self.stats = WorkerStats()
        self.resolver = Resolver(cfg, loop, self.stats, selector)
        self.udp = udp
        self.tcp = tcp
        self.servers: list[asyncio.Server] = []
        self.acl_ok: dict[str, bool] = {}
        # Packed IPv6 addresses, and IPv4 ones as ``UdpBatch.ipv4_words`` reads them.
        self.acl_packed: dict[int | bytes, bool] = {}
        self.batches = {s.fileno(): UdpBatch(s, UDP_SLOTS, RECV_SIZE) for s in udp}
        self.replies = {s.fileno(): ReplyQueue(s, loop, UDP_SLOTS, RECV_SIZE) for s in udp}
        self.hits: dict[bytes, _Hit] = {}
        self.hits_max = max(HITS_MAX, cfg.cache.capacity)
        self.tcp_conns = 0
        self.draining = False
        self.conn_tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        for s in self.udp:
            s.setblocking(False)
            if self.selector is not None:
                self.selector.add_fast(s.fileno(), self._udp_ready, s)
            else:
                self.loop.add_reader(s.fileno(), self._udp_ready, s)
        for s in self.tcp:
            s.setblocking(False)
            self.servers.append(await asyncio.start_server(self._tcp_client, sock=s))
        self._sweeper = self.loop.call_later(SWEEP_EVERY, self._sweep)

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.acl_ok = {}
        self.acl_packed = {}
        self.hits.clear()  # max_udp_payload may have changed what a query's bytes mean
        self.hits_max = max(HITS_MAX, cfg.cache.capacity)
        self.resolver.reconfigure(cfg)

    def gauges(self) -> dict[str, int]:
        return {
            "cache_entries": len(self.resolver.cache),
            "evictions": self.resolver.cache.evictions,
            "inflight": len(self.resolver.inflight),
            "tcp_open": self.tcp_conns,
            "spoofed": self.resolver.exchanger.spoofed,
            "upstream_tcp_opened": self.resolver.exchanger.tcp_connections_opened(),
            "upstream_tcp_open": self.resolver.exchanger.tcp_connections_open(),
        }

    def _sweep(self) -> None:
        self.resolver.cache.sweep(time.monotonic())
        self.resolver.exchanger.sweep()
        self._sweeper = self.loop.call_later(SWEEP_EVERY, self._sweep)

    def _allowed(self, ip: str) -> bool:
        ok = self.acl_ok.get(ip)
        if ok is None:
            ok = self._permitted(ipaddress.ip_address(ip.partition("%")[0]))
            if len(self.acl_ok) > 65536:
                self.acl_ok.clear()
            self.acl_ok[ip] = ok
        return ok

    def _allowed_packed(self, ip: int | bytes) -> bool:
        """``_allowed`` for an address as a sockaddr holds it: 16 bytes, or 4 read as one
        native-order integer."""
        packed = ip.to_bytes(4, sys.byteorder) if isinstance(ip, int) else ip
        ok = self._permitted(ipaddress.ip_address(packed))
        if len(self.acl_packed) > 65536:
            self.acl_packed.clear()
        self.acl_packed[ip] = ok
        return ok

    def _permitted(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.cfg.acl)

    # -- UDP --------------------------------------------------------------------------------

    def _udp_ready(self, sock: socket.socket) -> bool:
        """Serve what ``sock`` holds, at most ``BATCH`` queries; True when it is empty.

        Queries come in and hits go out ``UdpBatch.slots`` at a time (``udpbatch.py``); a hit's
        reply is written over its query and sent from the same slot. Misses and unusual
        queries leave the batch: they are answered later with ``sendto``."""
        batch = self.batches[sock.fileno()]
        queue = self.replies[sock.fileno()]
        receive, send, move = batch.receive, batch.send, batch.move
        buf, view, names, lengths, send_iov = (
            batch.buf,
            batch.view,
            batch.names,
            batch.lengths,
            batch.send_iov,
        )
        size, msg_words, len_word, name_size = (
            batch.size,
            batch.MSG_WORDS,
            batch.LEN_WORD,
            batch.NAME,
        )
        ip_start, ip_end = batch.ip_start, batch.ip_end
        v4 = ip_end - ip_start == 4
        ipv4_words, name_words, ipv4_word = batch.ipv4_words, batch.NAME_WORDS, batch.IPV4_WORD
        get = self.resolver.cache.data.get
        hits = self.hits
        hit_get = hits.get
        acl = self.acl_packed
        maxp = self.cfg.max_udp_payload
        perf = time.perf_counter
        now = time.monotonic()
        now_s = int(now)
        counts = self.stats.udp
        slots = self.stats.udp_slots
        hist = self.stats.duration["udp"]
        self.stats.counters["udp_wakeups"] += 1
        for _ in range(BATCH // batch.slots):
            # Every query of a batch is timed from before the read to after the send.
            t0 = perf()
            got = receive()
            if not got:
                return True
            staged = 0
            for i in range(got):
                at = i * size
                end = at + lengths[i * msg_words + len_word]
                try:
                    ip: int | bytes
                    if v4:
                        ip = ipv4_words[i * name_words + ipv4_word]
                    else:
                        ip = names[i * name_size + ip_start : i * name_size + ip_end]
                    if not acl.get(ip) and not self._allowed_packed(ip):
                        self._refuse(queue, buf[at:end], batch.sockaddr(i))
                        continue
                    after_id = buf[at + 2 : end]
                    h = hit_get(after_id)
                    if h is not None:  # a query seen before, byte for byte after its ID
                        entry = h.entry
                        entry.hits += 1
                        if (now < entry.memo_until and h.second == now_s) or self._memo_recheck(
                            h, after_id, now, now_s
                        ):
                            tail = h.tail
                            view[at + 2 : at + 2 + len(tail)] = tail  # _Hit tails always fit
                            send_iov[2 * staged + 1] = 2 + len(tail)
                            if staged != i:
                                move(staged, i)
                            staged += 1
                            slots[h.slot] += 1
                            continue
                    data = buf[at:end]
                    q = fast_query(data, maxp)
                    if q is None:
                        self._udp_slow(queue, data, batch.sockaddr(i), t0)
                        continue
                    key, qend, limit = q
                    e = get(key)
                    if e is not None and now < e.expires:
                        e.hits += 1
                        if now >= e.prefetch_after:
                            self.resolver.maybe_prefetch(e, key)
                        body = e.rendered if e.rendered_at == now_s else e.render(now)
                        reply = splice(e, body, data, qend, limit, limit or 512)
                        if len(reply) < qend + e.body_len:  # TC=1: too large for the client
                            # Counted, and not memoized: a memo hit would not count it.
                            self.stats.counters["truncated"] += 1
                            queue.sendto(reply, batch.sockaddr(i))
                        elif len(reply) > size:
                            queue.sendto(reply, batch.sockaddr(i))
                        else:
                            view[at : at + len(reply)] = reply
                            send_iov[2 * staged + 1] = len(reply)
                            if staged != i:
                                move(staged, i)
                            staged += 1
                            if hits.pop(after_id, None) is None and len(hits) >= self.hits_max:
                                for old in list(itertools.islice(hits, self.hits_max // 4)):
                                    del hits[old]  # the oldest quarter
                            slot = self.stats.slot_of(e.label)
                            hits[after_id] = _Hit(key, qend, limit, e, now_s, reply[2:], slot)
                        label = e.label
                        counts[label] = counts.get(label, 0) + 1
                        continue
                    addr = batch.sockaddr(i)
                    w = Waiter(None, data, qend, limit, limit or 512, t0, "udp", queue, addr)
                    self.resolver.miss(key, w, now, e)
                except OSError as exc:
                    log.debug("udp reply to %s: %s", batch.address(i), exc)
                except Exception:  # one bad packet must never stop the worker: log it, go on
                    self.stats.counters["malformed"] += 1
                    log.exception("internal error on a query from %s (dropped)", batch.address(i))
            if staged:
                send(staged)
                hist.observe_many(perf() - t0, staged)
            if got < batch.slots:
                return True
        return False

    def _memo_recheck(self, h: _Hit, after_id: bytes, now: float, now_s: int) -> bool:
        """A memo hit past its entry's ``memo_until`` or in a new second: True when the
        entry may still answer (prefetched when due, the reply's TTLs aged), False when it
        left the cache or expired, for the general path to look the query up."""
        entry = h.entry
        if not entry.cached or now >= entry.expires:
            entry.hits -= 1  # counted before the check: not a hit after all
            return False
        if now >= entry.prefetch_after:
            self.resolver.maybe_prefetch(entry, h.key)
        if h.second != now_s:
            h.age(now, now_s)
            del self.hits[after_id]  # to the end: the eviction order
            self.hits[after_id] = h
        return True

    def _refuse(self, sock: DatagramSender, data: bytes, addr: Any) -> None:
        """Never an open resolver: clients outside the ACL get REFUSED (or nothing)."""
        self.stats.counters["acl_rejected"] += 1
        if self.cfg.acl_action == "refuse" and len(data) >= 12 and not data[2] & 0x80:
            sock.sendto(error_reply(data, Rcode.REFUSED), addr)

    def _udp_slow(self, sock: DatagramSender, data: bytes, addr: Any, t0: float) -> None:
        send = _udp_sender(sock, addr)
        self._slow(data, send, t0, "udp", 0)

    def _slow(self, data: bytes, send: Send, t0: float, proto: str, cap: int) -> bool:
        """Full check of an unusual query; False when it was dropped unanswered."""
        try:
            q = parse_query(data, self.cfg.max_udp_payload)
        except WireError as exc:
            self.stats.counters["malformed"] += 1
            if exc.rcode is None:
                return False
            qend = _question_end_or_zero(data)
            send(error_reply(data, exc.rcode, qend, 512 if exc.rcode >= 16 else 0))
            return True
        self.resolver.handle(
            q.key, data, q.question_end, q.limit, cap or q.limit or 512, send, t0, proto
        )
        return True

    # -- TCP --------------------------------------------------------------------------------

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.conn_tasks.add(task)
        peer = writer.get_extra_info("peername")
        if not self._allowed(peer[0]) or self.tcp_conns >= self.cfg.tcp_max_connections:
            self.stats.counters[
                "acl_rejected" if not self._allowed(peer[0]) else "tcp_rejected"
            ] += 1
            writer.close()
            return
        self.tcp_conns += 1
        self.stats.counters["tcp_connections"] += 1
        conn = _Conn(writer)
        try:
            await self._tcp_serve(reader, conn)
            await conn.flushed(self.cfg.drain_timeout)
        finally:
            self.tcp_conns -= 1
            writer.close()
            if task is not None:
                self.conn_tasks.discard(task)

    async def _tcp_serve(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        idle = self.cfg.tcp_idle_timeout
        while not self.draining:
            try:
                async with asyncio.timeout(idle):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(size)
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                return
            conn.pending += 1
            t0 = time.perf_counter()
            try:
                q = fast_query(data, self.cfg.max_udp_payload)
                if q is None:
                    if not self._slow(data, conn.send, t0, "tcp", TCP_CAP):
                        conn.pending -= 1
                    continue
                key, qend, limit = q
                self.resolver.handle(key, data, qend, limit, TCP_CAP, conn.send, t0, "tcp")
            except Exception:  # one bad query must never stop the worker: log it, go on
                conn.pending -= 1
                self.stats.counters["malformed"] += 1
                log.exception("internal error on a TCP query (dropped)")

    # -- drain ------------------------------------------------------------------------------

    async def drain(self, timeout: float, on_closed: Callable[[], None] | None = None) -> None:
        """Stop taking queries and close the listening sockets at once (``on_closed`` is called
        then), finish the queries already read (at most ``timeout``), close the rest.

        A UDP socket closed while its queries wait on an upstream can no longer answer them,
        so what it holds is served first, and the waiters get a sender of their own
        (``_AfterClose``) that answers from the same address and port."""
        self.draining = True
        for s in self.udp:
            if self.selector is not None:
                self.selector.remove_fast(s.fileno())
            else:
                self.loop.remove_reader(s.fileno())
            try:
                while not self._udp_ready(s):
                    pass
            except OSError as exc:
                log.debug("last read of %s: %s", s, exc)
            queue = self.replies[s.fileno()]
            queue.flush()
            late = _AfterClose(s)
            for p in self.resolver.inflight.values():
                for w in p.waiters:
                    if w.sock is queue:
                        w.sock = late
            s.close()
        for srv in self.servers:
            srv.close()
        for s in self.tcp:
            s.close()
        if on_closed is not None:
            on_closed()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.resolver.idle(timeout)
        if self.conn_tasks:
            await asyncio.wait(list(self.conn_tasks), timeout=timeout)
        for t in list(self.resolver.tasks):
            t.cancel()
        self.resolver.exchanger.close()


class _Hit:
    """A query already answered from the cache, keyed by its bytes after the ID: what
    ``fast_query`` found in it, and the reply without its ID for ``entry`` in ``second``.
    The same bytes always parse the same way, so a repeat skips the parse and the splice.
    A repeat also skips the cache lookup while ``entry.cached`` holds: the cache clears it
    when the entry is replaced, evicted or dropped, and the hit then takes the general path,
    which makes a new ``_Hit`` (the lookup was 7% of a Zipf-loaded worker).

    A new second only ages the TTLs: the 4 bytes at each of ``ttl_at`` in ``tail`` are
    rewritten in place, not the whole reply spliced again (a render and a splice: 10.7% of
    a Zipf-loaded worker, where many names turn over every second)."""

    __slots__ = ("key", "entry", "second", "tail", "ttl_at", "slot")

    def __init__(
        self,
        key: bytes,
        qend: int,
        limit: int,
        entry: Entry,
        second: int,
        tail: bytes,
        slot: int,
    ) -> None:
        """``slot``: where ``WorkerStats.udp_slots`` counts the entry's label."""
        self.key, self.entry, self.second, self.slot = key, entry, second, slot
        self.tail = bytearray(tail)
        self.ttl_at = _ttl_offsets_in_tail(entry, qend, limit)

    def age(self, now: float, second: int) -> None:
        """The tail as a fresh splice of ``entry`` would give it in ``second``."""
        self.second = second
        if self.ttl_at:
            value = self.entry.shown_ttl(now).to_bytes(4, "big")
            tail = self.tail
            for at in self.ttl_at:
                tail[at : at + 4] = value


def _ttl_offsets_in_tail(e: Entry, qend: int, limit: int) -> tuple[int, ...]:
    """Where ``splice`` put the entry's TTLs in a UDP reply without its ID: the body follows
    the 10 header bytes and the question, so at ``qend - 2``; none when it truncated."""
    if qend + e.body_len + (11 if limit else 0) > (limit or 512):
        return ()
    return tuple(qend - 2 + off for off in e.ttl_offsets)


class _Conn:
    __slots__ = ("writer", "pending", "event")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.pending = 0
        self.event = asyncio.Event()

    def send(self, reply: bytes) -> None:
        self.pending -= 1
        if not self.writer.is_closing():
            self.writer.write(len(reply).to_bytes(2, "big") + reply)
        if self.pending <= 0:
            self.event.set()

    async def flushed(self, timeout: float) -> None:
        """Wait for the answers still owed on this connection (the client half-closed)."""
        if self.pending > 0:
            self.event.clear()
            try:
                async with asyncio.timeout(timeout):
                    while self.pending > 0:
                        await self.event.wait()
                        self.event.clear()
            except TimeoutError:
                log.warning("TCP connection closed with %d answers unsent", self.pending)
        try:
            async with asyncio.timeout(timeout):
                await self.writer.drain()
        except (TimeoutError, ConnectionError):
            return


class _AfterClose:
    """Answers a client whose query was read before its listening socket closed: from a
    short-lived socket bound to the same address and port (SO_REUSEPORT) and connected to
    the client, so the reply has the source the client expects. A connected member of a
    reuseport group receives only its peer's datagrams, so it takes no one else's queries."""

    def __init__(self, listener: socket.socket) -> None:
        self.family = listener.family
        self.local = listener.getsockname()

    def sendto(self, reply: bytes, sockaddr: bytes) -> None:
        """``sockaddr``: the client's raw sockaddr, as ``ReplyQueue.sendto`` takes it."""
        with socket.socket(self.family, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(self.local)
            s.connect(sockaddr_tuple(self.family, sockaddr))
            s.send(reply)


def _udp_sender(sock: DatagramSender, addr: Any) -> Send:
    def send(reply: bytes) -> None:
        sock.sendto(reply, addr)

    return send


def _question_end_or_zero(data: bytes) -> int:
    """The question's end if it can be found, to echo it in an error reply; else 0."""
    if len(data) < 12 or data[4:6] != b"\x00\x01":
        return 0
    i, n = 12, len(data)
    while i < n and 0 < data[i] <= 63:
        i += data[i] + 1
    return i + 5 if i < n and data[i] == 0 and i + 5 <= n and i - 12 <= 255 else 0
