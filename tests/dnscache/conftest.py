"""Fixtures: a loopback authoritative upstream and ultranet-dns processes, always stopped."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tools.bench.dns.authserver import AuthServer

from .helpers import DnsProcess

ZONE = [
    "www.test. A 198.18.0.5",
    "www.test. A 198.18.0.6",
    "alias.test. CNAME mid.test.",
    "mid.test. CNAME www.test.",
    "big.test. TXT " + " ".join(['"' + "x" * 200 + '"'] * 8),
    "mx.test. MX 10 www.test.",
    "sub.deep.test. A 198.18.0.7",
]


@pytest.fixture
def auth() -> Iterator[AuthServer]:
    with AuthServer("test.", ZONE, wildcard_a=False) as server:
        yield server


@pytest.fixture
def dns_factory() -> Iterator[Callable[..., DnsProcess]]:
    procs: list[DnsProcess] = []

    def start(doc: dict[str, Any], **kw: Any) -> DnsProcess:
        p = DnsProcess(doc, **kw)
        procs.append(p)
        return p

    try:
        yield start
    finally:
        for p in reversed(procs):
            p.close()


@pytest.fixture
def need_dig() -> None:
    if shutil.which("dig") is None:
        pytest.fail("dig is missing: install the Debian package bind9-dnsutils")
