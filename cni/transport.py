"""The daemon's side of the shim's socket: ``serve(path, handler)``, and spool replay.

The frames are :mod:`cni.shim`'s (that module holds the codec, because it is the side
that may import nothing). One connection carries one request and one answer, as one
exec carries one CNI command. A handler that fails unexpectedly is answered as code 999
and logged; a handler is never cancelled because its shim hung up, since an ADD
stopped halfway would skip its own rollback.

Each answered command is reported to an ``Observe`` callable, as (command, CNI code,
seconds from the request read to the answer sent): the daemon's metrics live in a
package this one may not import, so the daemon passes the callable in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from cni import shim
from cni.errors import CniError, ErrorCode
from cni.spec import NETNS_FD, NO_NETNS_FD, Command, error_json

__all__ = ["CniServer", "Handle", "Observe", "call", "ignore", "replay_spool", "serve"]
_MAX_FDS = 4  # room for a few: more than one is refused, and every one is closed
_ACCEPT_BACKOFF_S = 0.1  # after accept(2) failed for want of descriptors or memory

log = logging.getLogger("ultranet.cni")

Handle = Callable[[Mapping[str, str], bytes], Awaitable[tuple[int, bytes]]]
# (command, code, seconds): code 0 for success, else the CNI error code answered; a
# command that is none of the spec's is "other", so a bad shim cannot grow the labels.
Observe = Callable[[str, int, float], None]
_COMMANDS = frozenset(c.value for c in Command)


def ignore(command: str, code: int, seconds: float) -> None:
    """The default ``Observe``: nothing is measured."""


def _answered_code(exit_code: int, stdout: bytes) -> int:
    """The CNI code of an answer: 0, or the ``code`` of the spec's error JSON (999 if an
    answer that failed carries none, which only a bug of ours would produce)."""
    if exit_code == 0:
        return 0
    try:
        code = json.loads(stdout).get("code")
    except (ValueError, AttributeError):
        return int(ErrorCode.INTERNAL)
    return code if isinstance(code, int) else int(ErrorCode.INTERNAL)


def _text_env(env: Mapping[bytes, bytes]) -> dict[str, str]:
    """The ``CNI_*`` variables (nothing else may come from a shim: ``NETNS_FD`` is ours)."""
    return {
        k.decode(errors="surrogateescape"): v.decode(errors="surrogateescape")
        for k, v in env.items()
        if k.startswith(b"CNI_")
    }


async def _answer(handle: Handle, env: Mapping[str, str], stdin: bytes) -> tuple[int, bytes]:
    try:
        return await handle(env, stdin)
    except Exception as err:  # a bug: answer it rather than hang the runtime
        log.exception("cni: handler failed on %s", env.get("CNI_COMMAND"))
        failure = CniError(ErrorCode.INTERNAL, "internal error in ultranet-ipamd", repr(err))
        return 1, error_json(failure)


class CniServer:
    """The daemon's listening socket and its connections; ``close()`` then
    ``await wait_closed()`` (as ``asyncio.Server``) stops accepting and waits for the
    requests in flight."""

    def __init__(self, listener: socket.socket, handle: Handle, observe: Observe = ignore) -> None:
        self._listener = listener
        self._handle = handle
        self._observe = observe
        self._connections: set[asyncio.Task[None]] = set()
        self._accepting = asyncio.ensure_future(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as err:  # EMFILE, ENFILE, ENOBUFS...: the shim waits in the backlog
                log.error("cni: cannot accept a connection (retrying in 0.1 s): %r", err)
                await asyncio.sleep(_ACCEPT_BACKOFF_S)
                continue
            conn.setblocking(False)
            task = asyncio.ensure_future(_connection(self._handle, conn, self._observe))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    def close(self) -> None:
        self._accepting.cancel()
        self._listener.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self._accepting
        if self._connections:
            await asyncio.wait(set(self._connections))


async def _readable(conn: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(conn.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())


async def _recv_exactly(conn: socket.socket, size: int, fds: list[int]) -> bytes:
    """``size`` bytes; descriptors that ride on them (SCM_RIGHTS) are appended to ``fds``."""
    chunks: list[bytes] = []
    while size:
        try:
            data, ancillary, _, _ = conn.recvmsg(
                min(size, 1 << 20), socket.CMSG_SPACE(4 * _MAX_FDS), socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            await _readable(conn)
            continue
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(
                    int.from_bytes(payload[i : i + 4], sys.byteorder) for i in range(0, usable, 4)
                )
        if not data:
            raise asyncio.IncompleteReadError(b"".join(chunks), size)
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


async def _read_request(conn: socket.socket, fds: list[int]) -> tuple[bytes, dict[str, str], bytes]:
    """(magic, env for the handler, stdin) of one request frame."""
    magic, kind, size = shim.parse_header_magic(await _recv_exactly(conn, 9, fds))
    if kind != shim.REQUEST:
        raise shim.WireError(f"frame kind {kind!r}, expected a request")
    body = await _recv_exactly(conn, size, fds)
    if magic == shim.MAGIC_V1:  # a shim before UCN2: CNI_NETNS by path
        raw, stdin = shim.decode_request(body)
        return magic, _text_env(raw), stdin
    flags, raw, stdin = shim.decode_request_v2(body)
    env = _text_env(raw)
    if flags & shim.FLAG_NETNS_FD:
        if len(fds) != 1:
            raise shim.WireError(f"{len(fds)} descriptors came with the request, not 1")
        env[NETNS_FD] = str(fds[0])
    else:
        env[NETNS_FD] = NO_NETNS_FD  # the shim could not open CNI_NETNS: never use the path
    return magic, env, stdin


async def _connection(handle: Handle, conn: socket.socket, observe: Observe = ignore) -> None:
    loop = asyncio.get_running_loop()
    fds: list[int] = []
    try:
        try:
            magic, env, stdin = await _read_request(conn, fds)
        except (asyncio.IncompleteReadError, shim.WireError) as err:
            log.warning("cni: dropped a malformed request: %s", err)
            return
        started = time.perf_counter()
        task = asyncio.ensure_future(_answer(handle, env, stdin))
        code, stdout = await asyncio.shield(task)
        await loop.sock_sendall(conn, shim.encode_answer(code, stdout, magic=magic))
        command = env.get("CNI_COMMAND", "")
        observe(
            command if command in _COMMANDS else "other",
            _answered_code(code, stdout),
            time.perf_counter() - started,
        )
    except (ConnectionError, asyncio.CancelledError) as err:
        log.warning("cni: shim went away before its answer: %r", err)
    except Exception:  # a bug of ours: the shim sees a hang-up, so say why here
        log.exception("cni: connection failed")
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()


async def serve(path: str | Path, handle: Handle, observe: Observe = ignore) -> CniServer:
    """Listen on the Unix socket ``path`` (mode 0600: only root execs CNI plugins).

    A stale socket file left by a killed daemon is replaced; any other file there is an
    error. The caller owns the server: ``server.close(); await server.wait_closed()``.
    A UCN2 request's namespace descriptor reaches ``handle`` as ``env[NETNS_FD]`` and is
    closed once it has answered. Every answer sent is reported to ``observe``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(target.lstat().st_mode):
            raise FileExistsError(f"{target} exists and is not a socket")
        target.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(target))
        os.chmod(target, 0o600)
        listener.listen(512)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return CniServer(listener, handle, observe)


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
