"""The AWS VPC CNI's EC2 calls in prefix mode, as data read from its source.

What the AWS VPC CNI's node daemon (``aws-node``: ``ipamd``) asks EC2, when, and how many
times, with ``ENABLE_PREFIX_DELEGATION=true`` and IPv4, so that a fleet run
(``tools/fleet``) can play it against the same emulated account as ultranet and the
launch model (``ipam.nau``) can count it for 100,000 nodes. Each entry names the file and
function of ``github.com/aws/amazon-vpc-cni-k8s`` it comes from (commits in ``SOURCES``),
so a reader can check it. IMDS reads are not EC2 calls and are not listed.

Only the warm-prefix mode is modelled: ``WARM_PREFIX_TARGET`` set (the EKS manifest's
default is 1), ``WARM_IP_TARGET`` and ``MINIMUM_IP_TARGET`` unset; no custom networking,
no security groups for pods (trunk ENI), no IPv6.

Pure data and small functions: importable by the planner and by repo tools alike.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum

REPOSITORY = "https://github.com/aws/amazon-vpc-cni-k8s"
IPAMD = "pkg/ipamd/ipamd.go"
AWSUTILS = "pkg/awsutils/awsutils.go"
AGENT_MAIN = "cmd/aws-k8s-agent/main.go"
SDK_RETRY = "github.com/aws/aws-sdk-go-v2 aws/retry/standard.go, jitter_backoff.go"
# The commits read (one stored version of each file; the call sequence has been stable
# across the versions we compared, but check the live tree before relying on a detail).
SOURCES = {
    IPAMD: "00892598b44765f1240ef542f217a8862269ac69",
    AWSUTILS: "0066ec88d28f6a102545f2aca4ad1453e713fc34",
    AGENT_MAIN: "08ef8ed7a982cd71711efc40acbacc0fab3b79a6",
}

ADDRESSES_PER_PREFIX = 16
DEFAULT_WARM_PREFIX_TARGET = 1  # the EKS add-on manifest's value (the code's default is 0)
DEFAULT_MAX_PODS = 110  # EKS's max-pods for prefix mode up to 30 vCPUs (ipam.nau.maxpods)


class Phase(StrEnum):
    """When a call happens."""

    NODE_START = "node start"  # once per aws-node start, before the node is Ready
    TOP_UP = "each top-up"  # a pool pass that finds the pool too low, an ENI with room
    RELEASE = "each release"  # a pool pass that finds more free prefixes than the target
    NEW_ENI = "each new ENI"  # a top-up when every attached ENI is full
    PERIODIC = "periodic"  # timers of their own


@dataclass(frozen=True, slots=True)
class Ec2Call:
    action: str
    phase: Phase
    count: str  # the rule, in words
    source: str  # file: function (call path)
    detail: str = ""


CALLS: tuple[Ec2Call, ...] = (
    Ec2Call(
        "DescribeInstanceTypes",
        Phase.NODE_START,
        "0 when the instance type is in the CNI's generated limits table "
        "(pkg/vpc/vpc_ip_resource_limit.go, every current type); else 1",
        f"{AWSUTILS}: FetchInstanceTypeLimits (from {IPAMD}: New)",
    ),
    Ec2Call(
        "DescribeNetworkInterfaces",
        Phase.NODE_START,
        "1: every attached ENI (from IMDS) in one request; on an error up to 12 requests, "
        "sleeping 10 ms x try between them",
        f"{AWSUTILS}: DescribeAllENIs (from {IPAMD}: nodeInit)",
        "reads each ENI's tags and type; ENABLE_IMDS_ONLY_MODE skips it",
    ),
    Ec2Call(
        "CreateTags",
        Phase.NODE_START,
        "1 per attached managed ENI (not the trunk) missing the node tag "
        "node.k8s.amazonaws.com/instance_id: every ENI of a freshly launched instance; "
        "up to 5 tries (0.5 s backoff x2, jitter 0.3)",
        f"{AWSUTILS}: TagENI (from {IPAMD}: nodeInit)",
        "a failure after the tries fails nodeInit",
    ),
    Ec2Call(
        "ModifyNetworkInterfaceAttribute",
        Phase.NODE_START,
        "1 per managed ENI in the datastore (security groups): the daemon's security-group "
        "cache starts empty, so its first refresh sees every group as added",
        f"{AWSUTILS}: RefreshSGIDs (from {IPAMD}: nodeInit)",
        "errors are logged and ignored; then every 30 s, calling again only if the "
        "primary ENI's groups in IMDS changed",
    ),
    Ec2Call(
        "AssignPrivateIpAddresses",
        Phase.NODE_START,
        "1 (Ipv4PrefixCount = max(1, WARM_PREFIX_TARGET - free prefixes), capped by the "
        "ENI's room) when the launch prefixes leave fewer than 16 x WARM_PREFIX_TARGET "
        "free addresses; 0 otherwise. If it fails, 1 more asking for 1 prefix; if that "
        "fails too, nodeInit fails",
        f"{IPAMD}: nodeInit -> handlePreScaling -> increaseDatastorePool -> "
        f"tryAssignPrefixes -> {AWSUTILS}: AllocIPAddresses",
    ),
    Ec2Call(
        "AssignPrivateIpAddresses",
        Phase.TOP_UP,
        "1 per pool pass (every 5 s) that finds fewer than 16 x WARM_PREFIX_TARGET free "
        "addresses (and fewer than max-pods addresses in all); the same count and "
        "fallback to 1 prefix as at start",
        f"{IPAMD}: StartNodeIPPoolManager -> updateIPPoolIfRequired -> "
        f"increaseDatastorePool -> tryAssignPrefixes -> {AWSUTILS}: AllocIPAddresses",
        "a failed top-up is tried again at the next pass; InsufficientCidrBlocks pauses "
        "top-ups for 120 s",
    ),
    Ec2Call(
        "UnassignPrivateIpAddresses",
        Phase.RELEASE,
        "1 per pool pass that finds more wholly free prefixes than WARM_PREFIX_TARGET "
        "(Ipv4Prefixes = the excess), at most once per 30 s",
        f"{IPAMD}: updateIPPoolIfRequired -> decreaseDatastorePool -> "
        f"tryUnassignCidrsFromAll -> DeallocCidrs -> {AWSUTILS}: DeallocPrefixAddresses",
        "so prefixes pre-assigned at launch beyond the target are given back at the first "
        "pass (2.5 s after start) if no pod has landed on them yet",
    ),
    Ec2Call(
        "DescribeSubnets",
        Phase.NEW_ENI,
        "1 (ENABLE_SUBNET_DISCOVERY, default true)",
        f"{IPAMD}: increaseDatastorePool -> tryAllocateENI -> {AWSUTILS}: AllocENI -> "
        "createENI -> getVpcSubnets",
    ),
    Ec2Call(
        "CreateNetworkInterface",
        Phase.NEW_ENI,
        "1 per subnet tried until one succeeds (Ipv4PrefixCount = min(prefixes needed, "
        "the ENI's limit); tags ride in TagSpecifications)",
        f"{AWSUTILS}: createENI -> tryCreateNetworkInterface",
    ),
    Ec2Call(
        "DescribeInstances",
        Phase.NEW_ENI,
        "1 (the first free device index)",
        f"{AWSUTILS}: attachENI -> awsGetFreeDeviceNumber",
    ),
    Ec2Call(
        "AttachNetworkInterface",
        Phase.NEW_ENI,
        "1; on failure the new ENI is deleted (DeleteNetworkInterface, up to 12 tries)",
        f"{AWSUTILS}: AllocENI -> attachENI",
    ),
    Ec2Call(
        "ModifyNetworkInterfaceAttribute",
        Phase.NEW_ENI,
        "1 (DeleteOnTermination=true on the attachment)",
        f"{AWSUTILS}: AllocENI",
    ),
    Ec2Call(
        "DescribeNetworkInterfaces",
        Phase.PERIODIC,
        "1 per 1,000 leaked ENIs found (filters tag-key, status=available, vpc-id): "
        "first at a uniformly random 0-300 s after start, then hourly",
        f"{AWSUTILS}: New -> cleanUpLeakedENIs -> getLeakedENIs",
        "DISABLE_LEAKED_ENI_CLEANUP=true skips it",
    ),
    Ec2Call(
        "DescribeNetworkInterfaces",
        Phase.PERIODIC,
        "0 while IMDS and the datastore agree; 1 per ENI whose prefixes differ, at a "
        "reconcile (60 s after the last pool action)",
        f"{IPAMD}: nodeIPPoolReconcile -> eniPrefixPoolReconcile -> "
        f"{AWSUTILS}: GetIPv4PrefixesFromEC2",
        "IMDS lags EC2 by seconds in AWS; the emulator's IMDS never does, so 0 here",
    ),
)


@dataclass(frozen=True, slots=True)
class SdkRetry:
    """The EC2 client's retries. ``awsutils.New`` builds the client from
    ``config.LoadDefaultConfig`` with the region only (the session with 10 attempts in
    ``awssession`` serves IMDS), so the Go SDK's standard retryer defaults apply."""

    max_attempts: int = 3
    max_backoff_s: float = 20.0
    # Retry quota, per client: a retry costs 5 tokens (10 after a timeout); a request
    # that succeeds first time gives 1 back, a retry that succeeds its cost back.
    quota_tokens: int = 500
    retry_cost: int = 5
    timeout_retry_cost: int = 10
    success_refund: int = 1
    retryable_status: tuple[int, ...] = (500, 502, 503, 504)  # and throttle codes
    source: str = f"{AWSUTILS}: New; {SDK_RETRY}"

    def backoff_bound_s(self, attempt: int) -> float:
        """Full jitter: the delay before retry ``attempt`` (1-based) is uniform in
        [0, 2**attempt) s, and the cap itself once 2**attempt passes it."""
        if attempt > int(math.log2(self.max_backoff_s)):
            return self.max_backoff_s
        return float(2**attempt)

    def backoff_is_fixed(self, attempt: int) -> bool:
        return attempt > int(math.log2(self.max_backoff_s))


