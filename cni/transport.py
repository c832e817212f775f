"""The daemon's side of the shim's socket: ``serve(path, handler)``, and spool replay.

The frames are :mod:`cni.shim`'s (that module holds the codec, because it is the side
that may import nothing). One connection carries one request and one answer, as one
exec carries one CNI command. A handler that fails unexpectedly is answered as code 999
and logged; a handler is never cancelled because its shim hung up, since an ADD
stopped halfway would skip its own rollback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from cni import shim
from cni.errors import CniError, ErrorCode
from cni.spec import error_json

__all__ = ["Handle", "call", "replay_spool", "serve"]

log = logging.getLogger("ultranet.cni")

Handle = Callable[[Mapping[str, str], bytes], Awaitable[tuple[int, bytes]]]


def _text_env(env: Mapping[bytes, bytes]) -> dict[str, str]:
    return {
        k.decode(errors="surrogateescape"): v.decode(errors="surrogateescape")
        for k, v in env.items()
    }


async def _answer(handle: Handle, env: Mapping[str, str], stdin: bytes) -> tuple[int, bytes]:
    try:
        return await handle(env, stdin)
    except Exception as err:  # a bug: answer it rather than hang the runtime
        log.exception("cni: handler failed on %s", env.get("CNI_COMMAND"))
        failure = CniError(ErrorCode.INTERNAL, "internal error in ultranet-ipamd", repr(err))
        return 1, error_json(failure)


async def _connection(
    handle: Handle, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        try:
            kind, size = shim.parse_header(await reader.readexactly(9))
            if kind != shim.REQUEST:
                raise shim.WireError(f"frame kind {kind!r}, expected a request")
            env, stdin = shim.decode_request(await reader.readexactly(size))
        except (asyncio.IncompleteReadError, shim.WireError) as err:
            log.warning("cni: dropped a malformed request: %s", err)
            return
        task = asyncio.ensure_future(_answer(handle, _text_env(env), stdin))
        code, stdout = await asyncio.shield(task)
        writer.write(shim.encode_answer(code, stdout))
        await writer.drain()
    except (ConnectionError, asyncio.CancelledError) as err:
        log.warning("cni: shim went away before its answer: %r", err)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve(path: str | Path, handle: Handle) -> asyncio.Server:
    """Listen on the Unix socket ``path`` (mode 0600: only root execs CNI plugins).

    A stale socket file left by a killed daemon is replaced; any other file there is an
    error. The caller owns the server: ``server.close(); await server.wait_closed()``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(target.lstat().st_mode):
            raise FileExistsError(f"{target} exists and is not a socket")
        target.unlink()
    server = await asyncio.start_unix_server(
        lambda r, w: _connection(handle, r, w), path=str(target), backlog=512
    )
    os.chmod(target, 0o600)
    return server


async def call(path: str | Path, env: Mapping[str, str], stdin: bytes) -> tuple[int, bytes]:
    """A client in asyncio, speaking the shim's protocol (tests, tools)."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        raw = {k.encode(): v.encode() for k, v in env.items()}
        writer.write(shim.encode_request(raw, stdin))
        await writer.drain()
        kind, size = shim.parse_header(await reader.readexactly(9))
        code, stdout, _ = shim.decode_answer(await reader.readexactly(size))
        return code, stdout
    finally:
        writer.close()
        await writer.wait_closed()


async def replay_spool(directory: str | Path, handle: Handle) -> list[Path]:
    """Run every DEL the shim spooled while the daemon was down; returns those still
    failing (they stay spooled for the next replay). Call it before ``serve``."""
    root = Path(directory)
    if not root.is_dir():
        return []
    failing = []
    for path in sorted(root.glob("*.del")):
        try:
            env, stdin = shim.decode_request(shim.decode_frame(path.read_bytes(), shim.REQUEST))
        except shim.WireError as err:
            log.error("cni: spooled DEL %s is unreadable (%s); kept for inspection", path, err)
            failing.append(path)
            continue
        code, stdout = await _answer(handle, _text_env(env), stdin)
        if code == 0:
            path.unlink()
        else:
            log.warning("cni: spooled DEL %s failed again: %s", path.name, stdout.decode().strip())
            failing.append(path)
    return failing
