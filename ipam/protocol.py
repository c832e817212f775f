"""The node daemon's API on its Unix socket: versioned JSON messages, length-framed.

Each message is a 4-byte big-endian length and that many bytes of UTF-8 JSON. A
request is ``{"version": 1, "op": ..., ...}``; a reply is ``{"version": 1, "ok": true,
"result": {...}}`` or ``{"version": 1, "ok": false, "error": {"code": ..., "message":
...}}``. The version lets an old CNI shim and a new daemon (or the reverse) meet during a
rolling upgrade: a daemon answers a version it does not speak with ``unsupported-version``
and the versions it does, so the caller can say exactly what is wrong (the VPC CNI's gRPC
API answers a version mismatch with FailedPrecondition: ``aws/amazon-vpc-cni-k8s``,
``pkg/ipamd/rpc_handler.go``, ``validateVersion``).

Operations:

==========  ===================================================================
allocate    network, container_id, ifname, pod_namespace, pod_name, multi_nic
release     network, container_id, ifname  (idempotent): {"released": true|false}
gc          network, valid: [[container_id, ifname], ...]
status      (none)
list        (none): every allocation, for operators and tests
==========  ===================================================================

Pure encoding and validation; the server is ``ipam.server``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any

from cni.backend import Allocation
from cni.keys import InvalidKey, IpamKey, PodRef
from ipam.errors import UltranetError

VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_MESSAGE = 1 << 20  # a GC of every pod on a node is well under this
HEADER = struct.Struct(">I")
OPS = ("allocate", "release", "gc", "status", "list")


class ProtocolError(UltranetError):
    """A request the daemon cannot act on; ``code`` is what the reply says."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class AllocateRequest:
    key: IpamKey
    pod: PodRef
    multi_nic: bool


@dataclass(frozen=True, slots=True)
class ReleaseRequest:
    key: IpamKey


@dataclass(frozen=True, slots=True)
class GcRequest:
    network: str
    valid: frozenset[IpamKey]


@dataclass(frozen=True, slots=True)
class StatusRequest:
    pass


@dataclass(frozen=True, slots=True)
class ListRequest:
    pass


Request = AllocateRequest | ReleaseRequest | GcRequest | StatusRequest | ListRequest


def frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise ProtocolError("too-large", f"message of {len(body)} bytes over {MAX_MESSAGE}")
    return HEADER.pack(len(body)) + body


