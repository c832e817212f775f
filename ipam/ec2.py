"""The one EC2 client of ultranet-ipamd: typed calls, a client-side rate limit, our retries.

The VPC CNI builds its EC2 client with the SDK's defaults (``aws/amazon-vpc-cni-k8s``,
``pkg/awsutils/awsutils.go``: no custom retryer, so the standard one's 3 attempts) and lets
its 5 s pool loop be the retry, so mass launches become ``RequestLimitExceeded`` storms
(its issues #405, #2730, #873). Here every request, retries included, first takes a token
from one client-side bucket shared by all actions, so a node never offers EC2 more than
``rate_per_s`` requests a second.
Throttling, 5xx and connection errors are retried with full-jitter exponential backoff
(``uniform(0, min(max_delay, base * 2**n))``, "Exponential Backoff and Jitter", AWS
Architecture Blog), which spreads out the retries of nodes throttled at the same instant.
botocore is built with ``total_max_attempts=1`` so that two retry policies never multiply.

boto3 is imported only when a client is built: a node whose prefixes were pre-assigned at
launch starts from IMDS alone and must not pay boto3's import on its way to ready.

Retried requests may repeat a side effect when the first one timed out after EC2 acted.
CreateNetworkInterface is made idempotent with a ``ClientToken``; Assign and Unassign have
none, so the daemon's reconcile (DescribeNetworkInterfaces is authoritative) must absorb an
extra prefix or an ``InvalidParameterValue`` for a prefix already gone.

Errors::

    UltranetError
    └── Ec2Error(action, code, message, attempts)   EC2 refused; .code is EC2's error code
        ├── Ec2RetriesExhausted                      throttled, 5xx or unreachable every time
        ├── Ec2NotFound                              *.NotFound: the resource is gone
        ├── Ec2AddressLimitExceeded                  PrivateIpAddressLimitExceeded: ENI full
        ├── Ec2NauLimitExceeded                      NetworkAddressUsageLimitExceeded
        ├── Ec2InsufficientCidrBlocks                also an errors.InsufficientCidrBlocks
        └── Ec2InsufficientFreeAddresses             also an errors.InsufficientFreeAddresses
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ipam.errors import (
    ConfigError,
    InsufficientCidrBlocks,
    InsufficientFreeAddresses,
    UltranetError,
)

if TYPE_CHECKING:
    from mypy_boto3_ec2.client import EC2Client
    from mypy_boto3_ec2.type_defs import (
        FilterTypeDef,
        NetworkInterfaceTypeDef,
        SubnetTypeDef,
        TagTypeDef,
    )

__all__ = [
    "Ec2AddressLimitExceeded",
    "Ec2Client",
    "Ec2Counters",
    "Ec2Error",
    "Ec2InsufficientCidrBlocks",
    "Ec2InsufficientFreeAddresses",
    "Ec2NauLimitExceeded",
    "Ec2NotFound",
    "Ec2RetriesExhausted",
    "Ec2Stats",
    "EniState",
    "SubnetState",
    "ThrottlePacer",
    "TokenBucket",
    "boto3_client",
]

LOG = logging.getLogger("ultranet.ipamd.ec2")

USER_AGENT_EXTRA = "ultranet-ipamd"
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 10.0  # the VPC CNI's HTTP_TIMEOUT
PAGE_SIZE = 1000  # EC2's largest MaxResults for DescribeNetworkInterfaces/DescribeSubnets
LATENCY_SAMPLES = 1024  # per action, kept by Ec2Counters

THROTTLE_CODES = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "EC2ThrottledException",
    }
)
SERVER_ERROR_CODES = frozenset(
    {"InternalError", "InternalFailure", "Unavailable", "ServiceUnavailable"}
)
SUBNET_SPACE_CODES = frozenset({"InsufficientCidrBlocks", "InsufficientFreeAddressesInSubnet"})

T = TypeVar("T")
R = TypeVar("R", bound=Mapping[str, object])
Filters = Mapping[str, Sequence[str]]


# -- errors -----------------------------------------------------------------------------


class Ec2Error(UltranetError):
    """EC2 refused ``action``; the message names the objects the call was about."""

    _tries = "after"

    def __init__(
        self,
        action: str,
        code: str,
        message: str,
        *,
        attempts: int = 1,
        subject: str = "",
        subnet_id: str | None = None,
    ) -> None:
        where = f" {subject}" if subject else ""
        tries = f" ({self._tries} {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"EC2 {action}{where}: {code}: {message}{tries}")
        self.action = action
        self.code = code
        self.message = message
        self.attempts = attempts
        self.subnet_id = subnet_id

    @property
    def throttled(self) -> bool:
        return self.code in THROTTLE_CODES


class Ec2RetriesExhausted(Ec2Error):
    """Every attempt was throttled, failed server-side or could not reach EC2."""

    _tries = "gave up after"


class Ec2NotFound(Ec2Error):
    """The ENI, attachment or subnet does not exist (any ``*.NotFound`` code)."""


class Ec2AddressLimitExceeded(Ec2Error):
    """The ENI has no free slot: the daemon's view of it is out of date.

    The VPC CNI reads ``PrivateIpAddressLimitExceeded`` the same way and re-describes the
    ENI (``pkg/ipamd/ipamd.go``).
    """


class Ec2NauLimitExceeded(Ec2Error):
    """The VPC is at its Network Address Usage quota."""


class Ec2InsufficientCidrBlocks(Ec2Error, InsufficientCidrBlocks):
    """No aligned, fully free /28 in the subnet, though it may still have addresses."""


class Ec2InsufficientFreeAddresses(Ec2Error, InsufficientFreeAddresses):
    """The subnet has no free address left."""


_ERROR_CLASSES: dict[str, type[Ec2Error]] = {
    "InsufficientCidrBlocks": Ec2InsufficientCidrBlocks,
    "InsufficientFreeAddressesInSubnet": Ec2InsufficientFreeAddresses,
    "PrivateIpAddressLimitExceeded": Ec2AddressLimitExceeded,
    "NetworkAddressUsageLimitExceeded": Ec2NauLimitExceeded,
}


def _error_class(code: str) -> type[Ec2Error]:
    if code.endswith(".NotFound"):
        return Ec2NotFound
    return _ERROR_CLASSES.get(code, Ec2Error)


# -- statistics -------------------------------------------------------------------------


class Ec2Stats(Protocol):
    """What the client reports, for metrics: one ``request`` per HTTP request sent."""

    def request(self, action: str, latency_s: float, error_code: str | None) -> None: ...

    def retry(self, action: str, code: str, delay_s: float) -> None: ...

    def rate_limited(self, action: str, wait_s: float) -> None: ...


class Ec2Counters:
    """``Ec2Stats`` in memory, per action; keeps the last ``LATENCY_SAMPLES`` latencies and
    backoff delays, so a long-lived daemon does not grow them without bound."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.errors: Counter[tuple[str, str]] = Counter()  # (action, code)
        self.retries: Counter[str] = Counter()
        self.throttles: Counter[str] = Counter()
        self.backoffs: dict[str, deque[float]] = {}
        self.latencies: dict[str, deque[float]] = {}
        self.rate_limit_wait_s: dict[str, float] = {}

    def request(self, action: str, latency_s: float, error_code: str | None) -> None:
        with self._lock:
            self.calls[action] += 1
            samples = self.latencies.setdefault(action, deque(maxlen=LATENCY_SAMPLES))
            samples.append(latency_s)
            if error_code is not None:
                self.errors[action, error_code] += 1
                if error_code in THROTTLE_CODES:
                    self.throttles[action] += 1

    def retry(self, action: str, code: str, delay_s: float) -> None:
        with self._lock:
            self.retries[action] += 1
            self.backoffs.setdefault(action, deque(maxlen=LATENCY_SAMPLES)).append(delay_s)

    def rate_limited(self, action: str, wait_s: float) -> None:
        with self._lock:
            self.rate_limit_wait_s[action] = self.rate_limit_wait_s.get(action, 0.0) + wait_s


