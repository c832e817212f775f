"""Garbage collection in a worker: the collector never walks the cache on the hot path.

CPython's full (generation 2) collection walks every tracked object. A worker's tracked objects
are mostly cache entries, so with 200K entries one full collection stalls the worker ~90 ms
(measured here), and CPython runs one each time the old generation grows by 25%: every few
seconds while a cache fills or churns. Entries hold only bytes, ints and tuples, so they are
never part of a reference cycle and the collector has nothing to find among them.

The policy: at start everything is collected and frozen (``gc.freeze``), and after every
collection of the middle generation the survivors are frozen too, so the old generation
stays empty and every automatic collection, full ones included, walks only objects younger
than the last middle-generation collection (a few thousand). Young cyclic garbage is still
collected as usual. What is frozen is out of the collector's sight, so an object frozen alive
that later becomes cyclic garbage would stay; asyncio breaks its transports' cycles on close,
and a full collection of everything (unfreeze, collect, freeze) every ``FULL_EVERY`` seconds
bounds what could remain: one pause of the old size per interval instead of one per 25% of
growth. The middle generation is collected more often than by default, so each of its
collections (hence each freeze) covers fewer objects and pauses less.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

FULL_EVERY = 600.0
THRESHOLD0 = 700  # CPython's default: young collections stay ~0.1 ms
THRESHOLD1 = 2  # middle collections every 2 young ones (default 10): ~0.3 ms, not 1-2 ms


class GcPolicy:
    def __init__(self, loop: asyncio.AbstractEventLoop, full_every: float = FULL_EVERY) -> None:
        self.loop = loop
        self.full_every = full_every
        self.full_collections = 0
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        _, _, t2 = gc.get_threshold()
        gc.set_threshold(THRESHOLD0, THRESHOLD1, t2)
        gc.collect()
        gc.freeze()
        gc.callbacks.append(self._on_gc)
        self._timer = self.loop.call_later(self.full_every, self.full)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info["generation"] >= 1:
            gc.freeze()  # the survivors: the old generation stays empty

    def full(self) -> None:
        gc.unfreeze()
        gc.collect()  # its callback freezes what is left
        self.full_collections += 1
        self._timer = self.loop.call_later(self.full_every, self.full)

    def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
