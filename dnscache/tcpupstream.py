"""Pooled, pipelined TCP to one upstream (RFC 7766 §6.2.1, §7).

A zone served over TCP (``transport: tcp``, e.g. ``cluster.local`` to the cluster DNS, as
NodeLocal DNSCache does it) would otherwise cost a connection per miss: a handshake and a
teardown on both ends, and on the upstream one accepted socket per query from every node.
A pool keeps at most ``connections`` open per upstream and worker, sends up to ``pipeline``
queries on each without waiting for answers, and matches the answers, in whatever order they
come, by ID and question (RFC 5452 §9.1; an answer whose question is not ours is counted as
spoofed and ignored). A connection is closed after ``idle`` seconds without a query in
flight (``sweep``), when the upstream closes it, on any error, and when a query on it times
out with nothing answered on it since that query was sent (a connection that went silent).

Where a query goes: the least busy open connection, unless every open one is busy and the
pool may open another; when all are full, the query waits for room (the caller's deadline
still runs). A query that was in flight on a connection the upstream closed, where that
connection had already answered before (so it had been idle: servers close idle connections
when they like, RFC 7766 §6.2.3), is sent once more on another connection; any other
failure is the caller's to handle (the resolver moves to the next upstream).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable
from secrets import randbits

from .config import Address
from .errors import UpstreamError
from .policy import upstream_label
from .wire import make_upstream_query, response_question_matches


class _Closed(Exception):
    """The connection went away before the answer; ``reused``: it had answered before."""

    def __init__(self, reason: str, reused: bool) -> None:
        super().__init__(reason)
        self.reason, self.reused = reason, reused


class _Connection:
    __slots__ = ("writer", "waiting", "answered", "idle_since", "closed", "reader_task")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.waiting: dict[int, tuple[bytes, asyncio.Future[bytes]]] = {}  # ID -> (key, answer)
        self.answered = 0
        self.idle_since = time.monotonic()
        self.closed = False
        self.reader_task: asyncio.Task[None] | None = None


class TcpPool:
    """The pooled connections to one upstream, for one worker's event loop."""

    def __init__(
        self,
        addr: Address,
        payload: Callable[[], int],
        on_spoofed: Callable[[], None],
        connections: int = 4,
        pipeline: int = 100,
        idle: float = 10.0,
    ) -> None:
        self.addr = addr
        self.label = upstream_label(addr)
        self.connections, self.pipeline, self.idle = connections, pipeline, idle
        self.opened = 0  # connections opened over the pool's life (a metric)
        self._payload = payload
        self._on_spoofed = on_spoofed
        self._open: list[_Connection] = []
        self._opening = 0
        self._room: deque[asyncio.Future[None]] = deque()  # queries waiting for a free slot

    def __len__(self) -> int:
        return len(self._open)

    async def query(self, key: bytes, timeout: float) -> bytes:
        """The upstream's answer to ``key``; UpstreamError on timeout, refusal or loss."""
        try:
            async with asyncio.timeout(timeout):
                try:
                    return await self._ask(await self._connection(), key)
                except _Closed as closed:
                    if not closed.reused:
                        raise
                    return await self._ask(await self._connection(), key)
        except TimeoutError:
            raise UpstreamError(self.label, f"tcp: no answer in {timeout:g} s") from None
        except _Closed as closed:
            raise UpstreamError(self.label, f"tcp: {closed.reason}") from None
        except OSError as exc:  # asyncio's connect errors carry only "Connect call failed"
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise UpstreamError(self.label, f"tcp: {why}") from None

    def sweep(self, now: float) -> None:
        """Close connections idle for ``idle`` seconds or more."""
        for conn in list(self._open):
            if not conn.waiting and now - conn.idle_since >= self.idle:
                self._close(conn)

    def close(self) -> None:
        for conn in list(self._open):
            self._close(conn)
            if conn.reader_task is not None:
                conn.reader_task.cancel()
        for waiter in self._room:
            if not waiter.done():
                waiter.cancel()
        self._room.clear()

    # -- inside ---------------------------------------------------------------------------

    async def _connection(self) -> _Connection:
        while True:
            best: _Connection | None = None
            for conn in self._open:
                if len(conn.waiting) < self.pipeline and (
                    best is None or len(conn.waiting) < len(best.waiting)
                ):
                    best = conn
            if best is not None and not best.waiting:
                return best
            if len(self._open) + self._opening < self.connections:
                return await self._connect()
            if best is not None:
                return best
            waiter = asyncio.get_running_loop().create_future()
            self._room.append(waiter)
            await waiter

    async def _connect(self) -> _Connection:
        host, port = self.addr
        self._opening += 1
        try:
            reader, writer = await asyncio.open_connection(str(host), port)
        finally:
            self._opening -= 1
            self._wake(self.pipeline)  # the new connection's room, or the slot it failed to use
        conn = _Connection(writer)
        self._open.append(conn)
        self.opened += 1
        conn.reader_task = asyncio.get_running_loop().create_task(self._read(conn, reader))
        return conn

    async def _ask(self, conn: _Connection, key: bytes) -> bytes:
        if conn.closed:
            raise _Closed("connection closed before the query", reused=True)
        qid = randbits(16)
        while qid in conn.waiting:
            qid = randbits(16)
        query = make_upstream_query(qid, key, self._payload())
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        conn.waiting[qid] = (key, answer)
        answered = conn.answered
        try:
            conn.writer.write(len(query).to_bytes(2, "big") + query)
            return await answer
        except asyncio.CancelledError:
            if conn.answered == answered:  # nothing came back on it since: treat it as dead
                self._close(conn)
            raise
        finally:
            if conn.waiting.get(qid, (None, None))[1] is answer:
                del conn.waiting[qid]  # gave up (timeout): a late answer is dropped
            if not conn.waiting:
                conn.idle_since = time.monotonic()
            self._wake()

    async def _read(self, conn: _Connection, reader: asyncio.StreamReader) -> None:
        reason = "connection closed before the answer"
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(size)
                qid = data[0] << 8 | data[1] if len(data) >= 2 else -1
                waiting = conn.waiting.get(qid)
                if waiting is None:
                    continue  # its query gave up already
                key, answer = waiting
                if not response_question_matches(data, key):
                    self._on_spoofed()
                    continue
                del conn.waiting[qid]
                conn.answered += 1
                if not answer.done():
                    answer.set_result(data)
        except asyncio.IncompleteReadError:
            pass
        except OSError as exc:
            reason = f"{exc.strerror or exc}"
        finally:
            reused = conn.answered > 0
            self._close(conn)
            for _, answer in conn.waiting.values():
                if not answer.done():
                    answer.set_exception(_Closed(reason, reused))
            conn.waiting.clear()

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._open.remove(conn)
        conn.writer.close()
        self._wake(self.pipeline)

    def _wake(self, count: int = 1) -> None:
        """Let up to ``count`` queries waiting for room look again."""
        while self._room and count:
            waiter = self._room.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1
