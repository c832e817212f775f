"""A small authoritative server on loopback: the upstream of the DNS tests and of the lab (dnslib).

A repo tool, never shipped: the product (``dnscache``) holds no test doubles. The tests import
it from here, and the demo runs it as ``python -m tools.bench.dns.authserver``.

``AuthServer`` answers one zone over UDP and TCP on one port of 127.0.0.1, from its own thread
and event loop, and counts every query. Knobs that tests turn: ``down`` (drop everything),
``delay`` (seconds before answering), ``truncate`` (names answered TC=1 over UDP),
``servfail`` (names answered SERVFAIL), ``spoof`` (send a wrong-ID and a wrong-question reply
before the real one), ``ttl``, ``hold`` (names whose UDP queries wait, unanswered and
uncounted, until ``release()``; ``held`` says how many arrived: a test knows a query is in
flight without a timer). Over TCP it answers pipelined queries as each is ready
(``slow`` names later: out of order), counts connections (``tcp_accepted``, ``tcp_open``)
and can close every open one (``close_tcp``), as a server's idle timer would.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

import dnslib

SOA_MINIMUM = 60


class AuthServer:
    def __init__(
        self,
        origin: str = "test.",
        records: Iterable[str] = (),
        ttl: int = 300,
        wildcard_a: bool = False,
    ) -> None:
        """``records`` are zone-file lines relative to nothing (full names); ``wildcard_a``
        answers A 198.18.0.1 for every name under ``origin`` without its own records."""
        self.origin = dnslib.DNSLabel(origin)
        self.ttl = ttl
        self.wildcard_a = wildcard_a
        self.rrs: dict[tuple[str, int], list[Any]] = {}
        for line in records:
            for rr in dnslib.RR.fromZone(line, ttl=ttl):
                self.rrs.setdefault((str(rr.rname).lower(), rr.rtype), []).append(rr)
        self.names = {name for name, _ in self.rrs}
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.down = False
        self.delay = 0.0
        self.truncate: set[str] = set()
        self.servfail: set[str] = set()
        self.spoof = False
        self.last: tuple[bytes, Any] = (b"", None)  # the last UDP query and its source
        self.slow: dict[str, float] = {}  # name -> seconds before answering it
        self.hold: set[str] = set()  # names (as in ``slow``) answered over UDP on release()
        self._held: list[tuple[bytes, Any]] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._lock = threading.Lock()
        self.tcp_accepted = 0
        self._tcp_writers: set[asyncio.StreamWriter] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> AuthServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        # UDP picks the port, TCP must get the same number: another socket (a TIME-WAIT one
        # left by earlier connections, say) may hold it for TCP, so try a few.
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind(("127.0.0.1", udp.getsockname()[1]))
            except OSError as err:
                udp.close()
                tcp.close()
                if err.errno != errno.EADDRINUSE:
                    raise
                continue
            break
        else:
            raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")
        self._udp, self._tcp = udp, tcp
        self.port = udp.getsockname()[1]
        self._tcp.listen(128)
        self._thread = threading.Thread(target=self._serve, name="auth-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("auth server did not start")

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        for s in (self._udp, self._tcp):
            if s is not None:
                s.close()

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        assert self._udp is not None and self._tcp is not None
        self._udp.setblocking(False)
        loop.add_reader(self._udp.fileno(), self._on_udp)
        server = loop.run_until_complete(asyncio.start_server(self._on_tcp, sock=self._tcp))
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.remove_reader(self._udp.fileno())
            server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    def count(self, name: str, qtype: str = "A", proto: str | None = None) -> int:
        with self._lock:
            return sum(
                n
                for (q, t, p), n in self.counts.items()
                if q == name.lower().rstrip(".") + "." and t == qtype and proto in (None, p)
            )

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    @property
    def held(self) -> int:
        """UDP queries of ``hold`` names received and not yet released."""
        with self._lock:
            return len(self._held)

    def release(self) -> None:
        """Answer every held query now, from the server's thread."""
        assert self._loop is not None
        with self._lock:
            held, self._held = self._held, []
        for data, addr in held:
            self._loop.call_soon_threadsafe(self._answer_udp, data, addr)

    # -- answering ----------------------------------------------------------------------------

    def _on_udp(self) -> None:
        assert self._udp is not None and self._loop is not None
        while True:
            try:
                data, addr = self._udp.recvfrom(65535)
            except BlockingIOError:
                return
            self.last = (data, addr)
            if self.hold and self._qname(data) in self.hold:
                with self._lock:
                    self._held.append((data, addr))
                continue
            delay = self._delay_for(data)
            if delay:
                self._loop.call_later(delay, self._answer_udp, data, addr)
            else:
                self._answer_udp(data, addr)

    def _answer_udp(self, data: bytes, addr: Any) -> None:
        assert self._udp is not None
        reply = self.answer(data, "udp")
        if reply is None:
            return
        if self.spoof:
            wrong_id = bytes(((reply[0] + 1) & 0xFF, reply[1])) + reply[2:]
            self._udp.sendto(wrong_id, addr)
            other = dnslib.DNSRecord.parse(reply)
            other.q.qname = dnslib.DNSLabel("spoofed." + str(other.q.qname))
            other.rr = [dnslib.RR(other.q.qname, rdata=dnslib.A("198.18.66.66"))]
            self._udp.sendto(other.pack(), addr)
        self._udp.sendto(reply, addr)

    @property
    def tcp_open(self) -> int:
        with self._lock:
            return len(self._tcp_writers)

    def close_tcp(self) -> None:
        """Close every open TCP connection from the server's side (returns once each is told)."""
        assert self._loop is not None
        done = threading.Event()

        def close_all() -> None:
            with self._lock:
                writers = list(self._tcp_writers)
            for writer in writers:
                writer.close()
            done.set()

        self._loop.call_soon_threadsafe(close_all)
        if not done.wait(10):
            raise RuntimeError("auth server did not close its connections")

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.tcp_accepted += 1
            self._tcp_writers.add(writer)
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(size)
                delay = self._delay_for(data)
                if delay:
                    asyncio.get_running_loop().call_later(delay, self._answer_tcp, data, writer)
                else:
                    self._answer_tcp(data, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            with self._lock:
                self._tcp_writers.discard(writer)
            writer.close()

    def _answer_tcp(self, data: bytes, writer: asyncio.StreamWriter) -> None:
        reply = self.answer(data, "tcp")
        if reply is not None and not writer.is_closing():
            writer.write(len(reply).to_bytes(2, "big") + reply)

    def _delay_for(self, data: bytes) -> float:
        if not self.slow:
            return self.delay
        return self.slow.get(self._qname(data), self.delay)

    @staticmethod
    def _qname(data: bytes) -> str:
        """The query's name, lower-case with its final dot ("" if it does not parse)."""
        try:
            return str(dnslib.DNSRecord.parse(data).q.qname).lower()
        except (dnslib.DNSError, dnslib.buffer.BufferError):
            return ""

    def answer(self, data: bytes, proto: str) -> bytes | None:
        try:
            req = dnslib.DNSRecord.parse(data)
        except (dnslib.DNSError, dnslib.buffer.BufferError):
            return None
        q = req.q
        name = str(q.qname).lower()
        with self._lock:
            self.counts[(name, dnslib.QTYPE.get(q.qtype), proto)] += 1
        if self.down:
            return None
        reply = req.reply(ra=True, aa=True)
        reply.ar = [r for r in reply.ar if r.rtype != dnslib.QTYPE.OPT]
        if any(r.rtype == dnslib.QTYPE.OPT for r in req.ar):
            do = any(r.rtype == dnslib.QTYPE.OPT and r.edns_do for r in req.ar)
            reply.add_ar(dnslib.EDNS0(udp_len=1232, flags="do" if do else ""))
        if name in self.servfail:
            reply.header.rcode = dnslib.RCODE.SERVFAIL
            return bytes(reply.pack())
        if not q.qname.matchSuffix(self.origin):
            reply.header.rcode = dnslib.RCODE.REFUSED
            return bytes(reply.pack())
        self._fill(reply, name, q.qtype)
        if proto == "udp" and name in self.truncate:
            reply.rr, reply.auth = [], []
            reply.header.tc = 1
        return bytes(reply.pack())

    def _fill(self, reply: Any, name: str, qtype: int) -> None:
        for _ in range(8):  # follow CNAMEs inside the zone
            rrs = self.rrs.get((name, qtype), [])
            cname = self.rrs.get((name, dnslib.QTYPE.CNAME), [])
            if not rrs and not cname and self.wildcard_a and qtype == dnslib.QTYPE.A:
                rrs = [dnslib.RR(name, rdata=dnslib.A("198.18.0.1"), ttl=self.ttl)]
            if rrs:
                reply.rr.extend(rrs)
                return
            if cname and qtype != dnslib.QTYPE.CNAME:
                reply.rr.extend(cname)
                name = str(cname[0].rdata.label).lower()
                continue
            break
        exists = name in self.names or self.wildcard_a
        if not exists and not any(n.endswith("." + name) for n in self.names):
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
        reply.add_auth(self._soa())

    def _soa(self) -> Any:
        soa = dnslib.SOA(
            "ns." + str(self.origin),
            "hostmaster." + str(self.origin),
            (1, 3600, 600, 86400, SOA_MINIMUM),
        )
        return dnslib.RR(self.origin, dnslib.QTYPE.SOA, rdata=soa, ttl=self.ttl)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM, printing ``{"port": N}`` once listening (for tests in a namespace
    and the lab): ``python -m tools.bench.dns.authserver --origin test. --record
    'www.test. A 198.18.0.5' ...``."""
    import argparse
    import json
    import signal

    p = argparse.ArgumentParser(prog="python -m tools.bench.dns.authserver")
    p.add_argument("--origin", default="test.")
    p.add_argument("--record", action="append", default=[])
    args = p.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with AuthServer(args.origin, args.record) as server:
        print(json.dumps({"port": server.port}), flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
