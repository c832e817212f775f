"""Build and drive ``libcni_driver.go``: libcni 1.1 (Debian's golang-github-appc-cni-dev)
running plugins as containerd, CRI-O and podman do.

The build is cached by the hash of the source and of the Go version, under
``$ULTRANET_CNI_DRIVER_CACHE`` (default ``/tmp/ultranet-cni-driver``), so a test run
builds it once (~1 s) and later runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["Driver", "DriverUnavailable", "build"]

SOURCE = Path(__file__).with_name("libcni_driver.go")
GOPATH = Path("/usr/share/gocode")
LIBCNI = GOPATH / "src/github.com/containernetworking/cni/libcni"
REFERENCE_PLUGINS = Path("/usr/lib/cni")
DEBIAN_PACKAGES = ("golang-go", "golang-github-appc-cni-dev", "containernetworking-plugins")


class DriverUnavailable(RuntimeError):
    """Go or libcni is not installed; names the Debian packages to install."""


def build() -> Path:
    go = shutil.which("go")
    if go is None or not LIBCNI.is_dir():
        raise DriverUnavailable(f"needs Debian packages: {' '.join(DEBIAN_PACKAGES)}")
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    root = Path(os.environ.get("ULTRANET_CNI_DRIVER_CACHE", "/tmp/ultranet-cni-driver"))
    binary = root / digest / "libcni_driver"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(f".tmp{os.getpid()}")
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": str(GOPATH),
        "GOCACHE": str(root / "gocache"),
        "CGO_ENABLED": "0",
    }
    subprocess.run([go, "build", "-o", str(tmp), str(SOURCE)], env=env, check=True)
    tmp.replace(binary)  # atomic: a concurrent build of the same source is harmless
    return binary


class Driver:
    """One driver process inside ``netns`` (the node: plugins act on its namespace)."""

    def __init__(
        self,
        netns: str,
        conflist: Path,
        cache_dir: Path,
        bin_dirs: list[Path],
        env: dict[str, str] | None = None,
    ) -> None:
        argv = ["ip", "netns", "exec", netns, str(build()), str(conflist), str(cache_dir)]
        argv.append(":".join(str(d) for d in bin_dirs))
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **(env or {})},
        )

    def call(
        self,
        command: str,
        container: str,
        netns: str,
        ifname: str = "eth0",
        annotations: dict[str, str] | None = None,
        *,
        removes: Sequence[str] = (),
    ) -> dict[str, Any]:
        """One libcni call: ``{"ok", "ms", "cpu_us", "result"|"error"}``; ``cpu_us`` is
        the CPU of the plugins it exec'd. ``removes`` (del only): host links of the node
        namespace this DEL should remove, timed by :meth:`gone`."""
        extra = [f"{k}={v}" for k, v in (annotations or {}).items()]
        extra += [f"+{name}" for name in removes]
        return self._ask(" ".join([command, container, netns, ifname, *extra]))

    def gone(self) -> dict[str, float]:
        """Wait until every link named in ``removes`` since the last call is gone (its
        RTM_DELLINK arrived); ms from the start of its DEL to that event, per link."""
        answer = self._ask("gone")
        if not answer["ok"]:
            raise RuntimeError(f"libcni driver: {answer['error']}")
        if answer.get("overflows"):
            # Dropped events: some removals are timed at the first look after the drop.
            raise RuntimeError(f"libcni driver lost {answer['overflows']} netlink event bursts")
        gone: dict[str, float] = answer.get("gone_ms", {})
        return gone

    def _ask(self, line: str) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        reply = self._proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"libcni driver exited ({self._proc.wait()})")
        answer: dict[str, Any] = json.loads(reply)
        return answer

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait(timeout=30)
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> Driver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
