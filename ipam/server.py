"""The daemon's listeners: the API on a root-only Unix socket, metrics and introspection.

* ``ULTRANET_SOCKET`` (default /run/ultranet/ipamd.sock): the protocol of
  ``ipam.protocol``. The socket is mode 0600 and each connection's peer credentials are
  checked (SO_PEERCRED): only root may allocate addresses. A connection carries any
  number of requests; each is answered in order.
* ``ULTRANET_METRICS_ADDR`` (default 127.0.0.1:61678): ``/metrics`` for Prometheus.
* ``ULTRANET_INTROSPECTION_ADDR`` (default 127.0.0.1:61679): ``/v1/state`` (ENIs,
  prefixes, allocations, effective config, plans), ``/healthz``, and ``/ready``, which
  answers 200 only once the warm pool is met: the signal a node's startup taint waits for.

A bad request gets an error reply naming what is wrong; it never takes the daemon down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cni.backend import Allocation
from ipam.agent import AgentError, NodeAgent
from ipam.datastore_errors import DatastoreError, PoolExhausted
from ipam.protocol import (
    AllocateRequest,
    FrameBuffer,
    GcRequest,
    ListRequest,
    ProtocolError,
    ReleaseRequest,
    Request,
    StatusRequest,
    allocation_json,
    allocation_reply,
    error,
    frame,
    ok,
    parse_request,
)

log = logging.getLogger("ultranet.ipamd.server")

_PEERCRED = struct.Struct("3i")  # pid, uid, gid
LISTEN_BACKLOG = 1024


def peer_uid(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return int(_PEERCRED.unpack(raw)[1])


class ApiServer:
    """Serves ``ipam.protocol`` requests from ``agent`` on a Unix socket."""

    def __init__(
        self, agent: NodeAgent, path: Path, *, allowed_uids: frozenset[int] = frozenset({0})
    ):
        self.agent = agent
        self.path = path
        self.allowed_uids = allowed_uids
        self._server: asyncio.Server | None = None
        self._waiting: dict[asyncio.Future[None], list[_ApiConnection]] = {}

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()  # a previous daemon's; nothing listens on it any more
        old_umask = os.umask(0o177)
        try:
            loop = asyncio.get_running_loop()
            # asyncio's default backlog is 100; a non-blocking connect to a Unix socket with
            # a full backlog fails with EAGAIN, which asyncio takes for success, and the
            # client's first read then fails with ENOTCONN (seen with 128 clients).
            self._server = await loop.create_unix_server(
                lambda: _ApiConnection(self), path=str(self.path), backlog=LISTEN_BACKLOG
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.path.unlink(missing_ok=True)

    def dispatch(self, body: bytes | bytearray) -> Reply:
        """A reply now, a ``Durable`` one (allocate, release: answered once the group
        commit covering them is on disk), or a future of one (everything else)."""
        try:
            request = parse_request(body)
            if isinstance(request, AllocateRequest):
                started = self.agent._clock()
                allocation, durable = self.agent.allocate_staged(
                    request.key, request.pod, multi_nic=request.multi_nic
                )
                return Durable(durable, "allocate", started, allocation)
            if isinstance(request, ReleaseRequest):
                started = self.agent._clock()
                released, maybe = self.agent.release_staged(request.key)
                if maybe is None:
                    return _NOT_RELEASED
                return Durable(maybe, "release", started, None)
        except ProtocolError as err:
            return frame(error(err.code, err.message))
        except PoolExhausted as err:
            return frame(error("exhausted", str(err), cards=list(err.cards)))
        except (DatastoreError, AgentError) as err:
            return frame(error("refused", str(err)))
        return asyncio.ensure_future(self._handle_parsed(request))

    def answer(self, pending: Durable) -> bytes:
        """The framed reply of an allocate or release whose commit has finished."""
        failed = pending.durable.exception()
        if failed is not None:
            return frame(error("refused", f"not durable: {failed}"))
        self.agent.observe(pending.op, pending.started)
        if pending.allocation is None:
            return _RELEASED
        return allocation_reply(pending.allocation)

    def wait_durable(self, durable: asyncio.Future[None], connection: _ApiConnection) -> None:
        """Flush ``connection`` once ``durable`` resolves: one callback per commit, not
        one future and one callback per request."""
        waiting = self._waiting.get(durable)
        if waiting is None:
            self._waiting[durable] = waiting = []
            durable.add_done_callback(self._durable_done)
        waiting.append(connection)

    def _durable_done(self, durable: asyncio.Future[None]) -> None:
        for connection in self._waiting.pop(durable, ()):
            connection.flush()

    async def _handle_parsed(self, request: Request) -> dict[str, Any]:
        try:
            return await self._handle(request)
        except PoolExhausted as err:
            return error("exhausted", str(err), cards=list(err.cards))
        except (DatastoreError, AgentError) as err:
            return error("refused", str(err))

    async def handle(self, body: bytes) -> dict[str, Any]:
        """One request, answered: the slow path, and what tests call."""
        try:
            request = parse_request(body)
        except ProtocolError as err:
            return error(err.code, err.message)
        return await self._handle_parsed(request)

    async def _handle(self, request: Request) -> dict[str, Any]:
        if isinstance(request, AllocateRequest):
            allocation = await self.agent.allocate(
                request.key, request.pod, multi_nic=request.multi_nic
            )
            return ok(allocation_json(allocation))
        if isinstance(request, ReleaseRequest):
            released = await self.agent.release(request.key)
            return ok({"released": released is not None})
        if isinstance(request, GcRequest):
            stale = await self.agent.gc(request.network, request.valid)
            return ok({"released": [allocation_json(a) for a in stale]})
        if isinstance(request, ListRequest):
            return ok({"allocations": [allocation_json(a) for a in self.agent.allocations()]})
        assert isinstance(request, StatusRequest)
        status = await self.agent.status()
        return ok(
            {
                "ready": status.ready,
                "reason": status.reason,
                "cards": list(status.cards),
                "free_addresses": {str(k): v for k, v in status.free_addresses.items()},
                "ec2_used": self.agent.ec2_used,
                "boto3_loaded": "boto3" in sys.modules,
                "ready_after_s": (
                    None
                    if self.agent.ready_at is None
                    else self.agent.ready_at - self.agent.started_at
                ),
            }
        )


class Durable:
    """An allocate or release applied in memory, answered once its commit is durable."""

    __slots__ = ("durable", "op", "started", "allocation")

    def __init__(
        self, durable: asyncio.Future[None], op: str, started: float, allocation: Allocation | None
    ) -> None:
        self.durable = durable
        self.op = op
        self.started = started
        self.allocation = allocation


Reply = bytes | Durable | asyncio.Future[dict[str, Any]]

_RELEASED = frame(ok({"released": True}))
_NOT_RELEASED = frame(ok({"released": False}))


class _ApiConnection(asyncio.BufferedProtocol):
    """One client connection: frames in (``FrameBuffer``), replies out in request order.

    A buffered protocol, not streams: streams add a future and a wake-up per
    ``readexactly``, and at thousands of requests per second that was a large part of each.
    """

    def __init__(self, server: ApiServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._frames = FrameBuffer()
        self._replies: deque[Reply] = deque()
        self._waiting_on: asyncio.Future[None] | None = None  # the commit flush waits for
        self._forbidden = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        uid = peer_uid(transport.get_extra_info("socket"))
        if uid not in self._server.allowed_uids:
            # Said at once, closed once the client has sent its request: closing first
            # would fail the client's send with EPIPE before it could read why.
            self._forbidden = True
            transport.write(frame(error("forbidden", f"uid {uid} may not use the IPAM socket")))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._frames.view()

    def buffer_updated(self, nbytes: int) -> None:
        if self._forbidden:
            assert self._transport is not None
            self._transport.close()
            return
        replies = self._replies
        try:
            for body in self._frames.frames(nbytes):
                reply = self._server.dispatch(body)
                if isinstance(reply, asyncio.Future):
                    reply.add_done_callback(self.flush)
                replies.append(reply)
        except ProtocolError as err:
            assert self._transport is not None
            self._transport.write(frame(error(err.code, err.message)))
            self._transport.close()  # the stream cannot be resynchronised
            self._frames.clear()
            return
        self.flush()

    def flush(self, _: object = None) -> None:
        """Write the replies that are ready, in request order."""
        replies = self._replies
        transport = self._transport
        while replies:
            head = replies[0]
            if isinstance(head, bytes):
                reply = head
            elif isinstance(head, Durable):
                if not head.durable.done():
                    if self._waiting_on is not head.durable:
                        self._waiting_on = head.durable
                        self._server.wait_durable(head.durable, self)
                    return
                reply = self._server.answer(head)
            elif head.done():
                reply = frame(head.result())
            else:
                return  # its done-callback (added in buffer_updated) flushes again
            replies.popleft()
            if transport is not None and not transport.is_closing():
                transport.write(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


Route = Callable[[], Awaitable[tuple[int, str, bytes]]]


class HttpServer:
    """A small GET-only HTTP/1.1 server for metrics and introspection on loopback."""

    def __init__(self, host: str, port: int, routes: dict[str, Route]) -> None:
        self.host = host
        self.port = port
        self.routes = routes
        self._server: asyncio.Server | None = None
        self._waiting: dict[asyncio.Future[None], list[_ApiConnection]] = {}

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass  # headers: nothing here needs them
            parts = request_line.decode("latin-1").split()
            if len(parts) != 3:
                status, ctype, body = 400, "text/plain", b"bad request\n"
            elif parts[0] != "GET":
                status, ctype, body = 405, "text/plain", b"only GET\n"
            elif parts[1].split("?")[0] not in self.routes:
                status, ctype, body = 404, "text/plain", b"not found\n"
            else:
                status, ctype, body = await self.routes[parts[1].split("?")[0]]()
            reason = {
                200: "OK",
                400: "Bad Request",
                404: "Not Found",
                405: "Method Not Allowed",
                503: "Service Unavailable",
            }.get(status, "OK")
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError) as err:
            log.debug("http client: %s", err)
        finally:
            writer.close()


def metrics_routes(agent: NodeAgent) -> dict[str, Route]:
    async def metrics() -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, generate_latest(agent.metrics.registry)

    return {"/metrics": metrics}


def introspection_routes(agent: NodeAgent) -> dict[str, Route]:
    async def state() -> tuple[int, str, bytes]:
        return 200, "application/json", json.dumps(agent.introspect(), indent=1).encode()

    async def healthz() -> tuple[int, str, bytes]:
        return 200, "text/plain", b"ok\n"

    async def ready() -> tuple[int, str, bytes]:
        status = await agent.status()
        if status.ready:
            return 200, "text/plain", b"ready\n"
        return 503, "text/plain", f"not ready: {status.reason}\n".encode()

    return {"/v1/state": state, "/healthz": healthz, "/ready": ready}
