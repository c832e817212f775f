"""cni.spec and cni.result: pure parsing and rendering, no namespaces."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from cni.errors import CniError, ErrorCode
from cni.result import IpConfig, PodInterface, Result, Route, chain, parse_result, render_result
from cni.spec import (
    Command,
    error_json,
    parse_cni_args,
    parse_conf,
    parse_env,
    pick_version,
    version_json,
)

RESULT = Result(
    (
        PodInterface("eni0", "02:00:00:00:00:01", "", 9001),
        PodInterface("eth0", "02:00:00:00:00:02", "/run/netns/p", 9001),
    ),
    (IpConfig(IPv4Interface("100.64.0.20/32"), IPv4Address("169.254.1.1"), 1),),
    (
        Route(IPv4Network("0.0.0.0/0"), IPv4Address("169.254.1.1")),
        Route(IPv4Network("0.0.0.0/0"), IPv4Address("169.254.1.2"), table=1),
    ),
)


def test_cni_args_are_read_by_key_in_any_order() -> None:
    crio = (
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;"
        "K8S_POD_INFRA_CONTAINER_ID=c;K8S_POD_UID=u"
    )
    shuffled = "K8S_POD_UID=u;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=c;K8S_POD_NAMESPACE=ns"
    for text in (crio, shuffled):
        pod = parse_env({"CNI_COMMAND": "STATUS", "CNI_ARGS": text}).pod
        assert (pod.namespace, pod.name, pod.infra_container_id, pod.uid) == ("ns", "p", "c", "u")
    assert parse_cni_args("") == {} and parse_cni_args("A=;B=1") == {"A": "", "B": "1"}


@pytest.mark.parametrize("text", ["A", "=1", "A=1=2"])
def test_cni_args_pairs_need_exactly_one_equals(text: str) -> None:
    with pytest.raises(CniError) as caught:
        parse_cni_args(text)
    assert caught.value.code == ErrorCode.INVALID_ENV and repr(text) in caught.value.msg


def test_del_needs_no_netns_and_status_needs_nothing() -> None:
    assert (
        parse_env({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0"}).netns == ""
    )
    assert parse_env({"CNI_COMMAND": "GC"}).command is Command.GC


@pytest.mark.parametrize(
    ("version", "versions", "expected"),
    [
        ("1.0.0", None, "1.0.0"),
        (None, ["0.4.0", "1.1.0", "2.0.0"], "1.1.0"),
        ("0.4.0", ["1.1.0"], "0.4.0"),  # the runtime's pick wins: the result must echo it
    ],
)
def test_pick_version(version: str | None, versions: list[str] | None, expected: str) -> None:
    assert pick_version(version, versions) == expected


@pytest.mark.parametrize(
    ("version", "versions", "code"),
    [("0.3.1", None, 1), (None, ["0.1.0"], 1), (None, None, 7), (None, "1.0.0", 7), (1, None, 7)],
)
def test_pick_version_errors(version: object, versions: object, code: int) -> None:
    with pytest.raises(CniError) as caught:
        pick_version(version, versions)
    assert caught.value.code == code


def test_mtu_accepts_the_vpc_cni_string_spelling() -> None:
    body = {"cniVersion": "1.0.0", "name": "n", "type": "ultranet", "mtu": "1500"}
    assert parse_conf(json.dumps(body).encode(), Command.ADD).mtu == 1500


def test_capabilities_and_unknown_keys_are_tolerated() -> None:
    body = {
        "cniVersion": "1.1.0",
        "name": "n",
        "type": "ultranet",
        "capabilities": {"io.kubernetes.cri.pod-annotations": True},
        "somethingNew": 1,
        "runtimeConfig": {
            "io.kubernetes.cri.pod-annotations": {
                "k8s.amazonaws.com/nicConfig": "multi-nic-attachment"
            }
        },
    }
    conf = parse_conf(json.dumps(body).encode(), Command.ADD)
    assert conf.wants_multi_nic()


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_attachments_under_both_spellings(key: str) -> None:
    body = {
        "cniVersion": "1.1.0",
        "name": "n",
        "type": "t",
        key: [{"containerID": "c", "ifname": "eth0"}],
    }
    conf = parse_conf(json.dumps(body).encode(), Command.GC)
    assert conf.valid_attachments is not None and conf.valid_attachments[0].container_id == "c"


def test_result_per_version() -> None:
    old, v1, v11 = (render_result(RESULT, v) for v in ("0.4.0", "1.0.0", "1.1.0"))
    assert old["ips"][0]["version"] == "4" and "version" not in v1["ips"][0]
    assert "mtu" not in old["interfaces"][0] and "mtu" not in v1["interfaces"][0]
    assert v11["interfaces"][1] == {
        "name": "eth0",
        "mac": "02:00:00:00:00:02",
        "sandbox": "/run/netns/p",
        "mtu": 9001,
    }
    # A table-1 route can only be said in 1.1.0; before, it would read as a second default.
    assert old["routes"] == v1["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    assert v11["routes"][1] == {"dst": "0.0.0.0/0", "gw": "169.254.1.2", "table": 1}


def test_result_round_trips_through_prev_result() -> None:
    for version in ("0.4.0", "1.0.0", "1.1.0"):
        parsed = parse_result(render_result(RESULT, version))
        assert parsed.ips == RESULT.ips
        assert [i.name for i in parsed.interfaces] == ["eni0", "eth0"]


def test_chain_keeps_what_came_before() -> None:
    prev = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "x"}],
        "ips": [],
        "routes": [],
        "unknown": 1,
    }
    out = chain(prev, render_result(RESULT, "1.0.0"), "1.0.0")
    assert out["unknown"] == 1 and out["ips"][0]["interface"] == 2
    assert [i["name"] for i in out["interfaces"]] == ["x", "eni0", "eth0"]


def test_error_and_version_json() -> None:
    err = CniError(ErrorCode.INVALID_ENV, "required env variables [CNI_NETNS] missing", "why")
    assert json.loads(error_json(err, "1.0.0")) == {
        "cniVersion": "1.0.0",
        "code": 4,
        "msg": "required env variables [CNI_NETNS] missing",
        "details": "why",
    }
    assert json.loads(version_json(b""))["cniVersion"] == "1.1.0"
    assert json.loads(version_json(b'{"cniVersion": "0.4.0"}'))["supportedVersions"] == [
        "0.4.0",
        "1.0.0",
        "1.1.0",
    ]
