"""One exchange with one upstream, over UDP or TCP (asyncio I/O).

RFC 5452: every UDP query gets a fresh random ID and a fresh socket, so a fresh ephemeral
source port chosen by the kernel; the socket is connected, so the kernel drops datagrams from
any other address or port; a reply is accepted only with our ID and our question, and anything
else on that socket is counted as spoofed and ignored (we keep waiting for the real one).
TCP (RFC 7766) writes the length prefix and message in one call.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from _socket import socket as _new_socket  # the C type: no Python wrapper, no close() hooks
from collections import deque
from collections.abc import Callable
from secrets import randbits
from typing import Any, TypeVar

from .config import Address
from .errors import UpstreamError
from .eventloop import FastSelector, NestedPoller, Poller
from .policy import upstream_label
from .wire import make_upstream_query, response_id_matches, response_question_matches

log = logging.getLogger("ultranet.dns")
UDP_RECV = 4096
T = TypeVar("T")
# ``done(arg, response, error)``: exactly one of response and error is None.
Done = Callable[[T, bytes | None, UpstreamError | None], None]
_NONBLOCK_DGRAM = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
_IDS = struct.Struct("=4096H")
IDLE_MAX = 1024  # idle sockets kept per upstream when sockets are reused


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
        self._ids: list[int] = []

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

    def _peer(self, addr: Address) -> _Peer:
        peer = self._peers.get(addr)
        if peer is None:
            peer = self._peers[addr] = _Peer(addr)
        return peer

    def send_udp(
        self, addr: Address, key: bytes, timeout: float, edns: bool, done: Done[T], arg: T
    ) -> None:
        """Ask ``addr`` for ``key``; ``done(arg, response, None)`` or ``done(arg, None,
        error)`` follows, always from a later loop callback, never from inside this call."""
        peer = self._peers.get(addr) or self._peer(addr)
        ids = self._ids
        qid = ids.pop() if ids else self._refill_ids()
        query = make_upstream_query(qid, key, self.payload if edns else 0)
        idle = peer.idle
        sock: Any = None
        try:
            if idle:  # a random one of the idle sockets (RFC 5452 §9.2: unpredictable port)
                j = (ids.pop() if ids else self._refill_ids()) % len(idle)
                sock, fd, uses = idle[j]
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
        q = _Udp(sock, fd, qid, key, peer, done, arg, at, uses + 1)
        self._pending[fd] = q
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = deque()
        queue.append(q)
        if at < self._timer_at:
            self._arm(at)

    def _refill_ids(self) -> int:
        """Query IDs come from the OS CSPRNG (RFC 5452 §9.2), 4096 at a time."""
        self._ids = list(_IDS.unpack(os.urandom(_IDS.size)))
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
            if response_id_matches(data, q.qid) and response_question_matches(data, q.key):
                self._finish(q, data, None)
                return
            self.spoofed += 1

    def _drain_idle(self, fd: int) -> None:
        """Datagrams on an idle socket answer nothing we asked: count them, drop them."""
        found = self._idle_fds.get(fd)
        if found is None:
            return
        sock, peer = found
        while True:
            try:
                sock.recv(UDP_RECV)
            except BlockingIOError:
                return
            except OSError:
                break
            self.spoofed += 1
        del self._idle_fds[fd]  # an error (ICMP): retire the socket
        peer.idle[:] = [s for s in peer.idle if s[1] != fd]
        sock.close()

    def _finish(self, q: _Udp, data: bytes | None, err: UpstreamError | None) -> None:
        fd = q.fd
        del self._pending[fd]
        peer = q.peer
        if data is not None and q.uses < self.reuse and len(peer.idle) < IDLE_MAX:
            peer.idle.append((q.sock, fd, q.uses))  # still connected and registered
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
        host, port = addr
        label = upstream_label(addr)
        qid = randbits(16)
        query = make_upstream_query(qid, key, self.payload)
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(str(host), port)
                writer.write(len(query).to_bytes(2, "big") + query)
                while True:
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(size)
                    if response_id_matches(data, qid) and response_question_matches(data, key):
                        return data
                    self.spoofed += 1
        except TimeoutError:
            raise UpstreamError(label, f"tcp: no answer in {timeout:g} s") from None
        except asyncio.IncompleteReadError:
            raise UpstreamError(label, "tcp: connection closed before the answer") from None
        except OSError as exc:
            raise UpstreamError(label, f"tcp: {exc.strerror or exc}") from None
        finally:
            if writer is not None:
                writer.close()


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
        self.idle: list[tuple[Any, int, int]] = []  # (socket, fd, uses)


class _Udp:
    __slots__ = ("sock", "fd", "qid", "key", "peer", "done", "arg", "at", "uses")

    def __init__(self, sock: Any, fd: int, qid: int, key: bytes, peer: _Peer, done: Any, arg: Any,
                 at: float, uses: int) -> None:  # fmt: skip
        self.sock, self.fd, self.qid, self.key, self.peer = sock, fd, qid, key, peer
        self.done, self.arg, self.at, self.uses = done, arg, at, uses
