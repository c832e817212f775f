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

from .cache import Cache, Entry, classify
from .config import Config
from .errors import OptNotLast, UpstreamError, WireError
from .policy import Router, UpstreamState, ZoneRoute
from .stats import WorkerStats, qtype_name, rcode_name
from .upstream import Exchanger
from .wire import OPT_REPLY, TYPE_AXFR, TYPE_IXFR, Rcode, error_reply, question_ok, walk_response

log = logging.getLogger("ultranet.dns")
Send = Callable[[bytes], None]
ROOT_NS_KEY = b"\x00\x00\x02\x00\x01\x00"  # ". IN NS", no DO, no CD: the health probe


class Waiter:
    __slots__ = ("send", "data", "qend", "limit", "cap", "t0", "proto", "done", "timer")

    def __init__(
        self, send: Send, data: bytes, qend: int, limit: int, cap: int, t0: float, proto: str
    ) -> None:
        self.send, self.data, self.qend, self.limit, self.cap = send, data, qend, limit, cap
        self.t0, self.proto = t0, proto
        self.done = False
        self.timer: asyncio.TimerHandle | None = None


class Pending:
    __slots__ = ("waiters", "stale")

    def __init__(self, stale: Entry | None) -> None:
        self.waiters: list[Waiter] = []
        self.stale = stale


def splice(e: Entry, body: bytes, data: bytes, qend: int, limit: int, cap: int) -> bytes:
    """The reply to ``data``: its ID and question bytes, our header, the cached sections, and
    our OPT if it sent one; TC=1 with the question only when larger than ``cap``."""
    i = (data[2] & 1) << 1 | (1 if limit else 0)
    if qend + e.body_len + (11 if limit else 0) > cap:
        return data[:2] + e.tc_heads[i] + data[12:qend] + (e.opt if limit else b"")
    return data[:2] + e.heads[i] + data[12:qend] + body + (e.opt if limit else b"")


class Resolver:
    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop, stats: WorkerStats) -> None:
        self.loop = loop
        self.stats = stats
        self.cache = Cache(cfg.cache.capacity)
        self.exchanger = Exchanger(loop, cfg.upstream.payload)
        self.inflight: dict[bytes, Pending] = {}
        self.active = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.cfg = cfg
        self.router = Router(cfg.zones)

    def reconfigure(self, cfg: Config) -> None:
        """Swap in a new config: routes keep the health of upstreams still configured, the cache
        keeps its entries (shrinking to a smaller capacity by evicting the oldest)."""
        self.cfg = cfg
        self.router = Router(cfg.zones, self.router)
        self.exchanger.payload = cfg.upstream.payload
        self.cache.capacity = cfg.cache.capacity
        while len(self.cache.data) > cfg.cache.capacity:
            del self.cache.data[next(iter(self.cache.data))]
            self.cache.evictions += 1

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
            send(splice(e, e.render(now), data, qend, limit, cap))
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
        qtype = key[-5] << 8 | key[-4]
        if qtype in (TYPE_AXFR, TYPE_IXFR):
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
            p = Pending(stale)
            self._start(key, p)
        else:
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
            w.send(reply)
        except OSError as exc:  # a client gone away must not stop the other waiters
            log.debug("reply to client failed: %s", exc)
        self.stats.count(w.proto, label)
        self.stats.duration[w.proto].observe(time.perf_counter() - w.t0)

    # -- resolving ------------------------------------------------------------------------

    def _start(self, key: bytes, p: Pending) -> None:
        self.inflight[key] = p
        self.active += 1
        task = self.loop.create_task(self._resolve(key, p))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _resolve(self, key: bytes, p: Pending) -> None:
        result: Entry | None = None
        try:
            resp, route = await self._ask(key)
            result = self._store(key, resp, route, p.stale)
        except UpstreamError as exc:
            log.debug("resolution failed: %s", exc)
        finally:
            self.active -= 1
            del self.inflight[key]
        self._complete(key, p, result)

    def _complete(self, key: bytes, p: Pending, result: Entry | None) -> None:
        now = time.monotonic()
        stale = p.stale if p.stale is not None and now < p.stale.stale_until else None
        if stale is not None and (result is None or result.rcode not in (0, 3)):
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
            body = result.render(now) if result.ttl else result.body
            reply = splice(result, body, w.data, w.qend, w.limit, w.cap)
            if len(reply) < w.qend + result.body_len and w.proto == "udp":
                self.stats.counters["truncated"] += 1
            self._send(w, reply, result.miss_label)

    async def _ask(self, key: bytes) -> tuple[bytes, ZoneRoute]:
        route = self.router.route(key[:-5])
        cfg = self.cfg.upstream
        ex = self.exchanger
        errors = []
        for u in route.order():
            try:
                if route.zone.transport == "tcp":
                    resp = await ex.tcp(u.addr, key, cfg.timeout)
                else:
                    resp = await ex.udp(u.addr, key, cfg.timeout)
                    if resp[3] & 0x0F == Rcode.FORMERR and len(resp) <= 12 + len(key):
                        resp = await ex.udp(u.addr, key, cfg.timeout, edns=False)  # RFC 6891 §7
                    if resp[2] & 0x02:  # truncated: the whole answer over TCP
                        resp = await ex.tcp(u.addr, key, cfg.timeout)
            except UpstreamError as exc:
                errors.append(str(exc))
                self._count_upstream(u, exc.reason.split(":")[0] + "_error")
                if self.router.failed(u, cfg.max_fails):
                    self.stats.counters["healthcheck_broken"] += 1
                    self._probe(route, u)
                continue
            self.router.succeeded(u)
            self._count_upstream(u, rcode_name(resp[3] & 0x0F))
            return resp, route
        raise UpstreamError(route.zone.text, "; ".join(errors) or "no upstream")

    def _count_upstream(self, u: UpstreamState, outcome: str) -> None:
        k = (u.label, outcome)
        self.stats.upstream[k] = self.stats.upstream.get(k, 0) + 1

    def _store(
        self, key: bytes, resp: bytes, route: ZoneRoute, stale: Entry | None
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
        verdict = classify(w, self.cfg.cache, len(resp))
        e = Entry(
            w, verdict, time.monotonic(), route.zone.text, self.cfg.serve_stale, self.cfg.prefetch
        )
        qtype = qtype_name(key[-5] << 8 | key[-4])
        e.label = (route.zone.text, qtype, verdict.kind, rcode_name(w.rcode))
        e.miss_label = (route.zone.text, qtype, "miss", rcode_name(w.rcode))
        e.opt = OPT_REPLY[1 if key[-1] & 2 else 0]
        replaces_stale = stale is not None and w.rcode not in (0, 3)
        if verdict.ttl is not None and not replaces_stale:
            self.cache.put(key, e)
        return e

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
        deadline = self.loop.time() + timeout
        while self.inflight and self.loop.time() < deadline:
            pending = [t for t in self.tasks if not t.done()]
            if not pending:
                break
            await asyncio.wait(pending, timeout=deadline - self.loop.time())
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
