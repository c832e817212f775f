"""UdpBatch: recvmmsg/sendmmsg on real loopback sockets."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Iterator

import pytest

from dnscache.udpbatch import ReplyQueue, UdpBatch

FAMILIES = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]


@pytest.fixture(params=FAMILIES, ids=["ipv4", "ipv6"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    family, host = request.param
    server = socket.socket(family, socket.SOCK_DGRAM)
    clients = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        server.bind((host, 0))
        server.setblocking(False)
        for c in clients:
            c.bind((host, 0))
            c.settimeout(5)
        yield server, clients
    finally:
        server.close()
        for c in clients:
            c.close()


def slot_bytes(batch: UdpBatch, slot: int) -> bytes:
    n = batch.lengths[slot * batch.MSG_WORDS + batch.LEN_WORD]
    return batch.buf[slot * batch.size : slot * batch.size + n]


def reply(batch: UdpBatch, message: int, slot: int, payload: bytes) -> None:
    at = slot * batch.size
    batch.view[at : at + len(payload)] = payload
    batch.send_iov[2 * message + 1] = len(payload)
    if message != slot:
        batch.move(message, slot)


def test_reads_each_datagram_with_its_sender_as_recvfrom_gives_it(
    pair: tuple[socket.socket, list[socket.socket]],
) -> None:
    server, clients = pair
    batch = UdpBatch(server, slots=8, size=512)
    assert batch.receive() == 0  # nothing yet
    for i, c in enumerate(clients):
        c.sendto(b"query %d" % i, server.getsockname())
    got = batch.receive()
    assert got == 3
    for i, c in enumerate(clients):
        assert slot_bytes(batch, i) == b"query %d" % i
        assert batch.address(i) == c.getsockname()
        at = i * batch.NAME
        packed = batch.names[at + batch.ip_start : at + batch.ip_end]
        assert socket.inet_ntop(server.family, packed) == c.getsockname()[0]


def test_replies_skip_a_slot_and_later_batches_use_their_own_slots_again(
    pair: tuple[socket.socket, list[socket.socket]],
) -> None:
    server, clients = pair
    batch = UdpBatch(server, slots=8, size=512)
    for i, c in enumerate(clients):
        c.sendto(b"q%d" % i, server.getsockname())
    assert batch.receive() == 3
    reply(batch, 0, 0, b"r0")
    reply(batch, 1, 2, b"r2")  # slot 1 answered later (a miss): slot 2 moves down
    assert batch.send(2) == 0
    assert clients[0].recv(100) == b"r0"
    assert clients[2].recv(100) == b"r2"
    clients[1].setblocking(False)
    with pytest.raises(BlockingIOError):
        clients[1].recv(100)
    clients[1].settimeout(5)
    for i, c in enumerate(clients):  # the next batch: message j is slot j again
        c.sendto(b"again%d" % i, server.getsockname())
    assert batch.receive() == 3
    for i in range(3):
        reply(batch, i, i, b"second %d" % i)
    assert batch.send(3) == 0
    assert [c.recv(100) for c in clients] == [b"second 0", b"second 1", b"second 2"]


def test_a_full_socket_is_read_slots_at_a_time(
    pair: tuple[socket.socket, list[socket.socket]],
) -> None:
    server, clients = pair
    batch = UdpBatch(server, slots=4, size=64)
    for i in range(6):
        clients[0].sendto(b"%d" % i, server.getsockname())
    assert batch.receive() == 4
    assert [slot_bytes(batch, i) for i in range(4)] == [b"0", b"1", b"2", b"3"]
    assert batch.receive() == 2
    assert [slot_bytes(batch, i) for i in range(2)] == [b"4", b"5"]
    assert batch.receive() == 0


def test_a_reply_that_cannot_be_sent_is_counted_and_the_others_still_go() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        server.bind(("127.0.0.1", 0))
        server.setblocking(False)
        for c in clients:
            c.bind(("127.0.0.1", 0))
            c.settimeout(5)
            c.sendto(b"q", server.getsockname())
        batch = UdpBatch(server, slots=3, size=70_000)
        assert batch.receive() == 3
        reply(batch, 0, 0, b"first")
        reply(batch, 1, 1, b"x" * 66_000)  # over UDP's 65,507: EMSGSIZE
        reply(batch, 2, 2, b"third")
        assert batch.send(3) == 1
        assert clients[0].recv(100) == b"first"
        assert clients[2].recv(100) == b"third"
    finally:
        server.close()
        for c in clients:
            c.close()


def test_a_closed_socket_raises_instead_of_reading_nothing() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    batch = UdpBatch(server, slots=2, size=64)
    server.close()
    with pytest.raises(OSError) as err:
        batch.receive()
    assert err.value.errno == errno.EBADF
    assert "recvmmsg" in str(err.value)


def test_only_ip_sockets() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        with pytest.raises(ValueError, match="IPv4 or IPv6"):
            UdpBatch(s)


def test_replies_queued_with_raw_sockaddrs_go_out_at_the_end_of_the_loops_turn(
    pair: tuple[socket.socket, list[socket.socket]],
) -> None:
    server, clients = pair
    loop = asyncio.new_event_loop()
    try:
        batch = UdpBatch(server, slots=4, size=512)
        queue = ReplyQueue(server, loop, slots=4, size=512)
        for i, c in enumerate(clients):
            c.sendto(b"q%d" % i, server.getsockname())
        assert batch.receive() == 3
        addrs = [batch.sockaddr(i) for i in range(3)]
        batch.receive()  # the batch's slots are reused: the queue keeps its own copies
        for i in (2, 0, 1):
            queue.sendto(b"answer %d" % i, addrs[i])
        assert queue.waiting == 3
        clients[0].setblocking(False)
        with pytest.raises(BlockingIOError):
            clients[0].recv(100)  # nothing sent before the turn ends
        clients[0].settimeout(5)
        loop.run_until_complete(asyncio.sleep(0))
        assert queue.waiting == 0
        assert [c.recv(100) for c in clients] == [b"answer 0", b"answer 1", b"answer 2"]
    finally:
        loop.close()


@pytest.fixture
def asked() -> Iterator[tuple[socket.socket, socket.socket, asyncio.AbstractEventLoop, bytes]]:
    """A server that has read one query of a client: (server, client, loop, its sockaddr)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    loop = asyncio.new_event_loop()
    try:
        server.bind(("127.0.0.1", 0))
        client.bind(("127.0.0.1", 0))
        client.settimeout(5)
        client.sendto(b"q", server.getsockname())
        batch = UdpBatch(server, slots=1, size=64)
        assert batch.receive() == 1
        yield server, client, loop, batch.sockaddr(0)
    finally:
        server.close()
        client.close()
        loop.close()


def test_a_full_queue_is_sent_at_once_and_an_oversized_reply_alone(
    asked: tuple[socket.socket, socket.socket, asyncio.AbstractEventLoop, bytes],
) -> None:
    server, client, loop, addr = asked
    queue = ReplyQueue(server, loop, slots=2, size=64)
    queue.sendto(b"big" * 30, addr)  # 90 bytes > 64: sent by itself, not queued
    assert queue.waiting == 0 and client.recv(200) == b"big" * 30
    queue.sendto(b"one", addr)
    queue.sendto(b"two", addr)  # the second of two slots: sent without waiting
    assert queue.waiting == 0
    assert client.recv(100) == b"one" and client.recv(100) == b"two"


def test_a_queued_reply_that_cannot_be_sent_is_counted(
    asked: tuple[socket.socket, socket.socket, asyncio.AbstractEventLoop, bytes],
) -> None:
    server, client, loop, addr = asked
    queue = ReplyQueue(server, loop, slots=4, size=70_000)
    queue.sendto(b"x" * 66_000, addr)  # EMSGSIZE
    queue.sendto(b"fine", addr)
    assert queue.flush() == 1
    assert client.recv(100) == b"fine"