@dataclass(frozen=True, slots=True)
class IpamdTimers:
    """ipamd's own loops and retries around the SDK's."""

    pool_pass_s: float = 5.0  # sleep 2.5 s, pool pass, sleep 2.5 s, reconcile
    first_pass_after_s: float = 2.5
    decrease_interval_s: float = 30.0
    reconcile_interval_s: float = 60.0
    describe_all_enis_tries: int = 12
    describe_all_enis_sleep_s: float = 0.010  # x try number
    tag_tries: int = 5
    tag_backoff_s: float = 0.5
    tag_backoff_factor: float = 2.0
    tag_jitter: float = 0.3
    leaked_eni_cleanup_delay_max_s: float = 300.0
    insufficient_cidr_cooldown_s: float = 120.0
    # nodeInit failing makes aws-k8s-agent exit 1 (cmd/aws-k8s-agent/main.go: _main);
    # the kubelet restarts the container after its crash-loop back-off: 10 s, doubled
    # each time, at most 300 s (kubernetes pkg/kubelet: backOffPeriod,
    # MaxContainerBackOff).
    restart_backoff_s: float = 10.0
    restart_backoff_max_s: float = 300.0
    source: str = f"{IPAMD}: constants, StartNodeIPPoolManager; {AWSUTILS}: TagENI, New"


