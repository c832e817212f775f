"""The VPC CNI's call sequence as data: every call cites its source, and the warm-prefix
arithmetic counts what ipamd's pool passes do."""

from __future__ import annotations

from collections import Counter

from ipam.nau.vpccni_calls import (
    CALLS,
    SDK,
    SOURCES,
    NodeShape,
    Phase,
    new_eni_calls,
    node_calls,
    pool_too_low,
)

M5_LARGE = NodeShape(max_prefixes_per_eni=9, max_enis=3, max_pods=110)
START = Counter(
    {"DescribeNetworkInterfaces": 2, "CreateTags": 1, "ModifyNetworkInterfaceAttribute": 1}
)


def test_every_call_names_a_source_file_that_was_read() -> None:
    for call in CALLS:
        assert any(path in call.source for path in SOURCES), call
        assert call.count and call.action[0].isupper()
    assert {c.action for c in CALLS if c.phase is Phase.NODE_START} >= {
        "DescribeNetworkInterfaces",
        "CreateTags",
        "ModifyNetworkInterfaceAttribute",
        "AssignPrivateIpAddresses",
    }


def test_reactive_node_assigns_to_become_ready_and_once_as_its_pods_land() -> None:
    assert node_calls(M5_LARGE, 0, 10) == START + Counter({"AssignPrivateIpAddresses": 2})


def test_prefixes_at_launch_still_describe_tag_and_modify() -> None:
    assert node_calls(M5_LARGE, 2, 10) == START
    # The pods came after the first pool pass: the spare launch prefix went back first.
    assert node_calls(M5_LARGE, 2, 10, pods_before_first_pass=False) == START + Counter(
        {"UnassignPrivateIpAddresses": 1, "AssignPrivateIpAddresses": 1}
    )
    assert node_calls(M5_LARGE, 2, 10, leaked_eni_cleanup=False) == START - Counter(
        {"DescribeNetworkInterfaces": 1}
    )


def test_a_full_eni_makes_a_new_one_with_five_calls() -> None:
    assert sum(new_eni_calls().values()) == 5
    # 9 prefixes fill the primary ENI; 150 pods (max-pods uncapped here) need a tenth.
    big = NodeShape(max_prefixes_per_eni=9, max_enis=3, max_pods=250)
    calls = node_calls(big, 9, 150)
    assert calls["CreateNetworkInterface"] == calls["AttachNetworkInterface"] == 1
    assert calls["ModifyNetworkInterfaceAttribute"] == 2  # groups at start, then the new ENI


def test_pool_is_low_below_the_warm_prefix_and_never_past_max_pods() -> None:
    assert pool_too_low(1, 1, 1, 110)  # 15 free < 16
    assert not pool_too_low(2, 16, 1, 110)
    assert not pool_too_low(7, 112, 1, 110)  # 112 addresses >= max-pods
    assert pool_too_low(0, 0, 0, 110)  # target 0 still wants one address


def test_sdk_backoff_is_full_jitter_capped_at_20_s() -> None:
    assert [SDK.backoff_bound_s(a) for a in (1, 2, 3, 4, 5)] == [2, 4, 8, 16, 20]
    assert SDK.backoff_is_fixed(5) and not SDK.backoff_is_fixed(4)
