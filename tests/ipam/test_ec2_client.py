"""ipam.ec2 against the EC2 emulator over HTTP: real boto3, a hand-moved clock, no sleeping."""

from __future__ import annotations

import functools
import logging
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from ipam import errors
from ipam.ec2 import (
    Ec2AddressLimitExceeded,
    Ec2Client,
    Ec2Counters,
    Ec2Error,
    Ec2InsufficientCidrBlocks,
    Ec2NauLimitExceeded,
    Ec2NotFound,
    Ec2RetriesExhausted,
    ThrottlePacer,
    boto3_client,
)
from tests.lab.ec2env import CNI_TAG, Ec2Env, ManualClock, ec2_env
from tools.lab.ec2.faults import FaultKind, FaultRule

REPO = Path(__file__).resolve().parents[2]
ASSIGN = "AssignPrivateIpAddresses"


class FakeSleep:
    """Moves the shared ManualClock instead of sleeping, and records every wait."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.clock.advance(seconds)


class CapRng(random.Random):
    """Full jitter at its top: every backoff equals its cap, so caps can be asserted."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.fixture
def env() -> Iterator[Ec2Env]:
    with ec2_env() as built:
        yield built


@pytest.fixture
def sleep(env: Ec2Env) -> FakeSleep:
    return FakeSleep(env.clock)


def make(env: Ec2Env, sleep: FakeSleep, **overrides: Any) -> Ec2Client:
    options: dict[str, Any] = {"rate_per_s": 1000.0, "burst": 1000, "rng": CapRng()}
    options.update(overrides)
    factory = functools.partial(boto3_client, aws_access_key_id="lab", aws_secret_access_key="lab")
    return Ec2Client(
        "us-west-2",
        endpoint_url=options.pop("endpoint_url", env.url),
        clock=env.clock,
        sleep=sleep,
        client_factory=factory,
        stats=options.pop("stats", Ec2Counters()),
        **options,
    )


def counters(client: Ec2Client) -> Ec2Counters:
    assert isinstance(client.stats, Ec2Counters)
    return client.stats


def requests(env: Ec2Env, action: str) -> int:
    return env.cloud.requests.counts()[action]


# -- typed calls round-trip -------------------------------------------------------------


def test_eni_lifecycle_round_trips(env: Ec2Env, sleep: FakeSleep) -> None:
    ec2 = make(env, sleep)
    subnet = IPv4Network("100.64.16.0/24")
    made = ec2.create_eni(
        env.subnet_ids[1],
        groups=["sg-lab"],
        prefix_count=1,
        description="ultranet test",
        tags={"owner": "ultranet"},
    )
    assert made.eni_id.startswith("eni-") and made.subnet_id == env.subnet_ids[1]
    assert made.status == "available" and made.interface_type == "interface"
    assert (made.card, made.device, made.attachment_id, made.instance_id) == (None,) * 4
    assert made.primary_ip is not None and made.primary_ip in subnet
    assert len(made.prefixes) == 1 and made.prefixes[0].subnet_of(subnet)
    assert dict(made.tags) == {"owner": "ultranet"}

    attachment = ec2.attach_eni(made.eni_id, env.instance_id, 1, 0)
    assert attachment
    ec2.set_delete_on_termination(made.eni_id, attachment)
    real = env.cloud.eni(made.eni_id).attachment
    assert real is not None and real.delete_on_termination
    (attached,) = ec2.describe_network_interfaces([made.eni_id])
    assert (attached.card, attached.device, attached.attachment_id) == (0, 1, attachment)
    assert attached.status == "in-use" and attached.instance_id == env.instance_id
    assert not attached.is_primary

    got = ec2.assign_prefixes(made.eni_id, 2)
    assert len(got) == 2 and all(p.prefixlen == 28 and p.subnet_of(subnet) for p in got)
    (after,) = ec2.describe_network_interfaces([made.eni_id])
    assert set(after.prefixes) == {*made.prefixes, *got}
    ec2.unassign_prefixes(made.eni_id, got)
    ec2.tag([made.eni_id], {"stage": "done"})
    (after,) = ec2.describe_network_interfaces([made.eni_id])
    assert after.prefixes == made.prefixes
    assert dict(after.tags) == {"owner": "ultranet", "stage": "done"}

    ec2.detach_eni(attachment)
    (detached,) = ec2.describe_network_interfaces([made.eni_id])
    assert detached.status == "available" and detached.attachment_id is None
    ec2.delete_eni(made.eni_id)
    with pytest.raises(Ec2NotFound) as excinfo:
        ec2.describe_network_interfaces([made.eni_id])
    assert excinfo.value.code == "InvalidNetworkInterfaceID.NotFound"
    assert excinfo.value.action == "DescribeNetworkInterfaces"
    assert made.eni_id in str(excinfo.value)
    assert sleep.delays == []


