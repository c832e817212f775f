"""Steer each UDP question to one worker: a classic BPF program on the SO_REUSEPORT group.

With N workers each holding its own cache, the kernel's default 4-tuple hash spreads one name
over every worker and each warms its own copy (the CoreDNS-replica dilution). A program
attached with SO_ATTACH_REUSEPORT_CBPF (Linux >= 4.5) instead returns the index of the socket
that gets the packet, and it sees the UDP payload from offset 0, the DNS header. It hashes the
first ``HASH_BYTES`` bytes of the question name from offset 12, stopping at the root label, each
byte folded with ``& 0xDF`` so that 0x20 mixed case lands on the same worker, and returns
``hash % N``. So every question for a name goes to the one worker that caches it: the N caches
partition the names and together act as one cache.

An index past the group's size, or a load past the packet's end (a malformed packet), falls
back to socket 0 or the kernel's hash; those packets are answered as usual (FORMERR or a
correct, if less cached, answer). The index is the socket's position in the group, the order
the sockets joined: the supervisor creates them all, in order, and holds them open for the
group's life, so a restarted worker gets the same socket and the same names.

TCP is not steered (a SYN has no DNS payload): a TCP query is answered by whichever worker
accepted the connection, from its own cache. TCP follows truncation, so it is rare on this path.
"""

from __future__ import annotations

import socket
import struct

from .errors import DnscacheError

SO_ATTACH_REUSEPORT_CBPF = 51
HASH_BYTES = 40  # the jump over the unrolled loop must fit the 8-bit jt field
_MULT = 0x01000193  # the FNV-1 32-bit prime

# Classic BPF opcodes (linux/filter.h, linux/bpf_common.h)
_LD_B_ABS = 0x30
_LDX_IMM = 0x01
_JEQ_K = 0x15
_AND_K = 0x54
_ADD_X = 0x0C
_MUL_K = 0x24
_RSH_K = 0x74
_XOR_X = 0xAC
_MOD_K = 0x94
_TAX = 0x07
_TXA = 0x87
_RET_A = 0x16

Insn = tuple[int, int, int, int]


def program(workers: int) -> list[Insn]:
    """The steering program as (code, jt, jf, k) instructions."""
    if workers < 2:
        raise ValueError("steering needs at least two sockets")
    insns: list[Insn] = [(_LDX_IMM, 0, 0, 0)]
    done = 1 + 6 * HASH_BYTES
    for i in range(HASH_BYTES):
        insns.append((_LD_B_ABS, 0, 0, 12 + i))
        insns.append((_JEQ_K, done - len(insns) - 1, 0, 0))
        insns += [(_AND_K, 0, 0, 0xDF), (_ADD_X, 0, 0, 0), (_MUL_K, 0, 0, _MULT), (_TAX, 0, 0, 0)]
    insns += [(_TXA, 0, 0, 0), (_RSH_K, 0, 0, 16), (_XOR_X, 0, 0, 0)]
    insns += [(_MOD_K, 0, 0, workers), (_RET_A, 0, 0, 0)]
    assert len(insns) == done + 5
    return insns


def worker_for(query: bytes, workers: int) -> int:
    """What the program returns for ``query`` (a UDP payload): its specification in Python,
    which the tests hold the program to. A packet that ends before the root label (within
    ``HASH_BYTES``) makes the program load past its end, which ends it with 0: socket 0."""
    h = 0
    for offset in range(12, 12 + HASH_BYTES):
        if offset >= len(query):
            return 0
        b = query[offset]
        if b == 0:
            break
        h = ((h + (b & 0xDF)) * _MULT) & 0xFFFFFFFF
    return ((h >> 16) ^ h) % workers


def attach(sock: socket.socket, workers: int) -> None:
    """Attach the program to ``sock``'s reuseport group (any member will do)."""
    insns = program(workers)
    filt = b"".join(struct.pack("HBBI", *i) for i in insns)
    buf = _buffer(filt)
    fprog = struct.pack("HL", len(insns), _address(buf))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:
        raise DnscacheError(
            f"SO_ATTACH_REUSEPORT_CBPF on {sock.getsockname()}: {exc.strerror} "
            "(needs Linux >= 4.5; set steering: false to run unsteered, with dilution)"
        ) from exc


def _buffer(data: bytes) -> object:
    import ctypes

    return ctypes.create_string_buffer(data, len(data))


def _address(buf: object) -> int:
    import ctypes

    return ctypes.addressof(buf)  # type: ignore[arg-type]
