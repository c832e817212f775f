"""EC2's account throttling: the buckets (ipam.nau.throttle) and the emulator's answer.

Every test runs on a clock moved by hand: refill is checked by advancing it, and boto3's
backoff sleeps are recorded instead of slept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from typing import Any

import botocore.endpoint
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from ipam.nau.throttle import (
    AccountThrottle,
    BucketSpec,
    Category,
    TokenBucket,
    load_table,
    parse_table,
)
from tests.lab.ec2env import Ec2Env, ManualClock, ec2_env
from tests.lab.test_ec2_requests import error_of, post


def _doc() -> dict[str, Any]:
    text = resources.files("ipam.nau").joinpath("data", "ec2-throttling.json").read_text()
    return dict(json.loads(text))


# -- the data file ----------------------------------------------------------------------


def test_the_data_file_cites_its_source_and_says_where_it_put_unlisted_actions() -> None:
    doc = _doc()
    assert doc["source"]["url"] == (
        "https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html"
    )
    assert doc["source"]["retrieved"]
    table = load_table()
    # Every action the node agent or the fleet calls is placed, and each the page does not
    # list says which category it went to.
    for action, reason in doc["not_listed"].items():
        assert action not in table.uncategorized
        assert table.limit(action).category.value in reason


@pytest.mark.parametrize(
    ("action", "category", "capacity", "refill"),
    [
        ("AssignPrivateIpAddresses", Category.UNCATEGORIZED, 100, 5),
        ("UnassignPrivateIpAddresses", Category.UNCATEGORIZED, 100, 5),
        ("CreateNetworkInterface", Category.UNCATEGORIZED, 100, 5),
        ("DeleteNetworkInterface", Category.UNCATEGORIZED, 100, 5),
        ("ModifyNetworkInterfaceAttribute", Category.UNCATEGORIZED, 100, 5),
        ("CreateTags", Category.UNCATEGORIZED, 100, 10),
        ("RunInstances", Category.UNCATEGORIZED, 5, 2),
        ("AttachNetworkInterface", Category.MUTATING, 50, 5),
        ("DetachNetworkInterface", Category.MUTATING, 50, 5),
        ("DescribeSubnets", Category.NON_MUTATING, 100, 20),
        ("DescribeNetworkInterfaces", Category.NON_MUTATING, 100, 20),
        ("DescribeInstances", Category.NON_MUTATING, 100, 20),
        ("AuthorizeSecurityGroupIngress", Category.RESOURCE_INTENSIVE, 50, 5),
    ],
)
def test_category_mapping(action: str, category: Category, capacity: float, refill: float) -> None:
    limit = load_table().limit(action)
    assert (limit.bucket, limit.category) == (action, category)
    assert limit.spec == BucketSpec(capacity, refill)


def test_unfiltered_unpaginated_describes_draw_from_a_smaller_bucket_of_their_own() -> None:
    table = load_table()
    for action in ("DescribeInstances", "DescribeNetworkInterfaces"):
        small = table.limit(action, filtered_or_paginated=False)
        assert small.bucket == f"{action}/unfiltered"
        assert small.category is Category.UNFILTERED_NON_MUTATING
        assert small.spec == BucketSpec(50, 10)
    # Not in the page's list: a filter makes no difference.
    assert table.limit("DescribeSubnets", filtered_or_paginated=False).bucket == "DescribeSubnets"


# -- the buckets ------------------------------------------------------------------------


def test_burst_then_refill_at_the_rate() -> None:
    bucket = TokenBucket(BucketSpec(100, 5))
    assert all(bucket.take(0.0) for _ in range(100))  # the burst
    assert not bucket.take(0.0)
    assert not bucket.take(0.19)  # 0.95 of a token
    assert bucket.take(0.2)  # one token after 1/5 s
    assert not bucket.take(0.2)
    assert bucket.can_take(10.2, 50)  # 10 s at 5/s
    assert not bucket.can_take(10.2, 51)
    assert bucket.can_take(1000.0, 100) and not bucket.can_take(1000.0, 101)  # capped


def test_a_clock_going_back_neither_adds_nor_removes_tokens() -> None:
    bucket = TokenBucket(BucketSpec(2, 1))
    assert bucket.take(10.0) and bucket.take(10.0)
    assert not bucket.take(9.0)
    assert bucket.take(11.0) and not bucket.take(11.0)


def test_each_action_has_its_own_bucket() -> None:
    clock = ManualClock(0.0)
    throttle = AccountThrottle(load_table(), clock)
    assert all(throttle.admit("AttachNetworkInterface").allowed for _ in range(50))
    refused = throttle.admit("AttachNetworkInterface")
    assert not refused.allowed and refused.refused_by == "request"
    # Another mutating action, same category, same size: its own bucket is still full.
    assert all(throttle.admit("DetachNetworkInterface").allowed for _ in range(50))
    assert throttle.admit("AssignPrivateIpAddresses").allowed
    # The unfiltered bucket is apart from the filtered one.
    assert all(
        throttle.admit("DescribeInstances", filtered_or_paginated=False).allowed for _ in range(50)
    )
    assert not throttle.admit("DescribeInstances", filtered_or_paginated=False).allowed
    assert throttle.admit("DescribeInstances").allowed
    clock.advance(0.2)  # AttachNetworkInterface refills at 5/s: one token
    assert throttle.admit("AttachNetworkInterface").allowed
    assert not throttle.admit("AttachNetworkInterface").allowed


def test_run_instances_takes_a_token_per_instance_from_its_resource_bucket() -> None:
    clock = ManualClock(0.0)
    throttle = AccountThrottle(load_table(), clock)
    assert throttle.admit("RunInstances", resources=1000).allowed  # the resource burst
    refused = throttle.admit("RunInstances", resources=1)
    assert not refused.allowed and refused.refused_by == "resource"
    # A refusal takes nothing: the request bucket still has the 4 tokens it had.
    assert throttle.tokens("RunInstances") == 4
    clock.advance(1.0)  # 2 instances a second
    assert throttle.admit("RunInstances", resources=2).allowed
    assert not throttle.admit("RunInstances", resources=1).allowed


def test_scaled_table_multiplies_refill_only() -> None:
    table = load_table().scaled(10)
    assert table.limit("AssignPrivateIpAddresses").spec == BucketSpec(100, 50)
    assert table.resource_buckets["RunInstances"] == BucketSpec(1000, 20)


def test_a_bad_row_names_itself() -> None:
    doc = _doc()
    doc["uncategorized"]["CreateTags"] = {"capacity": 0, "refill_per_s": 1}
    with pytest.raises(ValueError, match="uncategorized.CreateTags"):
        parse_table(doc)


# -- the emulator's answer, through boto3 -----------------------------------------------


class RecordedSleeps:
    """Stands in for botocore's ``time`` module in its endpoint: backoffs are recorded."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def __getattr__(self, name: str) -> Any:
        import time

        return getattr(time, name)