class FrameBuffer:
    """Frames read into one reusable buffer, for an ``asyncio.BufferedProtocol``: the
    plain transport allocates a 256 KiB bytes object for every read.

    ``view()`` answers ``get_buffer``; ``frames(nbytes)`` answers ``buffer_updated`` and
    yields each whole frame's body (a copy), raising ``ProtocolError`` on a header over
    MAX_MESSAGE. Compaction and growth happen in ``view()``: the transport still holds a
    view of the buffer while it reports a read, and a bytearray with a view cannot be
    resized.
    """

    def __init__(self, size: int = 1 << 16) -> None:
        self._buffer = bytearray(size)
        self._start = 0  # the first byte not yet taken as a frame
        self._end = 0  # the end of what has been read

    def view(self) -> memoryview:
        buffer, start, end = self._buffer, self._start, self._end
        if start == end:
            self._start = self._end = end = 0
        elif start and (end == len(buffer) or start > len(buffer) // 2):
            buffer[: end - start] = buffer[start:end]
            self._start, self._end = 0, end - start
            end -= start
        if end == len(buffer):
            # A frame larger than the buffer (a GC of many pods): make room for it. Its
            # length was checked against MAX_MESSAGE when its header arrived.
            buffer.extend(bytes(len(buffer)))
        return memoryview(buffer)[end:]

    def frames(self, nbytes: int) -> Iterator[bytearray]:
        self._end += nbytes
        buffer = self._buffer
        while self._end - self._start >= 4:
            length = frame_length(buffer[self._start : self._start + 4])
            body = self._start + 4
            if self._end < body + length:
                return
            self._start = body + length
            yield buffer[body : body + length]

    def clear(self) -> None:
        self._start = self._end = 0


def frame_length(header: bytes | bytearray) -> int:
    (length,) = HEADER.unpack(header)
    if length > MAX_MESSAGE:
        raise ProtocolError("too-large", f"message of {length} bytes over {MAX_MESSAGE}")
    return int(length)


def _field(raw: dict[str, Any], name: str, kind: type) -> Any:
    if name not in raw:
        raise ProtocolError("bad-request", f"missing field {name!r}")
    value = raw[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(
            "bad-request", f"field {name!r} must be {kind.__name__}, not {type(value).__name__}"
        )
    return value


def _key(raw: dict[str, Any]) -> IpamKey:
    try:
        return IpamKey(
            _field(raw, "network", str),
            _field(raw, "container_id", str),
            _field(raw, "ifname", str),
        )
    except InvalidKey as err:
        raise ProtocolError("bad-request", str(err)) from None


def parse_request(body: bytes | bytearray) -> Request:
    """A validated request, or ``ProtocolError`` naming what is wrong with it."""
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, ValueError) as err:
        raise ProtocolError("bad-request", f"not JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("bad-request", "a request is a JSON object")
    version = raw.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            "unsupported-version",
            f"version {version!r} is not spoken here; supported: {list(SUPPORTED_VERSIONS)}",
        )
    op = raw.get("op")
    if op == "allocate":
        try:
            pod = PodRef(_field(raw, "pod_namespace", str), _field(raw, "pod_name", str))
        except InvalidKey as err:
            raise ProtocolError("bad-request", str(err)) from None
        multi_nic = raw.get("multi_nic", False)
        if not isinstance(multi_nic, bool):
            raise ProtocolError("bad-request", "field 'multi_nic' must be bool")
        return AllocateRequest(_key(raw), pod, multi_nic)
    if op == "release":
        return ReleaseRequest(_key(raw))
    if op == "gc":
        network = _field(raw, "network", str)
        valid = _field(raw, "valid", list)
        keys = set()
        for entry in valid:
            if not (isinstance(entry, list) and len(entry) == 2):
                raise ProtocolError("bad-request", "each 'valid' entry is [container_id, ifname]")
            keys.add(_key({"network": network, "container_id": entry[0], "ifname": entry[1]}))
        return GcRequest(network, frozenset(keys))
    if op == "status":
        return StatusRequest()
    if op == "list":
        return ListRequest()
    raise ProtocolError("bad-request", f"unknown op {op!r}; known: {', '.join(OPS)}")


def ok(result: dict[str, Any]) -> dict[str, Any]:
    return {"version": VERSION, "ok": True, "result": result}


def error(code: str, message: str, **detail: Any) -> dict[str, Any]:
    return {"version": VERSION, "ok": False, "error": {"code": code, "message": message, **detail}}


def allocation_json(allocation: Allocation) -> dict[str, Any]:
    egress = allocation.egress_v4
    return {
        "network": allocation.key.network,
        "container_id": allocation.key.container_id,
        "ifname": allocation.key.ifname,
        "pod": str(allocation.pod),
        "interfaces": [
            {
                "card": lease.card,
                "address": str(lease.address),
                "prefix": str(lease.prefix),
                "eni_id": lease.eni_id,
                "device": lease.device,
                "route_table": lease.route_table,
                "gateway": str(lease.gateway),
                "subnet": str(lease.subnet),
            }
            for lease in allocation.leases
        ],
        # An IPv6 pod's node-local IPv4 (ENABLE_V4_EGRESS), when it has one.
        **({"egress_v4": str(egress)} if egress is not None else {}),
    }


def allocation_reply(allocation: Allocation) -> bytes:
    """``frame(ok(allocation_json(allocation)))``, built directly: the allocate reply is
    on the hot path, and a generic dump of the nested dict cost three times this."""
    key = allocation.key
    interfaces = ",".join(
        f'{{"card":{lease.card},"address":"{lease.address}","prefix":"{lease.prefix}",'
        f'"eni_id":{_json_str(lease.eni_id)},"device":{lease.device},'
        f'"route_table":{lease.route_table},"gateway":"{lease.gateway}",'
        f'"subnet":"{lease.subnet}"}}'
        for lease in allocation.leases
    )
    egress = "" if allocation.egress_v4 is None else f',"egress_v4":"{allocation.egress_v4}"'
    body = (
        f'{{"version":{VERSION},"ok":true,"result":{{"network":{_json_str(key.network)},'
        f'"container_id":{_json_str(key.container_id)},"ifname":{_json_str(key.ifname)},'
        f'"pod":{_json_str(str(allocation.pod))},"interfaces":[{interfaces}]{egress}}}}}'
    ).encode()
    return HEADER.pack(len(body)) + body
