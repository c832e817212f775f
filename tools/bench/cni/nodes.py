"""What serves ultranet's CNI socket in the benchmark's lab node.

``DaemonNode`` (the headline): the real ``ultranet-ipamd`` process in the node namespace,
as on a node: its journal (fdatasync per group commit), the NodeAgent growing and
shrinking the pool through the lab's EC2 and IMDS, and the shipped defaults; only its
paths (sockets, state, spool) and endpoints point into the lab.

``InProcessNode`` (secondary, ``--backend inprocess``): the CNI handler on an event loop
thread of the benchmark's own process, over a fixed in-memory pool
(``tools.lab.pool_backend``): no journal, no agent, no cooldown. It isolates the CNI path
from the daemon's IPAM; it is not what a node runs.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from cni.handler import CniHandler, HandlerConfig
from cni.plumbing import Plumbing
from cni.transport import serve
from ipam.client import AsyncIpamClient
from tools.lab.daemon import IpamdProcess
from tools.lab.lab import Lab
from tools.lab.pool_backend import PoolBackend, pool_from_enis

BACKENDS = ("daemon", "inprocess")
# What the daemon's status says once nothing is pending: IPv4 (the warm pool), IPv6 mode.
STEADY = ("warm pool met", "IPv6 /80 held")


class UltranetNode(Protocol):
    shim_env: dict[str, str]  # what the shim needs to find this node's socket and spool

    def cpu_s(self) -> float:
        """CPU seconds (user + system) spent so far by what serves the CNI socket."""
        ...

    def wait_steady(self) -> float:
        """Block until the node's pool needs no change; returns the seconds waited."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class DaemonNode:
    def __init__(self, lab: Lab, state_dir: Path, env: dict[str, str]) -> None:
        self.overrides = dict(env)
        paths = {"ULTRANET_CNI_SPOOL": str(state_dir / "spool")}
        self.daemon = IpamdProcess(lab, state_dir, {**paths, **env})
        self.shim_env = {
            "ULTRANET_CNI_SOCKET": str(self.daemon.cni_socket),
            "ULTRANET_CNI_SPOOL": paths["ULTRANET_CNI_SPOOL"],
        }
        self.daemon.start()
        try:
            self.status = self.daemon.wait_ready(timeout=60)
            self.daemon.wait_cni_socket()
        except BaseException:
            self.daemon.stop()
            raise
        assert self.daemon.process is not None
        self.pid = self.daemon.process.pid

    def cpu_s(self) -> float:
        return process_cpu_s(self.pid)

    def wait_steady(self, timeout: float = 60.0) -> float:
        """Until the daemon reports its warm pool met (no grow or shrink pending).

        A cycle starts from the node a warm pool is sized for: its first /28 handed out,
        a burst of sequential ADDs outruns a grow whose EC2 client is still being made
        (boto3's import, ~0.3 s here) and the 14th ADD is answered 11, try again.
        """
        return asyncio.run(self._wait_steady(timeout))

    async def _wait_steady(self, timeout: float) -> float:
        started = time.monotonic()
        delay = 0.005
        async with AsyncIpamClient(self.daemon.socket) as client:
            while True:
                status = await client.status()
                if status["reason"] in STEADY:
                    return time.monotonic() - started
                if time.monotonic() - started > timeout:
                    raise TimeoutError(f"warm pool not met in {timeout} s: {status}")
                await asyncio.sleep(delay)  # polling the daemon's own answer, bounded
                delay = min(0.1, delay * 2)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "daemon",
            "what": "ultranet-ipamd process in the lab node namespace, behind the installed shim",
            "command": ["ip", "netns", "exec", "NODE", sys.executable, "-m", "ipam.cli"],
            "log_level": "info (the default)",
            "env_overrides": self.overrides,
            "effective_config": self.daemon.effective_config(),
            "ready_status": self.status,
            "cpu_counted": "the daemon process, all threads (/proc/PID/stat)",
        }

    def close(self) -> None:
        code = self.daemon.stop()
        if code != 0:
            raise RuntimeError(f"ultranet-ipamd exited {code}: {self.daemon.log_tail()}")


class InProcessNode:
    """``serve()`` + ``CniHandler`` on an event loop thread, host side in the node."""

    def __init__(self, lab: Lab, state_dir: Path) -> None:
        views = [lab.cloud.eni_view(e.eni_id) for e in lab.cloud.enis_of(lab.instance_id)]
        self.backend = PoolBackend(pool_from_enis(views))
        self._socket = state_dir / "cni.sock"
        self._spool = state_dir / "spool"
        self.shim_env = {
            "ULTRANET_CNI_SOCKET": str(self._socket),
            "ULTRANET_CNI_SPOOL": str(self._spool),
        }
        self._netns = f"/run/netns/{lab.node_ns}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cni-handler")
        self._thread.start()
        try:
            self._run(self._start())
        except BaseException:
            self._halt()
            raise

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _start(self) -> None:
        self.plumbing = await Plumbing.open(self._netns)
        handler = CniHandler(self.backend, self.plumbing, HandlerConfig(spool_dir=self._spool))
        self.server = await serve(self._socket, handler.handle)

    async def _stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()
        await self.plumbing.close()

    def cpu_s(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def wait_steady(self) -> float:
        return 0.0  # a fixed pool: nothing ever pending

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "inprocess",
            "what": "CniHandler in the benchmark's process over a fixed in-memory pool "
            "(tools.lab.pool_backend): no journal, no NodeAgent, no cooldown; NOT production",
            "cpu_counted": "the whole benchmark process (handler thread + the bench's own)",
        }

    def close(self) -> None:
        try:
            self._run(self._stop())
        finally:
            self._halt()

    def _halt(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