@pytest.fixture
def env() -> Iterator[Ec2Env]:
    with ec2_env() as built:
        built.cloud.throttle = AccountThrottle(load_table(), built.clock)
        yield built


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> RecordedSleeps:
    recorded = RecordedSleeps()
    monkeypatch.setattr(botocore.endpoint, "time", recorded)
    return recorded


def _boto3(env: Ec2Env, mode: str, attempts: int) -> Any:
    import boto3

    return boto3.client(
        "ec2",
        endpoint_url=env.url,
        region_name="us-west-2",
        aws_access_key_id="lab",
        aws_secret_access_key="lab",
        config=Config(retries={"total_max_attempts": attempts, "mode": mode}),
    )


def test_throttled_request_is_ec2s_503_request_limit_exceeded(env: Ec2Env) -> None:
    for _ in range(50):  # the unfiltered DescribeInstances bucket
        status, _ = post(env.url, {"Action": "DescribeInstances", "Version": "2016-11-15"})
        assert status == 200
    status, root = post(env.url, {"Action": "DescribeInstances", "Version": "2016-11-15"})
    assert status == 503
    assert error_of(root) == ("RequestLimitExceeded", "Request limit exceeded.")


@pytest.mark.parametrize("mode", ["standard", "legacy"])
def test_boto3_sees_a_throttling_error_and_retries_it(
    env: Ec2Env, sleeps: RecordedSleeps, mode: str
) -> None:
    ec2 = _boto3(env, mode, attempts=3)
    for _ in range(50):
        ec2.describe_instances()
    env.cloud.requests.clear()
    with pytest.raises(ClientError) as caught:
        ec2.describe_instances()
    response = caught.value.response
    assert response["Error"]["Code"] == "RequestLimitExceeded"
    assert response["Error"]["Message"] == "Request limit exceeded."
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert response["ResponseMetadata"]["RetryAttempts"] == 2
    assert len(sleeps.sleeps) == 2  # one backoff before each retry
    codes = [r.error_code for r in env.cloud.requests.records()]
    assert codes == ["RequestLimitExceeded"] * 3
    # The filtered call draws from the other bucket and passes.
    ec2.describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["running"]}])
    # Refilled (10/s): the retry that comes after a token is due succeeds.
    env.clock.advance(0.1)
    assert ec2.describe_instances()["ResponseMetadata"]["RetryAttempts"] == 0


