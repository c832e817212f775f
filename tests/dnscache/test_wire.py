"""The wire fast path and the response walker, against messages built by dnslib."""

from __future__ import annotations

import dnslib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnscache.errors import OptNotLast, WireError
from dnscache.wire import (
    Rcode,
    error_reply,
    fast_query,
    make_upstream_query,
    parse_query,
    response_question_matches,
    walk_response,
)


def q(
    name: str = "www.Example.COM",
    qtype: str = "A",
    payload: int | None = 1232,
    do: bool = False,
    cd: bool = False,
) -> bytes:
    rec = dnslib.DNSRecord.question(name, qtype)
    rec.header.cd = int(cd)
    if payload is not None:
        rec.add_ar(dnslib.EDNS0(udp_len=payload, flags="do" if do else ""))
    return bytes(rec.pack())


def test_fast_key_is_case_insensitive_and_keeps_do_cd_apart() -> None:
    a = fast_query(q("www.Example.COM"), 1232)
    b = fast_query(q("WWW.example.com"), 1232)
    assert a is not None and b is not None and a[0] == b[0]
    keys = {fast_query(q(do=do, cd=cd), 1232)[0] for do in (0, 1) for cd in (0, 1)}  # type: ignore[index]
    assert len(keys) == 4
    assert fast_query(q(qtype="AAAA"), 1232)[0] != a[0]  # type: ignore[index]


@pytest.mark.parametrize(
    ("payload", "limit"), [(None, 0), (100, 512), (512, 512), (1232, 1232), (4096, 1232)]
)
def test_fast_query_limit_is_the_clients_size_bounded(payload: int | None, limit: int) -> None:
    r = fast_query(q(payload=payload), 1232)
    assert r is not None and r[2] == limit


def test_fast_and_slow_parse_agree() -> None:
    for data in (q(), q(payload=None), q(do=True, cd=True), q("a.b.c.d.e.f", "TXT")):
        fast = fast_query(data, 1232)
        slow = parse_query(data, 1232)
        assert fast == (slow.key, slow.question_end, slow.limit)


def _raw(header: bytes, body: bytes) -> bytes:
    return header + body


QNAME = b"\x03www\x04test\x00\x00\x01\x00\x01"


@pytest.mark.parametrize(
    ("data", "rcode", "message"),
    [
        (b"\x00" * 5, None, "shorter than a DNS header"),
        (b"\x12\x34\x81\x00\x00\x01\x00\x00\x00\x00\x00\x00" + QNAME, None, "a response"),
        (b"\x12\x34\x28\x00\x00\x01\x00\x00\x00\x00\x00\x00" + QNAME, Rcode.NOTIMP, "opcode 5"),
        (b"\x12\x34\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00" + QNAME, Rcode.FORMERR, "qd=2"),
        (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www", Rcode.FORMERR, "past the end"),
        (
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",
            Rcode.FORMERR,
            "compression",
        ),
        (
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + QNAME + b"junk",
            Rcode.FORMERR,
            "trailing",
        ),
        (
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01"
            + QNAME
            + b"\x00\x00\x29\x04\xd0\x00\x01\x00\x00\x00\x00",
            Rcode.BADVERS,
            "EDNS version 1",
        ),
        (
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x02"
            + QNAME
            + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00" * 2,
            Rcode.FORMERR,
            "more than one OPT",
        ),
    ],
)
def test_parse_query_rejects(data: bytes, rcode: int | None, message: str) -> None:
    assert fast_query(data, 1232) is None
    with pytest.raises(WireError, match=message) as info:
        parse_query(data, 1232)
    assert info.value.rcode == rcode


def test_error_reply_keeps_id_question_and_reports_badvers_in_opt() -> None:
    data = q()
    r = dnslib.DNSRecord.parse(error_reply(data, Rcode.BADVERS, len(data) - 11, 1232))
    assert r.header.id == dnslib.DNSRecord.parse(data).header.id
    assert str(r.q.qname) == "www.Example.COM."
    opt = [x for x in r.ar if x.rtype == 41][0]
    assert (opt.ttl >> 24) == 1  # extended rcode 1 << 4 | 0 = 16 (BADVERS)


def upstream_reply(
    query: bytes,
    records: list[str],
    auth: list[str] = (),
    rcode: int = 0,  # type: ignore[assignment]
    opt: bool = True,
) -> bytes:
    req = dnslib.DNSRecord.parse(query)
    rep = req.reply()
    rep.ar = []
    for line in records:
        rep.add_answer(*dnslib.RR.fromZone(line))
    for line in auth:
        rep.add_auth(*dnslib.RR.fromZone(line))
    rep.header.rcode = rcode
    if opt:
        rep.add_ar(dnslib.EDNS0(udp_len=4096))
    return bytes(rep.pack())


def test_walk_strips_opt_and_finds_every_ttl() -> None:
    key = fast_query(q(), 1232)[0]  # type: ignore[index]
    up = make_upstream_query(0x4242, key, 1232)
    assert response_question_matches(upstream_reply(up, []), key)
    resp = upstream_reply(
        up, ["www.example.com. 300 A 198.18.0.1", "www.example.com. 100 A 198.18.0.2"]
    )
    w = walk_response(resp, len(key) - 1)
    assert (w.an, w.ns, w.ar, w.min_ttl, w.has_answer, w.rcode) == (2, 0, 0, 100, True, 0)
    assert len(w.ttl_offsets) == 2 and not w.body.endswith(b"\x00\x29\x10\x00")


def test_walk_negative_ttl_from_soa() -> None:
    key = fast_query(q(), 1232)[0]  # type: ignore[index]
    up = make_upstream_query(1, key, 1232)
    soa = "example.com. 900 SOA ns.example.com. h.example.com. 1 2 3 4 120"
    w = walk_response(upstream_reply(up, [], [soa], rcode=3), len(key) - 1)
    assert (w.rcode, w.negative_ttl, w.has_answer) == (3, 120, False)


def test_walk_rejects_opt_not_last() -> None:
    key = fast_query(q(), 1232)[0]  # type: ignore[index]
    rep = dnslib.DNSRecord.parse(upstream_reply(make_upstream_query(1, key, 1232), []))
    rep.add_ar(*dnslib.RR.fromZone("ns.example.com. 60 A 198.18.0.9"))
    with pytest.raises(OptNotLast):
        walk_response(bytes(rep.pack()), len(key) - 1)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_queries_only_raise_wire_errors(data: bytes) -> None:
    r = fast_query(data, 1232)
    try:
        parsed = parse_query(data, 1232)
    except WireError:
        assert r is None
        return
    if r is not None:
        assert r == (parsed.key, parsed.question_end, parsed.limit)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_responses_only_raise_wire_errors(tail: bytes) -> None:
    key = fast_query(q(), 1232)[0]  # type: ignore[index]
    head = b"\x00\x01\x81\x80\x00\x01" + tail[:6].ljust(6, b"\x00") + key[:-1]
    try:
        walk_response(head + tail[6:], len(key) - 1)
    except WireError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=12, max_size=64), st.integers(0, 40))
