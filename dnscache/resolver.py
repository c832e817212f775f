"""From a parsed query to an answer: cache, coalescing, stale, prefetch, upstream failover.

One resolution in flight per key (name, type, class, DO, CD): later identical queries wait on
it (RFC 5452 §5: no duplicate outstanding queries, the birthday defence), and so does
prefetch. Serve-stale follows RFC 8767: an expired entry is refreshed first; if the refresh
fails, or the client has waited ``client_timeout`` (1.8 s), the stale data is sent with TTL
``stale_ttl`` (30 s), and after a failure the upstream is not asked again for that name for
``failure_recheck`` (30 s). Only NOERROR and NXDOMAIN replace cached data (§5).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from .cache import Cache, Entry, Label, classify
from .config import Config
from .errors import OptNotLast, UpstreamError, WireError
from .eventloop import FastSelector
from .policy import Router, UpstreamState, ZoneRoute
from .stats import RCODES, WorkerStats, qtype_name, rcode_name
from .upstream import Exchanger
from .wire import (
    FORMERR,
    OPT_REPLY,
    TYPE_AXFR,
    TYPE_IXFR,
    Rcode,
    error_reply,
    question_ok,
    walk_response,
)

log = logging.getLogger("ultranet.dns")
Send = Callable[[bytes], None]
ROOT_NS_KEY = b"\x00\x00\x02\x00\x01\x00"  # ". IN NS", no DO, no CD: the health probe
ZONE_TRANSFERS = frozenset((TYPE_AXFR, TYPE_IXFR))


class DatagramSender(Protocol):
    """Where a UDP waiter's reply goes: ``sendto(reply, address)``, as on a socket (the
    listener's ``ReplyQueue``, with the client's raw sockaddr as the address)."""

    def sendto(self, data: bytes, address: Any, /) -> object: ...


class Waiter:
    """A client waiting for a resolution. UDP waiters carry their socket and address (no
    closure per miss); others a ``send`` callable."""

    __slots__ = ("send", "data", "qend", "limit", "cap", "t0", "proto", "done", "timer", "sock",
                 "addr")  # fmt: skip

    def __init__(
        self,
        send: Send | None,
        data: bytes,
        qend: int,
        limit: int,
        cap: int,
        t0: float,
        proto: str,
        sock: DatagramSender | None = None,
        addr: Any = None,
    ) -> None:
        self.send, self.data, self.qend, self.limit, self.cap = send, data, qend, limit, cap
        self.t0, self.proto, self.sock, self.addr = t0, proto, sock, addr
        self.done = False
        self.timer: asyncio.TimerHandle | None = None


class Pending:
    """One resolution in flight: who waits for it, and where it stands (see ``_try``)."""

    __slots__ = ("waiters", "stale", "key", "route", "order", "index", "edns", "errors")

    def __init__(self, stale: Entry | None, first: Waiter | None = None) -> None:
        self.waiters: list[Waiter] = [first] if first is not None else []
        self.stale = stale
        self.key = b""
        self.route: ZoneRoute | None = None
        self.order: list[UpstreamState] = []
        self.index = 0
        self.edns = True
        self.errors: list[str] | None = None  # made on the first failure


def splice(e: Entry, body: bytes, data: bytes, qend: int, limit: int, cap: int) -> bytes:
    """The reply to ``data``: its ID and question bytes, our header, the cached sections, and
    our OPT if it sent one; TC=1 with the question only when larger than ``cap``."""
    i = (data[2] & 1) << 1 | (1 if limit else 0)
    if qend + e.body_len + (11 if limit else 0) > cap:
        return data[:2] + e.tc_heads[i] + data[12:qend] + (e.opt if limit else b"")
    return data[:2] + e.heads[i] + data[12:qend] + body + (e.opt if limit else b"")


class Resolver:
    def __init__(
        self,
        cfg: Config,
        loop: asyncio.AbstractEventLoop,
        stats: WorkerStats,
        selector: FastSelector | None = None,
    ) -> None:
        self.loop = loop
        self.stats = stats
        self.cache = Cache(cfg.cache.capacity)
        self.exchanger = Exchanger(loop, cfg.upstream.payload, cfg.upstream.socket_reuse, selector)
        up = cfg.upstream
        self.exchanger.configure_tcp(up.tcp_connections, up.tcp_pipeline, up.tcp_idle)
        self.inflight: dict[bytes, Pending] = {}
        self.active = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self._idle: asyncio.Future[None] | None = None
        self.cfg = cfg
        self.router = Router(cfg.zones)
        self._on_udp_cb = self._on_udp  # one bound method, not one per query
        self._labels: dict[tuple[str, int, str, int], tuple[Label, Label]] = {}

    def reconfigure(self, cfg: Config) -> None:
        """Swap in a new config: routes keep the health of upstreams still configured, the cache
        keeps its entries (shrinking to a smaller capacity by evicting the oldest)."""
        self.cfg = cfg
        self.router = Router(cfg.zones, self.router)
        self.exchanger.payload = cfg.upstream.payload
        self.exchanger.reuse = cfg.upstream.socket_reuse
        up = cfg.upstream
        self.exchanger.configure_tcp(up.tcp_connections, up.tcp_pipeline, up.tcp_idle)
        self.exchanger.keep_tcp_pools({a for zone in cfg.zones for a in zone.upstreams})
        self.cache.shrink(cfg.cache.capacity)

    # -- answering ------------------------------------------------------------------------

    def handle(
        self,
        key: bytes,
        data: bytes,
        qend: int,
        limit: int,
        cap: int,
        send: Send,
        t0: float,
        proto: str,
    ) -> None:
        now = time.monotonic()
        e = self.cache.get(key, now)
        if e is not None and now < e.expires:
            self.hit(e, key, now)
            reply = splice(e, e.render(now), data, qend, limit, cap)
            if len(reply) < qend + e.body_len and proto == "udp":
                self.stats.counters["truncated"] += 1
            send(reply)
            self.stats.count(proto, e.label)
            self.stats.duration[proto].observe(time.perf_counter() - t0)
            return
        self.miss(key, Waiter(send, data, qend, limit, cap, t0, proto), now, e)

    def hit(self, e: Entry, key: bytes, now: float) -> None:
        """Bookkeeping of a fresh hit: prefetch when popular and near expiry."""
        e.hits += 1
        if now >= e.prefetch_after:
            self.maybe_prefetch(e, key)

    def maybe_prefetch(self, e: Entry, key: bytes) -> None:
        if e.hits >= self.cfg.prefetch.hits and key not in self.inflight:
            if self.active < self.cfg.upstream.max_concurrent:
                self.stats.counters["prefetch"] += 1
                self._start(key, Pending(e))

    def miss(self, key: bytes, w: Waiter, now: float, stale: Entry | None) -> None:
        if not question_ok(w.data, w.qend):
            self.stats.counters["malformed"] += 1
            self._error(key, w, Rcode.FORMERR)
            return
        if (key[-5] << 8 | key[-4]) in ZONE_TRANSFERS:
            self._error(key, w, Rcode.NOTIMP)  # a forwarder does not transfer zones
            return
        sc = self.cfg.serve_stale
        if stale is not None and now < stale.stale_until:
            if now - stale.failed_at < sc.failure_recheck or sc.client_timeout == 0:
                self._reply_stale(w, stale)
                if sc.client_timeout == 0 and key not in self.inflight:
                    self._start(key, Pending(stale))
                return
        else:
            stale = None
        p = self.inflight.get(key)
        if p is None:
            if self.active >= self.cfg.upstream.max_concurrent:
                self.stats.counters["max_concurrent_rejects"] += 1
                if stale is not None:
                    self._reply_stale(w, stale)
                else:
                    self._error(key, w, Rcode.REFUSED)
                return
            p = Pending(stale, w)
            if stale is not None:
                w.timer = self.loop.call_later(sc.client_timeout, self._stale_timer, w, stale)
            self._start(key, p)
            return
        self.stats.counters["coalesced"] += 1
        p.waiters.append(w)
        if stale is not None:
            w.timer = self.loop.call_later(sc.client_timeout, self._stale_timer, w, stale)

    def _stale_timer(self, w: Waiter, stale: Entry) -> None:
        if not w.done:
            self._reply_stale(w, stale)

    def _reply_stale(self, w: Waiter, e: Entry) -> None:
        w.done = True
        self.stats.counters["served_stale"] += 1
        body = e.with_ttl(self.cfg.serve_stale.stale_ttl)
        self._send(w, splice(e, body, w.data, w.qend, w.limit, w.cap), e.label)

    def _error(self, key: bytes, w: Waiter, rcode: int) -> None:
        w.done = True
        zone = self.router.route(key[:-5]).zone.text
        label = (zone, qtype_name(key[-5] << 8 | key[-4]), "error", rcode_name(rcode))
        do = bool(key[-1] & 2)
        self._send(w, error_reply(w.data, rcode, w.qend, w.limit, do), label)

    def _send(self, w: Waiter, reply: bytes, label: tuple[str, str, str, str]) -> None:
        if w.timer is not None:
            w.timer.cancel()
        try:
            if w.sock is not None:
                w.sock.sendto(reply, w.addr)
            elif w.send is not None:
                w.send(reply)
        except OSError as exc:  # a client gone away must not stop the other waiters
            log.debug("reply to client failed: %s", exc)
        stats = self.stats
        counts = stats.udp if w.proto == "udp" else stats.tcp
        counts[label] = counts.get(label, 0) + 1
        stats.duration[w.proto].observe(time.perf_counter() - w.t0)

    # -- resolving ------------------------------------------------------------------------
    #
    # A resolution is a small state machine on its ``Pending``, driven by callbacks from the
    # exchanger (no task per miss): ``_try`` asks the upstream at ``p.index`` of the route's
    # order (UDP with EDNS; then without EDNS after a FORMERR, RFC 6891 §7; then TCP after a
    # TC), ``_on_udp`` takes the outcome, ``_failed`` moves to the next upstream, ``_finish``
    # stores the answer and replies to every waiter. Only TCP exchanges run as tasks.

    def _start(self, key: bytes, p: Pending) -> None:
        self.inflight[key] = p
        self.active += 1
        p.key = key
        p.route = route = self.router.route(key[:-5])
        p.order = route.order()
        self._try(p)

    def _try(self, p: Pending) -> None:
        if p.index >= len(p.order):
            zone = p.route.zone.text if p.route is not None else "?"
            log.debug("resolution failed: %s", UpstreamError(zone, "; ".join(p.errors or ())))
            self._finish(p, None)
            return
        u = p.order[p.index]
        assert p.route is not None
        if p.route.zone.transport == "tcp":
            self._tcp(p, u)
        else:
            p.edns = True
            peer = u.peer
            if peer is None:
                peer = u.peer = self.exchanger.peer(u.addr)
            self.exchanger.send(peer, p.key, self.cfg.upstream.timeout, True, self._on_udp_cb, p)

    def _on_udp(self, p: Pending, resp: bytes | None, err: UpstreamError | None) -> None:
        u = p.order[p.index]
        if resp is None:
            self._failed(p, u, err or UpstreamError(u.label, "udp: no answer"))
            return
        if p.edns and resp[3] & 0x0F == FORMERR and len(resp) <= 12 + len(p.key):
            p.edns = False  # RFC 6891 §7: retry without EDNS
            self.exchanger.send_udp(
                u.addr, p.key, self.cfg.upstream.timeout, False, self._on_udp_cb, p
            )
            return
        if resp[2] & 0x02:  # truncated: the whole answer over TCP
            self._tcp(p, u)
            return
        u.fails = 0  # ``_succeeded``, inline: this runs on every miss
        u.healthy = True
        k = (u.label, RCODES.get(resp[3] & 0x0F) or rcode_name(resp[3] & 0x0F))
        upstream = self.stats.upstream
        upstream[k] = upstream.get(k, 0) + 1
        self._finish(p, resp)

    def _tcp(self, p: Pending, u: UpstreamState) -> None:
        task = self.loop.create_task(self._tcp_exchange(p, u))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _tcp_exchange(self, p: Pending, u: UpstreamState) -> None:
        try:
            resp = await self.exchanger.tcp(u.addr, p.key, self.cfg.upstream.timeout)
        except UpstreamError as exc:
            self._failed(p, u, exc)
            return
        self._succeeded(p, u, resp)

    def _succeeded(self, p: Pending, u: UpstreamState, resp: bytes) -> None:
        self.router.succeeded(u)
        self._count_upstream(u, rcode_name(resp[3] & 0x0F))
        self._finish(p, resp)

    def _failed(self, p: Pending, u: UpstreamState, exc: UpstreamError) -> None:
        if p.errors is None:
            p.errors = []
        p.errors.append(str(exc))
        self._count_upstream(u, exc.reason.split(":")[0] + "_error")
        if self.router.failed(u, self.cfg.upstream.max_fails):
            self.stats.counters["healthcheck_broken"] += 1
            assert p.route is not None
            self._probe(p.route, u)
        p.index += 1
        self._try(p)

    def _finish(self, p: Pending, resp: bytes | None) -> None:
        key = p.key
        result: Entry | None = None
        now = time.monotonic()
        try:
            if resp is not None and p.route is not None:
                result = self._store(key, resp, p.route, p.stale, now)
        except Exception:  # never leave the waiters hanging: they get SERVFAIL
            log.exception("storing the answer failed")
        finally:
            self.active -= 1
            del self.inflight[key]
            if not self.inflight and self._idle is not None and not self._idle.done():
                self._idle.set_result(None)
        self._complete(key, p, result, now)

    def _complete(self, key: bytes, p: Pending, result: Entry | None, now: float) -> None:
        stale = p.stale
        if stale is not None and now < stale.stale_until:
            if result is None or result.rcode not in (0, 3):
                stale.failed_at = now  # RFC 8767 §4: recheck no sooner than failure_recheck
                for w in p.waiters:
                    if not w.done:
                        self._reply_stale(w, stale)
                return
        for w in p.waiters:
            if w.done:
                continue
            w.done = True
            if result is None:
                self._error(key, w, Rcode.SERVFAIL)
                continue
            if not result.ttl:
                body = result.body
            elif result.rendered_at == int(now):
                body = result.rendered
            else:
                body = result.render(now)
            reply = splice(result, body, w.data, w.qend, w.limit, w.cap)
            if len(reply) < w.qend + result.body_len and w.proto == "udp":
                self.stats.counters["truncated"] += 1
            self._send(w, reply, result.miss_label)

    def _count_upstream(self, u: UpstreamState, outcome: str) -> None:  # failures
        k = (u.label, outcome)
        self.stats.upstream[k] = self.stats.upstream.get(k, 0) + 1

    def _store(
        self, key: bytes, resp: bytes, route: ZoneRoute, stale: Entry | None, now: float
    ) -> Entry | None:
        try:
            try:
                w = walk_response(resp, len(key) - 1)
            except OptNotLast:
                resp = repack_without_opt(resp)
                w = walk_response(resp, len(key) - 1)
        except WireError as exc:
            self.stats.counters["malformed"] += 1
            log.warning("malformed answer from upstream for zone %s: %s", route.zone.text, exc)
            return None
        cfg = self.cfg
        verdict = classify(w, cfg.cache, len(resp))
        zone = route.zone.text
        found = (zone, key[-5] << 8 | key[-4], verdict.kind, w.rcode)
        labels = self._labels.get(found) or self._label(found)
        opt = OPT_REPLY[1 if key[-1] & 2 else 0]
        e = Entry(w, verdict, now, zone, cfg.serve_stale, cfg.prefetch, labels, opt)
        if verdict.ttl is not None and (stale is None or w.rcode == 0 or w.rcode == 3):
            self.cache.put(key, e)
        return e

    def _label(self, found: tuple[str, int, str, int]) -> tuple[Label, Label]:
        """The request labels of an entry (hit and miss), made once per distinct value."""
        zone, qtype, kind, rcode = found
        if len(self._labels) > 4096:  # bounded: zones x types x kinds x rcodes is small
            self._labels.clear()
        labels = (
            (zone, qtype_name(qtype), kind, rcode_name(rcode)),
            (zone, qtype_name(qtype), "miss", rcode_name(rcode)),
        )
        self._labels[found] = labels
        return labels

    def _probe(self, route: ZoneRoute, u: UpstreamState) -> None:
        if u.probing:
            return
        u.probing = True
        task = self.loop.create_task(self._probe_loop(route, u))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _probe_loop(self, route: ZoneRoute, u: UpstreamState) -> None:
        cfg = self.cfg.upstream
        try:
            while not u.healthy and any(u is x for r in self.router.routes for x in r.upstreams):
                await asyncio.sleep(cfg.health_interval)  # the probe period, not a wait
                try:
                    if route.zone.transport == "tcp":
                        await self.exchanger.tcp(u.addr, ROOT_NS_KEY, cfg.timeout)
                    else:
                        await self.exchanger.udp(u.addr, ROOT_NS_KEY, cfg.timeout)
                except UpstreamError:
                    continue
                self.router.succeeded(u)
                log.info("upstream %s healthy again", u.label)
        finally:
            u.probing = False

    async def idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight (draining); False if ``timeout`` passed first."""
        if self.inflight:
            self._idle = self.loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._idle), timeout)
            except TimeoutError:
                pass
            finally:
                self._idle = None
        return not self.inflight


def repack_without_opt(resp: bytes) -> bytes:
    """Rebuild a response whose OPT is not last, without it (dnslib: rare, off the fast path)."""
    import dnslib

    try:
        rec = dnslib.DNSRecord.parse(resp)
        rec.ar = [r for r in rec.ar if r.rtype != 41]
        return bytes(rec.pack())
    except (dnslib.DNSError, dnslib.buffer.BufferError, ValueError, IndexError) as exc:
        raise WireError(f"cannot rebuild the response without its OPT: {exc}") from None
