"""Through libcni (Debian's golang-github-appc-cni-dev), with Debian's reference plugins
tuning, portmap and bandwidth chained after ultranet, as a runtime would run them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from cni.install import conflist
from tests.cni.backend import PoolBackend, pool_from_lab
from tests.cni.exec_harness import install_shim, serving
from tests.cni.harness import host_state, node, ns_path, run
from tests.lab.helpers import python_in
from tools.bench.cni.driver import REFERENCE_PLUGINS, Driver, DriverUnavailable, build
from tools.lab import netns
from tools.lab.lab import Lab

pytestmark = pytest.mark.netns

CHAIN = [
    {"type": "tuning", "sysctl": {"net.core.somaxconn": "512"}},
    {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
    {
        "type": "bandwidth",
        "ingressRate": 100_000_000,
        "ingressBurst": 1_000_000,
        "egressRate": 100_000_000,
        "egressBurst": 1_000_000,
    },
]


@pytest.fixture(scope="module")
def driver_binary() -> Path:
    if not (REFERENCE_PLUGINS / "tuning").exists():
        pytest.skip("needs Debian package containernetworking-plugins")
    try:
        return build()
    except DriverUnavailable as err:
        pytest.skip(str(err))


def all_links(ns: str) -> set[str]:
    with IPRoute(netns=ns) as ipr:
        return {str(link.get("ifname")) for link in ipr.get_links()}


def qdiscs(ns: str, ifname: str) -> set[str]:
    with IPRoute(netns=ns) as ipr:
        (index,) = ipr.link_lookup(ifname=ifname)
        return {str(q.get("kind")) for q in ipr.get_qdiscs(index=index)}


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_add_check_del_through_libcni_with_reference_plugins_chained(
    lab: Lab, tmp_path: Path, driver_binary: Path, version: str
) -> None:
    pod_ns = lab.create_pod_namespace("l")
    backend = PoolBackend(pool_from_lab(lab))
    shim, sock = install_shim(tmp_path), tmp_path / "cni.sock"
    body = conflist(chain=CHAIN)
    body["cniVersion"] = version
    body.pop("cniVersions")  # libcni 1.1 reads cniVersion only
    (tmp_path / "net.conflist").write_text(json.dumps(body))
    before_host, before_links = host_state(lab), all_links(lab.node_ns)
    gateway = str(lab.cloud.eni_view(lab.cloud.enis_of(lab.instance_id)[0].eni_id).gateway)

    def drive() -> dict[str, Any]:
        with Driver(
            lab.node_ns,
            tmp_path / "net.conflist",
            tmp_path / "cache",
            [shim.parent, REFERENCE_PLUGINS],
            env={"ULTRANET_CNI_SOCKET": str(sock)},
        ) as driver:
            added = driver.call("add", "c1", ns_path(pod_ns))
            assert added["ok"], added
            result = added["result"]
            host_veth = result["interfaces"][0]["name"]
            seen = {
                "result": result,
                "check": driver.call("check", "c1", ns_path(pod_ns)),
                "qdiscs": qdiscs(lab.node_ns, host_veth),
                "sysctl": python_in(
                    pod_ns, "print(open('/proc/sys/net/core/somaxconn').read())"
                ).stdout.split(),
                "links": all_links(lab.node_ns),
            }
            listener = netns.listening_socket(lab.vpc_ns, gateway, 0)
            try:
                port = listener.getsockname()[1]
                code = f"import socket; socket.create_connection(('{gateway}', {port}), 5)"
                seen["connect"] = python_in(pod_ns, code).returncode
                listener.settimeout(5)
                conn, peer = listener.accept()
                conn.close()
                seen["peer"] = peer[0]
            finally:
                listener.close()
            seen["del"] = driver.call("del", "c1", ns_path(pod_ns))
            seen["del2"] = driver.call("del", "c1", ns_path(pod_ns))
            return seen

    async def scenario() -> dict[str, Any]:
        async with node(lab, backend) as n, serving(n, sock):
            seen = await asyncio.to_thread(drive)
            await n.plumbing.settle()
            return seen

    seen = run(scenario())
    result = seen["result"]
    assert result["cniVersion"] == version
    address = result["ips"][0]["address"].split("/")[0]
    assert seen["check"]["ok"], seen["check"]
    assert {"tbf", "ingress"} <= seen["qdiscs"]  # bandwidth shaped our host veth
    assert len(seen["links"] - before_links) == 2  # our veth + bandwidth's ifb
    assert seen["sysctl"] == ["512"]  # tuning ran in the pod
    assert seen["connect"] == 0 and seen["peer"] == address
    assert seen["del"]["ok"] and seen["del2"]["ok"], (seen["del"], seen["del2"])
    assert host_state(lab) == before_host
    assert all_links(lab.node_ns) == before_links  # the ifb went too
    assert backend.held() == set()
