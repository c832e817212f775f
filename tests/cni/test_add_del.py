"""ADD, CHECK and DEL in-process in the lab: the VPC CNI's plumbing, per CNI version."""

from __future__ import annotations

import asyncio

import pytest

from cni.keys import IpamKey
from cni.plumbing import RULE_TO_POD, host_ifname
from tests.cni.backend import PoolBackend, pool_from_lab
from tests.cni.harness import NETWORK, conf, env, host_state, node, ns_path, pod_state, run
from tools.lab.lab import Lab

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_add_check_del_per_version(lab: Lab, version: str) -> None:
    pod_ns = lab.create_pod_namespace("a")
    backend = PoolBackend(pool_from_lab(lab))
    before = host_state(lab)

    async def scenario() -> dict[str, object]:
        async with node(lab, backend) as n:
            result = await n.add("c1", pod_ns, version, mtu=1500)
            code, out = await n.call(
                env("CHECK", "c1", ns_path(pod_ns)), conf(version, mtu=1500, prevResult=result)
            )
            assert code == 0, out
            during = {
                "host": await asyncio.to_thread(host_state, lab),
                "pod": await asyncio.to_thread(pod_state, pod_ns),
                "result": result,
            }
            await n.delete("c1", pod_ns, result, version)
            await n.delete("c1", pod_ns, result, version)  # DEL twice: still success
            await n.plumbing.settle()
            return during

    during = run(scenario())
    result = during["result"]
    assert isinstance(result, dict)
    assert result["cniVersion"] == version
    (ip,) = result["ips"]
    address = ip["address"].split("/")[0]
    assert ip["address"].endswith("/32") and ip["gateway"] == "169.254.1.1"
    assert ("version" in ip) == (version == "0.4.0")
    host_name = host_ifname(IpamKey(NETWORK, "c1", "eth0"), 0, "eni")
    assert [i["name"] for i in result["interfaces"]] == [host_name, "eth0"]
    assert result["interfaces"][1]["sandbox"] == ns_path(pod_ns)
    assert ("mtu" in result["interfaces"][1]) == (version == "1.1.0")
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    host = during["host"]
    assert isinstance(host, dict)
    assert host["links"] == sorted(before["links"] + [host_name])
    assert (RULE_TO_POD, "", address, 254) in host["rules"]
    assert address in host["routes"]
    assert during["pod"] == {"links": ["eth0"], "addrs": [("eth0", address)], "rules": []}
    assert host_state(lab) == before
    assert pod_state(pod_ns)["links"] == []
    assert backend.held() == set()
