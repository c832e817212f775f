"""Every instance's IMDS on one thread: a loopback port per instance, one event loop for all.

The lab's ``ImdsServer`` gives an instance a ``ThreadingHTTPServer``: a thread polling its
socket plus a thread per connection. Two thousand of those would spend the fleet's CPU
polling. Here one asyncio loop, on a thread of its own, listens on one loopback port per
instance and answers each request with that instance's ``ImdsService`` (the lab's IMDS
logic, unchanged: IMDSv2 tokens, the metadata tree read afresh from the cloud, lag
included). The agents' ``ImdsClient`` reaches it over real HTTP/1.1 keep-alive.

HTTP support is what ``ipam.imds.ImdsClient`` and curl send: one request line, headers,
an optional ``Content-Length`` body; every answer carries ``Content-Length``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from tools.lab.ec2.imds import ImdsService
from tools.lab.ec2.state import Cloud

log = logging.getLogger("ultranet.fleet.imds")

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY = 1 << 16
# Each port has one client, its agent's ImdsClient, which holds one keep-alive connection
# at a time: asyncio's default backlog is ample. Named because start_server calls listen
# again with its own backlog, whatever the socket had (socketserver's 5 at the EC2
# endpoint dropped the SYNs of a fleet's agents connecting at once).
LISTEN_BACKLOG = 100


class ImdsMux:
    """One thread serving the IMDS of any number of instances, a port each."""

    def __init__(self, cloud: Cloud) -> None:
        self._cloud = cloud
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="imds-mux", daemon=True)
        self._servers: dict[str, asyncio.Server] = {}
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def add(self, instance_id: str) -> str:
        """Serve ``instance_id``'s IMDS on a new loopback port; returns its URL."""
        service = ImdsService(lambda: self._cloud.imds_tree(instance_id), clock=self._cloud.clock)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

        async def serve() -> asyncio.Server:
            return await asyncio.start_server(_handler(service), sock=sock, backlog=LISTEN_BACKLOG)

        server = asyncio.run_coroutine_threadsafe(serve(), self._loop).result()
        self._servers[instance_id] = server
        return f"http://127.0.0.1:{port}"

    def remove(self, instance_id: str) -> None:
        server = self._servers.pop(instance_id, None)
        if server is None:
            return

        async def close() -> None:
            server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result()

    def close(self) -> None:
        for instance_id in list(self._servers):
            self.remove(instance_id)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def _handler(
    service: ImdsService,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await _one_request(service, reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client hung up (an agent stopped): normal here
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return handle


async def _one_request(
    service: ImdsService, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """Answer one request; False when the connection is done."""
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_HEADER_BYTES:
        return False
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, path, _version = lines[0].split(" ", 2)
    except ValueError:
        _write(writer, int(HTTPStatus.BAD_REQUEST), {}, b"bad request line", close=True)
        return False
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), "0"))
    if length:
        await reader.readexactly(min(length, MAX_BODY))
    response = service.handle(method, path, headers)
    closing = any(k.lower() == "connection" and v.lower() == "close" for k, v in headers.items())
    body = b"" if method == "HEAD" else response.body
    _write(
        writer, response.status, response.headers, body, close=closing, length=len(response.body)
    )
    await writer.drain()
    return not closing


def _write(
    writer: asyncio.StreamWriter,
    status: int,
    headers: dict[str, str],
    body: bytes,
    *,
    close: bool,
    length: int | None = None,
) -> None:
    phrase = HTTPStatus(status).phrase
    lines = [f"HTTP/1.1 {status} {phrase}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() != "content-length"]
    lines.append(f"Content-Length: {len(body) if length is None else length}")
    if close:
        lines.append("Connection: close")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
