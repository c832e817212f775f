"""Plumbing.reap_stray_rules: the start-up sweep of host rules no pod has any more."""

from __future__ import annotations

import errno
import socket
from ipaddress import IPv4Address
from typing import Any

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni.plumbing import RULE_FROM_POD, RULE_TO_POD
from tests.cni.backend import PoolBackend, pool_from_lab
from tests.cni.harness import host_state, node, run
from tools.lab.lab import Lab

pytestmark = pytest.mark.netns

GONE = "100.127.255.1"  # a pod that went with the daemon down: both rules are strays
ROUTED = "100.127.255.2"  # no allocation, but a /32 route reaches it: not ours to judge
HELD = "100.127.255.3"  # an allocation holds it (its ADD is about to route it)
# Rules at our priorities in shapes an ADD never makes: another agent's, kept.
FOREIGN: list[dict[str, Any]] = [
    {"priority": RULE_TO_POD, "dst": "100.127.255.4", "dst_len": 32, "table": 100},
    {"priority": RULE_TO_POD, "dst": "100.127.255.5", "dst_len": 32, "table": 254, "iifname": "lo"},
    {"priority": RULE_FROM_POD, "src": "100.127.255.6", "src_len": 32, "table": 5, "fwmark": 7},
    {"priority": RULE_FROM_POD, "src": "100.127.254.0", "src_len": 24, "table": 5},
    {"priority": RULE_TO_POD + 1, "dst": "100.127.255.7", "dst_len": 32, "table": 254},
]


def pod_rules(address: str, table: int = 5) -> list[dict[str, Any]]:
    return [
        {"priority": RULE_TO_POD, "dst": address, "dst_len": 32, "table": 254},
        {"priority": RULE_FROM_POD, "src": address, "src_len": 32, "table": table},
    ]


def rules_at_our_priorities(lab: Lab) -> list[tuple[Any, ...]]:
    with IPRoute(netns=lab.node_ns) as ipr:
        return sorted(
            (r.get("priority"), r.get("src") or r.get("dst"), r.get("table"))
            for r in ipr.get_rules(family=socket.AF_INET)
            if r.get("priority") in (RULE_TO_POD, RULE_FROM_POD, RULE_TO_POD + 1)
        )


def test_only_rules_of_an_adds_shape_whose_address_nothing_accounts_for_are_reaped(
    lab: Lab,
) -> None:
    before = host_state(lab)
    made = [*pod_rules(GONE), *pod_rules(ROUTED), *pod_rules(HELD), *FOREIGN]
    with IPRoute(netns=lab.node_ns) as ipr:
        try:
            ipr.route("add", dst=f"{ROUTED}/32", oif=ipr.link_lookup(ifname="lo")[0])
            for rule in made:
                ipr.rule("add", **rule)
            expected_left = [r for r in rules_at_our_priorities(lab) if r[1] != GONE]

            async def sweep() -> list[tuple[int, IPv4Address]]:
                async with node(lab, PoolBackend(pool_from_lab(lab))) as n:
                    return await n.plumbing.reap_stray_rules(lambda: {IPv4Address(HELD)})

            reaped = run(sweep())
            assert sorted(reaped) == [
                (RULE_TO_POD, IPv4Address(GONE)),
                (RULE_FROM_POD, IPv4Address(GONE)),
            ]
            assert rules_at_our_priorities(lab) == expected_left
        finally:
            for rule in made:
                try:
                    ipr.rule("del", **rule)
                except NetlinkError as err:
                    if err.code != errno.ENOENT:
                        raise
            try:
                ipr.route("del", dst=f"{ROUTED}/32", oif=ipr.link_lookup(ifname="lo")[0])
            except NetlinkError as err:
                if err.code != errno.ESRCH:
                    raise
    assert host_state(lab) == before
