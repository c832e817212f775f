"""What is cached, for how long, and how it is served back (pure: no sockets)."""

from __future__ import annotations

import dnslib
import pytest

from dnscache.cache import Cache, Entry, classify
from dnscache.config import CacheConfig, PrefetchConfig, StaleConfig
from dnscache.resolver import splice
from dnscache.wire import fast_query, heads, make_upstream_query, walk_response

from .test_wire import q, upstream_reply

SOA = "test. 900 SOA ns.test. h.test. 1 2 3 4 {min}"
CFG = CacheConfig(min_ttl=5, max_ttl=3600, max_negative_ttl=1800, servfail_ttl=5)


def walked(records: list[str], auth: list[str] = (), rcode: int = 0, qtype: str = "A"):  # type: ignore[no-untyped-def,assignment]
    key = fast_query(q("www.test", qtype), 1232)[0]  # type: ignore[index]
    resp = upstream_reply(make_upstream_query(7, key, 1232), records, list(auth), rcode)
    return key, walk_response(resp, len(key) - 1), len(resp)


@pytest.mark.parametrize(
    ("records", "auth", "rcode", "ttl", "kind"),
    [
        (["www.test. 300 A 198.18.0.1"], [], 0, 300, "success"),
        (["www.test. 1 A 198.18.0.1"], [], 0, 5, "success"),  # min TTL
        (["www.test. 99999 A 198.18.0.1"], [], 0, 3600, "success"),  # max TTL
        ([], [SOA.format(min=60)], 3, 60, "denial"),  # NXDOMAIN: SOA MINIMUM
        ([], [SOA.format(min=9999)], 0, 900, "denial"),  # NODATA: SOA TTL is lower
        ([], [], 3, None, "uncacheable"),  # RFC 2308 §5: no SOA, not cached
        (["www.test. 30 CNAME other.test."], [SOA.format(min=60)], 0, 30, "denial"),
        (["www.test. 30 CNAME other.test."], [], 0, None, "uncacheable"),
        ([], [], 2, 5, "servfail"),
        ([], [], 5, None, "uncacheable"),  # REFUSED
    ],
)
def test_classify(
    records: list[str], auth: list[str], rcode: int, ttl: int | None, kind: str
) -> None:
    _, w, size = walked(records, auth, rcode)
    v = classify(w, CFG, size)
    assert (v.ttl, v.kind) == (ttl, kind)


def test_truncated_and_oversized_are_not_cached() -> None:
    _, w, size = walked(["www.test. 300 A 198.18.0.1"])
    assert classify(w, CacheConfig(max_entry_bytes=512), 600).ttl is None
    tc = w._replace(truncated=True)
    assert classify(tc, CFG, size).ttl is None


def entry(ttl: int = 300, now: float = 1000.0) -> tuple[bytes, Entry]:
    key, w, size = walked([f"www.test. {ttl} A 198.18.0.1", f"www.test. {ttl} A 198.18.0.2"])
    return key, Entry(w, classify(w, CFG, size), now, ".", StaleConfig(), PrefetchConfig())


def test_render_ages_every_ttl_and_splices_the_clients_id_and_case() -> None:
    _, e = entry(300, now=1000.0)
    e.opt = b""
    data = q("WwW.tEsT", payload=None)
    qend = fast_query(data, 1232)[1]  # type: ignore[index]
    reply = dnslib.DNSRecord.parse(splice(e, e.render(1100.5), data, qend, 0, 512))
    assert reply.header.id == dnslib.DNSRecord.parse(data).header.id
    assert str(reply.q.qname) == "WwW.tEsT."
    assert [r.ttl for r in reply.rr] == [200, 200]
    assert [str(r.rdata) for r in reply.rr] == ["198.18.0.1", "198.18.0.2"]


def test_splice_truncates_over_the_clients_limit() -> None:
    _, e = entry()
    data = q("www.test", payload=None)
    qend = fast_query(data, 1232)[1]  # type: ignore[index]
    reply = dnslib.DNSRecord.parse(splice(e, e.body, data, qend, 0, qend + 10))
    assert reply.header.tc == 1 and reply.rr == []