def test_instance_enis_and_subnets_are_typed(env: Ec2Env, sleep: FakeSleep) -> None:
    ec2 = make(env, sleep)
    (primary,) = ec2.describe_instance_enis(env.instance_id)
    real = env.cloud.enis_of(env.instance_id)[0]
    assert primary.eni_id == real.eni_id and primary.mac == real.mac
    assert primary.is_primary and primary.primary_ip == real.primary_ip
    assert primary.prefixes == tuple(real.prefixes) and len(primary.prefixes) == 1
    assert primary.secondary_ips == ()
    (subnet,) = ec2.describe_subnets([env.subnet_ids[1]])
    assert subnet.cidr == IPv4Network("100.64.16.0/24") and subnet.az == "us-west-2a"
    assert subnet.available_ips == 256 - 5 and subnet.vpc_id == env.vpc_id
    assert subnet.tags[CNI_TAG] == "1"
    assert ec2.describe_network_interfaces([]) == [] and ec2.describe_subnets([]) == []


def test_describe_follows_pages(env: Ec2Env, sleep: FakeSleep) -> None:
    ec2 = make(env, sleep)
    made = {ec2.create_eni(env.subnet_ids[1], groups=[]).eni_id for _ in range(7)}
    mine = {"subnet-id": [env.subnet_ids[1]]}
    assert {e.eni_id for e in ec2.describe_network_interfaces(filters=mine, page_size=5)} == made
    assert requests(env, "DescribeNetworkInterfaces") == 2  # 5 + 2
    assert len(ec2.describe_network_interfaces(filters=mine)) == 7
    assert requests(env, "DescribeNetworkInterfaces") == 3  # one page of up to 1000


# -- retries ----------------------------------------------------------------------------


def test_throttled_three_times_succeeds_on_the_fourth(env: Ec2Env, sleep: FakeSleep) -> None:
    ec2 = make(env, sleep, max_throttled_attempts=4)
    eni = env.cloud.enis_of(env.instance_id)[0].eni_id
    env.cloud.faults.throttle_next(3, ASSIGN)
    assert len(ec2.assign_prefixes(eni, 1)) == 1
    assert requests(env, ASSIGN) == 4
    assert sleep.delays == [0.2, 0.4, 0.8]  # caps base * 2**n, doubling
    stats = counters(ec2)
    assert stats.calls[ASSIGN] == 4 and stats.retries[ASSIGN] == 3
    assert stats.throttles[ASSIGN] == 3 and stats.errors[ASSIGN, "RequestLimitExceeded"] == 3
    assert list(stats.backoffs[ASSIGN]) == [0.2, 0.4, 0.8] and len(stats.latencies[ASSIGN]) == 4


def test_backoff_is_full_jitter_from_the_rng(env: Ec2Env, sleep: FakeSleep) -> None:
    ec2 = make(env, sleep, rng=random.Random(42))
    env.cloud.faults.add(FaultRule(FaultKind.INTERNAL, "DescribeSubnets", count=3))
    ec2.describe_subnets([env.subnet_ids[0]])
    twin = random.Random(42)
    assert sleep.delays == [twin.uniform(0.0, cap) for cap in (0.2, 0.4, 0.8)]


