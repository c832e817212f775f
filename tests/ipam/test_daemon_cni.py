"""End to end: the installed CNI shim, exec'd as a runtime does, against the real
``ultranet-ipamd`` process in the lab's node namespace."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from cni.install import install
from ipam.client import AsyncIpamClient
from tests.cni.harness import conf, env, host_state, ns_path
from tests.conftest import LabFactory
from tests.lab.helpers import python_in
from tools.lab import netns
from tools.lab.daemon import IpamdProcess
from tools.lab.lab import Lab, LabConfig

pytestmark = pytest.mark.netns

CONNECT = """
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
print("connected")
"""


@pytest.fixture
def node(lab_factory: LabFactory, tmp_path: Path) -> Iterator[tuple[Lab, IpamdProcess, Path]]:
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=1))
    daemon = IpamdProcess(
        lab,
        tmp_path / "d",
        {
            "ULTRANET_CNI_SOCKET": str(tmp_path / "d" / "cni.sock"),
            "ULTRANET_CNI_SPOOL": str(tmp_path / "d" / "spool"),
        },
    )
    daemon.start()
    (shim,) = install(tmp_path / "bin", None, python=sys.executable)
    try:
        daemon.wait_ready()
        daemon.wait_cni_socket()  # bound after ready: the shim's first exec needs it
        yield lab, daemon, shim
    finally:
        daemon.stop()


def exec_shim(
    lab: Lab, shim: Path, daemon: IpamdProcess, variables: dict[str, str], stdin: bytes
) -> tuple[int, dict[str, Any]]:
    """Exec the shim in the node namespace, as the kubelet's runtime would."""
    done = subprocess.run(
        ["ip", "netns", "exec", lab.node_ns, str(shim)],
        env={
            "PATH": "/usr/bin:/bin",
            "ULTRANET_CNI_SOCKET": str(daemon.cni_socket),
            "ULTRANET_CNI_SPOOL": str(daemon.state_dir / "spool"),
            **variables,
        },
        input=stdin,
        capture_output=True,
        timeout=30,
    )
    body = json.loads(done.stdout) if done.stdout.strip() else {"stderr": done.stderr.decode()}
    return done.returncode, body


def test_pods_added_through_the_shim_reach_the_vpc_and_each_other(
    node: tuple[Lab, IpamdProcess, Path],
) -> None:
    lab, daemon, shim = node
    pods = [lab.create_pod_namespace(name) for name in ("a", "b")]
    addresses = []
    for n, pod in enumerate(pods):
        code, result = exec_shim(lab, shim, daemon, env("ADD", f"ctr{n}", ns_path(pod)), conf())
        assert code == 0, result
        addresses.append(result["ips"][0]["address"].split("/")[0])
    assert len(set(addresses)) == 2
    primary = lab.cloud.enis_of(lab.instance_id)[0]
    assert all(any(IPv4Address(a) in p for p in primary.prefixes) for a in addresses)
    # Pod a reaches its subnet's gateway in the vpc namespace, and pod b.
    gateway = lab.cloud.eni_view(primary.eni_id).gateway
    for target, where in ((str(gateway), lab.vpc_ns), (addresses[1], pods[1])):
        listener = netns.listening_socket(where, target, 0)
        try:
            done = python_in(pods[0], CONNECT, target, str(listener.getsockname()[1]))
        finally:
            listener.close()
        assert done.returncode == 0, done.stderr
    for n, pod in enumerate(pods):
        code, result = exec_shim(lab, shim, daemon, env("DEL", f"ctr{n}", ns_path(pod)), conf())
        assert code == 0, result
    state = host_state(lab)
    assert state["links"] == [] and state["rules"] == [] and state["routes"] == []


def test_a_restart_keeps_live_pods_and_drops_those_whose_veth_is_gone(
    node: tuple[Lab, IpamdProcess, Path],
) -> None:
    lab, daemon, shim = node
    keep, lose = lab.create_pod_namespace("keep"), lab.create_pod_namespace("lose")
    code, kept = exec_shim(lab, shim, daemon, env("ADD", "keep", ns_path(keep)), conf())
    assert code == 0, kept
    code, lost = exec_shim(lab, shim, daemon, env("ADD", "lose", ns_path(lose)), conf())
    assert code == 0, lost
    daemon.kill()
    netns.delete(lose)  # the pod goes away while the daemon is down: its veth goes too
    daemon.start()
    daemon.wait_ready()
    daemon.wait_cni_socket()

    async def held() -> list[str]:
        async with AsyncIpamClient(daemon.socket) as client:
            return [a["container_id"] for a in await client.list()]

    assert asyncio.run(held()) == ["keep"]
    code, again = exec_shim(
        lab, shim, daemon, env("CHECK", "keep", ns_path(keep)), conf(prevResult=kept)
    )
    assert code == 0, again
