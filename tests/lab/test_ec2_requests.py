"""The EC2 endpoint below boto3: raw Query requests, EC2's XML errors, latency faults."""

from __future__ import annotations

import select
import socket
import struct
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from xml.etree import ElementTree

import pytest

from tests.lab.ec2env import Ec2Env, ec2_env
from tools.lab.ec2.api import Ec2Api
from tools.lab.ec2.faults import FaultKind, FaultRule
from tools.lab.ec2.server import _Handler, _Server

FLEET_CONNECTIONS = 400  # a calibration wave's agents
GUARD_S = 60  # a failure guard, never the test's oracle
# struct tcp_info (linux/tcp.h): eight u8 fields, then u32s; tcpi_total_retrans is the 24th.
_TCPI_TOTAL_RETRANS = 8 + 23 * 4
_TCP_INFO_BYTES = _TCPI_TOTAL_RETRANS + 4


@pytest.fixture
def env() -> Iterator[Ec2Env]:
    with ec2_env() as built:
        yield built


def post(url: str, params: dict[str, str]) -> tuple[int, ElementTree.Element]:
    body = urllib.parse.urlencode(params).encode()
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, ElementTree.fromstring(response.read())
    except urllib.error.HTTPError as err:
        return err.code, ElementTree.fromstring(err.read())


def error_of(root: ElementTree.Element) -> tuple[str, str]:
    assert root.tag == "Response"
    code = root.findtext("Errors/Error/Code")
    message = root.findtext("Errors/Error/Message")
    assert root.findtext("RequestID")
    assert code is not None and message is not None
    return code, message


def test_unknown_action_is_invalid_action(env: Ec2Env) -> None:
    status, root = post(env.url, {"Action": "LaunchRocket", "Version": "2016-11-15"})
    assert status == 400
    code, message = error_of(root)
    assert code == "InvalidAction"
    assert "LaunchRocket" in message


def test_unknown_parameter_and_bad_values_are_refused(env: Ec2Env) -> None:
    base = {"Action": "DescribeSubnets", "Version": "2016-11-15"}
    status, root = post(env.url, {**base, "Colour": "blue"})
    assert status == 400 and error_of(root)[0] == "UnknownParameter"
    status, root = post(env.url, {**base, "MaxResults": "many"})
    assert status == 400 and error_of(root)[0] == "InvalidParameterValue"
    status, root = post(env.url, {"Action": "DeleteNetworkInterface", "Version": "2016-11-15"})
    assert status == 400 and error_of(root)[0] == "MissingParameter"


def test_responses_are_ec2_xml(env: Ec2Env) -> None:
    status, root = post(
        env.url,
        {"Action": "DescribeSubnets", "Version": "2016-11-15", "SubnetId.1": env.subnet_ids[1]},
    )
    assert status == 200
    ns = {"ec2": "http://ec2.amazonaws.com/doc/2016-11-15/"}
    assert root.tag == "{http://ec2.amazonaws.com/doc/2016-11-15/}DescribeSubnetsResponse"
    assert root.findtext("ec2:requestId", namespaces=ns)
    items = root.findall("ec2:subnetSet/ec2:item", ns)
    assert [i.findtext("ec2:subnetId", namespaces=ns) for i in items] == [env.subnet_ids[1]]


def test_failed_requests_change_nothing(env: Ec2Env) -> None:
    eni = env.cloud.enis_of(env.instance_id)[0]
    prefixes = list(eni.prefixes)
    status, root = post(
        env.url,
        {
            "Action": "AssignPrivateIpAddresses",
            "Version": "2016-11-15",
            "NetworkInterfaceId": eni.eni_id,
            "Ipv4PrefixCount": "20",
        },
    )
    assert status == 400 and error_of(root)[0] == "PrivateIpAddressLimitExceeded"
    assert env.cloud.eni(eni.eni_id).prefixes == prefixes


def test_latency_fault_delays_the_answer() -> None:
    with ec2_env() as env:
        slept: list[float] = []
        api = Ec2Api(env.cloud, sleep=slept.append)
        env.cloud.faults.add(FaultRule(FaultKind.LATENCY, "DescribeSubnets", latency_s=0.25))
        body = urllib.parse.urlencode({"Action": "DescribeSubnets", "Version": "2016-11-15"})
        answer = api.handle(body.encode())
        assert answer.status == 200
        assert slept == [0.25]
        other = api.handle(urllib.parse.urlencode({"Action": "DescribeInstances"}).encode())
        assert other.status == 200
        assert slept == [0.25]  # other actions are not delayed


