"""Configuration: parsed and validated once into frozen dataclasses.

``parse(doc)`` takes the merged document (the ``--config`` file with the command-line flags laid
over it, see ``cli.py``) and returns a ``Config`` or raises ``ConfigError(field, value,
reason)``. The supervisor sends the same document to its workers, which parse it again: the
result is the same because ``parse`` reads nothing else. Every knob and its default is listed
in the package README.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_ACL = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "fc00::/7",
    "fe80::/10",
)
TRANSPORTS = ("udp", "tcp")


@dataclass(frozen=True, slots=True)
class Zone:
    name: bytes  # wire form, lower-cased; b"\x00" for the root
    text: str  # "cluster.local." for metrics labels
    upstreams: tuple[Address, ...]
    transport: str  # "udp": UDP, TCP on TC; "tcp": always TCP


@dataclass(frozen=True, slots=True)
class CacheConfig:
    capacity: int = 10000
    min_ttl: int = 5
    max_ttl: int = 3600
    max_negative_ttl: int = 1800
    servfail_ttl: int = 5
    max_entry_bytes: int = 8192


@dataclass(frozen=True, slots=True)
class StaleConfig:
    max_stale: int = 86400  # RFC 8767: 1-3 days; 0 disables serve-stale
    stale_ttl: int = 30
    client_timeout: float = 1.8
    failure_recheck: float = 30.0


@dataclass(frozen=True, slots=True)
class PrefetchConfig:
    hits: int = 2  # 0 disables
    percent: int = 10


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    timeout: float = 2.0
    max_concurrent: int = 1000
    max_fails: int = 2
    health_interval: float = 0.5
    payload: int = 1232
    socket_reuse: int = 8  # queries per UDP socket (one at a time); 1 = a fresh socket each
    tcp_connections: int = 4  # open TCP connections per upstream (and worker), at most
    tcp_pipeline: int = 100  # queries in flight on one TCP connection, at most
    tcp_idle: float = 10.0  # seconds an idle TCP connection is kept (CoreDNS forward's expire)


@dataclass(frozen=True, slots=True)
class NodeLocalConfig:
    interface: str = "nodelocaldns"
    # IPv4 and IPv6 alike: NodeLocal DNSCache's docs suggest a link-local IPv4 (169.254.0.0/16)
    # or a unique-local IPv6 (fd00::/8) that nothing else in the cluster uses.
    addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = (
        ipaddress.IPv4Address("169.254.20.10"),
    )
    link_kind: str = "dummy"
    notrack: bool = True
    teardown: str = "auto"  # auto (unless another process serves the address) | always | never


@dataclass(frozen=True, slots=True)
class Config:
    listen: tuple[Address, ...]
    zones: tuple[Zone, ...]  # longest name first
    workers: int
    metrics: Address | None
    cache: CacheConfig
    serve_stale: StaleConfig
    prefetch: PrefetchConfig
    upstream: UpstreamConfig
    acl: tuple[Network, ...]
    acl_action: str  # "refuse" | "drop"
    max_udp_payload: int
    tcp_idle_timeout: float
    tcp_max_connections: int
    lameduck: float
    drain_timeout: float
    node_local: NodeLocalConfig | None
    steering: bool


def parse_address(field: str, text: object, default_port: int = 53) -> Address:
    if not isinstance(text, str) or not text:
        raise ConfigError(field, text, "expected ADDR:PORT")
    host, port = text, default_port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(field, text, "expected [ADDR]:PORT")
            port = _port(field, text, rest[1:])
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = _port(field, text, p)
    try:
        return ipaddress.ip_address(host), port
    except ValueError:
        raise ConfigError(field, text, "not an IP address (names are not resolved)") from None


def _port(field: str, text: str, p: str) -> int:
    if not p.isdigit() or not 0 <= int(p) <= 65535:
        raise ConfigError(field, text, "port must be 0-65535")
    return int(p)


def zone_wire(field: str, name: object) -> tuple[bytes, str]:
    if not isinstance(name, str) or not name:
        raise ConfigError(field, name, "zone must be a non-empty name")
    labels = [label for label in name.lower().strip(".").split(".") if label]
    wire = b""
    for label in labels:
        raw = label.encode("ascii", errors="strict") if label.isascii() else b""
        if not raw or len(raw) > 63:
            raise ConfigError(field, name, f"bad label {label!r}")
        wire += bytes((len(raw),)) + raw
    if len(wire) + 1 > 255:
        raise ConfigError(field, name, "name longer than 255 bytes")
    return wire + b"\x00", ".".join(labels) + "."


def _section(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(key, value, "expected a mapping")
    return value


def _get(sec: Mapping[str, Any], prefix: str, name: str, default: Any, kind: type) -> Any:
    value = sec.get(name, default)
    field = f"{prefix}.{name}" if prefix else name
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(field, value, f"expected {kind.__name__}")
    return value


def _bounded(field: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(field, value, f"must be between {low} and {high}")


def _known(sec: Mapping[str, Any], prefix: str, names: set[str]) -> None:
    for key in sec:
        if key not in names:
            raise ConfigError(f"{prefix}.{key}" if prefix else key, sec[key], "unknown key")


def _cache(doc: Mapping[str, Any]) -> CacheConfig:
    sec = _section(doc, "cache")
    d = CacheConfig()
    _known(sec, "cache", set(CacheConfig.__dataclass_fields__))
    vals = {f: _get(sec, "cache", f, getattr(d, f), int) for f in CacheConfig.__dataclass_fields__}
    _bounded("cache.capacity", vals["capacity"], 1, 10_000_000)
    _bounded("cache.min_ttl", vals["min_ttl"], 0, 3600)
    _bounded("cache.max_ttl", vals["max_ttl"], max(1, vals["min_ttl"]), 7 * 86400)
    _bounded("cache.max_negative_ttl", vals["max_negative_ttl"], 0, 86400)
    _bounded("cache.servfail_ttl", vals["servfail_ttl"], 0, 300)  # RFC 2308 §7.1: ≤ 5 min
    _bounded("cache.max_entry_bytes", vals["max_entry_bytes"], 512, 65535)
    return CacheConfig(**vals)


def _stale(doc: Mapping[str, Any]) -> StaleConfig:
    sec = _section(doc, "serve_stale")
    _known(sec, "serve_stale", set(StaleConfig.__dataclass_fields__))
    d = StaleConfig()
    max_stale = _get(sec, "serve_stale", "max_stale", d.max_stale, int)
    stale_ttl = _get(sec, "serve_stale", "stale_ttl", d.stale_ttl, int)
    timer = _get(sec, "serve_stale", "client_timeout", d.client_timeout, float)
    recheck = _get(sec, "serve_stale", "failure_recheck", d.failure_recheck, float)
    _bounded("serve_stale.max_stale", max_stale, 0, 7 * 86400)
    _bounded("serve_stale.stale_ttl", stale_ttl, 1, 3600)  # RFC 8767 §4: stale TTL > 0
    _bounded("serve_stale.client_timeout", timer, 0.0, 30.0)
    _bounded("serve_stale.failure_recheck", recheck, 0.0, 300.0)
    return StaleConfig(max_stale, stale_ttl, timer, recheck)


def _prefetch(doc: Mapping[str, Any]) -> PrefetchConfig:
    sec = _section(doc, "prefetch")
    _known(sec, "prefetch", {"hits", "percent"})
    d = PrefetchConfig()
    hits = _get(sec, "prefetch", "hits", d.hits, int)
    pct = _get(sec, "prefetch", "percent", d.percent, int)
    _bounded("prefetch.hits", hits, 0, 1_000_000)
    _bounded("prefetch.percent", pct, 10, 90)  # CoreDNS: at least 10%
    return PrefetchConfig(hits, pct)


def _upstream(doc: Mapping[str, Any]) -> UpstreamConfig:
    sec = _section(doc, "upstream")
    _known(sec, "upstream", set(UpstreamConfig.__dataclass_fields__))
    d = UpstreamConfig()
    timeout = _get(sec, "upstream", "timeout", d.timeout, float)
    cap = _get(sec, "upstream", "max_concurrent", d.max_concurrent, int)
    fails = _get(sec, "upstream", "max_fails", d.max_fails, int)
    interval = _get(sec, "upstream", "health_interval", d.health_interval, float)
    payload = _get(sec, "upstream", "payload", d.payload, int)
    reuse = _get(sec, "upstream", "socket_reuse", d.socket_reuse, int)
    _bounded("upstream.timeout", timeout, 0.05, 30.0)
    _bounded("upstream.max_concurrent", cap, 1, 1_000_000)
    _bounded("upstream.max_fails", fails, 0, 1000)
    _bounded("upstream.health_interval", interval, 0.05, 60.0)
    _bounded("upstream.payload", payload, 512, 4096)
    _bounded("upstream.socket_reuse", reuse, 1, 100)
    conns = _get(sec, "upstream", "tcp_connections", d.tcp_connections, int)
    pipeline = _get(sec, "upstream", "tcp_pipeline", d.tcp_pipeline, int)
    idle = _get(sec, "upstream", "tcp_idle", d.tcp_idle, float)
    _bounded("upstream.tcp_connections", conns, 1, 64)
    _bounded("upstream.tcp_pipeline", pipeline, 1, 1000)
    _bounded("upstream.tcp_idle", idle, 0.1, 3600.0)
    return UpstreamConfig(timeout, cap, fails, interval, payload, reuse, conns, pipeline, idle)


def _zones(doc: Mapping[str, Any]) -> tuple[Zone, ...]:
    sec = _section(doc, "zones")
    zones = []
    for name, spec in sec.items():
        field = f"zones.{name}"
        if not isinstance(spec, Mapping):
            raise ConfigError(field, spec, "expected a mapping with upstreams")
        _known(spec, field, {"upstreams", "transport"})
        wire, text = zone_wire(field, name)
        ups = spec.get("upstreams")
        if not isinstance(ups, list) or not ups or len(ups) > 15:
            raise ConfigError(f"{field}.upstreams", ups, "expected a list of 1-15 ADDR:PORT")
        addrs = tuple(parse_address(f"{field}.upstreams", u) for u in ups)
        transport = spec.get("transport", "udp")
        if transport not in TRANSPORTS:
            raise ConfigError(f"{field}.transport", transport, "expected udp or tcp")
        zones.append(Zone(wire, text, addrs, transport))
    if not any(z.name == b"\x00" for z in zones):
        raise ConfigError("zones", sorted(sec), "no upstream for zone '.' (use --upstream)")
    if len({z.name for z in zones}) != len(zones):
        raise ConfigError("zones", sorted(sec), "the same zone twice")
    return tuple(sorted(zones, key=lambda z: -len(z.name)))


def _node_local(doc: Mapping[str, Any]) -> NodeLocalConfig | None:
    if doc.get("node_local") is None:
        return None
    sec = _section(doc, "node_local")
    _known(sec, "node_local", {"interface", "addresses", "link_kind", "notrack", "teardown"})
    d = NodeLocalConfig()
    iface = _get(sec, "node_local", "interface", d.interface, str)
    if not 1 <= len(iface) <= 15 or "/" in iface or " " in iface:
        raise ConfigError("node_local.interface", iface, "not an interface name")
    raw = sec.get("addresses", [str(a) for a in d.addresses])
    if not isinstance(raw, list) or not raw or not all(isinstance(a, str) for a in raw):
        raise ConfigError("node_local.addresses", raw, "expected a list of IP addresses")
    try:
        addrs = tuple(ipaddress.ip_address(a) for a in raw)
    except ValueError as exc:
        raise ConfigError("node_local.addresses", raw, str(exc)) from None
    for a in addrs:
        if a.version == 6 and (a.is_link_local or a.is_multicast or a.is_unspecified):
            raise ConfigError(
                "node_local.addresses",
                raw,
                f"{a}: pods reach the address through the node's routes, so an IPv6 one must be "
                "routable (NodeLocal DNSCache suggests one of fd00::/8)",
            )
    kind = _get(sec, "node_local", "link_kind", d.link_kind, str)
    if kind not in ("dummy", "bridge"):
        raise ConfigError("node_local.link_kind", kind, "expected dummy or bridge")
    teardown = _get(sec, "node_local", "teardown", d.teardown, str)
    if teardown not in ("auto", "always", "never"):
        raise ConfigError("node_local.teardown", teardown, "expected auto, always or never")
    notrack = _get(sec, "node_local", "notrack", True, bool)
    return NodeLocalConfig(iface, addrs, kind, notrack, teardown)


TOP_KEYS = {
    "listen",
    "zones",
    "workers",
    "metrics",
    "cache",
    "serve_stale",
    "prefetch",
    "upstream",
    "acl",
    "acl_action",
    "max_udp_payload",
    "tcp_idle_timeout",
    "tcp_max_connections",
    "lameduck",
    "drain_timeout",
    "node_local",
    "steering",
}


def parse(doc: Mapping[str, Any], cpu_count: int = 1) -> Config:
    """Validate the whole document; ``cpu_count`` is the default for ``workers``."""
    _known(doc, "", TOP_KEYS)
    listen_raw = doc.get("listen", ["127.0.0.1:53"])
    if not isinstance(listen_raw, list) or not listen_raw:
        raise ConfigError("listen", listen_raw, "expected a list of ADDR:PORT")
    listen = tuple(parse_address("listen", a) for a in listen_raw)
    if len(set(listen)) != len(listen):
        raise ConfigError("listen", listen_raw, "the same address twice")
    workers = _get(doc, "", "workers", cpu_count, int)
    _bounded("workers", workers, 1, 1024)
    metrics_raw = doc.get("metrics")
    metrics = None if metrics_raw is None else parse_address("metrics", metrics_raw, 9253)
    acl_raw = doc.get("acl", list(DEFAULT_ACL))
    if not isinstance(acl_raw, list):
        raise ConfigError("acl", acl_raw, "expected a list of networks")
    try:
        acl = tuple(ipaddress.ip_network(a, strict=True) for a in acl_raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError("acl", acl_raw, str(exc)) from None
    action = doc.get("acl_action", "refuse")
    if action not in ("refuse", "drop"):
        raise ConfigError("acl_action", action, "expected refuse or drop")
    max_payload = _get(doc, "", "max_udp_payload", 1232, int)
    _bounded("max_udp_payload", max_payload, 512, 4096)
    idle = _get(doc, "", "tcp_idle_timeout", 10.0, float)
    _bounded("tcp_idle_timeout", idle, 0.1, 300.0)
    max_conns = _get(doc, "", "tcp_max_connections", 1000, int)
    _bounded("tcp_max_connections", max_conns, 1, 1_000_000)
    lameduck = _get(doc, "", "lameduck", 0.0, float)
    _bounded("lameduck", lameduck, 0.0, 300.0)
    drain = _get(doc, "", "drain_timeout", 5.0, float)
    _bounded("drain_timeout", drain, 0.0, 300.0)
    return Config(
        listen=listen,
        zones=_zones(doc),
        workers=workers,
        metrics=metrics,
        cache=_cache(doc),
        serve_stale=_stale(doc),
        prefetch=_prefetch(doc),
        upstream=_upstream(doc),
        acl=acl,
        acl_action=action,
        max_udp_payload=max_payload,
        tcp_idle_timeout=idle,
        tcp_max_connections=max_conns,
        lameduck=lameduck,
        drain_timeout=drain,
        node_local=_node_local(doc),
        steering=_get(doc, "", "steering", True, bool),
    )


def load_file(path: Path) -> dict[str, Any]:
    """Read a YAML (or JSON, a subset of YAML) config file into a document for ``parse``."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("config", str(path), f"cannot read: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("config", str(path), f"not YAML: {exc}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError("config", str(path), "top level must be a mapping")
    plain: dict[str, Any] = json.loads(json.dumps(doc))  # JSON types: it is sent to workers
    return plain
