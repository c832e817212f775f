"""Netlink sockets in other namespaces, and the one raw request pyroute2 is too slow for.

* :func:`socket_in` opens a netlink socket inside a namespace given by path
  (``CNI_NETNS`` is a path: ``/var/run/netns/x`` or ``/proc/<pid>/ns/net``). The
  namespace is per *thread* (containernetworking ``pkg/ns`` README), and a socket stays
  in the namespace it was created in, so one long-lived thread enters it, creates the
  socket and goes back; the caller's thread, the daemon's event loop, never switches.
  A thread that cannot go back exits and is replaced, so none ever serves from a pod's
  namespace. (A new thread per socket cost ~0.6-0.9 ms of each ADD, most of the
  daemon's share; ``pyroute2.IPRoute(netns=...)`` forks a helper per socket, ~12 ms.)
  :class:`PendingSocket` starts the same work and returns at once: an ADD has the
  thread make the pod's socket (~0.35 ms) while it creates the veth (~1 ms in the kernel).
* :class:`LinkReaper` deletes links on worker threads. Deleting a veth blocks in the
  kernel for 15-25 ms (``netdev_run_todo`` waits for the device's references and an RCU
  grace period) inside ``sendmsg``; issued from the event loop that would stall every
  other request, so it gets its own threads, each with a raw socket made here. Its
  backlog is bounded (``max_pending``): past it, callers wait for room.
* :func:`write_sysctls` writes ``/proc/sys`` keys in a namespace given by path, from a
  thread that entered it once and stays (``/proc/sys/net`` shows the namespace of the
  thread that opens a key).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import queue
import socket
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pyroute2 import AsyncIPRoute

from cni.pausepoint import pause_point

__all__ = [
    "LinkReaper",
    "NamespaceError",
    "PendingSocket",
    "iproute_in",
    "same_namespace",
    "socket_in",
    "write_sysctls",
]

_CLONE_NEWNET = 0x40000000
_NETLINK_ROUTE = 0
_RTM_DELLINK = 17
_NLMSG_ERROR = 2
_NLM_F_REQUEST_ACK = 0x1 | 0x4
_IFLA_IFNAME = 3
_libc: Any = None
log = logging.getLogger("ultranet.cni")


class NamespaceError(OSError):
    """A namespace path could not be entered; ``errno`` says why (ENOENT: it is gone)."""


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


_sysctl_threads: dict[str, ThreadPoolExecutor] = {}
_sysctl_lock = threading.Lock()


def _enter_for_good(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)


def _write_sysctls(values: dict[str, str]) -> None:
    for key, value in values.items():
        with open(f"/proc/sys/{key}", "w") as handle:
            handle.write(value)


def write_sysctls(netns: str | None, values: dict[str, str]) -> None:
    """Write ``/proc/sys/<key>`` values in the namespace at ``netns`` (None: this
    thread's); OSError names what failed. The thread that does it for a path entered
    that namespace once and never serves another."""
    if netns is None:
        _write_sysctls(values)
        return
    with _sysctl_lock:
        executor = _sysctl_threads.get(netns)
        if executor is None:
            executor = ThreadPoolExecutor(
                1, thread_name_prefix="netns-sysctl", initializer=_enter_for_good, initargs=(netns,)
            )
            _sysctl_threads[netns] = executor
    try:
        executor.submit(_write_sysctls, values).result()
    except RuntimeError as err:  # BrokenThreadPool: the thread could not enter ``netns``
        with _sysctl_lock:
            _sysctl_threads.pop(netns, None)
        raise OSError(errno.EINVAL, f"cannot enter {netns} to write sysctls: {err}") from err


class _Worker:
    """The thread behind :class:`_NamespaceEntry`, and how to reach it."""

    def __init__(self, lock: threading.Lock) -> None:
        self.requests: queue.SimpleQueue[tuple[int, Future[socket.socket]]] = queue.SimpleQueue()
        self.stranded = threading.Event()  # set before the answer it could not come back from
        self._lock = lock  # the entry's: no request is queued behind a stranded thread
        started: Future[None] = Future()
        threading.Thread(
            target=self._serve, args=(started,), name="netns-enter", daemon=True
        ).start()
        started.result()

    def _serve(self, started: Future[None]) -> None:
        try:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            started.set_exception(err)
            return
        started.set_result(None)
        try:
            while True:
                fd, made = self.requests.get()
                if not made.set_running_or_notify_cancel():  # nobody waits for it any more
                    os.close(fd)
                    continue
                try:
                    _setns(fd)
                except OSError as err:
                    made.set_exception(err)
                    continue
                finally:
                    os.close(fd)  # before the answer: the caller sees it closed
                try:
                    sock: socket.socket | OSError = socket.socket(
                        socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_ROUTE
                    )
                except OSError as err:
                    sock = err
                try:
                    _setns(home)
                except OSError:
                    # Stranded in a foreign namespace: never serve again. The socket made
                    # is still good (it is in the namespace asked for).
                    self._strand()
                if isinstance(sock, OSError):
                    made.set_exception(sock)
                else:
                    made.set_result(sock)
                if self.stranded.is_set():
                    return
        finally:
            os.close(home)

    def _strand(self) -> None:
        queued = []
        with self._lock:  # no begin() can queue behind this thread once the flag is set
            self.stranded.set()
            while True:
                try:
                    queued.append(self.requests.get_nowait())
                except queue.Empty:
                    break
        for fd, made in queued:  # outside the lock: their callbacks may call begin()
            os.close(fd)
            if made.set_running_or_notify_cancel():
                made.set_exception(OSError(errno.EAGAIN, "namespace thread replaced; try again"))


class _NamespaceEntry:
    """One long-lived thread that makes netlink sockets in other namespaces, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._worker: _Worker | None = None

    def begin(self, fd: int) -> Future[socket.socket]:
        """Start making a NETLINK_ROUTE socket in the namespace ``fd`` refers to. The thread
        owns ``fd`` once this returns, and closes it before it answers."""
        with self._lock:
            if self._worker is None or self._worker.stranded.is_set():
                self._worker = _Worker(self._lock)  # a stranded one has exited or will
            made: Future[socket.socket] = Future()
            self._worker.requests.put((fd, made))
        return made


_ENTRY = _NamespaceEntry()


class PendingSocket:
    """A netlink socket being made in the namespace at ``path`` by the namespace thread,
    so the caller can do other work (the ADD creates the veth) in the meantime."""

    def __init__(self, path: str, fd: int | None = None) -> None:
        """``fd``: an open descriptor of the namespace, used instead of opening ``path``
        (which then only names it in messages); the caller keeps it (a copy is used)."""
        self.path = path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if fd is None else os.dup(fd)
        except OSError as err:
            raise NamespaceError(
                err.errno, f"cannot open network namespace {path}: {err.strerror}"
            ) from err
        try:
            self._made = _ENTRY.begin(fd)
        except BaseException:
            os.close(fd)
            raise

    def result(self) -> socket.socket:
        """Wait for the socket; NamespaceError if the namespace could not be entered."""
        try:
            return self._made.result()
        except OSError as err:
            why = "not a network namespace" if err.errno == errno.EINVAL else err.strerror
            raise NamespaceError(
                err.errno, f"cannot enter network namespace {self.path}: {why}"
            ) from err

    def discard(self) -> None:
        """The socket will not be used: close it once made."""
        self._made.add_done_callback(_close_made)


def _close_made(made: Future[socket.socket]) -> None:
    if not made.cancelled() and made.exception() is None:
        made.result().close()


def socket_in(path: str | None) -> socket.socket:
    """A NETLINK_ROUTE socket in the namespace at ``path`` (None: this thread's)."""
    if path is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_ROUTE)
    return PendingSocket(path).result()


