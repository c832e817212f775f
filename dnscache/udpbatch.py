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
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import sys
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
    - ``send_lengths[2 * j + 1] = n``: message ``j`` carries ``n`` bytes.
    """

    MSG_WORDS = _MSG_WORDS
    LEN_WORD = _LEN_WORD
    NAME = _NAME

    def __init__(self, sock: socket.socket, slots: int = 64, size: int = 4096) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ValueError(f"UdpBatch needs an IPv4 or IPv6 socket, not {sock.family!r}")
        self.sock = sock
        self.fd = sock.fileno()
        self.slots, self.size = slots, size
        v4 = sock.family == socket.AF_INET
        self.ip_start, self.ip_end = (4, 8) if v4 else (8, 24)
        namelen = 16 if v4 else 28
        # Any: slicing a c_char array gives bytes, where typeshed says list.
        self.buf: Any = (ctypes.c_char * (slots * size))()
        self.view = memoryview(self.buf).cast("B")
        self.names: Any = (ctypes.c_char * (slots * _NAME))()
        self._buf_at = ctypes.addressof(self.buf)
        self._names_at = ctypes.addressof(self.names)
        self._recv_iov = (_Iovec * slots)()
        self._send_iov = (_Iovec * slots)()
        self._recv = (_Mmsghdr * slots)()
        self._send = (_Mmsghdr * slots)()
        for i in range(slots):
            self._recv_iov[i].base = self._send_iov[i].base = self._buf_at + i * size
            self._recv_iov[i].len = size
            for msgs, iov in ((self._recv, self._recv_iov), (self._send, self._send_iov)):
                hdr = msgs[i].hdr
                hdr.name = self._names_at + i * _NAME
                hdr.iov = ctypes.addressof(iov) + i * ctypes.sizeof(_Iovec)
                hdr.iovlen = 1
            self._recv[i].hdr.namelen = _NAME  # the kernel writes the real length back
            self._send[i].hdr.namelen = namelen  # fixed by the socket's family
        self.lengths = memoryview(self._recv).cast("B").cast("I")
        self.send_lengths = memoryview(self._send_iov).cast("B").cast("Q")
        self._send_iov_words = self.send_lengths
        self._send_words = memoryview(self._send).cast("B").cast("Q")
        self._recv_at = ctypes.c_void_p(ctypes.addressof(self._recv))
        self._send_at = ctypes.addressof(self._send)
        self._send_all = ctypes.c_void_p(self._send_at)
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
        self._send_iov_words[2 * message] = self._buf_at + slot * self.size
        self._send_words[message * _MSG_QWORDS + _NAME_QWORD] = self._names_at + slot * _NAME
        if message < self._moved_from:
            self._moved_from = message

    def send(self, count: int) -> int:
        """Send messages ``0 .. count-1``; returns how many could not be sent (each logged).

        ``sendmmsg`` stops at the first message that fails and reports only what it sent
        before; the failed one is then retried alone, to learn its error and skip it."""
        failed = 0
        done = 0
        while done < count:
            first = self._send_all if not done else ctypes.c_void_p(self._send_at + done * _MSG)
            sent: int = _sendmmsg(self.fd, first, count - done, 0)
            if sent > 0:
                done += sent
                continue
            err = ctypes.get_errno()
            if sent < 0 and err == errno.EINTR:
                continue
            log.debug("sendmmsg to %s: %s", self.address(self._slot_of(done)), os.strerror(err))
            failed += 1
            done += 1
        if self._moved_from < self.slots:
            for j in range(self._moved_from, count):
                self.move(j, j)
            self._moved_from = self.slots
        return failed

    def _slot_of(self, message: int) -> int:
        name = self._send_words[message * _MSG_QWORDS + _NAME_QWORD]
        return (name - self._names_at) // _NAME

    def address(self, slot: int) -> Any:
        """The sender of ``slot`` as ``recvfrom`` gives it: ``(host, port)`` for IPv4,
        ``(host, port, flowinfo, scope_id)`` for IPv6."""
        raw = self.names[slot * _NAME : slot * _NAME + 28]
        port = int.from_bytes(raw[2:4], "big")
        if self.sock.family == socket.AF_INET:
            return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
        flowinfo = int.from_bytes(raw[4:8], "big")
        scope_id = int.from_bytes(raw[24:28], sys.byteorder)
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flowinfo, scope_id