# -- rate limit -------------------------------------------------------------------------


class TokenBucket:
    """``burst`` tokens refilled at ``rate_per_s``, EC2's own throttling model.

    A caller reserves a token (the count may go below zero) and sleeps, outside the lock,
    until the token is due: concurrent callers queue in arrival order and none spins.
    """

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float]) -> None:
        if rate_per_s <= 0:
            raise ConfigError("rate_per_s", rate_per_s, "must be > 0")
        if burst < 1:
            raise ConfigError("burst", burst, "must be >= 1")
        self._rate = rate_per_s
        self._burst = float(burst)
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._updated = clock()

    def reserve(self) -> float:
        """Take a token; return how many seconds to wait before using it."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
            self._updated = now
            self._tokens -= 1.0
            return 0.0 if self._tokens >= 0.0 else -self._tokens / self._rate


class ThrottlePacer:
    """One EC2 action's adaptive rate: AIMD on ``RequestLimitExceeded``.

    EC2 throttles per account and per action, so a node's own ``TokenBucket`` cannot keep
    a fleet under the account's refill rate: 2,000 nodes each retrying within their own
    budget still offer EC2 hundreds of requests a second for its 5 Assigns. A throttled
    answer is the only news a node gets of the others, so each one multiplies this
    action's rate by ``decrease`` (down to ``min_rate_per_s``) and spaces every later
    request of the action by a jittered ``uniform(0.5, 1) / rate``; each success adds
    ``increase_per_s`` back until ``max_rate_per_s``, where pacing stops. This is the
    additive-increase/multiplicative-decrease of TCP and the client-side rate limit of
    botocore's ``adaptive`` retry mode, per action (EC2's buckets are per action) and with
    a floor low enough for thousands of nodes sharing one bucket (botocore's is 0.5/s).
    """

    def __init__(
        self,
        max_rate_per_s: float,
        min_rate_per_s: float,
        decrease: float,
        increase_per_s: float,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        if not 0 < min_rate_per_s <= max_rate_per_s:
            raise ConfigError("min_rate_per_s", min_rate_per_s, "must be in (0, max_rate_per_s]")
        if not 0 < decrease < 1:
            raise ConfigError("decrease", decrease, "must be in (0, 1)")
        self._max = max_rate_per_s
        self._min = min_rate_per_s
        self._decrease = decrease
        self._increase = increase_per_s
        self._clock = clock
        self._rng = rng
        self._lock = threading.Lock()
        self.rate_per_s: float | None = None  # None: not paced
        self._next_at = 0.0

    def reserve(self) -> float:
        """Seconds to wait before this action's next request."""
        with self._lock:
            if self.rate_per_s is None:
                return 0.0
            now = self._clock()
            start = max(now, self._next_at)
            self._next_at = start + self._interval()
            return start - now

    def throttled(self) -> None:
        with self._lock:
            rate = self._max if self.rate_per_s is None else self.rate_per_s
            self.rate_per_s = max(self._min, rate * self._decrease)
            self._next_at = max(self._next_at, self._clock() + self._interval())

    def succeeded(self) -> None:
        with self._lock:
            if self.rate_per_s is not None:
                rate = self.rate_per_s + self._increase
                self.rate_per_s = None if rate >= self._max else rate

    def _interval(self) -> float:
        assert self.rate_per_s is not None
        return self._rng.uniform(0.5, 1.0) / self.rate_per_s


# -- results ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EniState:
    eni_id: str
    subnet_id: str
    interface_type: str  # interface, efa, efa-only, trunk, ...
    mac: str
    card: int | None  # attachment's NetworkCardIndex; None while unattached
    device: int | None  # attachment's DeviceIndex
    attachment_id: str | None
    instance_id: str | None
    primary_ip: IPv4Address | None  # None for efa-only
    secondary_ips: tuple[IPv4Address, ...]
    prefixes: tuple[IPv4Network, ...]
    status: str  # available, in-use, ...
    tags: Mapping[str, str] = field(hash=False)
    ipv6_prefixes: tuple[IPv6Network, ...] = ()  # the /80s (IPv6 prefix mode)

    @property
    def is_primary(self) -> bool:
        return self.card == 0 and self.device == 0


@dataclass(frozen=True, slots=True)
class SubnetState:
    subnet_id: str
    vpc_id: str
    cidr: IPv4Network
    az: str
    available_ips: int  # as of the DescribeSubnets that produced it
    tags: Mapping[str, str] = field(hash=False)


def _tags(raw: Iterable[TagTypeDef]) -> Mapping[str, str]:
    return MappingProxyType({t.get("Key", ""): t.get("Value", "") for t in raw})


def _tag_list(tags: Mapping[str, str]) -> list[TagTypeDef]:
    return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


def _eni_state(raw: NetworkInterfaceTypeDef) -> EniState:
    attachment = raw.get("Attachment", {})
    primary = raw.get("PrivateIpAddress")
    secondary = [
        IPv4Address(a["PrivateIpAddress"])
        for a in raw.get("PrivateIpAddresses", [])
        if "PrivateIpAddress" in a and not a.get("Primary", False)
    ]
    return EniState(
        eni_id=raw.get("NetworkInterfaceId", ""),
        subnet_id=raw.get("SubnetId", ""),
        interface_type=raw.get("InterfaceType", "interface"),
        mac=raw.get("MacAddress", ""),
        card=attachment.get("NetworkCardIndex"),
        device=attachment.get("DeviceIndex"),
        attachment_id=attachment.get("AttachmentId"),
        instance_id=attachment.get("InstanceId"),
        primary_ip=IPv4Address(primary) if primary else None,
        secondary_ips=tuple(secondary),
        prefixes=tuple(IPv4Network(p["Ipv4Prefix"]) for p in raw.get("Ipv4Prefixes", [])),
        status=raw.get("Status", ""),
        tags=_tags(raw.get("TagSet", [])),
        ipv6_prefixes=tuple(
            IPv6Network(p["Ipv6Prefix"]) for p in raw.get("Ipv6Prefixes", []) if "Ipv6Prefix" in p
        ),
    )


def _subnet_state(raw: SubnetTypeDef) -> SubnetState:
    return SubnetState(
        subnet_id=raw.get("SubnetId", ""),
        vpc_id=raw.get("VpcId", ""),
        cidr=IPv4Network(raw.get("CidrBlock", "0.0.0.0/32")),
        az=raw.get("AvailabilityZone", ""),
        available_ips=raw.get("AvailableIpAddressCount", 0),
        tags=_tags(raw.get("Tags", [])),
    )


def _filters(filters: Filters) -> list[FilterTypeDef]:
    return [{"Name": name, "Values": list(values)} for name, values in filters.items()]


# -- the client -------------------------------------------------------------------------


def boto3_client(
    region: str,
    endpoint_url: str | None = None,
    *,
    aws_access_key_id: str | None = None,
    aws_secret_access_key: str | None = None,
) -> EC2Client:
    """A boto3 EC2 client that never retries on its own: all retry policy is ``Ec2Client``'s."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        user_agent_extra=USER_AGENT_EXTRA,
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
    )
    return boto3.client(
        "ec2",
        region_name=region,
        endpoint_url=endpoint_url,
        config=config,
        aws_access_key_id=aws_access_key_id,
        aws_secret_access_key=aws_secret_access_key,
    )


def _failure(exc: Exception) -> tuple[str, str, bool] | None:
    """(code, message, retriable) for an error of EC2 or of the way to it; None otherwise."""
    from botocore import exceptions as bce

    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "Unknown")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        retriable = code in THROTTLE_CODES or code in SERVER_ERROR_CODES or status >= 500
        return code, error.get("Message", ""), retriable
    if isinstance(exc, bce.ConnectionError | bce.ConnectionClosedError | bce.ReadTimeoutError):
        return type(exc).__name__, str(exc), True
    return None


class Ec2Client:
    """Typed EC2 calls for the daemon, each rate-limited and retried here, never by botocore."""

    def __init__(
        self,
        region: str,
        *,
        endpoint_url: str | None = None,
        rate_per_s: float = 5.0,
        burst: int = 10,
        max_attempts: int = 8,
        max_throttled_attempts: int = 3,
        throttle_min_rate_per_s: float = 1 / 60,
        throttle_decrease: float = 0.25,
        throttle_increase_per_s: float = 0.5,
        base_delay_s: float = 0.2,
        max_delay_s: float = 20.0,
        subnet_cache_ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        stats: Ec2Stats | None = None,
        client_factory: Callable[[str, str | None], EC2Client] | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ConfigError("max_attempts", max_attempts, "must be >= 1")
        if max_throttled_attempts < 1:
            raise ConfigError("max_throttled_attempts", max_throttled_attempts, "must be >= 1")
        if base_delay_s < 0 or max_delay_s < base_delay_s:
            raise ConfigError("max_delay_s", max_delay_s, "must be >= base_delay_s >= 0")
        self._bucket = TokenBucket(rate_per_s, burst, clock)
        self._max_attempts = max_attempts
        self._max_throttled_attempts = max_throttled_attempts
        self._base_delay = base_delay_s
        self._max_delay = max_delay_s
        self._subnet_ttl = subnet_cache_ttl_s
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._new_pacer = functools.partial(
            ThrottlePacer,
            rate_per_s,
            min(rate_per_s, throttle_min_rate_per_s),
            throttle_decrease,
            throttle_increase_per_s,
            clock,
            self._rng,
        )
        self._pacers: dict[str, ThrottlePacer] = {}
        self._pacers_lock = threading.Lock()
        self.stats: Ec2Stats = stats if stats is not None else Ec2Counters()
        self._ec2 = (client_factory or boto3_client)(region, endpoint_url)
        self._subnets: dict[tuple[str, str, str], tuple[float, list[SubnetState]]] = {}
        self._subnets_lock = threading.Lock()

    # -- the retry loop --------------------------------------------------------------

    def pacer(self, action: str) -> ThrottlePacer:
        """``action``'s adaptive rate, made on first use."""
        with self._pacers_lock:
            pacer = self._pacers.get(action)
            if pacer is None:
                pacer = self._pacers[action] = self._new_pacer()
            return pacer

    def _call(
        self, action: str, send: Callable[[], T], *, subject: str = "", subnet: str | None = None
    ) -> T:
        pacer = self.pacer(action)
        attempt = 0
        while True:
            attempt += 1
            wait = max(self._bucket.reserve(), pacer.reserve())
            if wait > 0:
                self.stats.rate_limited(action, wait)
                self._sleep(wait)
            started = self._clock()
            try:
                result = send()
            except Exception as exc:
                failure = _failure(exc)
                if failure is None:
                    raise
                self.stats.request(action, self._clock() - started, failure[0])
                if failure[0] in THROTTLE_CODES:
                    pacer.throttled()
                self._backoff_or_raise(action, failure, attempt, subject, subnet, exc)
            else:
                self.stats.request(action, self._clock() - started, None)
                pacer.succeeded()
                return result

    def _backoff_or_raise(
        self,
        action: str,
        failure: tuple[str, str, bool],
        attempt: int,
        subject: str,
        subnet: str | None,
        exc: Exception,
    ) -> None:
        code, message, retriable = failure
        # A throttled call gives up sooner than a failing one: the action's pacer already
        # slows every request of it, and the agent's next pool step asks again anyway.
        limit = self._max_throttled_attempts if code in THROTTLE_CODES else self._max_attempts
        if not retriable or attempt >= limit:
            cls = Ec2RetriesExhausted if retriable else _error_class(code)
            if code in SUBNET_SPACE_CODES:
                LOG.warning(
                    "%s %s: %s in subnet %s: %s", action, subject, code, subnet or "?", message
                )
            raise cls(
                action, code, message, attempts=attempt, subject=subject, subnet_id=subnet
            ) from exc
        cap = min(self._max_delay, self._base_delay * 2 ** (attempt - 1))
        delay = self._rng.uniform(0.0, cap)
        LOG.warning(
            "%s %s: %s, attempt %d/%d, retrying in %.3fs",
            action,
            subject,
            code,
            attempt,
            limit,
            delay,
        )
        self.stats.retry(action, code, delay)
        self._sleep(delay)

    def _pages(
        self,
        action: str,
        send: Callable[[dict[str, Any]], R],
        args: dict[str, Any],
        *,
        page_size: int | None,
        subject: str = "",
    ) -> Iterator[R]:
        """Follow NextToken; each page is one call, rate-limited and retried on its own."""
        token: object = None
        while True:
            page = dict(args)
            if page_size is not None:
                page["MaxResults"] = page_size
            if token:
                page["NextToken"] = token
            resp = self._call(action, functools.partial(send, page), subject=subject)
            yield resp
            token = resp.get("NextToken")
            if not token:
                return

    # -- describe ------------------------------------------------------------------------

    def describe_network_interfaces(
        self,
        ids: Sequence[str] | None = None,
        filters: Filters | None = None,
        *,
        page_size: int = PAGE_SIZE,
    ) -> list[EniState]:
        """ENIs by id (one request), or every ENI matching ``filters`` (pages of ``page_size``)."""
        args: dict[str, Any] = {}
        if ids is not None:
            if not ids:
                return []
            args["NetworkInterfaceIds"] = list(ids)
        if filters:
            args["Filters"] = _filters(filters)
        pages = self._pages(
            "DescribeNetworkInterfaces",
            lambda page: self._ec2.describe_network_interfaces(**page),
            args,
            page_size=None if ids is not None else page_size,
            subject=",".join(ids or ()),
        )
        return [_eni_state(raw) for resp in pages for raw in resp.get("NetworkInterfaces", [])]

    def describe_instance_enis(self, instance_id: str) -> list[EniState]:
        return self.describe_network_interfaces(filters={"attachment.instance-id": [instance_id]})

    def describe_subnets(
        self, ids: Sequence[str] | None = None, filters: Filters | None = None
    ) -> list[SubnetState]:
        """Subnets by id, or all matching ``filters``; never cached."""
        args: dict[str, Any] = {}
        if ids is not None:
            if not ids:
                return []
            args["SubnetIds"] = list(ids)
        if filters:
            args["Filters"] = _filters(filters)
        pages = self._pages(
            "DescribeSubnets",
            lambda page: self._ec2.describe_subnets(**page),
            args,
            page_size=None if ids is not None else PAGE_SIZE,
        )
        return [_subnet_state(raw) for resp in pages for raw in resp.get("Subnets", [])]

    def subnets_in(self, vpc_id: str, availability_zone: str, tag_key: str) -> list[SubnetState]:
        """Subnets of the VPC in the AZ carrying ``tag_key``, cached ``subnet_cache_ttl_s``.

        The VPC CNI calls DescribeSubnets on every ENI set-up (``pkg/awsutils/awsutils.go``,
        ``IsSubnetExcluded``); subnets change rarely, so a cache removes most of those
        calls. ``available_ips`` ages with it; a subnet that answered
        ``InsufficientCidrBlocks`` is benched by the agent, not re-read.
        """
        key = (vpc_id, availability_zone, tag_key)
        now = self._clock()
        with self._subnets_lock:
            cached = self._subnets.get(key)
            if cached is not None and now < cached[0]:
                return list(cached[1])
        filters = {"vpc-id": [vpc_id], "availability-zone": [availability_zone]}
        found = self.describe_subnets(filters={**filters, "tag-key": [tag_key]})
        with self._subnets_lock:
            self._subnets[key] = (self._clock() + self._subnet_ttl, found)
        return list(found)

    # -- prefixes ------------------------------------------------------------------------

    def assign_prefixes(
        self, eni_id: str, count: int, *, subnet_id: str | None = None
    ) -> list[IPv4Network]:
        """Ask EC2 for ``count`` /28s on the ENI; ``subnet_id`` only names it in errors."""
        resp = self._call(
            "AssignPrivateIpAddresses",
            lambda: self._ec2.assign_private_ip_addresses(
                NetworkInterfaceId=eni_id, Ipv4PrefixCount=count
            ),
            subject=eni_id if subnet_id is None else f"{eni_id} in {subnet_id}",
            subnet=subnet_id,
        )
        return [IPv4Network(p["Ipv4Prefix"]) for p in resp.get("AssignedIpv4Prefixes", [])]

    def unassign_prefixes(self, eni_id: str, prefixes: Iterable[IPv4Network]) -> None:
        names = [str(p) for p in prefixes]
        if not names:
            return
        self._call(
            "UnassignPrivateIpAddresses",
            lambda: self._ec2.unassign_private_ip_addresses(
                NetworkInterfaceId=eni_id, Ipv4Prefixes=names
            ),
            subject=f"{eni_id} ({', '.join(names)})",
        )

    def assign_ipv6_prefix(self, eni_id: str) -> list[IPv6Network]:
        """One IPv6 /80 on the ENI (``AssignIpv6Addresses Ipv6PrefixCount=1``), as the VPC
        CNI's IPv6 mode asks for the primary ENI's."""
        resp = self._call(
            "AssignIpv6Addresses",
            lambda: self._ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6PrefixCount=1),
            subject=eni_id,
        )
        return [IPv6Network(p) for p in resp.get("AssignedIpv6Prefixes", [])]

    # -- interfaces ----------------------------------------------------------------------

    def create_eni(
        self,
        subnet_id: str,
        *,
        groups: Sequence[str],
        prefix_count: int = 0,
        interface_type: str = "interface",
        description: str = "",
        tags: Mapping[str, str] | None = None,
    ) -> EniState:
        """A new ENI; one ``ClientToken`` for all attempts, so a retry never makes two."""
        args: dict[str, Any] = {"SubnetId": subnet_id, "ClientToken": uuid.uuid4().hex}
        if groups:
            args["Groups"] = list(groups)
        if prefix_count:
            args["Ipv4PrefixCount"] = prefix_count
        if interface_type != "interface":  # not in EC2's enum: the default is left unsaid
            args["InterfaceType"] = interface_type
        if description:
            args["Description"] = description
        if tags:
            spec = {"ResourceType": "network-interface", "Tags": _tag_list(tags)}
            args["TagSpecifications"] = [spec]
        resp = self._call(
            "CreateNetworkInterface",
            lambda: self._ec2.create_network_interface(**args),
            subject=f"in {subnet_id}",
            subnet=subnet_id,
        )
        return _eni_state(resp["NetworkInterface"])

    def attach_eni(
        self, eni_id: str, instance_id: str, device_index: int, network_card_index: int
    ) -> str:
        """Attach; returns the attachment id."""
        resp = self._call(
            "AttachNetworkInterface",
            lambda: self._ec2.attach_network_interface(
                NetworkInterfaceId=eni_id,
                InstanceId=instance_id,
                DeviceIndex=device_index,
                NetworkCardIndex=network_card_index,
            ),
            subject=f"{eni_id} to {instance_id} card {network_card_index} device {device_index}",
        )
        return resp.get("AttachmentId", "")

    def detach_eni(self, attachment_id: str, force: bool = False) -> None:
        self._call(
            "DetachNetworkInterface",
            lambda: self._ec2.detach_network_interface(AttachmentId=attachment_id, Force=force),
            subject=attachment_id,
        )

    def delete_eni(self, eni_id: str) -> None:
        self._call(
            "DeleteNetworkInterface",
            lambda: self._ec2.delete_network_interface(NetworkInterfaceId=eni_id),
            subject=eni_id,
        )

    def set_delete_on_termination(self, eni_id: str, attachment_id: str) -> None:
        """So EC2 deletes the ENI with the instance, as the VPC CNI does after attach."""
        self._call(
            "ModifyNetworkInterfaceAttribute",
            lambda: self._ec2.modify_network_interface_attribute(
                NetworkInterfaceId=eni_id,
                Attachment={"AttachmentId": attachment_id, "DeleteOnTermination": True},
            ),
            subject=eni_id,
        )

    def tag(self, resource_ids: Sequence[str], tags: Mapping[str, str]) -> None:
        if not resource_ids or not tags:
            return
        self._call(
            "CreateTags",
            lambda: self._ec2.create_tags(Resources=list(resource_ids), Tags=_tag_list(tags)),
            subject=",".join(resource_ids),
        )