def test_heads_copy_rd_and_count_our_opt() -> None:
    h = heads(b"\x85\x80", 2, 0, 0)
    assert h[0][0] & 1 == 0 and h[2][0] & 1 == 1
    assert h[1][-2:] == b"\x00\x01" and h[0][-2:] == b"\x00\x00"


def test_capacity_evicts_the_oldest() -> None:
    cache = Cache(capacity=2)
    for i in range(3):
        cache.put(bytes([i]), entry()[1])
    assert list(cache.data) == [b"\x01", b"\x02"] and cache.evictions == 1


def test_eviction_takes_the_oldest_insertion_and_a_reput_counts_as_new() -> None:
    cache = Cache(capacity=3)
    for i in range(3):
        cache.put(bytes([i]), entry()[1])
    cache.put(b"\x00", entry()[1])  # replaced: now the youngest
    cache.remove(b"\x01")
    cache.put(b"\x03", entry()[1])  # room again: nothing evicted
    cache.put(b"\x04", entry()[1])  # full: the oldest insertion (\x02) goes
    assert sorted(cache.data) == [b"\x00", b"\x03", b"\x04"] and cache.evictions == 1
    cache.shrink(1)
    assert list(cache.data) == [b"\x04"] and cache.evictions == 3
    _, dead = entry(ttl=10, now=0.0)
    cache.capacity = 5
    cache.put(b"\x05", dead)
    assert cache.sweep(now=10.0 + 86400 + 1) == 1 and list(cache.data) == [b"\x04"]
    cache.put(b"\x06", entry()[1])  # the order stayed in step with the entries
    assert sorted(cache.data) == [b"\x04", b"\x06"]


def test_an_entry_is_marked_cached_exactly_while_the_cache_holds_it() -> None:
    """The hit memo serves an entry without a lookup while ``cached`` holds, so every way
    out of the cache must clear it: replacement, eviction, expiry met by ``get``, shrink,
    remove, sweep and clear."""
    cache = Cache(capacity=2)
    first, second, newer = entry()[1], entry()[1], entry()[1]
    assert not first.cached
    cache.put(b"a", first)
    cache.put(b"a", first)  # put again as it is: still the cache's
    assert first.cached
    cache.put(b"a", newer)
    assert newer.cached and not first.cached  # replaced
    cache.put(b"b", second)
    evicting = entry()[1]
    cache.put(b"c", evicting)
    assert not newer.cached and second.cached and evicting.cached  # the oldest evicted
    cache.shrink(1)
    assert not second.cached and evicting.cached
    cache.remove(b"c")
    assert not evicting.cached
    _, dying = entry(ttl=10, now=0.0)
    cache.put(b"d", dying)
    assert cache.get(b"d", 10.0 + 86400 + 1) is None and not dying.cached  # past stale
    _, swept = entry(ttl=10, now=0.0)
    cache.put(b"e", swept)
    assert cache.sweep(now=10.0 + 86400 + 1) == 1 and not swept.cached
    kept = entry()[1]
    cache.put(b"f", kept)
    assert kept.memo_until == min(kept.expires, kept.prefetch_after)
    cache.clear()
    assert not kept.cached
    # the hit memo reads memo_until alone: every released entry must show -inf there too
    released = (first, second, newer, evicting, dying, swept, kept)
    assert all(e.memo_until == float("-inf") for e in released)


def test_stale_window_then_gone() -> None:
    cache = Cache(capacity=10)
    key, e = entry(ttl=300, now=0.0)
    cache.put(key, e)
    assert cache.get(key, 301.0) is e  # expired, servable stale (RFC 8767)
    assert cache.get(key, 300.0 + 86400 + 1) is None
    assert key not in cache.data


def test_prefetch_clock_is_the_last_tenth() -> None:
    _, e = entry(ttl=300, now=0.0)
    assert e.prefetch_after == pytest.approx(270.0)
