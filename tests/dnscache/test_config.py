"""config.parse: one table of documents, good and bad, with the message expected."""

from __future__ import annotations

from typing import Any

import pytest

from dnscache.config import parse
from dnscache.errors import ConfigError

ROOT = {".": {"upstreams": ["198.18.0.2:53"]}}


def doc(**over: Any) -> dict[str, Any]:
    return {"zones": ROOT, **over}


def test_defaults() -> None:
    cfg = parse(doc(), cpu_count=4)
    assert cfg.workers == 4 and cfg.cache.capacity == 10000 and cfg.serve_stale.stale_ttl == 30
    assert cfg.serve_stale.client_timeout == 1.8 and cfg.cache.servfail_ttl == 5
    assert str(cfg.listen[0][0]) == "127.0.0.1" and cfg.listen[0][1] == 53


def test_zones_longest_first_and_transport() -> None:
    cfg = parse(
        doc(zones={**ROOT, "cluster.local": {"upstreams": ["100.64.0.10"], "transport": "tcp"}})
    )
    assert [z.text for z in cfg.zones] == ["cluster.local.", "."]
    assert cfg.zones[0].transport == "tcp" and cfg.zones[0].upstreams[0][1] == 53


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"zones": {}}, "no upstream for zone '.'"),
        (doc(listen=["localhost:53"]), "not an IP address"),
        (doc(listen=["127.0.0.1:99999"]), "port must be 0-65535"),
        (doc(workers=0), "between 1 and 1024"),
        (doc(cache={"servfail_ttl": 301}), "between 0 and 300"),
        (doc(cache={"capacity": "big"}), "expected int"),
        (doc(cache={"bogus": 1}), "cache.bogus"),
        (doc(serve_stale={"stale_ttl": 0}), "between 1 and 3600"),
        (doc(prefetch={"percent": 5}), "between 10 and 90"),
        (doc(upstream={"socket_reuse": 0}), "upstream.socket_reuse"),
        (doc(upstream={"tcp_connections": 0}), "upstream.tcp_connections"),
        (doc(upstream={"tcp_pipeline": 1001}), "upstream.tcp_pipeline"),
        (doc(upstream={"tcp_idle": 0}), "upstream.tcp_idle"),
        (doc(acl=["10.0.0.1/8"]), "host bits set"),
        (doc(acl_action="allow"), "expected refuse or drop"),
        (doc(zones={".": {"upstreams": []}}), "expected a list of 1-15"),
        (
            doc(zones={**ROOT, "a..b": {"upstreams": ["198.18.0.3"], "transport": "quic"}}),
            "expected udp or tcp",
        ),
        (doc(node_local={"addresses": ["fe80::1"]}), "fe80::1: pods reach the address"),
        (doc(node_local={"addresses": ["fd00::20:1x"]}), "node_local.addresses"),
        (doc(node_local={"addresses": [5]}), "expected a list of IP addresses"),
        (doc(node_local={"link_kind": "veth"}), "expected dummy or bridge"),
        (doc(node_local={"teardown": "sometimes"}), "expected auto, always or never"),
        (doc(surprise=True), "unknown key"),
    ],
)
def test_rejects(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(document)


def test_node_local_takes_ipv4_and_ipv6_addresses() -> None:
    cfg = parse(doc(node_local={"addresses": ["169.254.20.10", "fd00::20:10"]}))
    assert cfg.node_local is not None
    assert [str(a) for a in cfg.node_local.addresses] == ["169.254.20.10", "fd00::20:10"]
