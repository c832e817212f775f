"""The real exec'd shim against ``serve`` in the lab: 50 concurrent pods, real traffic."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.cni.backend import PoolBackend, pool_from_lab
from tests.cni.exec_harness import exec_shim, install_shim, serving
from tests.cni.harness import conf, env, host_state, node, ns_path, pod_state, run
from tests.lab.helpers import python_in
from tools.lab import netns
from tools.lab.lab import Lab, LabConfig

pytestmark = pytest.mark.netns

PODS = 50

CONNECT = """
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
sock.sendall(b"hello")
sock.close()
print("connected")
"""


def reach(lab: Lab, from_ns: str, to_ns: str, address: str) -> str:
    """Connect from ``from_ns`` to a listener on ``address`` in ``to_ns``; the peer seen."""
    listener = netns.listening_socket(to_ns, address, 0)
    try:
        done = python_in(from_ns, CONNECT, address, str(listener.getsockname()[1]))
        assert done.stdout.strip() == "connected", done.stderr
        listener.settimeout(5)
        conn, peer = listener.accept()
        assert conn.recv(5) == b"hello"
        conn.close()
    finally:
        listener.close()
    return str(peer[0])


def test_fifty_concurrent_pods_by_exec_get_distinct_addresses_and_leave_nothing(
    lab_factory: Any, tmp_path: Path
) -> None:
    lab: Lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=4))
    pods = [lab.create_pod_namespace(f"p{i}") for i in range(PODS)]
    backend = PoolBackend(pool_from_lab(lab))
    shim, sock = install_shim(tmp_path), tmp_path / "cni.sock"
    before = host_state(lab)
    gateway = str(lab.cloud.eni_view(lab.cloud.enis_of(lab.instance_id)[0].eni_id).gateway)

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        async with node(lab, backend) as n, serving(n, sock):
            adds = await asyncio.gather(
                *(
                    exec_shim(shim, sock, env("ADD", f"c{i}", ns_path(p)), conf())
                    for i, p in enumerate(pods)
                )
            )
            assert all(code == 0 for code, _ in adds), [out for code, out in adds if code]
            results = [out for _, out in adds]
            during = await asyncio.to_thread(host_state, lab)
            # traffic: pod -> subnet gateway (vpc namespace), pod <-> pod on this node
            a, b = (r["ips"][0]["address"].split("/")[0] for r in results[:2])
            assert await asyncio.to_thread(reach, lab, pods[0], lab.vpc_ns, gateway) == a
            assert await asyncio.to_thread(reach, lab, pods[1], pods[0], a) == b
            assert await asyncio.to_thread(reach, lab, pods[0], pods[1], b) == a
            dels = await asyncio.gather(
                *(
                    exec_shim(shim, sock, env("DEL", f"c{i}", ns_path(p)), conf(prevResult=r))
                    for i, (p, r) in enumerate(zip(pods, results, strict=True))
                )
            )
            assert all(code == 0 for code, _ in dels), dels
            await n.plumbing.settle()
            return results, during

    results, during = run(scenario())
    addresses = {r["ips"][0]["address"] for r in results}
    assert len(addresses) == PODS
    assert len(during["links"]) == len(before["links"]) + PODS
    assert host_state(lab) == before
    assert all(pod_state(p) == {"links": [], "addrs": [], "rules": []} for p in pods)
    assert backend.held() == set()


def test_exec_errors_come_back_as_cni_error_json(lab: Lab, tmp_path: Path) -> None:
    backend = PoolBackend(pool_from_lab(lab))
    shim, sock = install_shim(tmp_path), tmp_path / "cni.sock"

    async def scenario() -> list[tuple[int, dict[str, Any]]]:
        async with node(lab, backend) as n, serving(n, sock):
            return [
                await exec_shim(shim, sock, env("ADD", "c1", ""), conf()),
                await exec_shim(shim, sock, env("ADD", "c1", "/proc/self/ns/net"), b"{"),
                await exec_shim(shim, sock, env("STATUS"), conf("1.0.0")),
            ]

    missing, bad_json, status = run(scenario())
    assert missing[0] == 1 and missing[1]["code"] == 4 and "CNI_NETNS" in missing[1]["msg"]
    assert bad_json[0] == 1 and bad_json[1]["code"] == 6
    assert status == (0, {"stderr": ""})