async def iproute_in(path: str | None) -> Any:
    """An ``AsyncIPRoute`` on a socket made by :func:`socket_in`, ready for requests."""
    sock = socket_in(path)
    try:
        ipr = AsyncIPRoute(fileno=sock.detach(), groups=0)
    except BaseException:
        sock.close()
        raise
    try:
        await ipr.setup_endpoint()
    except BaseException:
        ipr.close()
        raise
    return ipr


def same_namespace(path: str | int, other: str | None) -> bool:
    """Whether two namespaces, by path or open descriptor (None: this thread's), are one."""
    a = os.stat(path)
    b = os.stat(other if other is not None else "/proc/thread-self/ns/net")
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _delete_link_request(seq: int, name: str) -> bytes:
    ifname = name.encode() + b"\0"
    attr_len = 4 + len(ifname)
    attr = struct.pack("=HH", attr_len, _IFLA_IFNAME) + ifname + b"\0" * (-attr_len % 4)
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0) + attr
    header = struct.pack("=IHHII", 16 + len(body), _RTM_DELLINK, _NLM_F_REQUEST_ACK, seq, 0)
    return header + body


def delete_link(sock: socket.socket, name: str, seq: int = 1) -> int:
    """RTM_DELLINK by name on a raw socket: 0, or the errno (ENODEV: already gone)."""
    sock.sendto(_delete_link_request(seq, name), (0, 0))
    while True:
        reply = sock.recv(65536)
        offset = 0
        while offset + 16 <= len(reply):
            length, kind, _, got_seq, _ = struct.unpack_from("=IHHII", reply, offset)
            if kind == _NLMSG_ERROR and got_seq == seq:
                (code,) = struct.unpack_from("=i", reply, offset + 16)
                return -int(code)
            offset += max(length, 16)


