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

Where a query goes: the least busy open connection with room (while it is busy and the pool
may open another, one is opened in the background for the queries after it); with none open,
a new one; when all are full, the query waits for room (the caller's deadline still runs).
A query that gave up on a connection that stays open keeps its ID reserved there until its
late answer comes, so that answer can never pass for a newer query's (whose question may
differ only in CD). A query that was in flight on a connection the upstream closed, where
that connection had already answered before (so it had been idle: servers close idle
connections when they like, RFC 7766 §6.2.3), is sent once more on another connection; any
other failure is the caller's to handle (the resolver moves to the next upstream).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from secrets import randbits

from .config import Address, UpstreamConfig
from .errors import UpstreamError
from .policy import upstream_label
from .wire import make_upstream_query, response_question_matches

log = logging.getLogger("ultranet.dns")
_DEFAULTS = UpstreamConfig()
CONNECT_TIMEOUT = 5.0  # seconds for a connection opened in the background


def _random_id() -> int:
    return randbits(16)


class _Closed(Exception):
    """The connection went away before the answer; ``reused``: it had answered before."""

    def __init__(self, reason: str, reused: bool) -> None:
        super().__init__(reason)
        self.reason, self.reused = reason, reused


class _Connection:
    __slots__ = (
        "writer",
        "waiting",
        "abandoned",
        "answered",
        "idle_since",
        "closed",
        "reader_task",
    )

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.waiting: dict[int, tuple[bytes, asyncio.Future[bytes]]] = {}  # ID -> (key, answer)
        # IDs of queries that gave up (timeout) while the upstream may still answer them:
        # not reused until that late answer comes, so it cannot pass for a newer query's.
        self.abandoned: set[int] = set()
        self.answered = 0
        self.idle_since = time.monotonic()
        self.closed = False
        self.reader_task: asyncio.Task[None] | None = None

    def load(self) -> int:
        return len(self.waiting) + len(self.abandoned)


class TcpPool:
    """The pooled connections to one upstream, for one worker's event loop."""

    def __init__(
        self,
        addr: Address,
        payload: Callable[[], int],
        on_spoofed: Callable[[], None],
        connections: int = _DEFAULTS.tcp_connections,
        pipeline: int = _DEFAULTS.tcp_pipeline,
        idle: float = _DEFAULTS.tcp_idle,
        *,
        next_id: Callable[[], int] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """``next_id``: a fresh random 16-bit ID (default ``secrets.randbits``); ``loop``:
        the worker's (default: the running one at first use; looking it up costs a
        ``getpid`` system call each time, so it is looked up once)."""
        self.addr = addr
        self._next_id = next_id if next_id is not None else _random_id
        self._loop = loop
        self.label = upstream_label(addr)
        self.connections, self.pipeline, self.idle = connections, pipeline, idle
        self.opened = 0  # connections opened over the pool's life (a metric)
        self._payload = payload
        self._on_spoofed = on_spoofed
        self._open: list[_Connection] = []
        self._opening = 0
        self._room: deque[asyncio.Future[None]] = deque()  # queries waiting for a free slot
        self._background: set[asyncio.Task[_Connection]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._open)

    def _running(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

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

    def resize(self, connections: int, pipeline: int, idle: float) -> None:
        """New sizes (reload); queued queries look again, there may be room now."""
        self.connections, self.pipeline, self.idle = connections, pipeline, idle
        self._wake(len(self._room))

    def sweep(self, now: float) -> None:
        """Close connections idle for ``idle`` seconds or more."""
        for conn in list(self._open):
            if not conn.waiting and now - conn.idle_since >= self.idle:
                self._close(conn)

    def close(self) -> None:
        self._closed = True
        for task in list(self._background):
            task.cancel()
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
        """The least busy connection with room; a new one only when none is open or being
        opened. Other new connections are opened in the background (beside a busy one, or
        during a burst), so no query waits on a connect that an upstream at its connection
        limit may never complete while another connection could carry it."""
        queued_before = False
        while True:
            if self._closed:
                raise _Closed("pool closed", reused=False)
            best: _Connection | None = None
            for conn in self._open:
                if conn.load() < self.pipeline and (best is None or conn.load() < best.load()):
                    best = conn
            can_open = len(self._open) + self._opening < self.connections
            if best is not None:
                if best.load() and can_open:
                    self._open_in_background()
                return best
            if can_open and not self._opening:
                self._opening += 1
                return await self._connect()
            if can_open:  # a burst while the first connection opens: more, beside it
                self._open_in_background()
            waiter = self._running().create_future()
            if queued_before:
                self._room.appendleft(waiter)  # woken but beaten to the room: keep its place
            else:
                self._room.append(waiter)
            queued_before = True
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, then cancelled before it ran: pass the turn on
                raise

    def _open_in_background(self) -> None:
        self._opening += 1  # now: the task starts later, and the next query must see it
        task = self._running().create_task(self._connect(CONNECT_TIMEOUT))
        self._background.add(task)
        task.add_done_callback(self._opened_in_background)

    def _opened_in_background(self, task: asyncio.Task[_Connection]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("tcp upstream %s: connect failed: %s", self.label, task.exception())

    async def _connect(self, timeout: float | None = None) -> _Connection:
        """A new connection, counted in ``_opening`` by the caller; ``timeout`` bounds a
        connect no query waits on (one a query waits on has that query's deadline)."""
        host, port = self.addr
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(str(host), port)
        finally:
            self._opening -= 1
            self._wake(self.pipeline)  # the new connection's room, or the slot it failed to use
        if self._closed:
            writer.close()
            raise _Closed("pool closed", reused=False)
        conn = _Connection(writer)
        self._open.append(conn)
        self.opened += 1
        conn.reader_task = self._running().create_task(self._read(conn, reader))
        return conn

    async def _ask(self, conn: _Connection, key: bytes) -> bytes:
        if conn.closed:
            raise _Closed("connection closed before the query", reused=True)
        qid = self._next_id()
        while qid in conn.waiting or qid in conn.abandoned:
            qid = self._next_id()
        query = make_upstream_query(qid, key, self._payload())
        answer: asyncio.Future[bytes] = self._running().create_future()
        conn.waiting[qid] = (key, answer)
        answered = conn.answered
        try:
            conn.writer.write(len(query).to_bytes(2, "big") + query)
            return await answer
        except asyncio.CancelledError:  # gave up (timeout): its answer may still come
            if conn.waiting.pop(qid, None) is not None and not conn.closed:
                if conn.answered == answered or len(conn.abandoned) >= self.pipeline:
                    self._close(conn)  # nothing came back since it was sent: gone silent
                else:
                    conn.abandoned.add(qid)
            raise
        finally:
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
                    if qid in conn.abandoned:
                        conn.abandoned.discard(qid)  # the late answer: its ID is free again
                        self._wake()
                    else:
                        self._on_spoofed()
                    continue
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
