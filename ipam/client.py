"""A client of the node daemon's socket API (``ipam.protocol``), for tools and tests.

``AsyncIpamClient`` keeps one connection and sends requests one at a time on it; open
several for concurrency. The CNI shim does not use this module: it must import almost
nothing (``cni/``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from ipam.errors import UltranetError
from ipam.protocol import VERSION, frame, frame_length


class IpamClientError(UltranetError):
    """The daemon answered with an error; ``code`` is its code."""

    def __init__(self, code: str, message: str, detail: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.detail = detail


class AsyncIpamClient:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> AsyncIpamClient:
        self._reader, self._writer = await asyncio.open_unix_connection(str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except ConnectionError:
                pass
            self._writer = None

    async def raw(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request as given and return the reply, error or not."""
        assert self._reader is not None and self._writer is not None, "not connected"
        self._writer.write(frame(message))
        await self._writer.drain()
        header = await self._reader.readexactly(4)
        body = await self._reader.readexactly(frame_length(header))
        reply: dict[str, Any] = json.loads(body)
        return reply

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        reply = await self.raw({"version": VERSION, "op": op, **fields})
        if not reply.get("ok"):
            err = dict(reply.get("error") or {})
            raise IpamClientError(str(err.pop("code", "?")), str(err.pop("message", "")), err)
        result: dict[str, Any] = reply["result"]
        return result

    async def allocate(
        self,
        container_id: str,
        *,
        network: str = "ultranet",
        ifname: str = "eth0",
        pod_namespace: str = "default",
        pod_name: str = "pod",
        multi_nic: bool = False,
    ) -> dict[str, Any]:
        return await self.call(
            "allocate",
            network=network,
            container_id=container_id,
            ifname=ifname,
            pod_namespace=pod_namespace,
            pod_name=pod_name,
            multi_nic=multi_nic,
        )

    async def release(
        self, container_id: str, *, network: str = "ultranet", ifname: str = "eth0"
    ) -> dict[str, Any]:
        return await self.call("release", network=network, container_id=container_id, ifname=ifname)

    async def status(self) -> dict[str, Any]:
        return await self.call("status")

    async def list(self) -> list[dict[str, Any]]:
        result = await self.call("list")
        allocations: list[dict[str, Any]] = result["allocations"]
        return allocations