def test_fuzz_mutated_real_queries(noise: bytes, where: int) -> None:
    data = bytearray(q("a.B.example.org", do=True))
    for i, b in enumerate(noise[:8]):
        data[(where + i * 7) % len(data)] = b
    try:
        parse_query(bytes(data), 1232)
    except WireError:
        pass


_RECORDS = [
    "{n} 300 A 198.18.0.1",
    "{n} 60 AAAA 2001:db8::1",
    "{n} 30 CNAME other.example.org.",
    '{n} 120 TXT "some text"',
    "other.example.org. 90 A 198.18.0.2",
    "example.com. 900 SOA ns.example.com. h.example.com. 1 2 3 4 120",
    "example.com. 100 NS ns.example.com.",
    "example.com. 60 SOA ns.example.com. h.example.com. 1 2 3 4 3600",
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, len(_RECORDS) - 1), max_size=4),
    st.lists(st.integers(0, len(_RECORDS) - 1), max_size=3),
    st.lists(st.integers(0, len(_RECORDS) - 1), max_size=2),
    st.booleans(),
    st.integers(0, 5),
    st.binary(max_size=3),
)
def test_the_fast_walk_agrees_with_the_general_one(
    answer: list[int], auth: list[int], extra: list[int], opt: bool, rcode: int, trail: bytes
) -> None:
    """``walk_response`` has its own loop for the usual shapes (pointer owner names) and
    falls back to ``_walk_general`` otherwise: on any response both give the same result, or
    both reject it."""
    from dnscache.wire import _walk_general

    key = fast_query(q(), 1232)[0]  # type: ignore[index]
    req = dnslib.DNSRecord.parse(make_upstream_query(7, key, 1232))
    rep = req.reply()
    rep.ar = []
    name = "www.example.com."
    for group, add in ((answer, rep.add_answer), (auth, rep.add_auth), (extra, rep.add_ar)):
        for i in group:
            add(*dnslib.RR.fromZone(_RECORDS[i].format(n=name)))
    if opt:
        rep.add_ar(dnslib.EDNS0(udp_len=4096))
    rep.header.rcode = rcode
    resp = bytes(rep.pack()) + trail
    results = []
    for walk in (walk_response, _walk_general):
        try:
            results.append(walk(resp, len(key) - 1))
        except OptNotLast:
            results.append("OptNotLast")
        except WireError:
            results.append("WireError")
    assert results[0] == results[1]
    # and cut short anywhere, both reject it (or both still read a shorter valid message)
    cut = resp[: len(resp) // 2 + len(trail)]
    outcomes = []
    for walk in (walk_response, _walk_general):
        try:
            outcomes.append(walk(cut, len(key) - 1))
        except (WireError, OptNotLast) as exc:
            outcomes.append(type(exc).__name__)
    assert outcomes[0] == outcomes[1]
