"""The conditions a CNI benchmark run was taken under, for its JSON: the generic ones
(``tools.bench.conditions``: code, machine, load) and the interpreters, the peer's and the
driver's versions."""

from __future__ import annotations

import shutil
import sys
from typing import Any

from tools.bench.cni.driver import DEBIAN_PACKAGES, SOURCE, build
from tools.bench.conditions import CHECKOUT, code, load, machine, run

__all__ = ["code", "interpreter", "load", "machine", "run", "versions"]


def interpreter(path: str) -> dict[str, str]:
    version = run([path, "-c", "import sys; print(sys.version)"])
    return {"path": path, "version": version.replace("\n", " ")}


def versions() -> dict[str, Any]:
    packages = {}
    for package in DEBIAN_PACKAGES:
        packages[package] = run(["dpkg-query", "-W", "-f", "${Version}", package])
    go = shutil.which("go")
    return {
        "debian_packages": packages,
        "go": run([go, "version"]) if go else "unavailable: no go on PATH",
        "driver_source": str(SOURCE.relative_to(CHECKOUT)),
        "driver_binary": str(build()),
        "python": {"executable": sys.executable, "version": sys.version.replace("\n", " ")},
    }