def test_persistent_throttling_gives_up_after_max_attempts(
    env: Ec2Env, sleep: FakeSleep, caplog: pytest.LogCaptureFixture
) -> None:
    ec2 = make(env, sleep, max_throttled_attempts=8, max_delay_s=1.0)
    eni = env.cloud.enis_of(env.instance_id)[0].eni_id
    env.cloud.faults.add(FaultRule(FaultKind.THROTTLE, ASSIGN))
    with caplog.at_level(logging.WARNING, logger="ultranet.ipamd.ec2"):
        with pytest.raises(Ec2RetriesExhausted) as excinfo:
            ec2.assign_prefixes(eni, 1)
    err = excinfo.value
    assert err.code == "RequestLimitExceeded" and err.throttled and err.attempts == 8
    assert err.action == ASSIGN and "gave up after 8 attempts" in str(err) and eni in str(err)
    assert requests(env, ASSIGN) == 8
    backoffs = list(counters(ec2).backoffs[ASSIGN])
    assert backoffs == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]  # capped at max_delay_s
    assert sum(sleep.delays) > sum(backoffs)  # and the pacer spaced them further
    retries = [r.getMessage() for r in caplog.records]
    assert len(retries) == 7
    assert retries[0] == f"{ASSIGN} {eni}: RequestLimitExceeded, attempt 1/8, retrying in 0.200s"


def test_a_throttled_call_gives_up_sooner_than_a_failing_one(env: Ec2Env, sleep: FakeSleep) -> None:
    ec2 = make(env, sleep)  # shipped attempts: 3 throttled, 8 otherwise
    env.cloud.faults.add(FaultRule(FaultKind.THROTTLE, "DescribeSubnets"))
    with pytest.raises(Ec2RetriesExhausted) as excinfo:
        ec2.describe_subnets([env.subnet_ids[0]])
    assert excinfo.value.attempts == 3 and requests(env, "DescribeSubnets") == 3
    env.cloud.faults.clear()
    env.cloud.faults.add(FaultRule(FaultKind.INTERNAL, "DescribeNetworkInterfaces", count=7))
    assert len(ec2.describe_instance_enis(env.instance_id)) == 1
    assert requests(env, "DescribeNetworkInterfaces") == 8


# -- adaptive rate on throttling ----------------------------------------------------------


def pacer(env: Ec2Env, rng: random.Random | None = None) -> ThrottlePacer:
    return ThrottlePacer(4.0, 0.01, 0.25, 0.5, env.clock, rng or CapRng())


def test_pacer_decreases_multiplicatively_and_spaces_requests(env: Ec2Env) -> None:
    paced = pacer(env)
    assert paced.reserve() == 0.0 and paced.rate_per_s is None  # never throttled: free
    paced.throttled()
    assert paced.rate_per_s == 1.0
    assert paced.reserve() == 1.0  # the throttled request's own interval first
    assert paced.reserve() == 2.0  # then one interval (1 / rate, CapRng's top) each
    env.clock.advance(2.0)
    paced.throttled()
    assert paced.rate_per_s == 0.25
    # a new interval from now (t = 2 + 4) outlasts the queue (t = 3)
    assert paced.reserve() == 4.0


def test_pacer_floor_and_additive_recovery(env: Ec2Env) -> None:
    paced = pacer(env)
    for _ in range(10):
        paced.throttled()
    assert paced.rate_per_s == 0.01  # min_rate_per_s: 100 s between requests
    paced.succeeded()
    assert paced.rate_per_s == pytest.approx(0.51)
    for _ in range(6):
        paced.succeeded()
    assert paced.rate_per_s == pytest.approx(3.51)
    paced.succeeded()
    assert paced.rate_per_s is None  # back at max_rate_per_s: pacing stops
    env.clock.advance(1000.0)
    assert paced.reserve() == 0.0


def test_pacer_interval_is_jittered_from_the_rng(env: Ec2Env) -> None:
    paced = pacer(env, random.Random(7))
    paced.throttled()
    twin = random.Random(7)
    first = twin.uniform(0.5, 1.0) / 1.0
    assert paced.reserve() == pytest.approx(first)
    second = twin.uniform(0.5, 1.0) / 1.0
    assert paced.reserve() == pytest.approx(first + second)