SDK = SdkRetry()
TIMERS = IpamdTimers()


# -- the warm-prefix decisions (ipamd.go: isDatastorePoolTooLow, getPrefixesNeeded,
#    isDatastorePoolTooHigh, computeExtraPrefixesOverWarmTarget) ---------------------


def pool_too_low(
    total_prefixes: int, assigned: int, warm_prefix_target: int, max_pods: int
) -> bool:
    """Fewer free addresses than the target's prefixes hold (or none with target 0),
    unless the node already holds max-pods addresses."""
    total = total_prefixes * ADDRESSES_PER_PREFIX
    if total >= max_pods:
        return False
    available = total - assigned
    return available < ADDRESSES_PER_PREFIX * warm_prefix_target or (
        warm_prefix_target == 0 and available == 0
    )


def free_prefixes(total_prefixes: int, assigned: int) -> int:
    """Prefixes with no address assigned, pods packed into the fewest prefixes."""
    return total_prefixes - math.ceil(assigned / ADDRESSES_PER_PREFIX)


def prefixes_to_assign(free: int, warm_prefix_target: int) -> int:
    return max(1, warm_prefix_target - free)


def prefixes_to_release(free: int, warm_prefix_target: int) -> int:
    return max(free - warm_prefix_target, 0)


def calls_of(phase: Phase) -> list[Ec2Call]:
    return [c for c in CALLS if c.phase is phase]


