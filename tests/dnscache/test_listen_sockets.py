"""The supervisor's listening sockets: a taken port is a clear error; with port 0 a number
that is free for UDP but taken for TCP is given up for another."""

from __future__ import annotations

import socket
from ipaddress import ip_address
from typing import Any

import pytest

from dnscache import supervisor
from dnscache.errors import DnscacheError


def test_a_fixed_port_taken_for_tcp_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(DnscacheError, match=f"127.0.0.1:{port}: Address already in use"):
            supervisor._listen_sockets((ip_address("127.0.0.1"), port), 2, False)


def test_port_zero_tries_another_number_when_tcp_holds_the_one_udp_got(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = supervisor._bind_sockets
    calls: list[int] = []

    def taken_twice(*args: Any) -> Any:
        calls.append(1)
        if len(calls) <= 2:
            raise supervisor._PortTaken()
        return real(*args)

    monkeypatch.setattr(supervisor, "_bind_sockets", taken_twice)
    udp, tcp = supervisor._listen_sockets((ip_address("127.0.0.1"), 0), 2, False)
    try:
        # Three or more: the real bind after the two planted failures can itself find the
        # number held for TCP by another process's connection (seen on a busy machine).
        assert len(calls) >= 3
        ports = {s.getsockname()[1] for s in udp + tcp}
        assert len(ports) == 1 and ports != {0}
    finally:
        for s in udp + tcp:
            s.close()


def test_port_zero_gives_up_after_its_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    def always_taken(*args: Any) -> Any:
        raise supervisor._PortTaken()

    monkeypatch.setattr(supervisor, "_bind_sockets", always_taken)
    with pytest.raises(DnscacheError, match="Address already in use"):
        supervisor._listen_sockets((ip_address("127.0.0.1"), 0), 1, False)