def test_a_throttle_slows_later_calls_of_that_action_only(env: Ec2Env, sleep: FakeSleep) -> None:
    ec2 = make(env, sleep, rate_per_s=5.0, burst=10)
    eni = env.cloud.enis_of(env.instance_id)[0].eni_id
    env.cloud.faults.throttle_next(1, ASSIGN)
    assert len(ec2.assign_prefixes(eni, 1)) == 1
    # throttled once: 5/s x 0.25 = 1.25/s, 0.8 s apart; the 0.2 s backoff sleeps first
    assert sleep.delays == [0.2, pytest.approx(0.6)]
    assert ec2.pacer(ASSIGN).rate_per_s == pytest.approx(1.75)  # + 0.5 for the success
    sleep.delays.clear()
    ec2.describe_subnets([env.subnet_ids[0]])
    assert sleep.delays == []  # another action: EC2's buckets are per action
    assert len(ec2.assign_prefixes(eni, 1)) == 1
    assert sleep.delays == [pytest.approx(0.8)]  # still paced: 1 / 1.25, queued after
    assert counters(ec2).throttles[ASSIGN] == 1


@pytest.mark.parametrize(
    ("kind", "code"),
    [(FaultKind.INTERNAL, "InternalError"), (FaultKind.UNAVAILABLE, "Unavailable")],
)
def test_server_errors_are_retried(
    env: Ec2Env, sleep: FakeSleep, kind: FaultKind, code: str
) -> None:
    ec2 = make(env, sleep)
    env.cloud.faults.add(FaultRule(kind, "DescribeSubnets", count=2))
    assert len(ec2.describe_subnets([env.subnet_ids[0]])) == 1
    assert requests(env, "DescribeSubnets") == 3 and sleep.delays == [0.2, 0.4]
    stats = counters(ec2)
    assert stats.errors["DescribeSubnets", code] == 2 and stats.throttles["DescribeSubnets"] == 0


def test_unreachable_endpoint_is_retried_then_reported(env: Ec2Env, sleep: FakeSleep) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ec2 = make(env, sleep, endpoint_url=f"http://127.0.0.1:{port}", max_attempts=3)
    with pytest.raises(Ec2RetriesExhausted) as excinfo:
        ec2.describe_subnets([env.subnet_ids[0]])
    assert excinfo.value.code == "EndpointConnectionError" and excinfo.value.attempts == 3
    assert sleep.delays == [0.2, 0.4]


# -- errors EC2 means ---------------------------------------------------------------------


def fragment(env: Ec2Env, subnet_id: str, cidr: str) -> None:
    """Leave no fully free /28 in the subnet: one taken address in each block."""
    ec2 = env.client()
    holder = ec2.create_network_interface(SubnetId=subnet_id)["NetworkInterface"]
    taken = IPv4Network(f"{holder['PrivateIpAddress']}/28", strict=False)
    blocks = [b for b in IPv4Network(cidr).subnets(new_prefix=28) if b != taken]
    ec2.assign_private_ip_addresses(
        NetworkInterfaceId=holder["NetworkInterfaceId"],
        PrivateIpAddresses=[str(b[6]) for b in blocks],
    )


def test_insufficient_cidr_blocks_is_raised_at_once(
    env: Ec2Env, sleep: FakeSleep, caplog: pytest.LogCaptureFixture
) -> None:
    subnet_id = env.subnet_ids[1]
    fragment(env, subnet_id, "100.64.16.0/24")
    ec2 = make(env, sleep)
    eni = ec2.create_eni(subnet_id, groups=["sg-lab"])
    env.cloud.requests.clear()
    with caplog.at_level(logging.WARNING, logger="ultranet.ipamd.ec2"):
        with pytest.raises(Ec2InsufficientCidrBlocks) as excinfo:
            ec2.assign_prefixes(eni.eni_id, 1, subnet_id=subnet_id)
    err = excinfo.value
    assert isinstance(err, errors.InsufficientCidrBlocks)  # as the local allocator's
    assert err.code == "InsufficientCidrBlocks" and err.attempts == 1
    assert err.subnet_id == subnet_id and subnet_id in str(err) and eni.eni_id in str(err)
    assert env.cloud.requests.counts() == {ASSIGN: 1} and sleep.delays == []
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"InsufficientCidrBlocks in subnet {subnet_id}" in line
    with pytest.raises(Ec2InsufficientCidrBlocks, match=f"CreateNetworkInterface in {subnet_id}"):
        ec2.create_eni(subnet_id, groups=["sg-lab"], prefix_count=1)


