"""The conditions a benchmark run was taken under, for its JSON: the code (git commit and
whether the checkout differed from it), the machine and its load. Each benchmark adds what
is its own (peers' versions, interpreters, flags)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[2]


def run(argv: list[str], cwd: Path | None = None, *, strip: bool = True) -> str:
    """A command's stdout, or ``"unavailable: <why>"`` (a missing tool is a fact to record,
    not a reason to lose the run)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=cwd)
    except (OSError, subprocess.CalledProcessError) as err:
        return f"unavailable: {err}"
    return done.stdout.strip() if strip else done.stdout


def load() -> dict[str, Any]:
    """The machine's load as ``uptime`` states it, and the load averages."""
    return {
        "uptime": run(["uptime"]),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def code() -> dict[str, Any]:
    commit = run(["git", "rev-parse", "HEAD"], CHECKOUT)
    status = run(["git", "status", "--porcelain", "--untracked-files=no"], CHECKOUT, strip=False)
    changed = [] if status.startswith("unavailable") else status.splitlines()
    return {
        "checkout": str(CHECKOUT),
        "commit": commit,
        "dirty": bool(changed),
        # Paths that differ from the commit: the figures are of the commit only if none of
        # them is code the benchmark runs.
        "dirty_paths": [line[3:] for line in changed],
    }


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "clock_ticks_per_s": os.sysconf("SC_CLK_TCK"),
    }
