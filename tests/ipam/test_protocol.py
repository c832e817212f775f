"""The socket protocol's encoding: the hand-built allocate reply says exactly what the
generic encoder would, for any names the key validation lets through."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni.backend import Allocation, Lease
from cni.keys import IpamKey, PodRef
from ipam.protocol import (
    HEADER,
    MAX_MESSAGE,
    FrameBuffer,
    ProtocolError,
    allocation_json,
    allocation_reply,
    frame,
    ok,
)

# Names as the validation admits them: any text for the network (no '/' or whitespace)
# and the pod, including quotes, backslashes, control and non-ASCII characters.
networks = st.text(min_size=1).filter(lambda s: "/" not in s and not any(c.isspace() for c in s))
container_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,40}", fullmatch=True)
pod_names = st.text(min_size=1)


@st.composite
def allocations(draw: st.DrawFn) -> Allocation:
    leases = []
    for card in range(draw(st.integers(1, 4))):
        prefix = IPv4Network((draw(st.integers(0, (1 << 28) - 1)) << 4, 28))
        leases.append(
            Lease(
                card=card,
                address=IPv4Address(int(prefix.network_address) + draw(st.integers(0, 15))),
                prefix=prefix,
                eni_id=draw(st.text(min_size=1, max_size=30)),
                device=draw(st.integers(0, 15)),
                route_table=draw(st.integers(1, 13_000)),
                gateway=IPv4Address(draw(st.integers(0, (1 << 32) - 1))),
                subnet=prefix.supernet(new_prefix=16),
            )
        )
    return Allocation(
        IpamKey(draw(networks), draw(container_ids), "eth0"),
        PodRef(draw(pod_names), draw(pod_names)),
        tuple(leases),
        draw(st.floats(0, 1e10)),
    )


@given(allocations())
def test_the_allocate_reply_matches_the_generic_encoding(allocation: Allocation) -> None:
    fast = allocation_reply(allocation)
    (length,) = HEADER.unpack_from(fast)
    assert length == len(fast) - 4
    assert json.loads(fast[4:]) == ok(allocation_json(allocation))
    assert json.loads(frame(ok(allocation_json(allocation)))[4:]) == json.loads(fast[4:])


def _read(buffer: FrameBuffer, data: bytes, chunk: int) -> list[bytes]:
    """Feed ``data`` as a transport would, ``chunk`` bytes per read."""
    bodies: list[bytes] = []
    while data:
        view = buffer.view()
        n = min(chunk, len(view), len(data))
        view[:n] = data[:n]
        del view
        data = data[n:]
        bodies.extend(bytes(b) for b in buffer.frames(n))
    return bodies


def test_frame_buffer_splits_joins_and_grows() -> None:
    messages = [{"op": "status"}, {"op": "list", "pad": "x" * 200_000}, {"op": "status", "n": 2}]
    data = b"".join(frame(m) for m in messages)
    for chunk in (1, 7, 4096, len(data)):
        bodies = _read(FrameBuffer(size=64), data, chunk)
        assert [json.loads(b) for b in bodies] == messages


def test_frame_buffer_refuses_a_header_over_the_limit() -> None:
    buffer = FrameBuffer()
    with pytest.raises(ProtocolError, match="too-large"):
        _read(buffer, (MAX_MESSAGE + 1).to_bytes(4, "big") + b"x", 64)
