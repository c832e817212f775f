"""Progress lines for the demo: ``[n/N] what ... done (1.23 s)`` and the facts below them.

A long step reports its count as it goes: rewritten in place on a terminal, as
quarter marks (`` 25% 50% ...``) in a log, so a piped ``make demo`` shows progress too.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class DemoError(RuntimeError):
    """A step failed; the message says which and why (the demo prints it, then cleans up)."""


class Step:
    def __init__(self, progress: Progress, head: str) -> None:
        self._progress = progress
        self._head = head
        self._notes: list[str] = []
        self._marks_shown = 0
        self._live = False
        # Rewritten in place only on a terminal wide enough for the head and a count: a
        # line that wrapped cannot be rewritten with a carriage return.
        self._width = shutil.get_terminal_size().columns - 1
        self._rewrite_ok = progress.tty and len(head) + 16 <= self._width

    def count(self, done: int, total: int, detail: str = "") -> None:
        """``done`` of ``total`` items finished."""
        out = self._progress.out
        if self._rewrite_ok:
            self._rewrite(f"{done}/{total}" + (f" ({detail})" if detail else ""))
        else:
            quarter = done * 4 // max(total, 1)
            while self._marks_shown < quarter:
                self._marks_shown += 1
                out.write(f" {self._marks_shown * 25}%")
        out.flush()

    def live(self, detail: str) -> None:
        """What the step waits on now; shown on a terminal only."""
        if self._rewrite_ok:
            self._rewrite(detail)
            self._progress.out.flush()

    def _rewrite(self, live: str) -> None:
        """The step's line again, ending in ``live``, cut to the terminal's width."""
        line = f"{self._head} {live}"
        if len(line) > self._width:
            line = line[: self._width - 3] + "..."
        self._progress.out.write(f"\r\033[K{line}")
        self._live = True

    def note(self, line: str) -> None:
        """A fact printed under the step's line once it is done."""
        self._notes.append(line)

    def _finish(self, outcome: str) -> None:
        out = self._progress.out
        if self._live:  # back to the head alone
            out.write(f"\r\033[K{self._head}")
        out.write(f" {outcome}\n")
        for line in self._notes:
            out.write(f"      {line}\n")
        out.flush()


class Progress:
    def __init__(self, total: int, out: TextIO | None = None, fail_at: str | None = None) -> None:
        self.total = total
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.fail_at = fail_at
        self.number = 0
        self.started = time.perf_counter()

    @contextmanager
    def step(self, key: str, text: str) -> Iterator[Step]:
        """One numbered step; ``key`` names it for ``--fail-at``."""
        self.number += 1
        step = Step(self, f"[{self.number}/{self.total}] {text} ...")
        self.out.write(step._head)
        self.out.flush()
        begun = time.perf_counter()
        try:
            if key == self.fail_at:
                raise DemoError(f"failing on purpose at step {key!r} (--fail-at)")
            yield step
        except BaseException as err:
            what = "interrupted" if isinstance(err, KeyboardInterrupt) else "FAILED"
            step._finish(f"{what} ({time.perf_counter() - begun:.2f} s)")
            raise
        step._finish(f"done ({time.perf_counter() - begun:.2f} s)")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
