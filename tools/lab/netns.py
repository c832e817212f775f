"""Network-namespace primitives for the lab: create, delete, list, and work inside.

Every namespace the lab makes is named ``ul-<lab id>-<role>`` and marked with the process
that made it (``tools.lab.owner``), so that what a killed process left can be found and
removed by the next start, and nothing a live process holds is. Work that must happen
inside a namespace (a socket created there, a ``/proc/sys/net`` write) runs on a
throwaway thread that enters it (``run_in``): the network namespace is per thread
(containernetworking ``pkg/ns`` README), a socket stays in the namespace it was created
in, and ``/proc/sys/net`` shows the namespace of the thread that opens it. The caller's
thread never switches, and no ``ip netns exec`` process is needed.

Netlink goes through pyroute2 ``IPRoute`` objects on sockets made that way, not
``IPRoute(netns=...)``, which forks a helper process per socket (~12 ms). An
``IPRoute`` still costs ~5 ms to open and pyroute2 0.9 keeps its socket and event loop
per thread (one used from another thread quietly opens another), so ``Netlink`` keeps
one open per namespace for a lab's life, owned by one worker thread that runs every
call: about 1 ms a request instead of 12 ms or more.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import queue
import secrets
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from tools.lab import owner

log = logging.getLogger("ultranet.lab")

NETNS_DIR = Path("/run/netns")
PREFIX = "ul-"
_CLONE_NEWNET = 0x40000000
_NETLINK_ROUTE = 0

T = TypeVar("T")


class NetnsError(RuntimeError):
    """A namespace operation failed; the message names the namespace."""


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def create(name: str, *, state_root: Path | None = None) -> None:
    """Make namespace ``name``, marked as this process's (``state_root``: where its lab
    record is, if any). The mark comes first, so no other lab's clean-up ever sees the
    namespace without it."""
    if exists(name):
        raise NetnsError(f"network namespace {name} already exists")
    owner.mark(name, owner.Owner.this_process(state_root))
    try:
        pyroute2_netns.create(name)
    except BaseException:
        owner.unmark(name)
        raise


def delete(name: str) -> None:
    """Remove a namespace and its mark; an absent one is not an error (teardown is
    idempotent)."""
    if exists(name):
        try:
            pyroute2_netns.remove(name)
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise NetnsError(f"cannot remove network namespace {name}: {err}") from err
    owner.unmark(name)


@contextmanager
def scratch(tag: str) -> Iterator[str]:
    """A namespace ``ul-<tag>-<8 hex>`` of this process's for the block (a test's, marked
    like a lab's so no lab's clean-up takes it), removed after it even if the block fails."""
    name = f"{PREFIX}{tag}-{secrets.token_hex(4)}"
    create(name)
    try:
        yield name
    finally:
        delete(name)


def prune_marks() -> list[str]:
    """Drop the marks of namespaces that are gone and whose owner is gone too (a process
    killed between deleting a namespace and its mark). A live owner's mark stays: it may
    be about to create its namespace."""
    pruned = [n for n in owner.marked() if not exists(n) and owner.provably_dead(n)]
    for name in pruned:
        owner.unmark(name)
    return pruned


def list_lab_namespaces() -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(PREFIX))


def _setns(name: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns({name}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in(name: str, work: Callable[[], T]) -> T:
    """``work()`` on a throwaway thread inside namespace ``name``: its result, or its error."""
    result: list[T] = []
    failure: list[BaseException] = []

    def enter_and_run() -> None:
        try:
            _setns(name)
            result.append(work())
        except BaseException as err:  # handed to the caller's thread
            failure.append(err)

    thread = threading.Thread(target=enter_and_run, name=f"netns-{name}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def listening_socket(name: str, host: str, port: int) -> socket.socket:
    """A TCP socket bound and listening on ``host:port`` inside namespace ``name``
    (IPv4, or IPv6 when ``host`` is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def bind() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock

    try:
        return run_in(name, bind)
    except (OSError, NetnsError) as err:
        raise NetnsError(f"cannot listen on {host}:{port} in {name}: {err}") from err


def sysctl(name: str, key: str, value: str) -> None:
    """Set a ``net.*`` sysctl of namespace ``name`` (``sysctl -w key=value`` inside it)."""
    path = Path("/proc/sys", *key.split("."))

    def write() -> None:
        path.write_text(f"{value}\n")

    try:
        run_in(name, write)
    except (OSError, NetnsError) as err:
        raise NetnsError(f"cannot set {key}={value} in {name}: {err}") from err


def iproute(name: str) -> IPRoute:
    """A pyroute2 ``IPRoute`` on a netlink socket inside namespace ``name``.

    Use it from the thread that opened it (pyroute2 keeps its state per thread) and
    close it: an open socket keeps its namespace alive after the name is removed.
    """
    try:
        sock = run_in(
            name, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_ROUTE)
        )
    except (OSError, NetnsError) as err:
        raise NetnsError(f"cannot open a netlink socket in {name}: {err}") from err
    with sock:
        return IPRoute(fileno=os.dup(sock.fileno()))


_Work = Callable[[Mapping[str, IPRoute]], Any]


class Netlink:
    """One ``IPRoute`` per namespace, kept open and driven by one worker thread.

    ``run(work)`` calls ``work(iproutes)`` on the worker, ``iproutes`` mapping each
    namespace name to its ``IPRoute``, and returns its result or raises its error in the
    caller's thread. Any thread may call ``run``; calls run one at a time, in order.
    ``close()`` runs what was already submitted, then closes the sockets.
    """

    def __init__(self, namespaces: Iterable[str], *, name: str = "netlink") -> None:
        self._jobs: queue.SimpleQueue[tuple[_Work, Future[Any]] | None] = queue.SimpleQueue()
        self._iproutes: dict[str, IPRoute] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        wanted = list(namespaces)
        try:
            self.run(lambda _: self._open(wanted))
        except BaseException:
            self.close()
            raise

    def run(self, work: Callable[[Mapping[str, IPRoute]], T]) -> T:
        if threading.current_thread() is self._thread:
            return work(self._iproutes)  # nested call from work already on the worker
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise NetnsError("netlink worker is closed")
            self._jobs.put((work, future))
        return future.result()

    def close(self) -> None:
        """Idempotent; waits for the worker unless called from it."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _open(self, namespaces: list[str]) -> None:
        for ns in namespaces:
            self._iproutes[ns] = iproute(ns)

    def _serve(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                work, future = job
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(work(self._iproutes))
                except BaseException as err:  # handed to the caller's thread
                    future.set_exception(err)
        finally:
            for ns, ipr in self._iproutes.items():
                try:
                    ipr.close()
                except Exception:
                    log.exception("lab: closing the netlink socket of %s failed", ns)
            self._iproutes.clear()
