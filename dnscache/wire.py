"""DNS messages read and written as bytes: the hit fast path and the walker used on inserts.

Pure: no I/O. A cache hit never builds a message object: ``fast_query`` finds the question
(RFC 1035 §4.1.2) and the OPT record (RFC 6891 §6.1.2) by offset, and the reply is spliced
from the client's ID and question bytes (so a 0x20 mixed-case question is echoed exactly,
draft-vixie-dnsext-dns0x20) and the cached sections. ``walk_response`` checks an upstream
reply once, records where its TTLs are, and strips its OPT (hop-by-hop, RFC 6891 §6.1.1).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple

from .errors import OptNotLast, WireError

HEADER_LEN = 12
MIN_PAYLOAD = 512  # RFC 6891 §6.2.3: sizes below 512 are treated as 512
TYPE_SOA = 6
TYPE_OPT = 41
TYPE_IXFR = 251
TYPE_AXFR = 252
TYPE_ANY = 255
_QR = 0x80
_AA = 0x04
_TC = 0x02
_RD = 0x01
_CD = 0x10
_DO = 0x80  # high bit of the OPT TTL's flags word (RFC 3225)
# The key's last byte: DO << 1 | CD. Both change the answer, so both are in the key.
KEY_SUFFIX = (b"\x00", b"\x01", b"\x02", b"\x03")


# Plain ints for the hot paths (an IntEnum member is a slower attribute lookup).
NOERROR, FORMERR, SERVFAIL, NXDOMAIN = 0, 1, 2, 3


class Rcode(enum.IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5
    BADVERS = 16  # extended, RFC 6891 §9


def opt_record(payload: int, do: bool, ext_rcode: int = 0) -> bytes:
    """Our own OPT RR: root name, type 41, class = payload size, TTL = ext-rcode/version/flags."""
    return (
        b"\x00\x00\x29"
        + payload.to_bytes(2, "big")
        + bytes((ext_rcode, 0, _DO if do else 0, 0))
        + b"\x00\x00"
    )


_OPT_FIXED = struct.Struct(">BHHBBBxH")  # root, type, size, ext-rcode, version, DO..., RDLEN


def fast_query(data: bytes, max_payload: int) -> tuple[bytes, int, int] | None:
    """The fast path's parse of a plain query: ``(key, question_end, limit)`` or None.

    ``key`` is the lower-cased question (name, type, class) plus one byte DO<<1|CD.
    ``limit`` is 0 without EDNS, else the client's payload size bounded to [512, max_payload].
    None means "not the common shape" (opcode, counts, a pointer in the question, several
    additional records, trailing bytes...): the caller then runs ``parse_query``, which
    answers every case precisely. Lower-casing the wire name is exact: length bytes are at
    most 63, below ``A``, so ``bytes.lower`` only touches letters.
    """
    n = len(data)
    if n < 17 or data[2] & 0xF8 or data[4:10] != b"\x00\x01\x00\x00\x00\x00" or data[10]:
        return None
    # The first zero byte ends the name in every well-formed question; if a label held a zero
    # byte, the "question" found is not one any cached key was made from, so it can only miss,
    # and every miss is checked in full by ``parse_query`` before it goes upstream.
    i = data.find(0, 12)
    if i < 0:
        return None
    qend = i + 5
    ar = data[11]
    cd = data[3] >> 4 & 1  # _CD
    if ar == 0:
        if qend != n:
            return None
        return data[12:qend].lower() + KEY_SUFFIX[cd], qend, 0
    if ar != 1 or n < qend + 11:
        return None
    root, rtype, size, _, version, dnssec, rdlen = _OPT_FIXED.unpack_from(data, qend)
    if root or rtype != TYPE_OPT or version or qend + 11 + rdlen != n:
        return None  # EDNS version > 0 (BADVERS) or a malformed OPT: the slow path answers
    limit = MIN_PAYLOAD if size < MIN_PAYLOAD else (size if size < max_payload else max_payload)
    return data[12:qend].lower() + KEY_SUFFIX[dnssec >> 6 & 2 | cd], qend, limit


def question_ok(data: bytes, qend: int) -> bool:
    """Whether the labels from offset 12 really end at ``qend - 5`` (checked on misses only)."""
    end = qend - 5
    if end - 12 >= 255:
        return False
    i = 12
    while i < end:
        length = data[i]
        if not 0 < length < 64:
            return False
        i += length + 1
    return i == end


@dataclass(frozen=True, slots=True)
class Query:
    """A query checked in full by ``parse_query``."""

    key: bytes
    question_end: int
    limit: int  # 0: no EDNS
    qtype: int


def _skip_name(data: bytes, i: int, n: int) -> int:
    """Index after the name at ``i``; pointers must point backwards (no loops)."""
    start = i
    while True:
        if i >= n:
            raise WireError("name runs past the end of the message")
        length = data[i]
        if length == 0:
            return i + 1
        if length >= 0xC0:
            if i + 1 >= n:
                raise WireError("truncated compression pointer")
            if ((length & 0x3F) << 8 | data[i + 1]) >= start:
                raise WireError("compression pointer does not point backwards")
            return i + 2
        if length > 63:
            raise WireError(f"bad label length byte 0x{length:02x}")
        i += length + 1
        if i - start > 255:
            raise WireError("name longer than 255 bytes")


def _question_end(data: bytes) -> int:
    n = len(data)
    i = 12
    while True:
        if i >= n:
            raise WireError("question name runs past the end of the message")
        length = data[i]
        if length == 0:
            break
        if length > 63:
            raise WireError("compression or bad label in the question")
        i += length + 1
    if i - 12 > 255:
        raise WireError("question name longer than 255 bytes")
    if i + 5 > n:
        raise WireError("question type and class missing")
    return i + 5


def parse_query(data: bytes, max_payload: int) -> Query:
    """Check a query in full. Raises ``WireError`` with the rcode to answer (FORMERR, NOTIMP,
    BADVERS); ``WireError.rcode`` is None when the message must be dropped unanswered
    (shorter than a header, or a response: answering responses makes loops)."""
    if len(data) < HEADER_LEN:
        raise WireError("shorter than a DNS header", rcode=None)
    if data[2] & _QR:
        raise WireError("a response, not a query", rcode=None)
    if (data[2] >> 3) & 0x0F != 0:
        raise WireError(f"opcode {(data[2] >> 3) & 0x0F} not implemented", rcode=Rcode.NOTIMP)
    qd, an, ns, ar = (int.from_bytes(data[i : i + 2], "big") for i in (4, 6, 8, 10))
    if qd != 1 or an or ns:
        raise WireError(f"query with counts qd={qd} an={an} ns={ns}", rcode=Rcode.FORMERR)
    qend = _question_end(data)
    qtype = data[qend - 4] << 8 | data[qend - 3]
    n = len(data)
    i, limit, do, seen_opt = qend, 0, 0, False
    for _ in range(ar):
        name_end = _skip_name(data, i, n)
        if name_end + 10 > n:
            raise WireError("additional record header truncated")
        rtype = data[name_end] << 8 | data[name_end + 1]
        end = name_end + 10 + (data[name_end + 8] << 8 | data[name_end + 9])
        if end > n:
            raise WireError("additional record data truncated")
        if rtype == TYPE_OPT:
            if seen_opt or name_end != i + 1:
                raise WireError("more than one OPT, or OPT not at the root")
            seen_opt = True
            if data[name_end + 5] != 0:
                raise WireError(f"EDNS version {data[name_end + 5]}", rcode=Rcode.BADVERS)
            size = data[name_end + 2] << 8 | data[name_end + 3]
            limit = max(MIN_PAYLOAD, min(size, max_payload))
            do = 2 if data[name_end + 6] & _DO else 0
        i = end
    if i != n:
        raise WireError("trailing bytes after the last record")
    cd = 1 if data[3] & _CD else 0
    return Query(data[12:qend].lower() + KEY_SUFFIX[do | cd], qend, limit, qtype)


def error_reply(
    data: bytes, rcode: int, question_end: int = 0, limit: int = 0, do: bool = False
) -> bytes:
    """A reply with no records: the query's ID, opcode and RD, the question when known, and an
    OPT when the client sent one (``limit`` > 0; needed for the extended rcode BADVERS)."""
    ext, low = rcode >> 4, rcode & 0x0F
    flags = bytes((_QR | (data[2] & 0x79), 0x80 | (data[3] & _CD) | low))
    edns = limit > 0 or ext > 0
    head = data[:2] + flags + (b"\x00\x01" if question_end else b"\x00\x00") + b"\x00\x00\x00\x00"
    head += b"\x00\x01" if edns else b"\x00\x00"
    question = data[12:question_end] if question_end else b""
    return head + question + (opt_record(1232, do, ext) if edns else b"")


_QUERY_TAILS: dict[tuple[int, int], tuple[bytes, bytes]] = {}


def make_upstream_query(qid: int | bytes, key: bytes, payload: int) -> bytes:
    """Our query upstream: fresh ``qid`` (an int, or its two bytes), RD=1, CD as the client had
    it, our own OPT with DO as the client had it (RFC 6891: OPT is hop-by-hop; we advertise our
    own payload size). The header after the ID and the OPT depend only on the key's flag byte
    and the payload size, so they are made once."""
    flags = key[-1]
    tail = _QUERY_TAILS.get((flags, payload))
    if tail is None:
        head = bytes((_RD, _CD if flags & 1 else 0, 0, 1, 0, 0, 0, 0, 0, 1 if payload else 0))
        opt = opt_record(payload, bool(flags & 2)) if payload else b""
        tail = _QUERY_TAILS[(flags, payload)] = (head, opt)
    qid_bytes = qid if isinstance(qid, bytes) else qid.to_bytes(2, "big")
    return qid_bytes + tail[0] + key[:-1] + tail[1]


class Walked(NamedTuple):
    """An upstream response checked once: what the cache stores and how long. (A named
    tuple: made on every miss, and cheaper to build than an object with attributes.)"""

    flags: bytes  # header bytes 2-3 as the upstream sent them (``heads`` sets RD per client)
    an: int
    ns: int
    ar: int  # without the OPT
    body: bytes  # every section after the question, without the OPT
    ttl_offsets: tuple[int, ...]  # offsets in ``body`` of every TTL field
    min_ttl: int | None  # smallest TTL over all records; None when there are none
    negative_ttl: int | None  # RFC 2308 §5: min(SOA TTL, SOA MINIMUM) of the authority SOA
    has_answer: bool  # an answer record of the question's type (or CNAME/ANY asked)
    rcode: int
    truncated: bool
    upstream_ext_rcode: int
    max_ttl: int = -1  # largest TTL (-1 without records): min == max means one TTL throughout
    heads_key: bytes = b""  # header bytes 2-12 of the response (``heads_for`` keys on them)


def response_question_matches(resp: bytes, key: bytes) -> bool:
    """RFC 5452 §9.1: accept only the question we asked (compared case-insensitively)."""
    q = key[:-1]
    end = HEADER_LEN + len(q)
    return (
        len(resp) >= end
        and resp[2] & _QR != 0
        and resp[4:6] == b"\x00\x01"
        and resp[HEADER_LEN:end].lower() == q
    )


def response_matches(resp: bytes, qid: bytes, question: bytes) -> bool:
    """Both checks at once for the UDP path: ``qid`` our ID's two bytes, ``question`` the
    lower-case question we sent. Upstreams echo it as sent, so the exact comparison nearly
    always decides; a different case is compared case-insensitively."""
    if resp[:2] != qid or len(resp) < HEADER_LEN or not resp[2] & _QR or resp[4:6] != b"\x00\x01":
        return False
    got = resp[HEADER_LEN : HEADER_LEN + len(question)]
    return got == question or got.lower() == question


_RR = struct.Struct(">HHIH")  # type, class, TTL, RDLENGTH after a record's owner name
_PRR = struct.Struct(">HHHIH")  # the same after an owner name that is one pointer
_COUNTS = struct.Struct(">HHH")
_NO_TTL = 1 << 32


def walk_response(resp: bytes, question_len: int) -> Walked:
    """Walk every record of an upstream response (its question already matched). Raises
    ``WireError`` when it is malformed; the caller answers SERVFAIL and caches nothing.

    This runs on every miss, so the usual shape has its own loop: answer and authority
    records whose owner name is one compression pointer (read with the record's fixed
    fields in one ``unpack_from``), then the additional section. A short buffer surfaces as
    ``struct.error`` or ``IndexError``, caught once. Any other shape (an owner name with
    labels, a forward pointer...) is walked again by ``_walk_general``, record by record.
    """
    n = len(resp)
    qend = i = HEADER_LEN + question_len
    if n < qend:
        raise WireError("response shorter than its question")
    an, ns, ar = _COUNTS.unpack_from(resp, 6)
    qtype = resp[qend - 4] << 8 | resp[qend - 3]
    offsets: list[int] = []
    lo, hi = _NO_TTL, -1
    negative: int | None = None
    has_answer = False
    unpack = _PRR.unpack_from
    try:
        for _ in range(an):
            ptr, rtype, _c, ttl, rdlen = unpack(resp, i)
            if ptr < 0xC000 or ptr - 0xC000 >= i or rtype == TYPE_OPT:
                return _walk_general(resp, question_len)
            if ttl > 0x7FFFFFFF:
                ttl = 0  # RFC 2181 §8: a TTL with the top bit set is read as zero
            offsets.append(i + 6 - qend)
            if ttl < lo:
                lo = ttl
            if ttl > hi:
                hi = ttl
            if rtype == qtype or qtype == TYPE_ANY:
                has_answer = True
            i += 12 + rdlen
        for _ in range(ns):
            ptr, rtype, _c, ttl, rdlen = unpack(resp, i)
            if ptr < 0xC000 or ptr - 0xC000 >= i or rtype == TYPE_OPT:
                return _walk_general(resp, question_len)
            if ttl > 0x7FFFFFFF:
                ttl = 0
            offsets.append(i + 6 - qend)
            if ttl < lo:
                lo = ttl
            if ttl > hi:
                hi = ttl
            i += 12 + rdlen
            if rtype == TYPE_SOA and rdlen >= 22:
                soa_min = int.from_bytes(resp[i - 4 : i], "big")
                negative = ttl if ttl < soa_min else soa_min
        if i > n:
            raise WireError("record data truncated")
        opt_start = -1
        ext_rcode = 0
        for _ in range(ar):
            if opt_start >= 0:
                raise OptNotLast("OPT is not the last record")
            b = resp[i]
            if b == 0:  # the root: OPT's owner
                name_end = i + 1
            elif b >= 0xC0 and ((b & 0x3F) << 8 | resp[i + 1]) < i:
                name_end = i + 2
            else:
                return _walk_general(resp, question_len)
            rtype, _c, ttl, rdlen = _RR.unpack_from(resp, name_end)
            if rtype == TYPE_OPT:
                opt_start = i
                ext_rcode = resp[name_end + 4]
            else:
                if ttl > 0x7FFFFFFF:
                    ttl = 0
                offsets.append(name_end + 4 - qend)
                if ttl < lo:
                    lo = ttl
                if ttl > hi:
                    hi = ttl
            i = name_end + 10 + rdlen
    except (IndexError, struct.error):
        raise WireError("record header truncated") from None
    if i > n:
        raise WireError("record data truncated")
    return Walked(
        resp[2:4],
        an,
        ns,
        ar - 1 if opt_start >= 0 else ar,
        resp[qend : opt_start if opt_start >= 0 else i],
        tuple(offsets),
        lo if hi >= 0 else None,
        negative,
        has_answer,
        resp[3] & 0x0F | ext_rcode << 4,
        resp[2] & _TC != 0,
        ext_rcode,
        hi,
        resp[2:12],
    )


def _walk_general(resp: bytes, question_len: int) -> Walked:
    """``walk_response`` for any shape: every owner name walked (``_skip_name``)."""
    n = len(resp)
    if n < HEADER_LEN + question_len:
        raise WireError("response shorter than its question")
    qtype = resp[HEADER_LEN + question_len - 4] << 8 | resp[HEADER_LEN + question_len - 3]
    counts = _COUNTS.unpack_from(resp, 6)
    i = HEADER_LEN + question_len
    qend = i
    ttl_offsets: list[int] = []
    lo, hi = _NO_TTL, -1
    negative: int | None = None
    has_answer = False
    opt_span: tuple[int, int] | None = None
    ext_rcode = 0
    for section, count in enumerate(counts):
        for _ in range(count):
            name_end = _skip_name(resp, i, n)
            if name_end + 10 > n:
                raise WireError("record header truncated")
            rtype, _, ttl, rdlen = _RR.unpack_from(resp, name_end)
            end = name_end + 10 + rdlen
            if end > n:
                raise WireError("record data truncated")
            if rtype == TYPE_OPT:
                if section != 2 or opt_span is not None:
                    raise WireError("OPT outside the additional section, or twice")
                opt_span = (i, end)
                ext_rcode = resp[name_end + 4]
                i = end
                continue
            if opt_span is not None:
                raise OptNotLast("OPT is not the last record")
            if ttl & 0x80000000:
                ttl = 0  # RFC 2181 §8: a TTL with the top bit set is read as zero
            ttl_offsets.append(name_end + 4 - qend)
            lo, hi = min(lo, ttl), max(hi, ttl)
            if section == 0:
                if rtype == qtype or qtype == TYPE_ANY:
                    has_answer = True
            elif section == 1 and rtype == TYPE_SOA and rdlen >= 22:
                soa_min = int.from_bytes(resp[end - 4 : end], "big")
                negative = ttl if ttl < soa_min else soa_min
            i = end
    body_end = opt_span[0] if opt_span is not None else i
    return Walked(
        resp[2:4],
        counts[0],
        counts[1],
        counts[2] - (1 if opt_span is not None else 0),
        resp[qend:body_end],
        tuple(ttl_offsets),
        lo if hi >= 0 else None,
        negative,
        has_answer,
        resp[3] & 0x0F | ext_rcode << 4,
        bool(resp[2] & _TC),
        ext_rcode,
        hi,
        resp[2:12],
    )


_HEADS = struct.Struct(">" + "BBHHHH" * 4)


def heads(flags: bytes, an: int, ns: int, ar: int) -> tuple[bytes, bytes, bytes, bytes]:
    """The 10 header bytes after the ID, indexed by RD << 1 | EDNS (EDNS adds our OPT)."""
    f0, f1 = flags[0] & ~_RD & 0xFF, flags[1]
    r0, a1 = f0 | _RD, ar + 1
    b = _HEADS.pack(
        f0, f1, 1, an, ns, ar, f0, f1, 1, an, ns, a1, r0, f1, 1, an, ns, ar, r0, f1, 1, an, ns, a1
    )
    return b[:10], b[10:20], b[20:30], b[30:]


_HEADS_SEEN: dict[bytes, tuple[bytes, bytes, bytes, bytes]] = {}


def heads_for(w: Walked) -> tuple[bytes, bytes, bytes, bytes]:
    """``heads`` of a walked response, shared by every response of the same flags and counts
    (most answers come in a few shapes: one A record, an NXDOMAIN with its SOA...)."""
    found = _HEADS_SEEN.get(w.heads_key)
    if found is None or w.ar != found[0][9] | found[0][8] << 8:
        found = heads(w.flags, w.an, w.ns, w.ar)
        if len(_HEADS_SEEN) >= 4096:
            _HEADS_SEEN.clear()
        _HEADS_SEEN[w.heads_key] = found
    return found


def truncated_heads(flags: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """Header bytes of a TC=1 reply with the question only (RFC 6891 §7, RFC 1035 §4.2.1)."""
    return heads(bytes(((flags[0] | _TC) & 0xFF, flags[1])), 0, 0, 0)


OPT_REPLY = (opt_record(1232, False), opt_record(1232, True))