def test_fault_rules_validate_their_arguments() -> None:
    with pytest.raises(ValueError):
        FaultRule(FaultKind.THROTTLE, count=0)
    with pytest.raises(ValueError):
        FaultRule(FaultKind.LATENCY)
    with pytest.raises(ValueError):
        FaultRule(FaultKind.INTERNAL, probability=0.0)


def test_probabilistic_faults_hit_some_calls_reproducibly() -> None:
    def run(seed: int) -> list[bool]:
        with ec2_env(seed=seed) as env:
            env.cloud.faults.add(FaultRule(FaultKind.UNAVAILABLE, probability=0.5))
            api = Ec2Api(env.cloud)
            body = urllib.parse.urlencode({"Action": "DescribeSubnets"}).encode()
            return [api.handle(body).status == 503 for _ in range(40)]

    first = run(3)
    assert first == run(3)
    assert 5 < sum(first) < 35


def test_dry_run_changes_nothing(env: Ec2Env) -> None:
    from botocore.exceptions import ClientError

    ec2 = env.client()
    before = len(env.cloud.enis())
    with pytest.raises(ClientError) as excinfo:
        ec2.create_network_interface(SubnetId=env.subnet_ids[0], DryRun=True)
    assert excinfo.value.response["Error"]["Code"] == "DryRunOperation"
    assert len(env.cloud.enis()) == before


def test_every_filter_accepted_is_one_ec2_documents(env: Ec2Env) -> None:
    """A filter the lab takes but EC2 refuses would pass tests and fail on AWS."""
    import re

    import botocore.session

    api = Ec2Api(env.cloud)
    model = botocore.session.get_session().get_service_model("ec2")
    for action in (
        "DescribeInstances",
        "DescribeInstanceTypes",
        "DescribeNetworkInterfaces",
        "DescribeSubnets",
    ):
        assert api.handle(urllib.parse.urlencode({"Action": action}).encode()).status == 200
        shape = model.operation_model(action).input_shape.members["Filters"]
        documented = set(re.findall(r"<code>([A-Za-z0-9.:-]+)</code>", shape.documentation))
        accepted = api.filter_names[action]
        assert accepted, action
        assert accepted <= documented, (action, sorted(accepted - documented))


def syn_retransmitted(client: socket.socket) -> bool:
    """Whether the kernel has had to send this client's segments again (a dropped SYN's
    retransmission), from its tcp_info's cumulative ``tcpi_total_retrans``."""
    raw = client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    return struct.unpack_from("=I", raw, _TCPI_TOTAL_RETRANS)[0] > 0


def test_the_endpoint_takes_a_fleets_connections_at_once() -> None:
    """A fleet's agents connect at once; a listen backlog of socketserver's default 5
    drops the rest's SYNs, and their retransmission (1 s, then 3 s) meets botocore's 3 s
    connect timeout: EC2 calls failing on this machine, never on AWS. The handshakes
    complete in the kernel, so a listener that is not accepting yet shows the backlog.
    A dropped SYN is read from the client's tcp_info (the kernel's own retransmission
    timer), not from the test's clock: a loaded machine only makes the test slower."""
    server = _Server(("127.0.0.1", 0), _Handler, bind_and_activate=True)
    clients = [socket.socket() for _ in range(FLEET_CONNECTIONS)]
    try:
        for client in clients:
            client.setblocking(False)
            client.connect_ex(server.server_address)
        deadline = time.monotonic() + GUARD_S
        waiting = set(clients)
        while waiting and not any(syn_retransmitted(c) for c in waiting):
            assert time.monotonic() < deadline, f"{len(waiting)} handshakes still pending"
            _, connected, _ = select.select([], list(waiting), [], 0.1)
            waiting.difference_update(connected)
        dropped = [c for c in clients if syn_retransmitted(c)]
        assert not dropped, f"{len(dropped)} of {FLEET_CONNECTIONS} SYNs dropped and sent again"
        refused = [c for c in clients if c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)]
        assert not waiting and not refused
    finally:
        for client in clients:
            client.close()
        server.server_close()
