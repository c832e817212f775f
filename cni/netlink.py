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
* :class:`LinkReaper` deletes links on worker threads, in batches. Deleting a veth blocks
  in the kernel for 15-25 ms (``unregister_netdevice_many`` waits for RCU grace periods
  under the rtnl lock, ``netdev_run_todo`` for the device's references) inside
  ``sendmsg``; issued from the event loop that would stall every other request. One
  request per link also queues on that lock, so four threads could not keep up with a
  burst of DELs handing them two veths each (IPv6 pods). A thread puts every name
  queued by then in its own device group (``IFLA_GROUP``, one message per link, no
  wait) and deletes the group with one ``RTM_DELLINK``: the kernel unregisters the batch
  together and waits once (``tools/bench/cni/reaper.py`` times both ways). Its backlog is
  bounded (``max_pending``): past it, callers wait for room.
* :func:`write_sysctls` writes ``/proc/sys`` keys in a namespace given by path, from a
  thread that entered it once and stays (``/proc/sys/net`` shows the namespace of the
  thread that opens a key).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import logging
import os
import queue
import secrets
import socket
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
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
_RTM_NEWLINK = 16
_RTM_DELLINK = 17
_NLMSG_ERROR = 2
_NLM_F_REQUEST_ACK = 0x1 | 0x4
_IFLA_IFNAME = 3
_IFLA_GROUP = 27
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


def _attribute(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _link_request(
    kind: int, seq: int, *, name: str | None = None, group: int | None = None
) -> bytes:
    attrs = b""
    if name is not None:
        attrs += _attribute(_IFLA_IFNAME, name.encode() + b"\0")
    if group is not None:
        attrs += _attribute(_IFLA_GROUP, struct.pack("=I", group))
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0) + attrs
    header = struct.pack("=IHHII", 16 + len(body), kind, _NLM_F_REQUEST_ACK, seq, 0)
    return header + body


def _answers(sock: socket.socket, seqs: Sequence[int]) -> list[int]:
    """The kernel's answer to each request of ``seqs``: 0, or the errno."""
    waiting = set(seqs)
    codes: dict[int, int] = {}
    while waiting:
        reply = sock.recv(65536)
        offset = 0
        while offset + 16 <= len(reply):
            length, kind, _, got_seq, _ = struct.unpack_from("=IHHII", reply, offset)
            if kind == _NLMSG_ERROR and got_seq in waiting:
                (code,) = struct.unpack_from("=i", reply, offset + 16)
                codes[got_seq] = -int(code)
                waiting.discard(got_seq)
            offset += max(length, 16)
    return [codes[seq] for seq in seqs]


def delete_link(sock: socket.socket, name: str, seq: int = 1) -> int:
    """RTM_DELLINK by name on a raw socket: 0, or the errno (ENODEV: already gone)."""
    sock.sendto(_link_request(_RTM_DELLINK, seq, name=name), (0, 0))
    (code,) = _answers(sock, [seq])
    return code


# The kernel queues its answers to one send on our socket before we read any: 400 of
# them overflowed the default 212 KiB receive buffer (ENOBUFS, answers lost).
_MARKS_PER_SEND = 64


def mark_links(sock: socket.socket, names: Sequence[str], group: int, first_seq: int) -> list[int]:
    """Put each link of ``names`` in device group ``group`` (RTM_NEWLINK by name with
    IFLA_GROUP; up to 64 in one send, the kernel answers each): 0 or the errno, per name."""
    codes: list[int] = []
    for start in range(0, len(names), _MARKS_PER_SEND):
        chunk = names[start : start + _MARKS_PER_SEND]
        seqs = [first_seq + start + i for i in range(len(chunk))]
        sock.sendto(
            b"".join(
                _link_request(_RTM_NEWLINK, seq, name=name, group=group)
                for seq, name in zip(seqs, chunk, strict=True)
            ),
            (0, 0),
        )
        codes += _answers(sock, seqs)
    return codes


def delete_group(sock: socket.socket, group: int, seq: int) -> int:
    """RTM_DELLINK of every link in device group ``group``, unregistered together: 0, or
    the errno. The kernel deletes none if one of them cannot be deleted (EOPNOTSUPP: an
    ENI, a loopback) and answers ENODEV if the group is empty."""
    sock.sendto(_link_request(_RTM_DELLINK, seq, group=group), (0, 0))
    (code,) = _answers(sock, [seq])
    return code


def private_group() -> int:
    """A device group for one reaper: drawn at random from 2^30 values, so no other
    program's group (small numbers, by hand or by config) is likely to be it."""
    return (1 << 30) + secrets.randbelow(1 << 30)


_Unit = list[tuple[str, "Future[int]"]]


@dataclass(slots=True)
class _Lane:
    """One reaper thread's own: its socket in the host namespace, its device group, and
    the sequence numbers of its requests."""

    socket: socket.socket
    group: int
    seq: int = 0

    def next_seqs(self, count: int) -> int:
        first = self.seq + 1
        if first + count > 0x7FFFFFFF:
            first = 1
        self.seq = first + count - 1
        return first


class LinkReaper:
    """Deletes links by name on ``workers`` threads, each with its own socket in the host
    namespace and its own device group (:func:`private_group`), in batches: a thread
    takes every name queued when it gets to it, puts those links in its group and
    deletes the group in one request. An idle thread takes a lone DEL's veths at once
    (as one thread per veth did); in a burst each batch grows instead of the queue. A
    link in one of those groups is one the reaper is deleting: a crash between the two
    steps leaves our veths in it, which the next start's sweep deletes as it deletes
    any other of ours (``Plumbing.reap_strays``); the next daemon draws other groups.

    ``delete`` and ``delete_all`` return awaitables; the names of one ``delete_all`` go
    in one batch. ``pending`` tells whether a name is still being deleted (an ADD
    reusing the name waits for it). Callers that may come in bursts (DEL) first
    ``await reserve(n)``, which returns once ``n`` more deletions fit under
    ``max_pending``: the backlog, and what it holds alive in the kernel, stays bounded,
    and a burst slows to the reaper's pace instead. A batch takes whole calls up to
    ``max_batch`` names (one call larger than that goes alone), so one request holds the
    kernel's rtnl lock, which every ADD's veth creation needs, for a bounded time."""

    def __init__(
        self,
        host_netns: str | None,
        *,
        workers: int = 4,
        max_pending: int = 256,
        max_batch: int = 64,
    ) -> None:
        groups: set[int] = set()
        while len(groups) < workers:
            groups.add(private_group())
        self.groups = sorted(groups)
        lanes: list[_Lane] = []
        try:
            for group in self.groups:
                lanes.append(_Lane(socket_in(host_netns), group))
        except BaseException:
            for lane in lanes:
                lane.socket.close()
            raise
        self._lanes = lanes
        self._queue: queue.SimpleQueue[_Unit | None] = queue.SimpleQueue()
        self._pending: dict[str, asyncio.Future[int]] = {}
        self.max_pending = max_pending
        self.max_batch = max_batch
        self._threads = [
            threading.Thread(target=self._serve, args=(lane,), name="link-reaper", daemon=True)
            for lane in lanes
        ]
        for thread in self._threads:
            thread.start()

    async def reserve(self, count: int) -> None:
        """Wait until ``count`` more deletions fit (one batch larger than the bound fits
        once nothing else is pending). Nothing may await between this and ``delete``."""
        while self._pending and len(self._pending) + count > self.max_pending:
            await asyncio.wait(list(self._pending.values()), return_when=asyncio.FIRST_COMPLETED)

    def pending(self, name: str) -> asyncio.Future[int] | None:
        return self._pending.get(name)

    def delete(self, name: str) -> asyncio.Future[int]:
        (future,) = self.delete_all([name])
        return future

    def delete_all(self, names: Sequence[str]) -> list[asyncio.Future[int]]:
        """Queue the deletion of ``names``, together; one awaitable per name (0, or
        ENODEV: it was gone already)."""
        futures = []
        unit: _Unit = []
        for name in names:
            existing = self._pending.get(name)
            if existing is not None:
                futures.append(existing)
                continue
            done: Future[int] = Future()
            future = asyncio.wrap_future(done)
            self._pending[name] = future
            future.add_done_callback(functools.partial(self._forget, name))
            unit.append((name, done))
            futures.append(future)
        if unit:
            self._queue.put(unit)
        return futures

    def _forget(self, name: str, future: asyncio.Future[int]) -> None:
        if self._pending.get(name) is future:
            del self._pending[name]
        if not future.cancelled() and future.exception() is not None:
            # Whoever awaits it sees the error too; one that did not (a DEL already
            # answered) leaves the link to the next start's sweep (Plumbing.reap_strays).
            log.error("cni: %s", future.exception())

    def _serve(self, lane: _Lane) -> None:
        closing = False
        while not closing:
            unit = self._queue.get()
            if unit is None:
                return
            batch = list(unit)
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                    break
                batch += more
            self._reap(lane, batch)

    def _reap(self, lane: _Lane, batch: _Unit) -> None:
        # A deletion cancelled before it ran is not done: its name may be in use again.
        live = [(name, done) for name, done in batch if done.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            codes = self._delete_batch(lane, [name for name, _ in live])
        except Exception as err:  # not only OSError: a thread must outlive a bug
            for _, done in live:
                done.set_exception(err)
            return
        for (name, done), code in zip(live, codes, strict=True):
            if code in (0, errno.ENODEV):
                done.set_result(code)
            else:
                done.set_exception(OSError(code, f"delete link {name}: {os.strerror(code)}"))

    def _delete_batch(self, lane: _Lane, names: list[str]) -> list[int]:
        first = lane.next_seqs(len(names) + 1)
        codes = mark_links(lane.socket, names, lane.group, first)
        marked = [name for name, code in zip(names, codes, strict=True) if code == 0]
        pause_point("reaper-before-delete")
        if not marked:
            return codes
        code = delete_group(lane.socket, lane.group, first + len(names))
        if code == 0:
            return codes
        if code == errno.ENODEV:  # every one went meanwhile (with its pod's namespace)
            return [errno.ENODEV if c == 0 else c for c in codes]
        # Something in our group the kernel cannot delete (another program chose the same
        # group for an ENI?): it stays; ours go one request each.
        log.warning(
            "cni: deleting device group %d failed (%s); deleting its %d veth(s) one by one",
            lane.group,
            os.strerror(code),
            len(marked),
        )
        return [
            delete_link(lane.socket, name, lane.next_seqs(1)) if c == 0 else c
            for name, c in zip(names, codes, strict=True)
        ]

    async def settle(self) -> None:
        """Wait until every deletion submitted so far is done (errors are the callers')."""
        while self._pending:
            await asyncio.wait(list(self._pending.values()))

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self.close_sockets()

    def close_sockets(self) -> None:
        for lane in self._lanes:
            lane.socket.close()