def new_eni_calls() -> Counter[str]:
    """One new ENI, every call succeeding first time."""
    return Counter(c.action for c in calls_of(Phase.NEW_ENI))


@dataclass(frozen=True, slots=True)
class NodeShape:
    """What the warm-prefix arithmetic needs to know of a node."""

    max_prefixes_per_eni: int  # the type's IPv4 addresses per ENI, minus the primary
    max_enis: int
    max_pods: int = DEFAULT_MAX_PODS
    warm_prefix_target: int = DEFAULT_WARM_PREFIX_TARGET


def node_calls(
    shape: NodeShape,
    prefixes_at_launch: int,
    pods: int,
    *,
    pods_before_first_pass: bool = True,
    type_in_table: bool = True,
    leaked_eni_cleanup: bool = True,
) -> Counter[str]:
    """Every EC2 call one node makes from start until its ``pods`` run and its pool is
    settled, each call succeeding first time: start-up, then pool passes. The pods land
    either all before the first pool pass after Ready (``pods_before_first_pass``) or
    all after it, as many as free addresses allow between passes."""
    calls: Counter[str] = Counter()
    if not type_in_table:
        calls["DescribeInstanceTypes"] += 1
    enis = [prefixes_at_launch]  # prefixes on each attached ENI; the primary first
    calls["DescribeNetworkInterfaces"] += 1
    calls["CreateTags"] += len(enis)
    calls["ModifyNetworkInterfaceAttribute"] += len(enis)
    if leaked_eni_cleanup:
        calls["DescribeNetworkInterfaces"] += 1
    target = shape.warm_prefix_target

    def top_up(assigned: int) -> None:
        need = prefixes_to_assign(free_prefixes(sum(enis), assigned), target)
        for i, held in enumerate(enis):
            if held < shape.max_prefixes_per_eni:
                enis[i] += min(need, shape.max_prefixes_per_eni - held)
                calls["AssignPrivateIpAddresses"] += 1
                return
        if len(enis) < shape.max_enis:
            calls.update(new_eni_calls())
            enis.append(min(need, shape.max_prefixes_per_eni))

    if pool_too_low(sum(enis), 0, target, shape.max_pods):
        top_up(0)
    assigned = 0
    if not pods_before_first_pass:
        over = prefixes_to_release(free_prefixes(sum(enis), 0), target)
        if over:
            _release(enis, over)
            calls["UnassignPrivateIpAddresses"] += 1
    for _ in range(10_000):  # pool passes; a node settles in a handful
        room = sum(enis) * ADDRESSES_PER_PREFIX - assigned
        assigned += min(room, pods - assigned)
        total = sum(enis)
        if pool_too_low(total, assigned, target, shape.max_pods):
            before = (len(enis), total)
            top_up(assigned)
            if (len(enis), sum(enis)) == before:
                break  # no room left anywhere: the node is full
            continue
        over = prefixes_to_release(free_prefixes(total, assigned), target)
        if over:
            _release(enis, over)
            calls["UnassignPrivateIpAddresses"] += 1
            continue
        if assigned >= pods:
            break
    return calls


def _release(enis: list[int], count: int) -> None:
    """The last ENI's prefixes go first: ipamd walks its ENIs in map order, which no
    count depends on."""
    for i in reversed(range(len(enis))):
        taken = min(count, enis[i])
        enis[i] -= taken
        count -= taken
        if not count:
            return


def describe() -> str:
    """The call table as text, for a README or ``--help``."""
    lines = []
    for phase in Phase:
        for call in calls_of(phase):
            lines.append(f"{phase}: {call.action}: {call.count} [{call.source}]")
    return "\n".join(lines)
