"""Max pods as the EKS calculator computes it, against the VPC CNI's published values."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from ipam.instance_types import catalog, lookup
from ipam.nau.errors import PlanError
from ipam.nau.maxpods import Mode, max_pods


def _raw() -> dict[str, dict[str, object]]:
    text = resources.files("ipam").joinpath("data", "instance-network-limits.json").read_text()
    types: dict[str, dict[str, object]] = json.loads(text)["instance_types"]
    return types


def test_secondary_ip_uncapped_equals_eni_max_pods_txt_for_every_type() -> None:
    published = {n: r["eni_max_pods_txt"] for n, r in _raw().items()}
    assert len(published) == len(catalog()) > 1000
    mismatched = {
        name: (max_pods(lookup(name), Mode.SECONDARY, cap=False).value, value)
        for name, value in published.items()
        if max_pods(lookup(name), Mode.SECONDARY, cap=False).value != value
    }
    assert mismatched == {}


@pytest.mark.parametrize("name", ["m5.large", "c5.large", "p5.48xlarge", "m7i.48xlarge"])
def test_prefix_mode_follows_the_calculator(name: str) -> None:
    raw = _raw()[name]
    enis, ips, vcpus = raw["max_enis_default_card"], raw["ipv4_per_eni"], raw["vcpus"]
    assert isinstance(enis, int) and isinstance(ips, int) and isinstance(vcpus, int)
    uncapped = enis * ((ips - 1) * 16) + 2
    cap = 250 if vcpus > 30 else 110
    result = max_pods(lookup(name), Mode.PREFIX)
    assert result.uncapped == uncapped
    assert result.value == min(uncapped, cap)


def test_published_examples() -> None:
    # EKS docs: m5.large is 29 in secondary-IP mode and 110 with prefix delegation
    assert max_pods(lookup("m5.large"), Mode.SECONDARY).value == 29
    assert max_pods(lookup("m5.large"), Mode.PREFIX).value == 110


def test_custom_networking_drops_the_primary_eni() -> None:
    raw = _raw()["m5.large"]
    enis, ips = raw["max_enis_default_card"], raw["ipv4_per_eni"]
    assert isinstance(enis, int) and isinstance(ips, int)
    got = max_pods(lookup("m5.large"), Mode.SECONDARY, custom_networking=True, cap=False)
    assert got.value == (enis - 1) * (ips - 1) + 2


def test_prefix_mode_on_xen_is_refused() -> None:
    with pytest.raises(PlanError, match="Nitro"):
        max_pods(lookup("p3.2xlarge"), Mode.PREFIX)


def test_unknown_vcpus_asks_for_max_pods() -> None:
    with pytest.raises(PlanError, match="--max-pods"):
        max_pods(lookup("p3.2xlarge"), Mode.SECONDARY)
