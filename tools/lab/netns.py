"""Network-namespace primitives for the lab: create, delete, list, and sockets inside.

Every namespace the lab makes is named ``ul-<lab id>-<role>`` so that a lab whose
process was killed can be found and removed by the next start. Netlink work goes
through ``pyroute2.IPRoute(netns=...)``, which never switches the caller's thread.
The one place that must enter a namespace, creating a listening socket there, does it
on a throwaway thread: the network namespace is per thread (containernetworking
``pkg/ns`` README), and a socket stays in the namespace it was created in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import threading
from pathlib import Path

from pyroute2 import netns as pyroute2_netns

NETNS_DIR = Path("/run/netns")
PREFIX = "ul-"
_CLONE_NEWNET = 0x40000000


class NetnsError(RuntimeError):
    """A namespace operation failed; the message names the namespace."""


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def create(name: str) -> None:
    if exists(name):
        raise NetnsError(f"network namespace {name} already exists")
    pyroute2_netns.create(name)


def delete(name: str) -> None:
    """Remove a namespace; an absent one is not an error (teardown is idempotent)."""
    if not exists(name):
        return
    try:
        pyroute2_netns.remove(name)
    except OSError as err:
        if err.errno != errno.ENOENT:
            raise NetnsError(f"cannot remove network namespace {name}: {err}") from err


def list_lab_namespaces() -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(PREFIX))


def _setns(name: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns({name}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def listening_socket(name: str, host: str, port: int) -> socket.socket:
    """A TCP socket bound and listening on ``host:port`` inside namespace ``name``."""
    result: list[socket.socket] = []
    failure: list[BaseException] = []

    def enter_and_bind() -> None:
        try:
            _setns(name)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            result.append(sock)
        except (OSError, NetnsError) as err:
            failure.append(err)

    thread = threading.Thread(target=enter_and_bind, name=f"netns-{name}")
    thread.start()
    thread.join()
    if failure:
        raise NetnsError(f"cannot listen on {host}:{port} in {name}: {failure[0]}")
    return result[0]
