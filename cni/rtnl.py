"""The few rtnetlink requests of ADD and DEL, encoded by hand and sent in batches.

Why not pyroute2 here: measured in the lab, each pyroute2 ``AsyncIPRoute`` request
costs 0.4-0.8 ms of Python (message objects, futures) against ~0.05 ms in the kernel,
and an ADD makes eleven of them: ~9 ms, most of the latency budget (the ADD bar is
1.5x the Go reference's ~11 ms, and the shim's interpreter start alone takes 6-7 ms).
Encoding the fixed set of messages with ``struct`` and sending each group as one
``sendmsg`` (the kernel processes a batch in order and acks each message,
``netlink_rcv_skb``) brings that to ~2 ms. pyroute2 still serves CHECK and the dumps,
where its parsing is worth its cost.

Layouts are the kernel's UAPI (``linux/netlink.h``, ``rtnetlink.h``, ``if_link.h``,
``fib_rules.h``, ``neighbour.h``).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

__all__ = ["Message", "Rtnl", "RtnlError"]

_HDR = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BxxxiHBB")
_FIBRULE = struct.Struct("=BBBBBBBBI")

NLMSG_ERROR = 2
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR = 20
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTM_NEWNEIGH = 28
RTM_NEWRULE, RTM_DELRULE = 32, 33
F_REQUEST, F_ACK, F_EXCL, F_CREATE = 0x1, 0x4, 0x200, 0x400
_NEW = F_REQUEST | F_ACK | F_CREATE | F_EXCL
_DEL = F_REQUEST | F_ACK
IFF_UP = 0x1
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 4, 18, 28
IFLA_IFALIAS = 20
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NDA_DST, NDA_LLADDR = 1, 2
FRA_DST, FRA_SRC, FRA_PRIORITY, FRA_TABLE = 1, 2, 6, 15
RTN_UNICAST, RTPROT_BOOT, FR_ACT_TO_TBL = 1, 3, 1
SCOPE_UNIVERSE, SCOPE_LINK = 0, 253
NUD_PERMANENT = 0x80
AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
IFA_F_NODAD = 0x02

Address = IPv4Address | IPv6Address


class RtnlError(OSError):
    """A request of a batch failed; ``what`` names it."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(code, f"{what}: {errno.errorcode.get(code, code)} ({code})")
        self.what = what


@dataclass(frozen=True, slots=True)
class Message:
    kind: int
    flags: int
    body: bytes
    what: str  # for error messages
    ignore: tuple[int, ...] = ()  # errnos that mean "already so"


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _name(name: str) -> bytes:
    return name.encode() + b"\0"


def _mac(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _u32(value: int) -> bytes:
    return struct.pack("=I", value)


def _family(addr: Address) -> int:
    return AF_INET if addr.version == 4 else AF_INET6


def _table(table: int) -> int:
    return table if table < 256 else 0  # RT_TABLE_UNSPEC; RTA/FRA_TABLE carries it


# -- message builders ------------------------------------------------------------------------


def veth(host: str, host_mac: str, peer: str, peer_mac: str, netns_fd: int, mtu: int) -> Message:
    """The host end up at creation; the peer goes straight into the pod's namespace,
    down: a veth end cannot open before its pair is linked (``veth_open``: ENOTCONN),
    so the pod side comes up with :func:`link_up`."""
    peer_body = _IFINFO.pack(0, 0, 0, 0, 0) + b"".join(
        (
            _attr(IFLA_IFNAME, _name(peer)),
            _attr(IFLA_ADDRESS, _mac(peer_mac)),
            _attr(IFLA_MTU, _u32(mtu)),
            _attr(IFLA_NET_NS_FD, _u32(netns_fd)),
        )
    )
    info = _attr(IFLA_INFO_KIND, b"veth\0") + _attr(
        IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer_body)
    )
    body = _IFINFO.pack(0, 0, 0, IFF_UP, IFF_UP) + b"".join(
        (
            _attr(IFLA_IFNAME, _name(host)),
            _attr(IFLA_ADDRESS, _mac(host_mac)),
            _attr(IFLA_MTU, _u32(mtu)),
            _attr(IFLA_LINKINFO, info),
        )
    )
    return Message(RTM_NEWLINK, _NEW, body, f"create veth {host} <-> {peer}")


def link_up(index: int, what: str) -> Message:
    body = _IFINFO.pack(0, 0, index, IFF_UP, IFF_UP)
    return Message(RTM_NEWLINK, F_REQUEST | F_ACK, body, what)


def link_alias(index: int, alias: str, what: str) -> Message:
    """Set the link's alias (``ip link set ... alias``); the kernel ignores one given
    at creation, so it takes its own message."""
    body = _IFINFO.pack(0, 0, index, 0, 0) + _attr(IFLA_IFALIAS, alias.encode())
    return Message(RTM_NEWLINK, F_REQUEST | F_ACK, body, what)


def get_link(name: str) -> Message:
    body = _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(name))
    return Message(RTM_GETLINK, F_REQUEST, body, f"find link {name}")


def address(index: int, addr: Address, what: str, *, scope: int = SCOPE_UNIVERSE) -> Message:
    """``addr/32`` or ``addr/128``; an IPv6 one with ``nodad``: usable at once, not
    tentative for DAD's second (the address is the pod's alone, by its allocation).
    ``scope`` link: never a source for traffic that leaves the link (a gateway address)."""
    packed = addr.packed
    flags = IFA_F_NODAD if addr.version == 6 else 0
    body = _IFADDR.pack(_family(addr), addr.max_prefixlen, flags, scope, index)
    body += _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
    return Message(RTM_NEWADDR, _NEW, body, what)


