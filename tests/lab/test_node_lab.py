"""The namespaced node: links follow EC2, IMDS answers inside the node, nothing leaks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from ipaddress import IPv4Network

import pytest

from tests.conftest import LabFactory
from tests.lab.helpers import ec2_client, links, python_in, routes
from tools.lab import netns
from tools.lab.lab import Lab, LabConfig, process_running, read_records

pytestmark = pytest.mark.netns

CONNECT = """
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
print("connected")
"""


def test_primary_eni_is_configured_and_reaches_its_gateway(lab: Lab) -> None:
    node = links(lab.node_ns)
    eni = lab.cloud.eni_view(lab.cloud.enis_of(lab.instance_id)[0].eni_id)
    assert node["eth0"]["mac"] == eni.mac
    assert str(eni.primary_ip) in node["eth0"]["addrs"]
    listener = netns.listening_socket(lab.vpc_ns, str(eni.gateway), 0)
    try:
        port = listener.getsockname()[1]
        done = python_in(lab.node_ns, CONNECT, str(eni.gateway), str(port))
    finally:
        listener.close()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "connected"


def test_prefixes_assigned_at_launch_are_routed_to_the_eni(lab: Lab) -> None:
    eni = lab.cloud.eni_view(lab.cloud.enis_of(lab.instance_id)[0].eni_id)
    assert len(eni.prefixes) == 1
    assert str(eni.prefixes[0]) in routes(lab.vpc_ns)


def test_attach_and_detach_through_boto3_hot_plug_the_link(lab: Lab) -> None:
    ec2 = ec2_client(lab)
    eni = ec2.create_network_interface(SubnetId=lab.subnet_ids[0], Ipv4PrefixCount=2)[
        "NetworkInterface"
    ]
    assert eni["MacAddress"] not in {v["mac"] for v in links(lab.node_ns).values()}
    attachment = ec2.attach_network_interface(
        NetworkInterfaceId=eni["NetworkInterfaceId"],
        InstanceId=lab.instance_id,
        DeviceIndex=1,
        NetworkCardIndex=0,
    )["AttachmentId"]
    node = links(lab.node_ns)
    assert node["eth1"]["mac"] == eni["MacAddress"]
    assert node["eth1"]["addrs"] == []  # secondary ENIs are left for the node agent
    prefixes = [p["Ipv4Prefix"] for p in eni["Ipv4Prefixes"]]
    assert set(prefixes) <= routes(lab.vpc_ns)

    added = ec2.assign_private_ip_addresses(
        NetworkInterfaceId=eni["NetworkInterfaceId"], Ipv4PrefixCount=1
    )["AssignedIpv4Prefixes"][0]["Ipv4Prefix"]
    assert added in routes(lab.vpc_ns)
    ec2.unassign_private_ip_addresses(
        NetworkInterfaceId=eni["NetworkInterfaceId"], Ipv4Prefixes=[added]
    )
    assert added not in routes(lab.vpc_ns)

    ec2.detach_network_interface(AttachmentId=attachment)
    assert "eth1" not in links(lab.node_ns)
    assert not set(prefixes) & routes(lab.vpc_ns)


def test_p5_node_sees_every_network_card_through_imds(lab_factory: LabFactory) -> None:
    lab = lab_factory(LabConfig(instance_type="p5.48xlarge", prefixes_per_card=1))
    node = links(lab.node_ns)
    enis = lab.cloud.enis_of(lab.instance_id)
    assert len(enis) == 32
    for eni in enis:
        view = lab.cloud.eni_view(eni.eni_id)
        name = lab.node.node_ifname(view)
        assert node[name]["mac"] == view.mac
    seen = subprocess.run(
        ["ip", "netns", "exec", lab.node_ns, sys.executable, "-m", "ipam.imds"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert seen.returncode == 0, seen.stderr
    doc = json.loads(seen.stdout)
    assert doc["identity"]["instance_type"] == "p5.48xlarge"
    cards = sorted(i["network_card"] for i in doc["interfaces"])
    assert cards == list(range(32))
    for interface in doc["interfaces"]:
        assert len(interface["ipv4_prefixes"]) == 1
        assert IPv4Network(interface["ipv4_prefixes"][0]).prefixlen == 28


IMDS_WITHOUT_TOKEN = """
import urllib.request, urllib.error
try:
    urllib.request.urlopen("http://169.254.169.254/latest/meta-data/instance-id", timeout=5)
except urllib.error.HTTPError as err:
    print(err.code)
"""


def test_imds_in_the_node_refuses_requests_without_a_token(lab: Lab) -> None:
    done = python_in(lab.node_ns, IMDS_WITHOUT_TOKEN)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "401"


def test_close_removes_every_namespace_and_record(lab_factory: LabFactory) -> None:
    lab = lab_factory()
    pod = lab.create_pod_namespace("a")
    names = [lab.vpc_ns, lab.node_ns, pod]
    assert all(netns.exists(n) for n in names)
    lab.close()
    assert not any(netns.exists(n) for n in names)
    assert lab.lab_id not in {r.lab_id for r in read_records()}
    # and the thread holding the lab's netlink sockets is gone with them
    assert f"netlink-{lab.lab_id}" not in {t.name for t in threading.enumerate()}


def _serve_lab_in_child() -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    read_fd, write_fd = os.pipe()
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tools.lab.cli",
            "serve",
            "--ready-fd",
            str(write_fd),
            "--instance-type",
            "m5.large",
        ],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    with os.fdopen(read_fd) as ready:
        line = ready.readline()
    assert line, "lab child failed to start"
    return child, json.loads(line)


def test_start_removes_what_a_killed_lab_left(lab_factory: LabFactory) -> None:
    child, record = _serve_lab_in_child()
    namespaces = record["namespaces"]
    assert isinstance(namespaces, list)
    child.send_signal(signal.SIGKILL)  # kill -9: it removes nothing of its own
    child.wait()
    # (Not asserted that they are still there now: on a shared machine another process's
    # lab start may already have removed them, its owner being dead.)
    lab_factory()
    assert not any(netns.exists(n) for n in namespaces)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.lab.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_up_status_down_leaves_nothing() -> None:
    up = _cli("up", "--instance-type", "m5.large", "--json")
    assert up.returncode == 0, up.stderr
    record = json.loads(up.stdout)
    try:
        status = json.loads(_cli("status", "--json").stdout)
        mine = [lab for lab in status["labs"] if lab["lab_id"] == record["lab_id"]]
        assert mine and mine[0]["state"] == "running"
        assert sorted(mine[0]["namespaces_present"]) == sorted(record["namespaces"])
    finally:
        down = _cli("down", str(record["lab_id"]))
    assert down.returncode == 0, down.stderr
    assert not any(netns.exists(n) for n in record["namespaces"])
    assert not process_running(int(str(record["pid"])))


def test_cli_rejects_unknown_instance_type_with_suggestions() -> None:
    done = _cli("up", "--instance-type", "p5.48xlarg")
    assert done.returncode == 2
    assert "unknown instance type 'p5.48xlarg'" in done.stderr
    assert "p5.48xlarge" in done.stderr