def test_address_and_nau_limits_have_their_own_errors(env: Ec2Env, sleep: FakeSleep) -> None:
    ec2 = make(env, sleep)
    primary = env.cloud.enis_of(env.instance_id)[0].eni_id
    with pytest.raises(Ec2AddressLimitExceeded) as limit:  # m5.large: 10 slots, 2 used
        ec2.assign_prefixes(primary, 9)
    assert limit.value.code == "PrivateIpAddressLimitExceeded"
    env.cloud.set_nau_quota(env.vpc_id, 2)  # the primary address and its /28
    with pytest.raises(Ec2NauLimitExceeded) as nau:
        ec2.assign_prefixes(primary, 1)
    assert nau.value.code == "NetworkAddressUsageLimitExceeded"
    assert requests(env, ASSIGN) == 2 and sleep.delays == []


def test_other_refusals_are_not_retried(env: Ec2Env, sleep: FakeSleep) -> None:
    ec2 = make(env, sleep)
    (primary,) = ec2.describe_instance_enis(env.instance_id)
    assert primary.attachment_id is not None
    with pytest.raises(Ec2Error) as excinfo:
        ec2.detach_eni(primary.attachment_id)
    assert type(excinfo.value) is Ec2Error and excinfo.value.code == "OperationNotPermitted"
    with pytest.raises(Ec2NotFound):
        ec2.delete_eni("eni-00000000000000000")
    counts = env.cloud.requests.counts()
    assert (counts["DetachNetworkInterface"], counts["DeleteNetworkInterface"]) == (1, 1)
    assert sleep.delays == []


# -- rate limit and cache -------------------------------------------------------------


def test_token_bucket_paces_every_action(env: Ec2Env, sleep: FakeSleep) -> None:
    ec2 = make(env, sleep, rate_per_s=2.0, burst=2)
    for _ in range(3):
        ec2.describe_subnets([env.subnet_ids[0]])
        ec2.describe_instance_enis(env.instance_id)
    assert sleep.delays == [0.5, 0.5, 0.5, 0.5] and sum(sleep.delays) == 2.0
    times = [r.at - 1000.0 for r in env.cloud.requests.records()]
    assert times == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0]
    waits = counters(ec2).rate_limit_wait_s
    assert waits == {"DescribeSubnets": 1.0, "DescribeNetworkInterfaces": 1.0}


def test_subnets_in_is_cached_until_ttl(env: Ec2Env, sleep: FakeSleep) -> None:
    ec2 = make(env, sleep, subnet_cache_ttl_s=300.0)
    found = ec2.subnets_in(env.vpc_id, "us-west-2a", CNI_TAG)
    assert {s.subnet_id for s in found} == set(env.subnet_ids[:2])
    assert ec2.subnets_in(env.vpc_id, "us-west-2a", CNI_TAG) == found
    env.clock.advance(299.0)
    ec2.subnets_in(env.vpc_id, "us-west-2a", CNI_TAG)
    assert requests(env, "DescribeSubnets") == 1
    env.clock.advance(1.0)
    ec2.subnets_in(env.vpc_id, "us-west-2a", CNI_TAG)
    assert requests(env, "DescribeSubnets") == 2
    assert ec2.subnets_in(env.vpc_id, "us-west-2b", CNI_TAG) == []  # its own key; untagged
    assert requests(env, "DescribeSubnets") == 3


# -- construction -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("rate_per_s", 0.0, "rate_per_s=0.0: must be > 0"),
        ("burst", 0, "burst=0: must be >= 1"),
        ("max_attempts", 0, "max_attempts=0: must be >= 1"),
        ("max_delay_s", 0.1, "max_delay_s=0.1: must be >= base_delay_s"),
    ],
)
def test_bad_options_are_refused(option: str, value: Any, message: str) -> None:
    def never(region: str, endpoint_url: str | None) -> Any:
        raise AssertionError("options are checked before a client is built")

    with pytest.raises(errors.ConfigError, match=message):
        Ec2Client("us-west-2", client_factory=never, **{option: value})


def test_botocore_never_retries_on_its_own() -> None:
    config: Any = boto3_client("us-west-2", "http://127.0.0.1:1").meta.config
    assert config.retries == {"total_max_attempts": 1, "mode": "standard"}
    assert config.user_agent_extra == "ultranet-ipamd"


def test_importing_the_module_does_not_import_boto3() -> None:
    code = "import ipam.ec2, sys; print('boto3' in sys.modules, 'botocore' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"]
