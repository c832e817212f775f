"""``ultranet-ipamd`` as a real process inside a lab's node namespace.

It finds IMDS at 169.254.169.254 and EC2 at 127.0.0.1:8773 there, as on an instance
whose VPC has an EC2 endpoint; its socket and journal live in a directory of the
caller's. Used by the daemon's tests, the benchmark and the demo.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from cni.transport import call
from ipam.client import AsyncIpamClient, IpamClientError
from tools.lab.lab import NODE_EC2_PORT, Lab


class IpamdProcess:
    def __init__(self, lab: Lab, state_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.lab = lab
        self.state_dir = state_dir
        self.socket = state_dir / "ipamd.sock"
        self.env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.state_dir / "ipamd.log"

    def environment(self) -> dict[str, str]:
        """The daemon's whole environment: the lab's endpoints and paths, then ``env``."""
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "ULTRANET_SOCKET": str(self.socket),
            # Never the host's /run/ultranet/cni.sock: a real node's daemon may be serving it.
            "ULTRANET_CNI_SOCKET": str(self.cni_socket),
            "ULTRANET_STATE_DIR": str(self.state_dir / "state"),
            "ULTRANET_EC2_ENDPOINT": f"http://127.0.0.1:{NODE_EC2_PORT}",
            "ULTRANET_METRICS_ADDR": "127.0.0.1:0",
            "ULTRANET_INTROSPECTION_ADDR": "127.0.0.1:0",
            "AWS_ACCESS_KEY_ID": "lab",
            "AWS_SECRET_ACCESS_KEY": "lab",
            "AWS_EC2_METADATA_DISABLED": "true",
            **self.env,
        }

    def effective_config(self) -> dict[str, object]:
        """What ``ultranet-ipamd --check-config`` prints with this environment: each knob's
        value in force and its source (a benchmark records it)."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.lab.node_ns, sys.executable, "-m", "ipam.cli"]
            + ["--check-config"],
            env=self.environment(),
            capture_output=True,
            text=True,
            check=True,
        )
        config: dict[str, object] = json.loads(done.stdout)
        return config

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = self.environment()
        if self._log is not None:
            self._log.close()  # a restart after kill(): same log, new handle
        self._log = open(self.log_path, "ab")
        self.started_at = time.monotonic()
        # The real interpreter, not a version manager's shim: exec time is what is measured.
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.lab.node_ns, sys.executable, "-m", "ipam.cli"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
        )

    @property
    def cni_socket(self) -> Path:
        return self.state_dir / "cni.sock"

    def wait_cni_socket(self, timeout: float = 30.0) -> Path:
        """Block until the CNI socket answers (ipamd serves it after ``ready``, once its
        plumbing is open and spooled DELs are replayed; a killed daemon's socket file may
        still be there, so only an answer counts); returns its path."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while not self._cni_answers():
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ultranet-ipamd exited {self.process.returncode}: {self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"no CNI socket in {timeout} s: {self.log_tail()}")
            time.sleep(delay)  # polling the daemon's own bind, bounded
            delay = min(0.1, delay * 2)
        return self.cni_socket

    def _cni_answers(self) -> bool:
        probe = b'{"cniVersion": "1.1.0", "name": "lab-probe", "type": "ultranet"}'
        try:
            asyncio.run(call(self.cni_socket, {"CNI_COMMAND": "STATUS"}, probe))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        return True

    def wait_ready(self, timeout: float = 30.0) -> dict[str, object]:
        """Block until the daemon answers status with ready; returns that status."""
        return asyncio.run(self._wait_ready(timeout))

    async def _wait_ready(self, timeout: float) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ultranet-ipamd exited {self.process.returncode}: {self.log_tail()}"
                )
            if self.socket.exists():
                try:
                    async with AsyncIpamClient(self.socket) as client:
                        status = await client.status()
                    if status["ready"]:
                        return status
                except (ConnectionError, FileNotFoundError):
                    pass  # bound but not yet listening, or a previous run's socket
            if time.monotonic() > deadline:
                raise TimeoutError(f"ultranet-ipamd not ready in {timeout} s: {self.log_tail()}")
            await asyncio.sleep(delay)  # polling the daemon's own answer, bounded
            delay = min(0.1, delay * 2)

    def kill(self) -> None:
        """SIGKILL: the crash the datastore must survive."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


async def allocate_then_kill(
    daemon: IpamdProcess, keys: list[str], stop_after: int, *, connections: int = 20
) -> dict[str, str]:
    """Allocate ``keys`` over concurrent connections and SIGKILL the daemon once
    ``stop_after`` are acknowledged; returns what was acknowledged (container -> address).

    The crash the datastore must survive: a test and the benchmark's soak share it.
    """
    acked: dict[str, str] = {}
    enough = asyncio.Event()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for k in keys:
        queue.put_nowait(k)

    async def worker() -> None:
        try:
            async with AsyncIpamClient(daemon.socket) as client:
                while not queue.empty():
                    container = queue.get_nowait()
                    reply = await client.allocate(container)
                    acked[container] = reply["interfaces"][0]["address"]
                    if len(acked) >= stop_after:
                        enough.set()
        except (ConnectionError, asyncio.IncompleteReadError, IpamClientError):
            return  # the daemon was killed under us

    tasks = [asyncio.create_task(worker()) for _ in range(connections)]
    waiter = asyncio.create_task(enough.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    daemon.kill()
    await asyncio.gather(*tasks)
    waiter.cancel()
    return acked
