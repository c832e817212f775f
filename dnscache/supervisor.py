"""The supervisor: owns the sockets, runs one worker process per core, serves HTTP, handles
signals.

Sockets: for every listen address, N UDP and N TCP sockets with SO_REUSEPORT, created here
in order and held open for the whole run; worker i inherits socket i of each group. With the
steering program attached to each UDP group (``steering.py``) a question always reaches the
same worker, so the N caches act as one. Holding the sockets here means a worker that dies is
restarted onto the same socket: queries queued meanwhile are answered, and no name moves.

HTTP (``metrics`` address): ``/metrics`` (sum of the workers' counters), ``/health`` (200 while
the supervisor runs and a worker is up), ``/ready`` (200 when every worker is up and we are
not draining). SIGHUP re-reads the config file, validates it, and sends it to the workers
(sockets stay, so no query is dropped); an invalid file is logged and the old config kept.
SIGTERM/SIGINT: /ready turns 503, ``lameduck`` seconds pass, then every listening socket is
closed at once, the supervisor's copies and the workers' (``{"event": "draining"}`` is
printed when they all are), so the sockets leave their SO_REUSEPORT groups and the kernel
hands new queries to whoever else listens on the same ports (the new pod of a surge
upgrade); the workers then finish the queries already read (``drain_timeout``), node-local
rules are torn down (unless another process still serves the address, see ``nodelocal``),
exit 0. The HTTP listener has SO_REUSEPORT too, so the new pod can bind it meanwhile.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from . import nodelocal, steering
from .config import Address, Config, parse
from .errors import ConfigError, DnscacheError
from .metrics import render
from .policy import upstream_label

log = logging.getLogger("ultranet.dns")
READY_TIMEOUT = 20.0
RCVBUF = 4 << 20


class WorkerHandle:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ready = False
        self.draining = False  # told to drain: its control channel carries no more requests
        self.lock = asyncio.Lock()

    async def request(self, msg: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        async with self.lock:
            if not self.ready or self.draining or self.writer is None or self.reader is None:
                raise DnscacheError(f"worker {self.index} is not running")
            self.writer.write(json.dumps(msg).encode() + b"\n")
            async with asyncio.timeout(timeout):
                line = await self.reader.readline()
            if not line:
                raise DnscacheError(f"worker {self.index} closed its control socket")
            reply: dict[str, Any] = json.loads(line)
            return reply


def _listen_sockets(
    addr: Address, n: int, steer: bool
) -> tuple[list[socket.socket], list[socket.socket]]:
    """N UDP and N TCP sockets on ``addr``. With port 0 the first UDP bind picks a port
    free for UDP, which a TCP socket (an outgoing connection's local port, say) may hold:
    then the whole set is tried again on another port."""
    for attempt in range(PORT_ZERO_ATTEMPTS):
        try:
            return _bind_sockets(addr, n, steer)
        except _PortTaken:
            if addr[1] != 0 or attempt == PORT_ZERO_ATTEMPTS - 1:
                raise DnscacheError(
                    f"cannot listen on {upstream_label(addr)}: Address already in use"
                ) from None
    raise AssertionError("unreachable")


class _PortTaken(Exception):
    pass


PORT_ZERO_ATTEMPTS = 20


def _bind_sockets(
    addr: Address, n: int, steer: bool
) -> tuple[list[socket.socket], list[socket.socket]]:
    host, port = addr
    family = socket.AF_INET6 if host.version == 6 else socket.AF_INET
    udp: list[socket.socket] = []
    tcp: list[socket.socket] = []
    try:
        for kind, group in ((socket.SOCK_DGRAM, udp), (socket.SOCK_STREAM, tcp)):
            for _ in range(n):
                s = socket.socket(family, kind)
                group.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if kind == socket.SOCK_DGRAM:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
                else:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((str(host), port))
                port = s.getsockname()[1]  # port 0: the first bind picks, the rest follow
                if kind == socket.SOCK_STREAM:
                    s.listen(1024)
        if steer and n > 1:
            steering.attach(udp[0], n)
    except OSError as exc:
        for s in udp + tcp:
            s.close()
        if exc.errno == errno.EADDRINUSE:
            raise _PortTaken() from exc
        raise DnscacheError(f"cannot listen on {upstream_label(addr)}: {exc.strerror}") from exc
    return udp, tcp


class Supervisor:
    def __init__(
        self,
        load: Callable[[], dict[str, Any]],
        loop_kind: str = "asyncio",
        log_level: str = "INFO",
    ) -> None:
        """``load`` returns the merged config document (file + flags); called again on SIGHUP."""
        self.load = load
        self.loop_kind = loop_kind
        self.log_level = log_level.upper()
        self.doc = load()
        self.cfg: Config = parse(self.doc, os.cpu_count() or 1)
        self.workers = [WorkerHandle(i) for i in range(self.cfg.workers)]
        self.udp: list[list[socket.socket]] = []
        self.tcp: list[list[socket.socket]] = []
        self.stopping = False
        self.draining = False
        self.restarts = 0
        self.reloads = {"ok": 0, "failed": 0}
        self.stop_event = asyncio.Event()
        self.monitors: list[asyncio.Task[None]] = []
        self.http: asyncio.Server | None = None
        self.bound: list[str] = []

    async def run(self) -> int:
        cfg = self.cfg
        nl = cfg.node_local
        if nl is not None:
            nodelocal.setup(nl, [p for a, p in cfg.listen if a in nl.addresses])
        try:
            return await self._run()
        finally:
            for group in self.udp + self.tcp:
                for s in group:
                    s.close()
            if nl is not None:
                ports = [p for a, p in cfg.listen if a in nl.addresses]
                skipped, errors = nodelocal.finish(nl, ports)
                for err in errors:
                    log.error("%s", err)
                if skipped is not None:
                    log.info("node-local interface and rules left in place: %s", skipped)

    async def _run(self) -> int:
        cfg = self.cfg
        for addr in cfg.listen:
            udp, tcp = _listen_sockets(addr, cfg.workers, cfg.steering)
            self.udp.append(udp)
            self.tcp.append(tcp)
            self.bound.append(upstream_label((addr[0], udp[0].getsockname()[1])))
        metrics = ""
        if cfg.metrics is not None:
            host, port = cfg.metrics
            # SO_REUSEPORT: in a surge upgrade the new pod binds this port beside the old one.
            self.http = await asyncio.start_server(self._http, str(host), port, reuse_port=True)
            metrics = upstream_label((host, self.http.sockets[0].getsockname()[1]))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await asyncio.gather(*(self._spawn(w) for w in self.workers))
        except TimeoutError:
            raise DnscacheError(f"workers not ready within {READY_TIMEOUT:g} s") from None
        self.monitors = [loop.create_task(self._monitor(w)) for w in self.workers]
        event = {"event": "ready", "listen": self.bound, "metrics": metrics, "workers": cfg.workers}
        print(json.dumps(event), flush=True)
        await self.stop_event.wait()
        await self._shutdown()
        return 0

    async def _spawn(self, w: WorkerHandle) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        udp = [g[w.index].fileno() for g in self.udp]
        tcp = [g[w.index].fileno() for g in self.tcp]
        argv = [
            sys.executable,
            "-m",
            "dnscache.worker",
            "--index",
            str(w.index),
            "--udp-fds",
            ",".join(map(str, udp)),
            "--tcp-fds",
            ",".join(map(str, tcp)),
            "--control-fd",
            str(child.fileno()),
            "--loop",
            self.loop_kind,
            "--log-level",
            self.log_level,
        ]
        try:
            w.proc = await asyncio.create_subprocess_exec(
                *argv, pass_fds=[*udp, *tcp, child.fileno()], stdin=asyncio.subprocess.DEVNULL
            )
        finally:
            child.close()
        w.reader, w.writer = await asyncio.open_connection(sock=parent, limit=1 << 24)
        w.writer.write(json.dumps({"op": "config", "doc": self.doc}).encode() + b"\n")
        line = await w.reader.readline()
        if not line or json.loads(line).get("op") != "ready":
            raise DnscacheError(f"worker {w.index} exited before it was ready")
        w.ready = True

    async def _monitor(self, w: WorkerHandle) -> None:
        """Restart a worker that dies, onto the same sockets; back off if it keeps dying."""
        backoff = 0.1
        loop = asyncio.get_running_loop()
        while True:
            assert w.proc is not None
            started = loop.time()
            rc = await w.proc.wait()
            w.ready = False
            if w.writer is not None:
                w.writer.close()
            if self.stopping:
                return
            self.restarts += 1
            log.error("worker %d exited with %s; restarting", w.index, rc)
            backoff = 0.1 if loop.time() - started > 10 else min(backoff * 2, 5.0)
            await asyncio.sleep(backoff)  # crash-loop backoff, not synchronisation
            try:
                await self._spawn(w)
            except (DnscacheError, OSError, json.JSONDecodeError) as exc:
                log.error("worker %d restart failed: %s", w.index, exc)

    async def reload(self) -> None:
        try:
            doc = self.load()
            cfg = parse(doc, os.cpu_count() or 1)
            fixed = ("listen", "workers", "metrics", "node_local", "steering")
            changed = [f for f in fixed if getattr(cfg, f) != getattr(self.cfg, f)]
            if changed:
                raise ConfigError(changed[0], getattr(cfg, changed[0]), "needs a restart")
        except ConfigError as exc:
            self.reloads["failed"] += 1
            log.error("reload rejected, keeping the running config: %s", exc)
            return
        self.doc, self.cfg = doc, cfg
        results = await asyncio.gather(
            *(w.request({"op": "config", "doc": doc}) for w in self.workers), return_exceptions=True
        )
        bad = [r for r in results if isinstance(r, BaseException) or not r.get("ok")]
        self.reloads["failed" if bad else "ok"] += 1
        if bad:
            log.error("reload failed on %d worker(s): %s", len(bad), bad)
        else:
            log.info("reloaded")

    async def _shutdown(self) -> None:
        self.draining = True
        if self.cfg.lameduck:
            await asyncio.sleep(self.cfg.lameduck)  # lameduck: /ready is 503 meanwhile
        self.stopping = True
        told = []
        for w in self.workers:
            if w.ready and w.writer is not None:
                async with w.lock:  # not in the middle of a scrape's exchange
                    w.draining = True
                    w.writer.write(b'{"op": "drain"}\n')
                told.append(w)
        for group in self.udp + self.tcp:  # our copies: the workers close theirs
            for s in group:
                s.close()
        await asyncio.gather(*(self._closed(w) for w in told))
        print(json.dumps({"event": "draining", "listen": self.bound}), flush=True)
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                try:
                    async with asyncio.timeout(self.cfg.drain_timeout + 5):
                        await w.proc.wait()
                except TimeoutError:
                    log.error("worker %d did not drain; killing it", w.index)
                    w.proc.kill()
                    await w.proc.wait()
        for t in self.monitors:
            t.cancel()
        if self.http is not None:
            self.http.close()

    async def _closed(self, w: WorkerHandle) -> None:
        """Until worker ``w`` says its listening sockets are closed (or exits, or time is up)."""
        assert w.reader is not None
        try:
            async with asyncio.timeout(self.cfg.drain_timeout + 5):
                while line := await w.reader.readline():
                    if json.loads(line).get("op") == "closed":
                        return
        except (TimeoutError, ConnectionError, json.JSONDecodeError) as exc:
            log.warning("worker %d: no word of its sockets closing: %s", w.index, exc)

    # -- HTTP -------------------------------------------------------------------------------

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readline()
                while (await reader.readline()).strip():
                    pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else ""
            status, ctype, body = await self._route(path)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError) as exc:
            log.debug("http: %s", exc)
        finally:
            writer.close()

    async def _route(self, path: str) -> tuple[str, str, bytes]:
        text = "text/plain; charset=utf-8"
        up = sum(1 for w in self.workers if w.ready)
        if path == "/health":
            return (
                ("200 OK", text, b"OK") if up else ("503 Service Unavailable", text, b"no worker")
            )
        if path == "/ready":
            if self.draining:
                return "503 Service Unavailable", text, b"draining"
            if up < len(self.workers):
                return "503 Service Unavailable", text, f"{up}/{len(self.workers)} workers".encode()
            return "200 OK", text, b"OK"
        if path == "/metrics":
            return "200 OK", "text/plain; version=0.0.4; charset=utf-8", await self._metrics()
        return "404 Not Found", text, b"not found"

    async def _metrics(self) -> bytes:
        replies = await asyncio.gather(
            *(w.request({"op": "stats"}) for w in self.workers if w.ready), return_exceptions=True
        )
        snaps = [r["data"] for r in replies if isinstance(r, dict) and r.get("op") == "stats"]
        states = {"ready": sum(1 for w in self.workers if w.ready)}
        states["down"] = len(self.workers) - states["ready"]
        sup = {"workers": states, "restarts": self.restarts, "reloads": self.reloads}
        server = "dns://" + (self.bound[0] if self.bound else "")
        return render(snaps, server, sup)
