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

from ipam.agent import AgentError, NodeAgent
from ipam.datastore_errors import DatastoreError, PoolExhausted
from ipam.protocol import (
    AllocateRequest,
    GcRequest,
    ListRequest,
    ProtocolError,
    ReleaseRequest,
    Request,
    StatusRequest,
    allocation_json,
    error,
    frame,
    frame_length,
    ok,
    parse_request,
)

log = logging.getLogger("ultranet.ipamd.server")

_PEERCRED = struct.Struct("3i")  # pid, uid, gid


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

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()  # a previous daemon's; nothing listens on it any more
        old_umask = os.umask(0o177)
        try:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_unix_server(
                lambda: _ApiConnection(self), path=str(self.path)
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

    def dispatch(self, body: bytes) -> dict[str, Any] | asyncio.Future[dict[str, Any]]:
        """A reply now, or a future of one. Allocations and releases take no coroutine:
        they are applied at once and answered from the group commit's callback."""
        try:
            request = parse_request(body)
            if isinstance(request, AllocateRequest):
                started = self.agent._clock()
                allocation, durable = self.agent.allocate_staged(
                    request.key, request.pod, multi_nic=request.multi_nic
                )
                return self._when_durable(
                    durable, "allocate", started, lambda: ok(allocation_json(allocation))
                )
            if isinstance(request, ReleaseRequest):
                started = self.agent._clock()
                released, maybe = self.agent.release_staged(request.key)
                if maybe is None:
                    return ok({"released": False})
                return self._when_durable(maybe, "release", started, _RELEASED)
        except ProtocolError as err:
            return error(err.code, err.message)
        except PoolExhausted as err:
            return error("exhausted", str(err), cards=list(err.cards))
        except (DatastoreError, AgentError) as err:
            return error("refused", str(err))
        return asyncio.ensure_future(self._handle_parsed(request))

    def _when_durable(
        self,
        durable: asyncio.Future[None],
        op: str,
        started: float,
        reply: Callable[[], dict[str, Any]],
    ) -> asyncio.Future[dict[str, Any]]:
        answer: asyncio.Future[dict[str, Any]] = durable.get_loop().create_future()

        def done(commit: asyncio.Future[None]) -> None:
            error_ = commit.exception()
            if error_ is None:
                self.agent.observe(op, started)
                answer.set_result(reply())
            else:
                answer.set_result(error("refused", f"not durable: {error_}"))

        durable.add_done_callback(done)
        return answer

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


def _RELEASED() -> dict[str, Any]:
    return ok({"released": True})


class _ApiConnection(asyncio.Protocol):
    """One client connection: frames in, replies out in request order.

    A protocol rather than streams: at thousands of requests per second the stream
    machinery (a future and a wake-up per ``readexactly``) was a large part of each one.
    """

    def __init__(self, server: ApiServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._replies: deque[dict[str, Any] | asyncio.Future[dict[str, Any]]] = deque()
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

    def data_received(self, data: bytes) -> None:
        if self._forbidden:
            assert self._transport is not None
            self._transport.close()
            return
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 4:
            try:
                length = frame_length(bytes(buffer[:4]))
            except ProtocolError as err:
                assert self._transport is not None
                self._transport.write(frame(error(err.code, err.message)))
                self._transport.close()  # the stream cannot be resynchronised
                buffer.clear()
                return
            if len(buffer) < 4 + length:
                break
            reply = self._server.dispatch(bytes(buffer[4 : 4 + length]))
            del buffer[: 4 + length]
            self._replies.append(reply)
            if not isinstance(reply, dict):
                reply.add_done_callback(self._flush)
        self._flush()

    def _flush(self, _: object = None) -> None:
        """Write the replies that are ready, in request order."""
        replies = self._replies
        transport = self._transport
        while replies:
            head = replies[0]
            if isinstance(head, dict):
                reply = head
            elif head.done():
                reply = head.result()
            else:
                return
            replies.popleft()
            if transport is not None and not transport.is_closing():
                transport.write(frame(reply))

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