class LinkReaper:
    """Deletes links by name on ``workers`` threads, each with its own socket in the
    host namespace. ``delete`` returns an awaitable; ``pending`` tells whether a name is
    still being deleted (an ADD reusing the name waits for it). Callers that may come in
    bursts (DEL) first ``await reserve(n)``, which returns once ``n`` more deletions fit
    under ``max_pending``: the backlog, and what it holds alive in the kernel, stays
    bounded, and a burst slows to the reaper's pace instead."""

    def __init__(self, host_netns: str | None, *, workers: int = 4, max_pending: int = 256) -> None:
        self._sockets: list[socket.socket] = []
        self._free: list[socket.socket] = []
        self._lock = threading.Lock()
        try:
            for _ in range(workers):
                self._sockets.append(socket_in(host_netns))
        except BaseException:
            self.close_sockets()
            raise
        self._free = list(self._sockets)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="link-reaper")
        self._pending: dict[str, asyncio.Future[int]] = {}
        self._seq = 0
        self.max_pending = max_pending

    async def reserve(self, count: int) -> None:
        """Wait until ``count`` more deletions fit (one batch larger than the bound fits
        once nothing else is pending). Nothing may await between this and ``delete``."""
        while self._pending and len(self._pending) + count > self.max_pending:
            await asyncio.wait(list(self._pending.values()), return_when=asyncio.FIRST_COMPLETED)

    def pending(self, name: str) -> asyncio.Future[int] | None:
        return self._pending.get(name)

    def delete(self, name: str) -> asyncio.Future[int]:
        existing = self._pending.get(name)
        if existing is not None:
            return existing
        done: Future[int] = self._pool.submit(self._delete, name)
        future = asyncio.wrap_future(done)
        self._pending[name] = future
        future.add_done_callback(lambda _: self._forget(name, future))
        return future

    def _forget(self, name: str, future: asyncio.Future[int]) -> None:
        if self._pending.get(name) is future:
            del self._pending[name]
        if not future.cancelled() and future.exception() is not None:
            # Whoever awaits it sees the error too; one that did not (a DEL already
            # answered) leaves the link to the next start's sweep (Plumbing.reap_strays).
            log.error("cni: %s", future.exception())

    def _delete(self, name: str) -> int:
        pause_point("reaper-before-delete")
        with self._lock:
            sock = self._free.pop()
            self._seq += 1
            seq = self._seq
        try:
            code = delete_link(sock, name, seq)
        finally:
            with self._lock:
                self._free.append(sock)
        if code not in (0, errno.ENODEV):
            raise OSError(code, f"delete link {name}: {os.strerror(code)}")
        return code

    async def settle(self) -> None:
        """Wait until every deletion submitted so far is done (errors are the callers')."""
        while self._pending:
            await asyncio.wait(list(self._pending.values()))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.close_sockets()

    def close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
