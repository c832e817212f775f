"""Node-local mode inside a namespace we create: 169.254.20.10 on our own interface, NOTRACK
rules for it, all removed on exit, except while another instance (the new pod of a surge
upgrade) still serves the address. The ``dummy`` link type is missing on this kernel, so the
tests run with ``link_kind: bridge`` (a port-less bridge holds a local address the same way)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import pytest

from .helpers import REPO, DnsProcess

pytestmark = pytest.mark.netns
Factory = Callable[..., DnsProcess]


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"un-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


@pytest.fixture
def upstream(netns: str) -> Iterator[int]:
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            netns,
            sys.executable,
            "-m",
            "tools.bench.dns.authserver",
            "--record",
            "www.test. A 198.18.0.5",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        yield json.loads(proc.stdout.readline())["port"]
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def node_local_doc(upstream: int) -> dict[str, object]:
    return {
        "listen": ["169.254.20.10:53"],
        "workers": 2,
        "metrics": "127.0.0.1:0",
        "zones": {".": {"upstreams": [f"127.0.0.1:{upstream}"]}},
        "node_local": {
            "interface": "nodelocaldns",
            "addresses": ["169.254.20.10"],
            "link_kind": "bridge",
        },
    }


def dig_local(netns: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "dig", "@169.254.20.10", "+tries=1", "+time=3", "www.test"],
        capture_output=True,
        text=True,
        timeout=20,
    ).stdout


def test_node_local_address_rules_and_teardown(
    netns: str, upstream: int, dns_factory: Factory
) -> None:
    dns = dns_factory(node_local_doc(upstream), netns=netns)
    assert "169.254.20.10/32" in sh("ip", "-n", netns, "addr", "show", "dev", "nodelocaldns")
    raw = sh("ip", "netns", "exec", netns, "iptables", "-w", "-t", "raw", "-S")
    assert "-A ULTRANET-DNS-PRE -d 169.254.20.10/32 -p udp -m udp --dport 53 -j NOTRACK" in raw
    assert "-A PREROUTING -j ULTRANET-DNS-PRE" in raw
    out = dig_local(netns)
    assert "198.18.0.5" in out and "status: NOERROR" in out
    dns.signal(signal.SIGTERM)
    assert dns.proc.wait(30) == 0
    links = sh("ip", "-n", netns, "link", "show")
    assert "nodelocaldns" not in links
    assert "ULTRANET" not in sh("ip", "netns", "exec", netns, "iptables", "-w", "-t", "raw", "-S")
    assert "ULTRANET" not in sh("ip", "netns", "exec", netns, "iptables", "-w", "-S")


def test_a_surge_keeps_the_address_and_rules_for_the_instance_still_serving(
    netns: str, upstream: int, dns_factory: Factory
) -> None:
    old = dns_factory(node_local_doc(upstream), netns=netns)
    new = dns_factory(node_local_doc(upstream), netns=netns)  # set up again beside it
    raw = sh("ip", "netns", "exec", netns, "iptables", "-w", "-t", "raw", "-S")
    assert raw.count("-A PREROUTING -j ULTRANET-DNS-PRE") == 1  # added once, not per start
    notrack = "-A ULTRANET-DNS-PRE -d 169.254.20.10/32 -p udp -m udp --dport 53 -j NOTRACK"
    assert raw.count(notrack) == 1
    old.signal(signal.SIGTERM)
    assert old.proc.wait(30) == 0
    assert "169.254.20.10/32" in sh("ip", "-n", netns, "addr", "show", "dev", "nodelocaldns")
    assert notrack in sh("ip", "netns", "exec", netns, "iptables", "-w", "-t", "raw", "-S")
    out = dig_local(netns)
    assert "198.18.0.5" in out and "status: NOERROR" in out  # the new one serves on
    new.signal(signal.SIGTERM)
    assert new.proc.wait(30) == 0  # the last one out tears down
    assert "nodelocaldns" not in sh("ip", "-n", netns, "link", "show")
    assert "ULTRANET" not in sh("ip", "netns", "exec", netns, "iptables", "-w", "-t", "raw", "-S")


def test_teardown_never_leaves_everything_in_place(
    netns: str, upstream: int, dns_factory: Factory
) -> None:
    dns = dns_factory(
        node_local_doc(upstream), netns=netns, extra=["--nodelocal-teardown", "never"]
    )
    dns.signal(signal.SIGTERM)
    assert dns.proc.wait(30) == 0
    assert "169.254.20.10/32" in sh("ip", "-n", netns, "addr", "show", "dev", "nodelocaldns")
    assert "ULTRANET-DNS-PRE" in sh(
        "ip", "netns", "exec", netns, "iptables", "-w", "-t", "raw", "-S"
    )


NODE_LOCAL_V6 = "fd00::20:10"  # NodeLocal DNSCache's docs suggest one of fd00::/8


def test_an_ipv6_node_local_address_gets_ip6tables_rules_and_answers(
    netns: str, upstream: int, dns_factory: Factory
) -> None:
    # IPv4 beside IPv6, as a dual-stack node would have both: each family's rules go to
    # its own table, and the IPv6 address answers though the port-less bridge has no carrier.
    doc = node_local_doc(upstream)
    doc["listen"] = ["169.254.20.10:53", f"[{NODE_LOCAL_V6}]:53"]
    doc["node_local"]["addresses"] = ["169.254.20.10", NODE_LOCAL_V6]  # type: ignore[index]
    dns = dns_factory(doc, netns=netns)
    shown = sh("ip", "-n", netns, "addr", "show", "dev", "nodelocaldns")
    (line,) = [x for x in shown.splitlines() if f"{NODE_LOCAL_V6}/128" in x]
    assert "tentative" not in line  # usable at once
    raw6 = sh("ip", "netns", "exec", netns, "ip6tables", "-w", "-t", "raw", "-S")
    assert f"-A ULTRANET-DNS-PRE -d {NODE_LOCAL_V6}/128 -p udp -m udp --dport 53 -j NOTRACK" in raw6
    assert "-A PREROUTING -j ULTRANET-DNS-PRE" in raw6
    raw4 = sh("ip", "netns", "exec", netns, "iptables", "-w", "-t", "raw", "-S")
    assert NODE_LOCAL_V6 not in raw4 and "-d 169.254.20.10/32" in raw4
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "dig", f"@{NODE_LOCAL_V6}", "+tries=1", "+time=3"]
        + ["www.test"],
        capture_output=True,
        text=True,
        timeout=20,
    ).stdout
    assert "198.18.0.5" in out and "status: NOERROR" in out
    dns.signal(signal.SIGTERM)
    assert dns.proc.wait(30) == 0
    assert "nodelocaldns" not in sh("ip", "-n", netns, "link", "show")
    for tool in ("iptables", "ip6tables"):
        for table in ("raw", "filter"):
            assert "ULTRANET" not in sh("ip", "netns", "exec", netns, tool, "-w", "-t", table, "-S")


def test_an_ipv6_surge_keeps_the_address_and_rules_for_the_instance_still_serving(
    netns: str, upstream: int, dns_factory: Factory
) -> None:
    # The surge check binds each node-local address in its own family: the old instance
    # must find the new one still serving the IPv6 address and leave it everything.
    doc = node_local_doc(upstream)
    doc["listen"] = [f"[{NODE_LOCAL_V6}]:53"]
    doc["node_local"]["addresses"] = [NODE_LOCAL_V6]  # type: ignore[index]
    old = dns_factory(doc, netns=netns)
    new = dns_factory(doc, netns=netns)
    old.signal(signal.SIGTERM)
    assert old.proc.wait(30) == 0
    assert f"{NODE_LOCAL_V6}/128" in sh("ip", "-n", netns, "addr", "show", "dev", "nodelocaldns")
    raw6 = sh("ip", "netns", "exec", netns, "ip6tables", "-w", "-t", "raw", "-S")
    assert "-A PREROUTING -j ULTRANET-DNS-PRE" in raw6
    new.signal(signal.SIGTERM)
    assert new.proc.wait(30) == 0
    assert "nodelocaldns" not in sh("ip", "-n", netns, "link", "show")
    assert "ULTRANET" not in sh("ip", "netns", "exec", netns, "ip6tables", "-w", "-t", "raw", "-S")
