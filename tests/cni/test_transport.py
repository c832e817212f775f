"""The daemon's socket server (cni.transport) when something on its side fails."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from cni import shim, transport
from cni.errors import CniError, ErrorCode
from cni.spec import error_json

ANSWER = b'{"cniVersion": "1.1.0"}\n'


async def answer_ok(env: Mapping[str, str], stdin: bytes) -> tuple[int, bytes]:
    return 0, ANSWER


def test_a_connection_failing_outside_the_handler_is_logged_and_the_next_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The shim only sees a hang-up; without a log line the daemon's side was invisible.
    real_encode = shim.encode_answer
    failures = [ValueError("answer cannot be framed")]

    def encode_once_failing(*args: Any, **kwargs: Any) -> bytes:
        if failures:
            raise failures.pop()
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(shim, "encode_answer", encode_once_failing)

    async def scenario() -> tuple[BaseException, tuple[int, bytes]]:
        server = await transport.serve(tmp_path / "cni.sock", answer_ok)
        try:
            with pytest.raises(asyncio.IncompleteReadError) as hung_up:
                await transport.call(tmp_path / "cni.sock", {"CNI_COMMAND": "ADD"}, b"{}")
            return hung_up.value, await transport.call(
                tmp_path / "cni.sock", {"CNI_COMMAND": "ADD"}, b"{}"
            )
        finally:
            server.close()
            await server.wait_closed()

    with caplog.at_level(logging.WARNING, logger="ultranet.cni"):
        _, second = asyncio.run(scenario())
    assert second == (0, ANSWER)
    (failed,) = [r for r in caplog.records if r.getMessage() == "cni: connection failed"]
    assert failed.levelno == logging.ERROR and failed.exc_info is not None
    assert "answer cannot be framed" in str(failed.exc_info[1])


def test_accept_failing_for_want_of_descriptors_is_logged_and_serving_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An accept(2) error used to end the accepting task silently: the socket stayed, every
    # later shim waited in the backlog until its timeout.
    async def scenario() -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        real_accept = loop.sock_accept
        failures = [OSError(errno.EMFILE, "Too many open files")]

        async def accept_once_failing(sock: socket.socket) -> tuple[socket.socket, Any]:
            if failures:
                (await real_accept(sock))[0].close()  # as if accept(2) had failed on it
                raise failures.pop()
            return await real_accept(sock)

        loop.sock_accept = accept_once_failing  # type: ignore[method-assign]
        server = await transport.serve(tmp_path / "cni.sock", answer_ok)
        try:
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                await transport.call(tmp_path / "cni.sock", {"CNI_COMMAND": "ADD"}, b"{}")
            return await asyncio.wait_for(
                transport.call(tmp_path / "cni.sock", {"CNI_COMMAND": "ADD"}, b"{}"), 30
            )
        finally:
            server.close()
            await server.wait_closed()

    with caplog.at_level(logging.WARNING, logger="ultranet.cni"):
        assert asyncio.run(scenario()) == (0, ANSWER)
    assert any("cannot accept a connection" in r.getMessage() for r in caplog.records)


def test_each_answer_is_observed_with_its_command_its_cni_code_and_its_time(
    tmp_path: Path,
) -> None:
    # The daemon's cni_command_seconds histogram is fed by this callable: a code read
    # from the answer (not the exit status), a command outside the spec's as "other".
    handler_took: dict[str, float] = {}

    async def answer_per_command(env: Mapping[str, str], stdin: bytes) -> tuple[int, bytes]:
        command = env["CNI_COMMAND"]
        if command == "ADD":  # some work, so that its time cannot round to nothing
            began = time.perf_counter()
            await asyncio.sleep(0.02)
            handler_took["ADD"] = time.perf_counter() - began
            return 0, ANSWER
        if command == "DEL":
            return 1, error_json(CniError(ErrorCode.TRY_AGAIN_LATER, "IPAM not ready"))
        if command == "STATUS":
            raise RuntimeError("a bug")  # answered as 999 by the transport
        if command == "CHECK":
            return 1, b"not the spec's error JSON\n"  # only a bug would answer so
        if command == "VERSION":
            return 0, ANSWER
        return 1, error_json(CniError(ErrorCode.INVALID_ENV, f"CNI_COMMAND={command!r}"))

    observed: list[tuple[str, int, float]] = []

    def observe(command: str, code: int, seconds: float) -> None:
        observed.append((command, code, seconds))

    async def scenario() -> float:
        server = await transport.serve(tmp_path / "cni.sock", answer_per_command, observe)
        try:
            began = time.perf_counter()
            await transport.call(tmp_path / "cni.sock", {"CNI_COMMAND": "ADD"}, b"{}")
            round_trip = time.perf_counter() - began
            for command in ("DEL", "STATUS", "CHECK", "NOT-A-COMMAND", "VERSION"):
                await transport.call(tmp_path / "cni.sock", {"CNI_COMMAND": command}, b"{}")
            return round_trip
        finally:
            server.close()
            await server.wait_closed()  # every connection has answered, and been observed

    add_round_trip = asyncio.run(scenario())
    assert [(command, code) for command, code, _ in observed] == [
        ("ADD", 0),
        ("DEL", 11),
        ("STATUS", 999),
        ("CHECK", 999),
        ("other", 4),
        ("VERSION", 0),
    ]
    add_seconds = observed[0][2]
    assert handler_took["ADD"] <= add_seconds <= add_round_trip
