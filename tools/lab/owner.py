"""Who owns a lab namespace: a machine-wide mark per ``ul-*`` namespace.

Labs, tests and benchmarks may each keep their records under a state root of their own
(``ULTRANET_LAB_STATE``), so no state root knows every namespace on the machine. Each
namespace made through ``tools.lab.netns.create`` therefore gets a mark in one fixed
directory, whatever the state root: the process that made it (pid and start time, so a
reused pid is told apart) and the state root it was made under. The mark is written
before the namespace exists and removed after it is gone, so a ``ul-*`` namespace without
one was made by something else (by hand, or by code before the marks), and nothing proves
it dead.

A clean-up removes a namespace only when its mark names a process that is gone (what a
killed lab left), or, for a lab closing, its own; a namespace whose owner lives stays.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("ultranet.lab")

# Machine-wide on purpose: not under ULTRANET_LAB_STATE, which differs between labs.
MARKS_DIR = Path("/run/ultranet-lab-netns")


def _process_stat(pid: int) -> tuple[str, str]:
    """(state, start time) of a process; the start time tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ("", "")
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], fields[19]


def process_start(pid: int) -> str:
    return _process_stat(pid)[1]


def process_running(pid: int, start: str | None = None) -> bool:
    """True unless the process is gone, a zombie, or a different process with its pid."""
    state, started = _process_stat(pid)
    return state not in ("", "Z", "X") and (start is None or started == start)


@dataclass(frozen=True, slots=True)
class Owner:
    pid: int
    pid_start: str
    state_root: str = ""  # where its lab record is, if it has one ("" for a test's own)

    @classmethod
    def this_process(cls, state_root: Path | None = None) -> Owner:
        pid = os.getpid()
        return cls(pid, process_start(pid), "" if state_root is None else str(state_root))

    def alive(self) -> bool:
        return self.pid_start != "" and process_running(self.pid, self.pid_start)

    def is_this_process(self) -> bool:
        return self.pid == os.getpid() and self.pid_start == process_start(self.pid)


def _path(namespace: str) -> Path:
    return MARKS_DIR / f"{namespace}.json"


def mark(namespace: str, owner: Owner) -> None:
    MARKS_DIR.mkdir(parents=True, exist_ok=True)
    path = _path(namespace)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(owner)))
    tmp.replace(path)


def unmark(namespace: str) -> None:
    _path(namespace).unlink(missing_ok=True)


def owner_of(namespace: str) -> Owner | None:
    """The mark of ``namespace``; None if it has none (or one that cannot be read, which
    is logged: an unreadable mark proves nothing, so the namespace is kept)."""
    try:
        text = _path(namespace).read_text()
    except FileNotFoundError:
        return None
    try:
        return Owner(**json.loads(text))
    except (ValueError, TypeError) as err:
        log.warning("lab: unreadable owner mark of %s (%s): kept", namespace, err)
        return None


def marked() -> list[str]:
    """Names of every namespace with a mark (present or not)."""
    if not MARKS_DIR.is_dir():
        return []
    return sorted(p.name.removesuffix(".json") for p in MARKS_DIR.glob("*.json"))


def provably_dead(namespace: str) -> bool:
    """Its mark names a process that is gone."""
    owner = owner_of(namespace)
    return owner is not None and not owner.alive()


def held_by_another(namespace: str) -> bool:
    """Its mark names a live process other than this one."""
    owner = owner_of(namespace)
    return owner is not None and owner.alive() and not owner.is_this_process()
