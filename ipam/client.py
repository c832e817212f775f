"""A client of the node daemon's socket API (``ipam.protocol``), for tools and tests.

``AsyncIpamClient`` keeps one connection; requests made concurrently on it are
pipelined (the daemon answers in order). The CNI shim does not use this module: it must
import almost nothing (``cni/``).
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from pathlib import Path
from typing import Any

from ipam.errors import UltranetError
from ipam.protocol import VERSION, FrameBuffer, frame


class IpamClientError(UltranetError):
    """The daemon answered with an error; ``code`` is its code."""

    def __init__(self, code: str, message: str, detail: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.detail = detail


class _ReplyReader(asyncio.BufferedProtocol):
    """Reads framed replies into one buffer and hands each to the oldest waiting call.

    A reply with no call waiting (the daemon's ``forbidden``, said before any request)
    is kept for the next call.
    """

    def __init__(self) -> None:
        self.waiters: deque[asyncio.Future[dict[str, Any]]] = deque()
        self.early: deque[dict[str, Any]] = deque()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._frames = FrameBuffer()
        self._lost: Exception | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._frames.view()

    def buffer_updated(self, nbytes: int) -> None:
        for body in self._frames.frames(nbytes):
            reply = json.loads(body)
            if self.waiters:
                waiter = self.waiters.popleft()
                if not waiter.done():
                    waiter.set_result(reply)
            else:
                self.early.append(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc if exc is not None else ConnectionResetError("the daemon closed")
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionResetError(f"connection lost: {self._lost}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def expect(self) -> asyncio.Future[dict[str, Any]]:
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if self.early:
            waiter.set_result(self.early.popleft())
        elif self._lost is not None:
            waiter.set_exception(ConnectionResetError(f"connection lost: {self._lost}"))
        else:
            self.waiters.append(waiter)
        return waiter


class AsyncIpamClient:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._transport: asyncio.Transport | None = None
        self._reader: _ReplyReader | None = None

    async def __aenter__(self) -> AsyncIpamClient:
        loop = asyncio.get_running_loop()
        self._transport, self._reader = await loop.create_unix_connection(
            _ReplyReader, str(self.path)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._transport is not None and self._reader is not None:
            self._transport.close()
            await self._reader.closed
            self._transport = None

    async def raw(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request as given and return the reply, error or not."""
        return await self.raw_bytes(frame(message))

    async def raw_bytes(self, data: bytes) -> dict[str, Any]:
        """Send ``data`` as given (a malformed frame, say) and return the next reply."""
        assert self._reader is not None and self._transport is not None, "not connected"
        if self._transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        waiter = self._reader.expect()
        self._transport.write(data)
        return await waiter

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
