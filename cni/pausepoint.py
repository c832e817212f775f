"""Named pause points, so a crash test can ``kill -9`` the daemon inside a given window.

A test starts ``ultranet-ipamd`` with ``ULTRANET_PAUSE_AT=<point>[@<passes>]`` and
``ULTRANET_PAUSE_SIGNAL=<file>``. The first ``passes`` arrivals at the point go on (default
0); the next one appends ``<point>\\n`` to the file, and that arrival and every later one
block their thread for good. The test waits for the line, then kills the process: the
window is hit without sleeps and without a debugger.

Points: ``del-between-interfaces`` (the event loop, after one interface's host routing
is torn down, before the next's), ``reaper-before-delete`` (a reaper thread, a
batch of veths put in its device group, before the one request that deletes them; the
DELs have been answered or are about to be; one arrival per batch), ``snapshot-written`` and
``snapshot-renamed`` (``ipam.datastore.Journal.snapshot``: the new snapshot synced under
its temporary name; renamed, the old journal not yet emptied), ``sync-beside-add`` (a
worker thread, before it syncs the allocation of an ADD that plumbs meanwhile).

Unset, as in production, :func:`pause_point` is one membership test on an empty dict.
"""

from __future__ import annotations

import os
import threading

__all__ = ["pause_point"]


def _parse(spec: str) -> dict[str, int]:
    points = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, passes = item.partition("@")
        points[name] = int(passes or "0")
    return points


_POINTS = _parse(os.environ.get("ULTRANET_PAUSE_AT", ""))
_SIGNAL = os.environ.get("ULTRANET_PAUSE_SIGNAL", "")
_lock = threading.Lock()
_held = threading.Event()  # never set: a paused thread waits for the kill


def pause_point(name: str) -> None:
    if name not in _POINTS:
        return
    with _lock:
        passes = _POINTS[name]
        _POINTS[name] = passes - 1
        if passes > 0:
            return
        if passes == 0 and _SIGNAL:
            with open(_SIGNAL, "a", encoding="ascii") as signal_file:
                signal_file.write(name + "\n")
    _held.wait()
