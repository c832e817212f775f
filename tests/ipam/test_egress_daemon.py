"""Egress in the daemon's life: installed at start by the real ``ultranet-ipamd`` in the
lab's node namespace, kept across a restart, re-applied when the VPC's CIDR blocks
change, removed by ``ultranet-ipamd --uninstall-egress``."""

from __future__ import annotations

import json
import subprocess
import sys
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from ipam.egress import Egress, EgressConfig
from ipam.hostnet import HostNetwork
from tests.conftest import LabFactory
from tests.ipam.agentenv import agent_on
from tools.lab.daemon import IpamdProcess
from tools.lab.egress import NetnsEgressHost
from tools.lab.lab import Lab, LabConfig

pytestmark = pytest.mark.netns


def saved(lab: Lab) -> str:
    return lab.node_exec(["iptables-nft-save"]).stdout


def rule_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("-A ")]


def primary_ip(lab: Lab) -> str:
    (primary,) = lab.cloud.enis_of(lab.instance_id)
    return str(lab.cloud.eni_view(primary.eni_id).primary_ip)


def test_the_daemon_installs_egress_at_start_and_the_uninstall_removes_it(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(LabConfig(instance_type="m5.large"))
    conf_dir = tmp_path / "net.d"
    env = {
        "AWS_VPC_K8S_CNI_VETHPREFIX": "pod",
        "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS": "198.19.0.0/24",
        "ULTRANET_CNI_CONF_DIR": str(conf_dir),
    }
    daemon = IpamdProcess(lab, tmp_path / "d", env)
    daemon.start()
    try:
        daemon.wait_ready()
        rules = saved(lab)
    finally:
        assert daemon.stop() == 0
    assert '-A AWS-SNAT-CHAIN-0 -d 100.64.0.0/16 -m comment --comment "AWS SNAT CHAIN"' in rules
    assert "-d 198.19.0.0/24" in rules
    assert f"-j SNAT --to-source {primary_ip(lab)} --random-fully" in rules
    assert "-i pod+" in rules and "-i eni+" not in rules
    assert "fwmark 0x80/0x80 lookup main" in lab.node_exec(["ip", "-4", "rule"]).stdout
    rp_filter = lab.node_exec(["cat", "/proc/sys/net/ipv4/conf/eth0/rp_filter"]).stdout
    assert rp_filter.strip() == "2"
    # The pods' veths are named as the rules expect.
    conflist = json.loads((conf_dir / "10-ultranet.conflist").read_text())
    assert conflist["plugins"][0]["vethPrefix"] == "pod"
    # A stopped daemon leaves them: pods keep their egress across a restart.
    assert rule_lines(saved(lab)) == rule_lines(rules)

    done = subprocess.run(
        ["ip", "netns", "exec", lab.node_ns, sys.executable, "-m", "ipam.cli"]
        + ["--uninstall-egress"],
        env=daemon.environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "egress uninstalled" in done.stdout
    assert "AWS" not in saved(lab)
    assert "fwmark" not in lab.node_exec(["ip", "-4", "rule"]).stdout


def test_the_agent_follows_a_new_vpc_cidr_block(lab_factory: LabFactory, tmp_path: Path) -> None:
    lab = lab_factory(LabConfig(instance_type="m5.large"))
    egress = Egress(EgressConfig(), NetnsEgressHost(lab.node_ns), backend="nft")
    with agent_on(lab, lambda: HostNetwork(netns=lab.node_ns), tmp_path, egress=egress) as run:
        assert "-d 100.64.0.0/16" in saved(lab)
        assert "198.19.0.0/16" not in saved(lab)
        run.run(run.agent.reconcile())
        before = saved(lab)

        # AssociateVpcCidrBlock of an IPv4 block: the emulator sets IPv4 blocks up front,
        # so the test adds one to the VPC and has IMDS show it, as EC2 would.
        lab.cloud.vpc(lab.vpc_id).cidrs.append(IPv4Network("198.19.0.0/16"))
        lab.cloud._record_vpc_imds(lab.vpc_id)
        run.run(run.agent.reconcile())

        after = saved(lab)
        assert after != before
        assert '-A AWS-SNAT-CHAIN-0 -d 198.19.0.0/16 -m comment --comment "AWS SNAT CHAIN"' in after
        assert "-A AWS-CONNMARK-CHAIN-0 -d 198.19.0.0/16" in after
        assert "-d 100.64.0.0/16" in after
