"""The steering program (``dnscache/steering.py``) against its Python reference, ``worker_for``.

Two ways of running the program: a classic BPF interpreter written here from the kernel's
definition (``linux/filter.h``; a load past the packet's end ends the program with 0), run
on many generated questions, names and malformed packets; and the kernel itself, with the
program attached to a real SO_REUSEPORT group on loopback, where the socket that receives a
datagram is the program's answer.
"""

from __future__ import annotations

import random
import select
import socket
import string
from collections.abc import Iterator
from contextlib import contextmanager

import dnslib
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dnscache import steering

MASK = 0xFFFFFFFF
# Classic BPF instruction classes and fields (linux/bpf_common.h).
BPF_LD, BPF_LDX, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = 0x00, 0x01, 0x04, 0x05, 0x06, 0x07
BPF_B, BPF_ABS, BPF_IMM, BPF_K, BPF_X, BPF_A = 0x10, 0x20, 0x00, 0x00, 0x08, 0x10
BPF_TAX, BPF_TXA = 0x00, 0x80
ALU = {
    0x00: lambda a, b: a + b,
    0x10: lambda a, b: a - b,
    0x20: lambda a, b: a * b,
    0x30: lambda a, b: a // b,
    0x40: lambda a, b: a | b,
    0x50: lambda a, b: a & b,
    0x60: lambda a, b: a << b if b < 32 else 0,
    0x70: lambda a, b: a >> b if b < 32 else 0,
    0x90: lambda a, b: a % b,
    0xA0: lambda a, b: a ^ b,
}


class Rejected(Exception):
    """An instruction this interpreter (and the program) does not use."""


def run_cbpf(insns: list[steering.Insn], packet: bytes) -> int:
    """What the program returns for ``packet`` (the UDP payload), step by step."""
    a = x = 0
    pc = 0
    for _ in range(4096):  # BPF_MAXINSNS: classic BPF only jumps forward, so this bounds it
        code, jt, jf, k = insns[pc]
        cls = code & 0x07
        pc += 1
        if cls == BPF_LD and code == BPF_LD | BPF_B | BPF_ABS:
            if k >= len(packet):
                return 0  # the kernel ends the program with 0 on a load past the end
            a = packet[k]
        elif cls == BPF_LDX and code == BPF_LDX | BPF_IMM:
            x = k
        elif cls == BPF_ALU and code & 0xF0 in ALU:
            operand = x if code & BPF_X else k
            if code & 0xF0 in (0x30, 0x90) and operand == 0:
                return 0  # division by zero ends the program with 0
            a = ALU[code & 0xF0](a, operand) & MASK
        elif cls == BPF_JMP and code == BPF_JMP | 0x10 | BPF_K:  # JEQ K
            pc += jt if a == k else jf
        elif cls == BPF_RET:
            return a if code & 0x18 == BPF_A else k
        elif cls == BPF_MISC:
            if code == BPF_MISC | BPF_TAX:
                x = a
            elif code == BPF_MISC | BPF_TXA:
                a = x
            else:
                raise Rejected(hex(code))
        else:
            raise Rejected(hex(code))
    raise AssertionError("the program ran past BPF_MAXINSNS steps")


def query(name: str, qtype: str = "A") -> bytes:
    return bytes(dnslib.DNSRecord.question(name, qtype).pack())


@pytest.mark.parametrize("workers", [2, 3, 4, 7, 64])
def test_the_program_is_well_formed(workers: int) -> None:
    insns = steering.program(workers)
    assert len(insns) <= 4096 and insns[-1][0] & 0x07 == BPF_RET
    for pc, (code, jt, jf, _) in enumerate(insns):
        assert 0 <= jt <= 255 and 0 <= jf <= 255
        if code & 0x07 == BPF_JMP:  # every jump lands inside the program
            assert pc + 1 + max(jt, jf) < len(insns)


labels = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=20)
names = st.lists(labels, min_size=1, max_size=6).map(".".join)


@settings(max_examples=400, deadline=None)
@given(names, st.sampled_from(["A", "AAAA", "SRV", "PTR"]), st.integers(2, 64))
@example("a" * 60, "A", 2)  # a name longer than HASH_BYTES: both stop at byte 40
@example("x", "A", 3)  # the shortest name
def test_the_program_returns_what_the_reference_does_for_questions(
    name: str, qtype: str, workers: int
) -> None:
    packet = query(name, qtype)
    assert run_cbpf(steering.program(workers), packet) == steering.worker_for(packet, workers)


@settings(max_examples=200, deadline=None)
@given(names, st.integers(2, 16), st.randoms(use_true_random=False))
def test_0x20_mixed_case_goes_to_the_same_worker(
    name: str, workers: int, rng: random.Random
) -> None:
    mixed = "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in name)
    program = steering.program(workers)
    assert run_cbpf(program, query(mixed)) == run_cbpf(program, query(name.lower()))


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=80), st.integers(2, 64))
@example(b"", 2)  # no header
@example(b"\x00" * 12, 2)  # a header, no question
@example(b"\x00" * 12 + b"\x03www", 3)  # the name cut short: the load past the end gives 0
@example(b"\x00" * 12 + b"\x41" * 39, 5)  # no root label within HASH_BYTES, cut at 51 bytes
@example(b"\x00" * 12 + b"\x41" * 40, 5)  # ... and exactly HASH_BYTES: hashed in full
@example(b"\x00" * 12 + b"\xff" * 45, 7)  # bytes past HASH_BYTES are never read
def test_the_program_returns_what_the_reference_does_for_any_packet(
    packet: bytes, workers: int
) -> None:
    assert run_cbpf(steering.program(workers), packet) == steering.worker_for(packet, workers)


def test_the_reference_partitions_names_over_every_worker() -> None:
    # Not a hash-quality claim: a program returning a constant would pass every test above.
    got = {steering.worker_for(query(f"name{i}.example."), 4) for i in range(200)}
    assert got == {0, 1, 2, 3}


# -- the kernel ------------------------------------------------------------------------------


@contextmanager
def reuseport_group(workers: int) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        port = 0
        for _ in range(workers):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", port))
            port = s.getsockname()[1]
            s.setblocking(False)
        steering.attach(socks[0], workers)
        yield socks
    finally:
        for s in socks:
            s.close()


def receiver(socks: list[socket.socket], client: socket.socket, packet: bytes) -> int:
    """The index of the group's socket that the kernel gave ``packet`` to."""
    client.sendto(packet, socks[0].getsockname())
    ready, _, _ = select.select(socks, [], [], 5.0)
    assert len(ready) == 1, f"{len(ready)} sockets readable"
    assert ready[0].recv(4096) == packet
    return socks.index(ready[0])


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_the_kernel_delivers_each_datagram_to_the_socket_the_reference_names(
    workers: int,
) -> None:
    packets = [query(f"host{i}.ns{i % 7}.svc.cluster.local.") for i in range(120)]
    packets += [query("WwW.ExAmPlE.CoM."), query("a" * 60 + ".example.")]
    packets += [b"\x00" * 12 + b"\x03www", b"\x00" * 12 + b"\x41" * 45]  # cut short; long
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        with reuseport_group(workers) as socks:
            got = [receiver(socks, client, p) for p in packets]
    want = [steering.worker_for(p, workers) for p in packets]
    assert got == want
    assert len(set(got)) == workers  # every socket of the group gets some names
