"""The worker's event loop: asyncio for everything, with the UDP hot path served from epoll.

``FastSelector`` is the epoll selector of the worker's ``asyncio.SelectorEventLoop``. Besides
the usual asyncio registrations it holds two kinds of descriptor that it serves itself, from
inside ``select``: *fast* ones (the listening UDP sockets), each with its own callback, and
*watched* ones (upstream UDP sockets), all handed to one callback with their fd. Their events
come back from the same ``epoll_wait`` as asyncio's own, and their callbacks run at once:
no ``Handle`` per event, no second pass of the loop, no nested epoll set (the previous
design: one more ``epoll_wait`` per wake-up). TCP, timers, the control channel and health
probes stay ordinary asyncio. Measured on a miss load, see the README (Benchmarks).

Closing a watched socket removes it from the epoll set (the kernel does it when the last
descriptor of the socket closes), so the exchanger only ever registers.

``NestedPoller`` gives the same ``watch`` interface on any other loop (uvloop, or a test's
default loop): its own epoll set, itself one reader of the loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import select
import selectors
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("ultranet.dns")
MAX_EVENTS = 512
FdCallback = Callable[[int], None]


class Poller(Protocol):
    """Where the exchanger registers its upstream sockets (readable → ``callback(fd)``)."""

    def watch(self, fd: int) -> None: ...

    def close(self) -> None: ...


class FastSelector(selectors.EpollSelector):
    def __init__(self) -> None:
        super().__init__()
        self._epoll: select.epoll = self._selector  # type: ignore[attr-defined]
        # The base class's fd -> key dict (updated in place by register/unregister).
        self._keys: dict[int, selectors.SelectorKey] = self._fd_to_key  # type: ignore[attr-defined]
        self._fast: dict[int, tuple[Callable[[Any], object], Any]] = {}
        self._watched: FdCallback | None = None

    def add_fast(self, fd: int, callback: Callable[[Any], object], arg: Any) -> None:
        """Serve ``fd`` from ``select``: ``callback(arg)`` whenever it is readable."""
        self._fast[fd] = (callback, arg)
        self._epoll.register(fd, select.EPOLLIN)

    def remove_fast(self, fd: int) -> None:
        if self._fast.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def poller(self, callback: FdCallback) -> _SelectorPoller:
        """The exchanger's ``Poller``: watched fds go to ``callback(fd)`` (one per loop)."""
        self._watched = callback
        return _SelectorPoller(self)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            wait = -1.0
        elif timeout <= 0:
            wait = 0.0
        else:  # epoll_wait counts milliseconds: round up, to wait at least ``timeout``
            wait = math.ceil(timeout * 1e3) * 1e-3
        ready: list[tuple[selectors.SelectorKey, int]] = []
        try:
            events = self._epoll.poll(wait, MAX_EVENTS)
        except InterruptedError:
            return ready
        fast, keys, watched = self._fast, self._keys, self._watched
        for fd, event in events:
            try:
                found = fast.get(fd)
                if found is not None:
                    found[0](found[1])
                    continue
                key = keys.get(fd)
                if key is None:
                    if watched is not None:
                        watched(fd)
                    continue
            except Exception:  # the callbacks catch their own; this keeps the loop alive
                log.exception("fast-path callback failed")
                continue
            mask = (selectors.EVENT_WRITE if event & ~select.EPOLLIN else 0) | (
                selectors.EVENT_READ if event & ~select.EPOLLOUT else 0
            )
            ready.append((key, mask & key.events))
        return ready

    def close(self) -> None:
        self._fast.clear()
        self._watched = None
        super().close()


class _SelectorPoller:
    def __init__(self, selector: FastSelector) -> None:
        self._register = selector._epoll.register
        self._selector = selector

    def watch(self, fd: int) -> None:
        self._register(fd, select.EPOLLIN)

    def close(self) -> None:
        self._selector._watched = None


class NestedPoller:
    """``Poller`` for loops without a ``FastSelector``: an epoll set of its own."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: FdCallback) -> None:
        self._loop = loop
        self._callback = callback
        self._epoll = select.epoll()
        loop.add_reader(self._epoll.fileno(), self._ready)

    def watch(self, fd: int) -> None:
        self._epoll.register(fd, select.EPOLLIN)

    def _ready(self) -> None:
        callback = self._callback
        for fd, _ in self._epoll.poll(0, MAX_EVENTS):
            callback(fd)

    def close(self) -> None:
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()


def new_loop(selector: FastSelector) -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop(selector)
