"""IPv6 results (no root): ips and routes of an IPv6 pod for every supported CNI version,
and prevResult parsing that keeps them."""

from __future__ import annotations

from ipaddress import IPv6Address, IPv6Interface, IPv6Network

import pytest

from cni.errors import CniError
from cni.result import IpConfig, PodInterface, Result, Route, parse_result, render_result
from cni.spec import SUPPORTED_VERSIONS

POD_ADDRESS = IPv6Interface("fd00:ec2:0:1:a1b2::7/128")
RESULT = Result(
    interfaces=(PodInterface("eni0123456789a", "02:00:00:00:00:01"), PodInterface("eth0")),
    ips=(IpConfig(POD_ADDRESS, IPv6Address("fe80::1"), 1),),
    routes=(Route(IPv6Network("::/0"), IPv6Address("fe80::1")),),
)


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_an_ipv6_pod_renders_for_every_supported_version(version: str) -> None:
    rendered = render_result(RESULT, version)
    (ip,) = rendered["ips"]
    expected = {"address": "fd00:ec2:0:1:a1b2::7/128", "gateway": "fe80::1", "interface": 1}
    if version.startswith("0."):
        expected["version"] = "6"  # 0.3.x/0.4.0 name the family; 1.0.0 dropped the field
    assert ip == expected
    assert rendered["routes"] == [{"dst": "::/0", "gw": "fe80::1"}]
    assert parse_result(rendered) == RESULT


def test_a_prev_result_keeps_ipv6_and_ipv4_entries_in_order() -> None:
    raw = {
        "ips": [
            {"address": "100.64.0.5/32", "gateway": "169.254.1.1", "interface": 0},
            {"address": "fd00::5/128", "version": "6"},
        ],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "fd00::/8", "gw": "fe80::1"}],
    }
    parsed = parse_result(raw)
    assert [str(ip.address) for ip in parsed.ips] == ["100.64.0.5/32", "fd00::5/128"]
    assert [str(r.dst) for r in parsed.routes] == ["0.0.0.0/0", "fd00::/8"]


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"ips": [{"address": "fd00::5/128", "gateway": "169.254.1.1"}]}, "ips[0].gateway"),
        ({"ips": [{"address": "100.64.0.5/32", "gateway": "fe80::1"}]}, "ips[0].gateway"),
        ({"routes": [{"dst": "::/0", "gw": "169.254.1.1"}]}, "routes[0].gw"),
    ],
)
def test_a_gateway_of_the_other_family_is_refused(raw: dict[str, object], path: str) -> None:
    with pytest.raises(CniError) as caught:
        parse_result(raw)
    assert f"prevResult.{path}" in caught.value.msg
