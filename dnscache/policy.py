"""Which upstream to ask: zones by longest suffix, health, failover order. Pure.

As CoreDNS forward does: an upstream that failed ``max_fails`` times in a row is unhealthy and
is probed (``. IN NS``, any reply counts) every ``health_interval`` until it answers; queries go
to healthy upstreams in order, the next one on failure; when none is healthy, one is tried
anyway rather than failing every query at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import Address, Zone


def upstream_label(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if host.version == 6 else f"{host}:{port}"


@dataclass(slots=True)
class UpstreamState:
    addr: Address
    label: str
    fails: int = 0
    healthy: bool = True
    probing: bool = False
    queries: int = 0
    errors: int = 0
    peer: Any = None  # the exchanger's handle for this address, set on first use


@dataclass(slots=True)
class ZoneRoute:
    zone: Zone
    upstreams: list[UpstreamState] = field(default_factory=list)
    next_start: int = 0

    def order(self) -> list[UpstreamState]:
        """Healthy upstreams first (rotating the first one so load spreads), then the rest."""
        ups = self.upstreams
        if len(ups) == 1:
            return ups  # callers only read it
        start = self.next_start % len(ups)
        self.next_start += 1
        rotated = ups[start:] + ups[:start]
        healthy = [u for u in rotated if u.healthy]
        return healthy + [u for u in rotated if not u.healthy] if healthy else rotated[:1]


class Router:
    def __init__(self, zones: tuple[Zone, ...], previous: Router | None = None) -> None:
        """``zones`` longest first (as ``config.parse`` returns them). Health state of an
        upstream kept across a reload when it is still configured for the same zone."""
        old: dict[tuple[bytes, Address], UpstreamState] = {}
        if previous is not None:
            for route in previous.routes:
                for u in route.upstreams:
                    old[(route.zone.name, u.addr)] = u
        self.routes: list[ZoneRoute] = [
            ZoneRoute(
                z,
                [old.get((z.name, a)) or UpstreamState(a, upstream_label(a)) for a in z.upstreams],
            )
            for z in zones
        ]

    def route(self, qname: bytes) -> ZoneRoute:
        """The zone whose wire name is a label-aligned suffix of ``qname`` (lower-case wire)."""
        for r in self.routes:
            zname = r.zone.name
            if zname == b"\x00" or qname == zname:
                return r
            if qname.endswith(zname) and _label_boundary(qname, len(qname) - len(zname)):
                return r
        raise AssertionError("config.parse guarantees a root zone")

    def failed(self, u: UpstreamState, max_fails: int) -> bool:
        """Count a failure; True when the upstream has just become unhealthy."""
        u.fails += 1
        u.errors += 1
        if max_fails and u.healthy and u.fails >= max_fails:
            u.healthy = False
            return True
        return False

    @staticmethod
    def succeeded(u: UpstreamState) -> None:
        u.fails = 0
        u.healthy = True


def _label_boundary(qname: bytes, offset: int) -> bool:
    i = 0
    while i < offset:
        i += qname[i] + 1
    return i == offset
