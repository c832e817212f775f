"""cni.netlink.socket_in: sockets made in other namespaces by one long-lived thread that
always comes back, and is replaced when it cannot."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni import netlink
from tools.lab import netns, owner
from tools.lab.lab import Lab, LabConfig

pytestmark = pytest.mark.netns

_RTM_GETLINK, _NLM_F_DUMP, _NLMSG_DONE = 18, 0x300 | 0x1, 3


@pytest.fixture
def namespace() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    # Marked as this process's (netns.scratch): a lab another process starts meanwhile
    # leaves it alone, and removes it if this process is killed.
    with netns.scratch("t") as name:
        yield f"/run/netns/{name}"


def test_the_namespace_is_this_processs_and_a_lab_starting_meanwhile_keeps_it(
    namespace: str, tmp_path: Path
) -> None:
    name = os.path.basename(namespace)
    assert owner.owner_of(name) == owner.Owner.this_process()
    with Lab(LabConfig(instance_type="m5.large"), state_root=tmp_path / "another"):
        assert os.path.exists(namespace)
    with netlink.socket_in(namespace) as sock:
        assert _link_names(sock) == {"lo"}


def _link_names(sock: socket.socket) -> set[str]:
    """Every link name an RTM_GETLINK dump on ``sock`` returns."""
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)
    sock.sendto(
        struct.pack("=IHHII", 16 + len(body), _RTM_GETLINK, _NLM_F_DUMP, 1, 0) + body, (0, 0)
    )
    names: set[str] = set()
    while True:
        data = sock.recv(65536)
        offset = 0
        while offset < len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            if kind == _NLMSG_DONE:
                return names
            attr = offset + 16 + 16
            while attr < offset + length:
                size, code = struct.unpack_from("=HH", data, attr)
                if code == 3:  # IFLA_IFNAME
                    names.add(data[attr + 4 : attr + size].rstrip(b"\0").decode())
                attr += (size + 3) & ~3
            offset += (length + 3) & ~3


def _namespace_of_thread(name: str) -> tuple[int, int]:
    (thread,) = [t for t in threading.enumerate() if t.name == name]
    stat = os.stat(f"/proc/self/task/{thread.native_id}/ns/net")
    return stat.st_dev, stat.st_ino


def _here() -> tuple[int, int]:
    stat = os.stat("/proc/thread-self/ns/net")
    return stat.st_dev, stat.st_ino


def test_sockets_are_made_in_the_namespace_and_the_thread_comes_back(namespace: str) -> None:
    for _ in range(3):
        with netlink.socket_in(namespace) as sock:
            assert _link_names(sock) == {"lo"}  # a fresh namespace: loopback only
    assert _namespace_of_thread("netns-enter") == _here()


def test_a_thread_stranded_in_a_pod_namespace_is_replaced(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with netlink.socket_in(namespace):
        pass  # the worker exists
    real_setns = netlink._setns
    calls: list[int] = []

    def setns_that_cannot_go_home(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the way back
            raise OSError(1, "Operation not permitted")
        real_setns(fd)

    monkeypatch.setattr(netlink, "_setns", setns_that_cannot_go_home)
    with netlink.socket_in(namespace) as sock:
        assert _link_names(sock) == {"lo"}  # the socket made is still good
    monkeypatch.setattr(netlink, "_setns", real_setns)
    for stranded in [t for t in threading.enumerate() if t.name == "netns-enter"]:
        stranded.join(5)
        assert not stranded.is_alive()  # it exited: it never serves from the pod's namespace
    with netlink.socket_in(namespace) as sock:
        assert _link_names(sock) == {"lo"}
    assert _namespace_of_thread("netns-enter") == _here()  # a new thread, at home


def test_a_path_that_is_not_a_namespace_is_a_clear_error() -> None:
    with pytest.raises(netlink.NamespaceError, match="not a network namespace"):
        netlink.socket_in("/proc/self/ns/uts")
    with pytest.raises(netlink.NamespaceError, match="cannot open network namespace"):
        netlink.socket_in("/run/netns/ul-no-such-namespace")


def _fds_on_namespace(path: str) -> int:
    """How many of this process's descriptors refer to the namespace at ``path`` (other
    descriptors come and go with the garbage collector, so they are not compared)."""
    target = f"net:[{os.stat(path).st_ino}]"
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == target
        except FileNotFoundError:  # the listing's own descriptor, closed by now
            pass
    return count


def test_a_pending_socket_that_is_discarded_is_closed_once_made(namespace: str) -> None:
    netlink.socket_in(namespace).close()  # the thread exists
    pending = netlink.PendingSocket(namespace)
    pending.discard()
    after_discard = threading.Event()
    # Done callbacks run in the order they were added: this one runs after the discard's.
    pending._made.add_done_callback(lambda _: after_discard.set())
    assert after_discard.wait(5)
    assert pending._made.result().fileno() == -1  # made, then closed by the discard
    assert _fds_on_namespace(namespace) == 0  # the namespace's descriptor is closed too
    taken = netlink.PendingSocket(namespace).result()
    with taken:
        assert _link_names(taken) == {"lo"}
    assert _fds_on_namespace(namespace) == 0


def _hold_first_entry(
    monkeypatch: pytest.MonkeyPatch, *, strand: bool
) -> tuple[threading.Event, threading.Event]:
    """Patch setns so the thread's next entry waits for ``release`` (set ``entered`` first),
    keeping it busy while more requests queue; with ``strand`` its way back then fails."""
    real_setns = netlink._setns
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def setns(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            entered.set()
            release.wait(5)
        if strand and len(calls) == 2:  # the first request's way back
            raise OSError(1, "Operation not permitted")
        real_setns(fd)

    monkeypatch.setattr(netlink, "_setns", setns)
    return entered, release


def test_requests_queued_behind_a_stranded_thread_are_answered(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    netlink.socket_in(namespace).close()
    real_setns = netlink._setns
    entered, release = _hold_first_entry(monkeypatch, strand=True)
    first = netlink.PendingSocket(namespace)
    assert entered.wait(5)
    second = netlink.PendingSocket(namespace)  # queued behind the first
    release.set()
    with first.result() as sock:
        assert _link_names(sock) == {"lo"}
    assert second._made.exception(timeout=5) is not None  # answered, not left waiting
    with pytest.raises(netlink.NamespaceError) as raised:
        second.result()
    assert raised.value.errno == errno.EAGAIN
    monkeypatch.setattr(netlink, "_setns", real_setns)
    for stranded in [t for t in threading.enumerate() if t.name == "netns-enter"]:
        stranded.join(5)
        assert not stranded.is_alive()
    with netlink.socket_in(namespace) as sock:  # a new thread serves
        assert _link_names(sock) == {"lo"}
    assert _namespace_of_thread("netns-enter") == _here()


def test_a_cancelled_request_is_skipped_and_the_thread_serves_on(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    netlink.socket_in(namespace).close()
    entered, release = _hold_first_entry(monkeypatch, strand=False)
    first = netlink.PendingSocket(namespace)
    assert entered.wait(5)
    second = netlink.PendingSocket(namespace)
    assert second._made.cancel()  # as asyncio.wrap_future's cancel would
    release.set()
    first.result().close()
    third = netlink.PendingSocket(namespace)
    with third._made.result(timeout=5) as sock:  # answered: the thread did not die
        assert _link_names(sock) == {"lo"}
    assert _fds_on_namespace(namespace) == 0  # the cancelled request's descriptor too
