"""One exchange with one upstream, over UDP or TCP (asyncio I/O).

RFC 5452: every UDP query gets a fresh random ID and a fresh socket, so a fresh ephemeral
source port chosen by the kernel; the socket is connected, so the kernel drops datagrams from
any other address or port; a reply is accepted only with our ID and our question, and anything
else on that socket is counted as spoofed and ignored (we keep waiting for the real one).
TCP (RFC 7766) writes the length prefix and message in one call.
"""

from __future__ import annotations

import asyncio
import heapq
import secrets
import select
import socket

from .config import Address
from .errors import UpstreamError
from .policy import upstream_label
from .wire import make_upstream_query, response_id_matches, response_question_matches

UDP_RECV = 4096


class Exchanger:
    """Counts spoofed replies; ``udp``/``tcp`` return the raw response or raise UpstreamError.

    Every UDP query has its own socket, so registering each with the event loop would cost
    ~20 µs (``add_reader``/``remove_reader``) and a timer ~9 µs (``call_later``/``cancel``),
    a third of a miss. Instead the sockets go into one epoll set of our own, itself one
    reader of the loop (closing a socket removes it from the set), and the deadlines into
    one heap served by a single timer.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, payload: int) -> None:
        self.loop = loop
        self.payload = payload
        self.spoofed = 0
        self._epoll = select.epoll()
        self._pending: dict[int, _Udp] = {}
        self._deadlines: list[tuple[float, int, asyncio.Future[bytes], str]] = []
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        loop.add_reader(self._epoll.fileno(), self._on_epoll)

    def close(self) -> None:
        self.loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        if self._timer is not None:
            self._timer.cancel()

    async def udp(self, addr: Address, key: bytes, timeout: float, edns: bool = True) -> bytes:
        host, port = addr
        qid = secrets.randbits(16)
        query = make_upstream_query(qid, key, self.payload if edns else 0)
        family = socket.AF_INET6 if host.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        fut: asyncio.Future[bytes] = self.loop.create_future()
        fd = sock.fileno()
        try:
            sock.setblocking(False)
            sock.connect((str(host), port))
            sock.send(query)
            self._pending[fd] = _Udp(sock, fut, qid, key, addr)
            self._epoll.register(fd, select.EPOLLIN)
            self._deadline(fut, timeout, addr)
            return await fut
        except OSError as exc:
            raise UpstreamError(upstream_label(addr), f"udp: {exc.strerror or exc}") from None
        finally:
            self._pending.pop(fd, None)
            sock.close()

    def _on_epoll(self) -> None:
        for fd, _ in self._epoll.poll(0, 512):
            q = self._pending.get(fd)
            if q is not None:
                self._on_udp(q)

    def _on_udp(self, q: _Udp) -> None:
        fut = q.fut
        while not fut.done():
            try:
                data = q.sock.recv(UDP_RECV)
            except BlockingIOError:
                return
            except OSError as exc:  # ICMP port unreachable arrives as ECONNREFUSED
                fut.set_exception(UpstreamError(upstream_label(q.addr), f"udp: {exc.strerror}"))
                return
            if response_id_matches(data, q.qid) and response_question_matches(data, q.key):
                fut.set_result(data)
            else:
                self.spoofed += 1

    def _deadline(self, fut: asyncio.Future[bytes], timeout: float, addr: Address) -> None:
        at = self.loop.time() + timeout
        self._seq += 1
        reason = f"udp: no answer in {timeout:g} s"
        heapq.heappush(self._deadlines, (at, self._seq, fut, upstream_label(addr) + "\0" + reason))
        if at < self._timer_at:
            self._arm(at)

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._expire)

    def _expire(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        now = self.loop.time()
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, _, fut, what = heapq.heappop(heap)
            if not fut.done():
                label, _, reason = what.partition("\0")
                fut.set_exception(UpstreamError(label, reason))
        if heap:
            self._arm(heap[0][0])

    async def tcp(self, addr: Address, key: bytes, timeout: float) -> bytes:
        host, port = addr
        label = upstream_label(addr)
        qid = secrets.randbits(16)
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


class _Udp:
    __slots__ = ("sock", "fut", "qid", "key", "addr")

    def __init__(self, sock: socket.socket, fut: asyncio.Future[bytes], qid: int, key: bytes,
                 addr: Address) -> None:  # fmt: skip
        self.sock, self.fut, self.qid, self.key, self.addr = sock, fut, qid, key, addr
