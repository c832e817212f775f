"""``kill -9`` of the real ``ultranet-ipamd`` in IPv6 mode after a DEL was answered and
before its veths went. An IPv6 pod has two host veths, its own (``eni*``) and its IPv4
egress one (``v4e*``, ``ENABLE_V4_EGRESS``, the default); the reaper puts a batch in its
device group and then deletes the group. Killed between the two, the restarted daemon's
start-up sweep deletes both veths (they carry our alias) and holds nothing."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from cni.install import install
from cni.keys import IpamKey
from cni.plumbing import host_ifname, v4_egress_ifname
from tests.cni.harness import NETWORK, conf, env, ns_path
from tests.conftest import LabFactory
from tests.ipam.ipv6lab import give_primary_eni_an_ipv6_prefix
from tests.ipam.test_daemon_cni import (
    METRICS_PORT,
    PausePoint,
    exec_shim,
    held,
    restart_without_pause,
    strays_reaped,
)
from tools.lab.daemon import IpamdProcess
from tools.lab.lab import Lab, LabConfig

pytestmark = pytest.mark.netns

IPV6 = {
    "ENABLE_IPv4": "false",
    "ENABLE_IPv6": "true",
    "ENABLE_PREFIX_DELEGATION": "true",
    "ULTRANET_V4_EGRESS_RANGE": "198.18.4.0/22",  # lab addresses only (default 169.254.172.0/22)
}


@pytest.fixture
def pause(tmp_path: Path) -> Iterator[PausePoint]:
    point = PausePoint(tmp_path / "pause")
    try:
        yield point
    finally:
        point.close()


def ipv6_lab(lab_factory: LabFactory) -> Lab:
    """An m5.large whose primary ENI has its /80 at launch (``Ipv6PrefixCount=1``)."""
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=1))
    give_primary_eni_an_ipv6_prefix(lab)
    return lab


def pod_veths(lab: Lab) -> dict[str, int]:
    """Our host veths in the node's namespace (``eni*``, ``v4e*``) and their device groups."""
    with IPRoute(netns=lab.node_ns) as ipr:
        return {
            str(link.get("ifname")): int(link.get("IFLA_GROUP"))
            for link in ipr.get_links()
            if str(link.get("ifname")).startswith(("eni", "v4e"))
        }


def pod_links(ns: str) -> list[str]:
    with IPRoute(netns=ns) as ipr:
        return sorted(str(link.get("ifname")) for link in ipr.get_links())


def test_kill_9_after_an_ipv6_del_answered_before_its_two_veths_went_leaves_the_host_clean(
    lab_factory: LabFactory, pause: PausePoint, tmp_path: Path
) -> None:
    lab = ipv6_lab(lab_factory)
    daemon = IpamdProcess(
        lab,
        tmp_path / "d",
        {
            "ULTRANET_CNI_SPOOL": str(tmp_path / "d" / "spool"),
            "ULTRANET_METRICS_ADDR": f"127.0.0.1:{METRICS_PORT}",
            **IPV6,
            **pause.env("reaper-before-delete"),
        },
    )
    try:
        daemon.start()
        daemon.wait_ready(60)
        daemon.wait_cni_socket()
        (shim,) = install(tmp_path / "bin", None, python=sys.executable)
        pod = lab.create_pod_namespace("v6")
        code, added = exec_shim(lab, shim, daemon, env("ADD", "v6", ns_path(pod)), conf())
        assert code == 0, added
        key = IpamKey(NETWORK, "v6", "eth0")
        veths = sorted([host_ifname(key, 0, "eni"), v4_egress_ifname(key)])
        assert sorted(pod_veths(lab)) == veths

        code, out = exec_shim(
            lab, shim, daemon, env("DEL", "v6", ns_path(pod)), conf(prevResult=added)
        )
        assert code == 0, out  # answered...
        assert pause.wait(daemon) == "reaper-before-delete\n"  # ...a batch in its group
        daemon.kill()
        left = pod_veths(lab)
        assert sorted(left) == veths  # no deletion was sent
        assert any(group != 0 for group in left.values())  # marked for it, not deleted

        restart_without_pause(daemon)

        assert pod_veths(lab) == {}
        assert pod_links(pod) == ["lo"]  # the pod ends went with their veths
        assert held(daemon) == []
        assert strays_reaped(lab) == 2
        code, out = exec_shim(lab, shim, daemon, env("DEL", "v6", ns_path(pod)), conf())
        assert code == 0, out  # the runtime's next DEL: nothing left to do
    finally:
        daemon.stop()
