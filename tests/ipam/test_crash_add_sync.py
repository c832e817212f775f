"""kill -9 of the real daemon while an ADD's allocation is being synced beside its
plumbing (``IpamBackend.allocate_staged``): the veth and rules exist, the journal does not
have the allocation yet. The ADD was never answered, so nothing of it may stay."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest

from cni.keys import IpamKey
from cni.plumbing import host_ifname
from tests.cni.harness import NETWORK, conf, env, host_state, ns_path, pod_state
from tests.ipam.test_daemon_cni import (
    CLEAN,
    CrashNode,
    crash_node,
    exec_shim,
    held,
    restart_without_pause,
    strays_reaped,
)
from tools.lab.lab import LabConfig

pytestmark = pytest.mark.netns
__all__ = ["crash_node"]  # the fixture, used by name


def test_kill_9_while_an_adds_allocation_syncs_beside_its_plumbing_leaves_nothing(
    crash_node: Callable[[LabConfig, dict[str, str], str], CrashNode],
) -> None:
    lab, daemon, shim, pause = crash_node(
        LabConfig(instance_type="m5.large", prefixes_per_card=1), {}, "sync-beside-add"
    )
    pod = lab.create_pod_namespace("w4")
    with subprocess.Popen(
        ["ip", "netns", "exec", lab.node_ns, str(shim)],
        env={
            "PATH": "/usr/bin:/bin",
            "ULTRANET_CNI_SOCKET": str(daemon.cni_socket),
            "ULTRANET_CNI_SPOOL": str(daemon.state_dir / "spool"),
            **env("ADD", "w4", ns_path(pod)),
        },
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as shim_add:
        try:
            assert shim_add.stdin is not None
            shim_add.stdin.write(conf())
            shim_add.stdin.close()
            assert pause.wait(daemon) == "sync-beside-add\n"
            veth = host_ifname(IpamKey(NETWORK, "w4", "eth0"), 0, "eni")
            # The event loop plumbs while the sync is held: wait for its host side.
            deadline = time.monotonic() + 30
            plumbed = host_state(lab)
            while len(plumbed["rules"]) < 1:
                assert time.monotonic() < deadline, f"not plumbed: {daemon.log_tail()}"
                plumbed = host_state(lab)
            daemon.kill()
            shim_add.wait(timeout=30)
        finally:
            if shim_add.poll() is None:
                shim_add.kill()
        assert shim_add.stdout is not None
        answer = shim_add.stdout.read()
    assert shim_add.returncode == 1 and b'"code": 11' in answer, answer  # try again later
    assert plumbed["links"] == [veth] and len(plumbed["routes"]) == 1

    restart_without_pause(daemon)

    assert held(daemon) == []  # never synced: the journal does not have it
    assert host_state(lab) == CLEAN
    assert pod_state(pod) == {"links": [], "addrs": [], "rules": []}
    assert strays_reaped(lab) == 1
    code, added = exec_shim(lab, shim, daemon, env("ADD", "w4", ns_path(pod)), conf())
    assert code == 0, added  # the runtime's retry
    code, out = exec_shim(lab, shim, daemon, env("DEL", "w4", ns_path(pod)), conf())
    assert code == 0, out
