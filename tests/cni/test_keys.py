"""Attachment keys validated as the CNI spec defines their parts."""

from __future__ import annotations

import pytest

from cni.keys import InvalidKey, IpamKey, PodRef


def test_a_valid_key_prints_as_its_three_parts() -> None:
    assert str(IpamKey("ultranet", "abc_1.2-3", "eth0")) == "ultranet/abc_1.2-3/eth0"
    assert str(PodRef("kube-system", "coredns-1")) == "kube-system/coredns-1"


@pytest.mark.parametrize(
    ("network", "container", "ifname", "field"),
    [
        ("", "c1", "eth0", "network"),
        ("a b", "c1", "eth0", "network"),
        ("net", "", "eth0", "container_id"),
        ("net", "-c1", "eth0", "container_id"),
        ("net", "c/1", "eth0", "container_id"),
        ("net", "c1", "", "ifname"),
        ("net", "c1", "x" * 16, "ifname"),
        ("net", "c1", "..", "ifname"),
        ("net", "c1", "eth:0", "ifname"),
        ("net", "c1", "eth 0", "ifname"),
    ],
)
def test_malformed_parts_are_refused_by_name(
    network: str, container: str, ifname: str, field: str
) -> None:
    with pytest.raises(InvalidKey) as excinfo:
        IpamKey(network, container, ifname)
    assert excinfo.value.field == field
    assert field in str(excinfo.value)


def test_fifteen_byte_interface_names_are_the_limit() -> None:
    assert IpamKey("net", "c1", "x" * 15).ifname == "x" * 15
    with pytest.raises(InvalidKey):
        IpamKey("net", "c1", "é" * 8)  # 16 bytes in UTF-8


def test_pod_reference_needs_both_parts() -> None:
    with pytest.raises(InvalidKey, match="pod.namespace"):
        PodRef("", "web")
    with pytest.raises(InvalidKey, match="pod.name"):
        PodRef("default", "")
