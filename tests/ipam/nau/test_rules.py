"""Each NAU rule, against the units AWS publishes (VPC UG, "Network Address Usage for your VPC")."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ipam.nau.rules import (
    CONSERVATIVE_RULES,
    DEFAULT_RULES,
    InterfaceType,
    ManagedResource,
)

PUBLISHED_SIX = [
    ManagedResource.NLB,
    ManagedResource.GWLB,
    ManagedResource.VPC_ENDPOINT,
    ManagedResource.TGW_ATTACHMENT,
    ManagedResource.LAMBDA,
    ManagedResource.NAT_GATEWAY,
    ManagedResource.EFS_MOUNT_TARGET,
]


@pytest.mark.parametrize("resource", PUBLISHED_SIX)
def test_managed_resources_cost_six(resource: ManagedResource) -> None:
    assert DEFAULT_RULES.resource_units(resource) == 6


def test_primary_interface_counts_addresses_and_prefixes_only() -> None:
    # primary IPv4 + public IPv4 + 3 prefixes: 1 + 1 + 3, no interface unit
    units = DEFAULT_RULES.interface_units(
        InterfaceType.INTERFACE, primary=True, addresses=2, prefixes=3
    )
    assert units == 5


@pytest.mark.parametrize(
    ("counted", "expected"),
    [(True, 1 + 1 + 4), (False, 1 + 4)],  # interface + its primary IP + 4 secondaries
)
def test_additional_interface_primary_ip_switch(counted: bool, expected: int) -> None:
    rules = replace(DEFAULT_RULES, extra_interface_primary_ip=counted)
    units = rules.interface_units(InterfaceType.INTERFACE, primary=False, addresses=5, prefixes=0)
    assert units == expected


@pytest.mark.parametrize(
    ("adds", "kind", "addresses", "expected"),
    [
        (False, InterfaceType.EFA_ONLY, 0, 1),  # the EFA row alone
        (True, InterfaceType.EFA_ONLY, 0, 2),  # EFA row + additional-interface row
        (False, InterfaceType.EFA, 1, 2),  # EFA row + its IPv4
        (True, InterfaceType.EFA, 1, 3),
    ],
)
def test_efa_counting_switch(
    adds: bool, kind: InterfaceType, addresses: int, expected: int
) -> None:
    rules = replace(DEFAULT_RULES, efa_adds_to_interface=adds)
    assert rules.interface_units(kind, primary=False, addresses=addresses, prefixes=0) == expected


def test_primary_efa_never_gets_the_additional_interface_unit() -> None:
    units = CONSERVATIVE_RULES.interface_units(
        InterfaceType.EFA, primary=True, addresses=1, prefixes=1
    )
    assert units == 1 + 1 + 1  # IPv4, prefix, EFA row


def test_planner_defaults_are_the_conservative_readings() -> None:
    assert dict((s, c) for s, c, _ in CONSERVATIVE_RULES.switches()) == {
        "efa-counting": "adds",
        "extra-eni-primary-ip": "counted",
    }
    # the emulator keeps the literal reading
    assert DEFAULT_RULES.efa_adds_to_interface is False


def test_rule_table_lists_every_published_row() -> None:
    rows = dict(DEFAULT_RULES.table())
    assert len(rows) == 12
    assert sum(1 for units in rows.values() if units == 6) == 7
