"""Many datagrams per system call on a listening UDP socket: ``recvmmsg`` and ``sendmmsg``.

Python's socket module moves one datagram per call, and each call also builds an address
tuple (``recvfrom``) or parses one back (``sendto``). On the hit path those two calls were
most of an answer's cost: a bare echo loop spent 9.1-9.7 µs of CPU per answer with
``recvfrom``/``sendto`` and 6.1-7.5 µs with this (dnsperf at saturation, README). The two
calls come from libc through ``ctypes`` (standard library): one call per batch, not per
datagram, so the foreign-call overhead is shared by up to ``slots`` answers.

Layout: slot ``i`` has a region of ``size`` bytes in one buffer and a sockaddr store. A query is
read into its region; its reply is written over it (the client's ID is already in the first
two bytes) and sent from there to the address in the same store, so the hit path never
converts an address. Send message ``j`` normally carries slot ``j``; when an earlier query of
the batch had no immediate reply (a miss, a refusal), later replies move down and message
``j`` is pointed at slot ``i`` (``move``) until the batch is sent.

The replies that leave a batch (a miss answered when the upstream does, an error) go through
the socket's ``ReplyQueue``: copied into its own slots with the client's raw sockaddr, and
sent together at the end of the loop's turn.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ultranet.dns")
_NAME = 32  # bytes per sockaddr store: sockaddr_in6 is 28


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


# No ``argtypes``: with them ctypes converts every argument through its type, 0.5 µs more per
# call (measured); instead the pointers are passed as prebuilt ``c_void_p`` and the rest are
# small ints, which ctypes passes as C ints.
_libc = ctypes.CDLL(None, use_errno=True)
_recvmmsg = _libc.recvmmsg
_recvmmsg.restype = ctypes.c_int
_sendmmsg = _libc.sendmmsg
_sendmmsg.restype = ctypes.c_int

_MSG = ctypes.sizeof(_Mmsghdr)
_MSG_WORDS = _MSG // 4  # uint32 per message, for reading ``len``
_LEN_WORD = _Mmsghdr.len.offset // 4
_MSG_QWORDS = _MSG // 8  # uint64 per message, for pointing ``name``
_NAME_QWORD = _Msghdr.name.offset // 8
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)


class UdpBatch:
    """Read up to ``slots`` datagrams of ``sock`` at a time (each ≤ ``size`` bytes) and send
    their replies in one call. The hot loop reads the attributes directly:

    - ``lengths[i * MSG_WORDS + LEN_WORD]``: how many bytes slot ``i`` holds;
    - ``buf[i * size : ...]``: its bytes (slicing a ctypes char array gives ``bytes``);
      ``view``: the same buffer, writable;
    - ``names[i * NAME + ip_start : i * NAME + ip_end]``: the sender's packed IP address;
      on an IPv4 socket also ``ipv4_words[i * NAME_WORDS + IPV4_WORD]``, the same 4 bytes
      as one native-order integer (cheaper to read and hash than a slice);
    - ``send_iov[2 * j + 1] = n``: message ``j`` carries ``n`` bytes (``[2 * j]``: from where).
    """

    MSG_WORDS = _MSG_WORDS
    LEN_WORD = _LEN_WORD
    NAME = _NAME
    NAME_WORDS = _NAME // 4
    IPV4_WORD = 1  # sockaddr_in: family and port, then the address

    def __init__(self, sock: socket.socket, slots: int = 64, size: int = 4096) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.slots, self.size = slots, size
        self.namelen = _namelen(sock)
        v4 = sock.family == socket.AF_INET
        self.ip_start, self.ip_end = (4, 8) if v4 else (8, 24)
        # Any: slicing a c_char array gives bytes, where typeshed says list.
        self.buf: Any = (ctypes.c_char * (slots * size))()
        self.view = memoryview(self.buf).cast("B")
        self.names: Any = (ctypes.c_char * (slots * _NAME))()
        self.ipv4_words = memoryview(self.names).cast("B").cast("I")
        self._buf_at = ctypes.addressof(self.buf)
        self._names_at = ctypes.addressof(self.names)
        self._recv_iov = (_Iovec * slots)()
        self._send_iov = (_Iovec * slots)()
        self._recv = (_Mmsghdr * slots)()
        self._send = (_Mmsghdr * slots)()
        # The kernel writes each sender's real length back into a received message's namelen.
        _point(self._recv, self._recv_iov, self.buf, self.names, size, _NAME)
        _point(self._send, self._send_iov, self.buf, self.names, size, self.namelen)
        self.lengths = memoryview(self._recv).cast("B").cast("I")
        self.send_iov = memoryview(self._send_iov).cast("B").cast("Q")
        self._send_words = memoryview(self._send).cast("B").cast("Q")
        self._recv_at = ctypes.c_void_p(ctypes.addressof(self._recv))
        self._send_at = ctypes.addressof(self._send)
        self._moved_from = slots  # lowest message pointed away from its own slot

    def receive(self) -> int:
        """Read what the socket holds, up to ``slots`` datagrams; 0 when it holds none."""
        while True:
            got: int = _recvmmsg(self.fd, self._recv_at, self.slots, socket.MSG_DONTWAIT, None)
            if got >= 0:
                return got
            err = ctypes.get_errno()
            if err in _AGAIN:
                return 0
            if err != errno.EINTR:
                raise OSError(err, f"recvmmsg: {os.strerror(err)}")

    def move(self, message: int, slot: int) -> None:
        """Send message ``message`` from slot ``slot``'s region to slot ``slot``'s sender."""
        self.send_iov[2 * message] = self._buf_at + slot * self.size
        self._send_words[message * _MSG_QWORDS + _NAME_QWORD] = self._names_at + slot * _NAME
        if message < self._moved_from:
            self._moved_from = message

    def send(self, count: int) -> int:
        """Send messages ``0 .. count-1``; returns how many could not be sent (each logged)."""
        failed = _send_messages(self.fd, self._send_at, count, self._describe)
        if self._moved_from < self.slots:
            for j in range(self._moved_from, count):
                self.move(j, j)
            self._moved_from = self.slots
        return failed

    def _describe(self, message: int) -> str:
        return str(self.address(self._slot_of(message)))

    def _slot_of(self, message: int) -> int:
        name = self._send_words[message * _MSG_QWORDS + _NAME_QWORD]
        return (name - self._names_at) // _NAME

    def address(self, slot: int) -> Any:
        """The sender of ``slot`` as ``recvfrom`` gives it (``sockaddr_tuple``)."""
        return sockaddr_tuple(self.sock.family, self.names[slot * _NAME : slot * _NAME + 28])

    def sockaddr(self, slot: int) -> bytes:
        """The sender of ``slot`` as the kernel wrote it, for ``ReplyQueue.sendto``."""
        return self.names[slot * _NAME : slot * _NAME + self.namelen]  # type: ignore[no-any-return]


class ReplyQueue:
    """Replies to clients of one listening socket that leave a ``UdpBatch`` (misses answered
    when the upstream does, refusals, errors): staged with ``sendto(reply, sockaddr)`` and
    sent together by one ``sendmmsg`` at the end of the loop's turn, or when ``slots`` wait.

    ``sendto`` has a socket's signature with the client's address as raw sockaddr bytes
    (``UdpBatch.sockaddr``): a waiter keeps those and the reply is queued with no address
    conversion either way. A reply larger than ``size`` goes out on its own at once."""

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        slots: int = 64,
        size: int = 4096,
    ) -> None:
        self.sock, self.loop = sock, loop
        self.fd = sock.fileno()
        self.slots, self.size = slots, size
        self.namelen = _namelen(sock)
        self.waiting = 0
        self._buf = (ctypes.c_char * (slots * size))()
        self._view = memoryview(self._buf).cast("B")
        self._names: Any = (ctypes.c_char * (slots * _NAME))()  # Any: see UdpBatch.buf
        self._name_view = memoryview(self._names).cast("B")
        self._iov = (_Iovec * slots)()
        self._msgs = (_Mmsghdr * slots)()
        _point(self._msgs, self._iov, self._buf, self._names, size, self.namelen)
        self._lengths = memoryview(self._iov).cast("B").cast("Q")
        self._msgs_at = ctypes.addressof(self._msgs)

    def sendto(self, reply: bytes, sockaddr: bytes) -> None:
        n = self.waiting
        if len(reply) > self.size:
            self.sock.sendto(reply, sockaddr_tuple(self.sock.family, sockaddr))
            return
        at = n * self.size
        self._view[at : at + len(reply)] = reply
        self._name_view[n * _NAME : n * _NAME + len(sockaddr)] = sockaddr
        self._lengths[2 * n + 1] = len(reply)
        self.waiting = n + 1
        if n + 1 == self.slots:
            self.flush()
        elif n == 0:
            self.loop.call_soon(self.flush)

    def flush(self) -> int:
        """Send what waits; returns how many could not be sent (each logged)."""
        count, self.waiting = self.waiting, 0
        if not count:
            return 0
        return _send_messages(self.fd, self._msgs_at, count, self._describe)

    def _describe(self, message: int) -> str:
        raw = self._names[message * _NAME : message * _NAME + self.namelen]
        return str(sockaddr_tuple(self.sock.family, raw))


def sockaddr_tuple(family: int, raw: bytes) -> Any:
    """A sockaddr as ``recvfrom`` gives it: ``(host, port)`` for IPv4, ``(host, port,
    flowinfo, scope_id)`` for IPv6."""
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    flowinfo = int.from_bytes(raw[4:8], "big")
    scope_id = int.from_bytes(raw[24:28], sys.byteorder)
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flowinfo, scope_id


def _namelen(sock: socket.socket) -> int:
    if sock.family == socket.AF_INET:
        return 16
    if sock.family == socket.AF_INET6:
        return 28
    raise ValueError(f"UDP batches need an IPv4 or IPv6 socket, not {sock.family!r}")


def _point(msgs: Any, iovs: Any, buf: Any, names: Any, size: int, namelen: int) -> None:
    """Message ``i``: one iovec on region ``i`` of ``buf``, address in store ``i`` of ``names``."""
    buf_at, names_at, iov_at = (
        ctypes.addressof(buf),
        ctypes.addressof(names),
        ctypes.addressof(iovs),
    )
    for i in range(len(msgs)):
        iovs[i].base = buf_at + i * size
        iovs[i].len = size
        hdr = msgs[i].hdr
        hdr.name = names_at + i * _NAME
        hdr.namelen = namelen
        hdr.iov = iov_at + i * ctypes.sizeof(_Iovec)
        hdr.iovlen = 1


def _send_messages(fd: int, msgs_at: int, count: int, describe: Callable[[int], str]) -> int:
    """``sendmmsg`` messages ``0 .. count-1`` of the array at ``msgs_at``; returns how many
    failed. It stops at the first message that fails and reports only what it sent before;
    the failed one is then tried alone, to learn its error, and skipped."""
    failed = 0
    done = 0
    while done < count:
        first = ctypes.c_void_p(msgs_at + done * _MSG)
        sent: int = _sendmmsg(fd, first, count - done, 0)
        if sent > 0:
            done += sent
            continue
        err = ctypes.get_errno()
        if sent < 0 and err == errno.EINTR:
            continue
        log.debug("sendmmsg to %s: %s", describe(done), os.strerror(err))
        failed += 1
        done += 1
    return failed