def test_boto3_standard_mode_classifies_it_as_throttling(env: Ec2Env) -> None:
    from botocore.retries.standard import RetryContext, ThrottledRetryableChecker

    ec2 = _boto3(env, "standard", attempts=1)
    for _ in range(50):
        ec2.describe_instances()
    with pytest.raises(ClientError) as caught:
        ec2.describe_instances()
    context = RetryContext(attempt_number=1, parsed_response=caught.value.response)
    assert ThrottledRetryableChecker().is_retryable(context)


def test_throttling_is_off_unless_set() -> None:
    with ec2_env() as plain:
        assert plain.cloud.throttle is None
        ec2 = plain.client()
        for _ in range(60):  # more than the unfiltered bucket holds
            ec2.describe_instances()
        assert plain.cloud.requests.count() == 60


def test_run_instances_with_prefixes_at_launch_and_its_resource_bucket(env: Ec2Env) -> None:
    doc = _doc()
    doc["resource_buckets"]["RunInstances"] = {"capacity": 3, "refill_per_s": 1}
    env.cloud.throttle = AccountThrottle(parse_table(doc), env.clock)
    ec2 = env.client()
    before = len(env.cloud.instances())
    launched = ec2.run_instances(
        InstanceType="m5.large",
        MinCount=2,
        MaxCount=2,
        NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": env.subnet_ids[0], "Ipv4PrefixCount": 3}],
    )["Instances"]
    assert len(launched) == 2
    for instance in launched:
        (eni,) = instance["NetworkInterfaces"]
        assert eni["Attachment"]["DeviceIndex"] == 0
        enis = env.cloud.enis_of(instance["InstanceId"])
        assert len(enis[0].prefixes) == 3
    with pytest.raises(ClientError) as caught:  # 1 resource token left, 2 asked
        ec2.run_instances(
            InstanceType="m5.large", MinCount=2, MaxCount=2, SubnetId=env.subnet_ids[0]
        )
    assert caught.value.response["Error"]["Code"] == "RequestLimitExceeded"
    assert len(env.cloud.instances()) == before + 2  # the refused call launched nothing
    env.clock.advance(1.0)
    ec2.run_instances(InstanceType="m5.large", MinCount=2, MaxCount=2, SubnetId=env.subnet_ids[0])
    assert len(env.cloud.instances()) == before + 4