def route(
    index: int,
    dst: Address | None,
    *,
    table: int,
    gateway: Address | None = None,
    delete: bool = False,
    what: str,
) -> Message:
    """``dst/32`` or ``dst/128`` (None: the default route of the gateway's family)
    ``dev index``; scope link without gateway."""
    scope = SCOPE_UNIVERSE if gateway is not None else SCOPE_LINK
    given = dst if dst is not None else gateway
    if given is None:
        raise ValueError("a route needs a destination or a gateway")
    length = 0 if dst is None else dst.max_prefixlen
    body = _RTMSG.pack(
        _family(given), length, 0, 0, _table(table), RTPROT_BOOT, scope, RTN_UNICAST, 0
    )
    if dst is not None:
        body += _attr(RTA_DST, dst.packed)
    if gateway is not None:
        body += _attr(RTA_GATEWAY, gateway.packed)
    body += _attr(RTA_OIF, _u32(index)) + _attr(RTA_TABLE, _u32(table))
    if delete:
        return Message(RTM_DELROUTE, _DEL, body, what, (errno.ESRCH, errno.ENODEV))
    return Message(RTM_NEWROUTE, _NEW, body, what)


def neighbour(index: int, dst: Address, mac: str, what: str) -> Message:
    body = _NDMSG.pack(_family(dst), index, NUD_PERMANENT, 0, 0)
    body += _attr(NDA_DST, dst.packed) + _attr(NDA_LLADDR, _mac(mac))
    return Message(RTM_NEWNEIGH, _NEW, body, what)


def rule(
    side: str, addr: Address, priority: int, table: int | None, *, delete: bool = False
) -> Message:
    """``from|to addr/32 (/128) lookup table`` at ``priority``; a delete with table None
    matches any table (``fib_nl_delrule`` treats unset fields as wildcards)."""
    full = addr.max_prefixlen
    src_len, dst_len = (full, 0) if side == "src" else (0, full)
    action = 0 if delete and table is None else FR_ACT_TO_TBL
    head_table = 0 if table is None else _table(table)
    body = _FIBRULE.pack(_family(addr), dst_len, src_len, 0, head_table, 0, 0, action, 0)
    body += _attr(FRA_SRC if side == "src" else FRA_DST, addr.packed)
    body += _attr(FRA_PRIORITY, _u32(priority))
    if table is not None:
        body += _attr(FRA_TABLE, _u32(table))
    word = "from" if side == "src" else "to"
    what = f"rule {word} {addr} lookup {table if table is not None else 'any'} prio {priority}"
    if delete:
        return Message(RTM_DELRULE, _DEL, body, what, (errno.ENOENT,))
    # With NLM_F_EXCL the kernel answers EEXIST only for a rule equal in every field
    # (fib_rules.c rule_exists: priority, table, action, selectors...): the rule asked for
    # is there already. For a host rule of a pod's address that is one a pod before it
    # left (its DEL never ran): the address is this ADD's by its allocation and the rule
    # points the same way, so it is taken over, and this pod's DEL removes it.
    return Message(RTM_NEWRULE, _NEW, body, what, (errno.EEXIST,))


# -- the socket --------------------------------------------------------------------------------


class Rtnl:
    """A blocking NETLINK_ROUTE socket (already in its namespace) sending batches."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def batch(self, messages: Sequence[Message]) -> list[int]:
        """Send all, then read every answer; errnos per message (0: done).

        Raises ``RtnlError`` for the first failure not in the message's ``ignore``,
        after every answer is read (the socket stays in step)."""
        codes = self._exchange(messages)
        for message, code in zip(messages, codes, strict=True):
            if code and code not in message.ignore:
                raise RtnlError(code, message.what)
        return codes

    def link_index(self, name: str) -> int | None:
        """The ifindex of ``name``, or None if there is no such link."""
        message = get_link(name)
        self._seq += 1
        seq = self._seq
        header = _HDR.pack(16 + len(message.body), message.kind, message.flags, seq, 0)
        self._sock.sendto(header + message.body, (0, 0))
        while True:
            for kind, got, payload in self._replies():
                if got != seq:
                    continue
                if kind == RTM_NEWLINK:
                    return int(_IFINFO.unpack_from(payload)[2])
                if kind == NLMSG_ERROR:
                    code = -int(struct.unpack_from("=i", payload)[0])
                    if code == errno.ENODEV:
                        return None
                    raise RtnlError(code, message.what)

    def _exchange(self, messages: Sequence[Message]) -> list[int]:
        if not messages:
            return []
        first = self._seq + 1
        chunks = []
        for message in messages:
            self._seq += 1
            size = 16 + len(message.body)
            chunks.append(_HDR.pack(size, message.kind, message.flags, self._seq, 0) + message.body)
        self._sock.sendto(b"".join(chunks), (0, 0))
        codes: dict[int, int] = {}
        while len(codes) < len(messages):
            for kind, seq, payload in self._replies():
                if kind == NLMSG_ERROR and first <= seq <= self._seq:
                    codes[seq] = -int(struct.unpack_from("=i", payload)[0])
        return [codes[seq] for seq in range(first, self._seq + 1)]

    def _replies(self) -> list[tuple[int, int, bytes]]:
        data = self._sock.recv(1 << 16)
        out = []
        offset = 0
        while offset + 16 <= len(data):
            size, kind, _, seq, _ = _HDR.unpack_from(data, offset)
            out.append((kind, seq, data[offset + 16 : offset + size]))
            offset += (max(size, 16) + 3) & ~3
        return out
