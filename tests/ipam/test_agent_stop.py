"""NodeAgent.stop() and the IMDS read a cancelled pool step leaves on its worker thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from ipam.agent import NodeAgent
from ipam.imds import ImdsClient, ImdsInterface
from tests.ipam.agentenv import config_for


class HeldImds(ImdsClient):
    """An IMDS whose interface read blocks until released; records reads ending and closes."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9")  # never contacted
        self.entered = threading.Event()
        self.release = threading.Event()
        self.events: list[str] = []

    def interfaces(self, *, primary_mac: str | None = None) -> list[ImdsInterface]:
        self.entered.set()
        self.release.wait()
        self.events.append("read done")
        return []

    def close(self) -> None:
        self.events.append("close")
        super().close()


def test_stop_waits_for_an_imds_read_still_on_its_thread(tmp_path: Path) -> None:
    imds = HeldImds()
    agent = NodeAgent(config_for(tmp_path), imds=imds)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        read = asyncio.create_task(agent._read_imds_interfaces())
        await loop.run_in_executor(None, imds.entered.wait)
        read.cancel()  # as stop() cancels the manager mid-reconcile
        stopping = asyncio.create_task(agent.stop())
        # Released only after stop() has run up to its first wait: the old stop() closed
        # the client in that first step, before the read (which then reopened it) ended.
        loop.call_soon(imds.release.set)
        await stopping

    asyncio.run(scenario())
    assert imds.events == ["read done", "close"]
