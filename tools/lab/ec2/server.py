"""HTTP front ends of the emulator: the EC2 endpoint and one instance's IMDS.

Each server can listen on several sockets at once: one on the host's loopback for
tests and tools, and one created inside the node namespace (``netns.listening_socket``)
so software on the node reaches EC2 and IMDS where it would on an instance. HTTP/1.1
with keep-alive, because boto3 and the IMDS client both pool connections and a server
that closed after each answer would make every call pay a TCP handshake.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tools.lab.ec2.api import Ec2Api
from tools.lab.ec2.imds import ImdsService
from tools.lab.ec2.state import Cloud
from tools.lab.ec2.wire import render_error

log = logging.getLogger("ultranet.lab.http")

MAX_BODY = 1 << 20  # an EC2 Query request is a form; nothing legitimate comes near 1 MiB


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog (5) drops the SYNs of a fleet's agents connecting at
    # once; their retransmission (1 s, then 3 s) meets botocore's 3 s connect timeout, a
    # failure AWS's endpoint never gives. The kernel caps it at net.core.somaxconn.
    request_queue_size = 4096

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-request (a daemon killed or stopped) is normal in the
        # lab; anything else is a bug and keeps socketserver's traceback.
        error = sys.exc_info()[1]
        if isinstance(error, (BrokenPipeError, ConnectionResetError)):
            log.debug("client %s hung up: %s", client_address, error)
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the second waits for the
    # client's delayed ACK (~40 ms) on every keep-alive request.
    disable_nagle_algorithm = True
    server_version = "EC2ws"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() not in ("server", "date", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _Ec2Handler(_Handler):
    api: Ec2Api

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._reply(413, b"request too large", {"Content-Type": "text/plain"})
            return
        body = self.rfile.read(length)
        _, _, query = self.path.partition("?")
        self._answer(body, query)

    def do_GET(self) -> None:
        # EC2 also takes Query requests as GET with the parameters in the URL.
        _, _, query = self.path.partition("?")
        self._answer(b"", query)

    def _answer(self, body: bytes, query: str) -> None:
        try:
            response = self.api.handle(body, query)
            status, payload = response.status, response.body
        except Exception as err:
            # A bug in the emulator: answer as EC2 answers its own (500 InternalError),
            # naming the bug, so the test that hit it fails with a reason, not a reset.
            log.exception("ec2 emulator failed on a request")
            status, payload = 500, render_error("InternalError", f"emulator bug: {err!r}", "-")
        self._reply(status, payload, {"Content-Type": "text/xml;charset=UTF-8"})


class _ImdsHandler(_Handler):
    service: ImdsService

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(min(length, MAX_BODY))
        response = self.service.handle(self.command, self.path, dict(self.headers.items()))
        self._reply(response.status, response.body, response.headers)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = do_PATCH = _serve


class _Listeners:
    """One handler class served on any number of sockets, each on its own thread."""

    def __init__(self, handler: type[_Handler], name: str) -> None:
        self._handler = handler
        self._name = name
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []

    def start(self, sock: socket.socket | None = None) -> str:
        """Serve on ``sock`` (already bound and listening), or on a new loopback port."""
        if sock is None:
            server = _Server(("127.0.0.1", 0), self._handler)
        else:
            server = _Server(sock.getsockname()[:2], self._handler, bind_and_activate=False)
            server.socket.close()
            server.socket = sock
        host, port = server.server_address[:2]
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{self._name}-{port}",
            daemon=True,
        )
        thread.start()
        self._servers.append(server)
        self._threads.append(thread)
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join()
        self._servers.clear()
        self._threads.clear()


class Ec2Server(_Listeners):
    """The EC2 Query API of ``cloud``; boto3 reaches it with ``endpoint_url``."""

    def __init__(self, cloud: Cloud) -> None:
        self.api = Ec2Api(cloud)
        handler = type("Ec2Handler", (_Ec2Handler,), {"api": self.api})
        super().__init__(handler, "ec2")


class ImdsServer(_Listeners):
    """IMDS of one instance: IMDSv2 only unless ``v1_allowed``."""

    def __init__(self, cloud: Cloud, instance_id: str, *, v1_allowed: bool = False) -> None:
        self.service = ImdsService(
            lambda: cloud.imds_tree(instance_id), clock=cloud.clock, v1_allowed=v1_allowed
        )
        handler = type("ImdsHandler", (_ImdsHandler,), {"service": self.service})
        super().__init__(handler, "imds")
