"""One exchange with one upstream, over UDP or TCP (asyncio I/O).

RFC 5452 over UDP: every query gets a fresh random ID (OS CSPRNG) and a random source port,
and a reply is accepted only from the upstream's address and port (the socket is connected, so
the kernel drops anything else), with our ID and our question; anything else on the socket is
counted as spoofed and ignored (we keep waiting for the real one).

Source ports come from a pool of connected sockets per upstream (``upstream.socket_reuse``,
default 8). Each socket gets its port from the kernel, at random over the ephemeral range
(``ip_local_port_range``, 28,232 ports by default, ~14.8 bits), carries one query at a time,
and is closed after ``socket_reuse`` answered queries, after any timeout or error, as soon as
a datagram that is not its answer arrives (whoever sent it knows the port), and after
``IDLE_MAX_AGE`` seconds idle; a query takes an idle socket picked at random (CSPRNG), or a
new one. Against a blind, off-path attacker a query still has ~14.8 + 16 bits: the pooled ports
are as random as fresh ones and cannot be seen from off the path. What the pool gives up is
lifetime: an attacker who learns an open port (a side channel such as SAD DNS's ICMP rate
limit) can aim at up to ``socket_reuse - 1`` later queries on it, or for up to
``IDLE_MAX_AGE`` seconds, with the 16-bit ID still to guess, and one wrong guess closes the
socket. ``socket_reuse: 1`` gives every query a fresh socket and port (as unbound does) at
about 4 syscalls more per miss (socket, connect, epoll_ctl, close; see the README).

TCP (RFC 7766) goes through a pool of pipelined connections per upstream (``tcpupstream.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from _socket import socket as _new_socket  # the C type: no Python wrapper, no close() hooks
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from .config import Address, UpstreamConfig
from .errors import UpstreamError
from .eventloop import FastSelector, NestedPoller, Poller
from .policy import upstream_label
from .tcpupstream import TcpPool
from .wire import (
    make_upstream_query,
    response_matches,
)

log = logging.getLogger("ultranet.dns")
UDP_RECV = 4096
T = TypeVar("T")
# ``done(arg, response, error)``: exactly one of response and error is None.
Done = Callable[[T, bytes | None, UpstreamError | None], None]
_NONBLOCK_DGRAM = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
ID_BATCH = 4096
IDLE_MAX = 1024  # idle sockets kept per upstream when sockets are reused
IDLE_MAX_AGE = 2.0  # seconds an idle socket may wait for its next query before it is closed


class Exchanger:
    """Counts spoofed replies. ``send_udp`` starts a UDP exchange and calls ``done`` back from
    the event loop; ``udp``/``tcp`` are the awaitable forms (probes, TCP fallback).

    No task or future per query on the UDP path: each query's socket is watched by the
    worker's ``FastSelector`` (``eventloop.py``: served straight from the loop's own
    ``epoll_wait``; closing a socket removes it), or, on another loop, by a nested epoll set;
    the reply is matched and handed to ``done`` in the same callback, and the deadlines sit in
    FIFO queues (one per timeout value, so each is in deadline order) served by one timer.
    Registering every socket with the loop would cost ~20 µs (``add_reader``/
    ``remove_reader``), a timer ~9 µs (``call_later``/``cancel``), a task and its future more.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        payload: int,
        reuse: int = 1,
        selector: FastSelector | None = None,
    ) -> None:
        self.loop = loop
        self.payload = payload
        self.spoofed = 0
        self._poller: Poller = (
            selector.poller(self._on_fd)
            if selector is not None
            else NestedPoller(loop, self._on_fd)
        )
        self._watch = self._poller.watch
        self._pending: dict[int, _Udp] = {}
        self._queues: dict[float, deque[_Udp]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._peers: dict[Address, _Peer] = {}
        self._idle_fds: dict[int, tuple[Any, _Peer]] = {}
        self.reuse = reuse
        self._ids: list[bytes] = []
        defaults = UpstreamConfig()
        self.tcp_sizes = (defaults.tcp_connections, defaults.tcp_pipeline, defaults.tcp_idle)
        self._tcp_pools: dict[Address, TcpPool] = {}

    def close(self) -> None:
        self._poller.close()
        for q in self._pending.values():
            q.sock.close()
        self._pending.clear()
        for sock, _ in self._idle_fds.values():
            sock.close()
        self._idle_fds.clear()
        for peer in self._peers.values():
            peer.idle.clear()
        if self._timer is not None:
            self._timer.cancel()
        for pool in self._tcp_pools.values():
            pool.close()

    def peer(self, addr: Address) -> _Peer:
        """The upstream's socket address and idle sockets; callers keep it (hashing an
        ``ipaddress`` object runs Python code, so the UDP path does not look it up)."""
        peer = self._peers.get(addr)
        if peer is None:
            peer = self._peers[addr] = _Peer(addr)
        return peer

    def send_udp(
        self, addr: Address, key: bytes, timeout: float, edns: bool, done: Done[T], arg: T
    ) -> None:
        """Ask ``addr`` for ``key``; ``done(arg, response, None)`` or ``done(arg, None,
        error)`` follows, always from a later loop callback, never from inside this call."""
        self.send(self.peer(addr), key, timeout, edns, done, arg)

    def send(
        self, peer: _Peer, key: bytes, timeout: float, edns: bool, done: Done[T], arg: T
    ) -> None:
        """``send_udp`` to a peer already looked up."""
        ids = self._ids
        qid = ids.pop() if ids else self._refill_ids()
        query = make_upstream_query(qid, key, self.payload if edns else 0)
        idle = peer.idle
        sock: Any = None
        try:
            if idle:  # a random one of the idle sockets (RFC 5452 §9.2: unpredictable port)
                j = int.from_bytes(ids.pop() if ids else self._refill_ids(), "big") % len(idle)
                sock, fd, uses, _ = idle[j]
                idle[j] = idle[-1]
                idle.pop()
                del self._idle_fds[fd]
                sock.send(query)
            else:
                sock = _new_socket(peer.family, _NONBLOCK_DGRAM)
                sock.connect(peer.sockaddr)  # the kernel picks a random ephemeral port
                sock.send(query)
                fd = sock.fileno()
                self._watch(fd)
                uses = 0
        except OSError as exc:
            if sock is not None:
                sock.close()
            error = UpstreamError(peer.label, f"udp: {exc.strerror or exc}")
            self.loop.call_soon(done, arg, None, error)
            return
        at = self.loop.time() + timeout
        q = _Udp(sock, fd, qid, key[:-1], peer, done, arg, at, uses + 1)
        self._pending[fd] = q
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = deque()
        queue.append(q)
        if at < self._timer_at:
            self._arm(at)

    def _refill_ids(self) -> bytes:
        """Query IDs come from the OS CSPRNG (RFC 5452 §9.2), 4096 at a time, as the two
        bytes that go on the wire."""
        raw = os.urandom(2 * ID_BATCH)
        self._ids = [raw[i : i + 2] for i in range(0, 2 * ID_BATCH, 2)]
        return self._ids.pop()

    async def udp(self, addr: Address, key: bytes, timeout: float, edns: bool = True) -> bytes:
        fut: asyncio.Future[bytes] = self.loop.create_future()
        self.send_udp(addr, key, timeout, edns, _settle, fut)
        return await fut

    def _on_fd(self, fd: int) -> None:
        """An upstream socket is readable: the reply, an error, or datagrams to ignore."""
        q = self._pending.get(fd)
        if q is None:
            self._drain_idle(fd)
            return
        sock = q.sock
        while True:
            try:
                data = sock.recv(UDP_RECV)
            except BlockingIOError:
                return
            except OSError as exc:  # ICMP port unreachable arrives as ECONNREFUSED
                err = UpstreamError(q.peer.label, f"udp: {exc.strerror or exc}")
                self._finish(q, None, err)
                return
            if response_matches(data, q.qid, q.question):
                self._finish(q, data, None)
                return
            self.spoofed += 1
            q.uses = self.reuse  # someone else knows this port: never reuse the socket

    def _drain_idle(self, fd: int) -> None:
        """Datagrams on an idle socket answer nothing we asked: count them, drop them, and
        retire the socket (whoever sent them knows its port)."""
        found = self._idle_fds.pop(fd, None)
        if found is None:
            return
        sock, peer = found
        while True:
            try:
                sock.recv(UDP_RECV)
            except BlockingIOError:
                break
            except OSError:  # an ICMP error
                break
            self.spoofed += 1
        peer.idle[:] = [s for s in peer.idle if s[1] != fd]
        sock.close()

    def sweep(self) -> int:
        """Close the idle sockets that waited more than ``IDLE_MAX_AGE`` (so at low load a
        port does not stay open between rare queries); returns how many. Idle TCP
        connections past ``upstream.tcp_idle`` go too. Called every second by the worker."""
        cutoff = self.loop.time() - IDLE_MAX_AGE
        closed = 0
        for peer in self._peers.values():
            if not peer.idle or min(s[3] for s in peer.idle) >= cutoff:
                continue
            keep = []
            for entry in peer.idle:
                if entry[3] >= cutoff:
                    keep.append(entry)
                    continue
                del self._idle_fds[entry[1]]
                entry[0].close()
                closed += 1
            peer.idle[:] = keep
        now = time.monotonic()
        for pool in self._tcp_pools.values():
            pool.sweep(now)
        return closed

    def _finish(self, q: _Udp, data: bytes | None, err: UpstreamError | None) -> None:
        fd = q.fd
        del self._pending[fd]
        peer = q.peer
        if data is not None and q.uses < self.reuse and len(peer.idle) < IDLE_MAX:
            # still connected and registered; stamped for ``sweep``
            peer.idle.append((q.sock, fd, q.uses, self.loop.time()))
            self._idle_fds[fd] = (q.sock, peer)
        else:  # used up, or timed out or failed (a late reply must find the port closed)
            q.sock.close()
        q.sock = None
        done, arg = q.done, q.arg
        q.done = q.arg = None  # the queue keeps q until its deadline: drop what it holds
        try:
            done(arg, data, err)
        except Exception:  # a failing callback must not stop the other replies
            log.exception("upstream reply handler failed")

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._expire)

    def _expire(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        now = self.loop.time()
        first = float("inf")
        for timeout, queue in list(self._queues.items()):
            while queue and queue[0].at <= now:
                q = queue.popleft()
                if q.done is not None:
                    err = UpstreamError(q.peer.label, f"udp: no answer in {timeout:g} s")
                    self._finish(q, None, err)
            while queue and queue[0].done is None:  # answered already: nothing to time out
                queue.popleft()
            if queue:
                first = min(first, queue[0].at)
            else:
                del self._queues[timeout]
        if first < self._timer_at:
            self._arm(first)

    async def tcp(self, addr: Address, key: bytes, timeout: float) -> bytes:
        """The answer of ``addr`` over a pooled TCP connection (``tcpupstream.py``)."""
        pool = self._tcp_pools.get(addr)
        if pool is None:
            pool = self._tcp_pools[addr] = TcpPool(
                addr,
                self._current_payload,
                self._count_spoofed,
                *self.tcp_sizes,
                next_id=self._next_tcp_id,
                loop=self.loop,
            )
        return await pool.query(key, timeout)

    def configure_tcp(self, connections: int, pipeline: int, idle: float) -> None:
        """Pool sizes for TCP upstreams (reload: open pools take them too)."""
        self.tcp_sizes = (connections, pipeline, idle)
        for pool in self._tcp_pools.values():
            pool.resize(connections, pipeline, idle)

    def keep_tcp_pools(self, upstreams: set[Address]) -> None:
        """Close the pools of upstreams no longer configured (reload): their connections
        would otherwise stay open until idle, and the pools for good."""
        for addr in [a for a in self._tcp_pools if a not in upstreams]:
            self._tcp_pools.pop(addr).close()

    def tcp_connections_opened(self) -> int:
        return sum(pool.opened for pool in self._tcp_pools.values())

    def tcp_connections_open(self) -> int:
        return sum(len(pool) for pool in self._tcp_pools.values())

    def _next_tcp_id(self) -> int:
        ids = self._ids
        return int.from_bytes(ids.pop() if ids else self._refill_ids(), "big")

    def _current_payload(self) -> int:
        return self.payload

    def _count_spoofed(self) -> None:
        self.spoofed += 1


def _settle(fut: asyncio.Future[bytes], data: bytes | None, err: UpstreamError | None) -> None:
    if fut.done():
        return
    if data is not None:
        fut.set_result(data)
    else:
        fut.set_exception(err or UpstreamError("?", "udp: no answer"))


class _Peer:
    """An upstream's socket address, metric label, and idle sockets (when reused)."""

    __slots__ = ("family", "sockaddr", "label", "idle")

    def __init__(self, addr: Address) -> None:
        host, port = addr
        self.family = socket.AF_INET6 if host.version == 6 else socket.AF_INET
        self.sockaddr = (str(host), port)
        self.label = upstream_label(addr)
        self.idle: list[tuple[Any, int, int, float]] = []  # (socket, fd, uses, idle since)


class _Udp:
    __slots__ = ("sock", "fd", "qid", "question", "peer", "done", "arg", "at", "uses")

    def __init__(self, sock: Any, fd: int, qid: bytes, question: bytes, peer: _Peer, done: Any,
                 arg: Any, at: float, uses: int) -> None:  # fmt: skip
        self.sock, self.fd, self.qid, self.question, self.peer = sock, fd, qid, question, peer
        self.done, self.arg, self.at, self.uses = done, arg, at, uses
