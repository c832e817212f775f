"""Running the installed shim against a daemon-side ``serve`` in the test's event loop."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from cni.install import install
from cni.transport import serve
from tests.cni.harness import Node


def install_shim(tmp: Path) -> Path:
    (path,) = install(tmp / "bin", None, python=sys.executable)
    return path


@asynccontextmanager
async def serving(n: Node, socket_path: Path) -> AsyncIterator[None]:
    server = await serve(socket_path, n.handler.handle)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


async def exec_shim(
    shim: Path, socket_path: Path, variables: dict[str, str], stdin: bytes
) -> tuple[int, dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        str(shim),
        env={"PATH": "/usr/bin:/bin", "ULTRANET_CNI_SOCKET": str(socket_path), **variables},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, (json.loads(out) if out.strip() else {"stderr": err.decode()})
