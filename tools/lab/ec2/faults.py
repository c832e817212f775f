"""Faults on demand and the per-action request log of the emulated EC2 API.

Tests of the node daemon need EC2 to misbehave the way it does during mass launches
(``RequestLimitExceeded`` storms, slow calls, transient 5xx: ``aws/amazon-vpc-cni-k8s``
issues #405, #2730, #873) and need to count the calls a code path makes ("zero EC2 calls
at start"). Both live here, apart from the HTTP layer, so they are pure and driven by an
injected clock.

A request can also be *held* (``Faults.hold``): it blocks before reaching the state until
the test releases it, and the test learns that it arrived. Crash tests use it to kill the
daemon at an exact point of a multi-call sequence (between CreateNetworkInterface and
AttachNetworkInterface, say), with no sleep standing in for the timing.

Two kinds of throttling are offered: a rule that throttles the next N calls (exact,
for unit tests), and a token bucket per action, which is how EC2 itself throttles
("Request throttling for the Amazon EC2 API": a bucket per API action, refilled at a
fixed rate), for tests of a client's rate limiter and backoff.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from tools.lab.ec2.errors import Ec2Error, internal, throttled, unavailable

ANY_ACTION = "*"


class FaultKind(StrEnum):
    THROTTLE = "throttle"  # 503 RequestLimitExceeded
    UNAVAILABLE = "unavailable"  # 503 Unavailable
    INTERNAL = "internal"  # 500 InternalError
    LATENCY = "latency"  # answered, after a delay


_ERRORS: dict[FaultKind, Callable[[], Ec2Error]] = {
    FaultKind.THROTTLE: throttled,
    FaultKind.UNAVAILABLE: unavailable,
    FaultKind.INTERNAL: internal,
}


@dataclass(slots=True)
class FaultRule:
    """Applies to ``action`` (or every action); ``count`` None means until cleared."""

    kind: FaultKind
    action: str = ANY_ACTION
    count: int | None = None
    probability: float = 1.0
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if self.count is not None and self.count < 1:
            raise ValueError(f"fault count must be >= 1, not {self.count}")
        if not 0.0 < self.probability <= 1.0:
            raise ValueError(f"fault probability must be in (0, 1], not {self.probability}")
        if self.kind is FaultKind.LATENCY and self.latency_s <= 0:
            raise ValueError("a latency fault needs latency_s > 0")


@dataclass(slots=True)
class TokenBucket:
    """EC2's throttling: ``burst`` tokens, refilled at ``rate_per_s``; a call takes one."""

    rate_per_s: float
    burst: float
    tokens: float = field(init=False)
    updated: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0 or self.burst < 1:
            raise ValueError("a token bucket needs rate_per_s > 0 and burst >= 1")
        self.tokens = self.burst

    def take(self, now: float) -> bool:
        if self.updated is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Hold:
    """One request of ``action`` held before it reaches the cloud's state.

    ``skip`` requests of the action pass first; the next one blocks, ``reached`` is set,
    and it waits for ``release``: ``proceed=True`` lets it through to the state (EC2 got
    the call, its caller may not hear back), ``proceed=False`` fails it with a 500
    before the state (the call never took effect). One-shot: later requests pass.
    """

    def __init__(self, action: str, skip: int = 0) -> None:
        if skip < 0:
            raise ValueError(f"hold skip must be >= 0, not {skip}")
        self.action = action
        self.skip = skip
        self.reached = threading.Event()
        self._released = threading.Event()
        self._proceed = False

    def wait_reached(self, timeout: float) -> bool:
        return self.reached.wait(timeout)

    def release(self, *, proceed: bool) -> None:
        self._proceed = proceed
        self._released.set()

    def _block(self) -> bool:
        """Called on the request's thread: True to proceed."""
        self.reached.set()
        self._released.wait()
        return self._proceed


@dataclass(frozen=True, slots=True)
class Decision:
    """What the server does with one request before serving it."""

    latency_s: float = 0.0
    error: Ec2Error | None = None


@dataclass(frozen=True, slots=True)
class RequestRecord:
    at: float
    action: str
    error_code: str | None  # None: answered 200


class Faults:
    """The fault plan: rules and buckets, consulted once per request. Thread-safe."""

    def __init__(self, *, clock: Callable[[], float], seed: int = 0) -> None:
        self._clock = clock
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._buckets: dict[str, TokenBucket] = {}
        self._holds: list[Hold] = []

    def add(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def throttle_next(self, count: int, action: str = ANY_ACTION) -> FaultRule:
        return self.add(FaultRule(FaultKind.THROTTLE, action, count=count))

    def rate_limit(self, action: str, rate_per_s: float, burst: float) -> None:
        """Throttle ``action`` (or every action, each with its own bucket) like EC2."""
        with self._lock:
            self._buckets[action] = TokenBucket(rate_per_s, burst)

    def hold(self, action: str, *, skip: int = 0) -> Hold:
        """Hold the request of ``action`` that comes after ``skip`` others (see ``Hold``)."""
        hold = Hold(action, skip)
        with self._lock:
            self._holds.append(hold)
        return hold

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self._buckets.clear()
            holds, self._holds = self._holds, []
        for hold in holds:
            hold.release(proceed=False)

    def decide(self, action: str) -> Decision:
        """The fault for one request; blocks first if the request is held."""
        held = self._take_hold(action)
        if held is not None and not held._block():
            return Decision(error=internal())
        return self._decide(action)

    def _take_hold(self, action: str) -> Hold | None:
        with self._lock:
            for hold in self._holds:
                if hold.action != action:
                    continue
                if hold.skip:
                    hold.skip -= 1
                    return None
                self._holds.remove(hold)
                return hold
        return None

    def _decide(self, action: str) -> Decision:
        with self._lock:
            bucket = self._buckets.get(action)
            if bucket is None and ANY_ACTION in self._buckets:
                template = self._buckets[ANY_ACTION]
                bucket = self._buckets[action] = TokenBucket(template.rate_per_s, template.burst)
            if bucket is not None and not bucket.take(self._clock()):
                return Decision(error=throttled())
            latency = 0.0
            for rule in list(self._rules):
                if rule.action not in (ANY_ACTION, action):
                    continue
                if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                    continue
                if rule.count is not None:
                    rule.count -= 1
                    if rule.count == 0:
                        self._rules.remove(rule)
                if rule.kind is FaultKind.LATENCY:
                    latency += rule.latency_s
                    continue
                return Decision(latency_s=latency, error=_ERRORS[rule.kind]())
            return Decision(latency_s=latency)


class RequestLog:
    """Every EC2 request the emulator received, in order. Thread-safe."""

    def __init__(self, *, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []

    def record(self, action: str, error_code: str | None) -> None:
        with self._lock:
            self._records.append(RequestRecord(self._clock(), action, error_code))

    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def counts(self) -> Counter[str]:
        """Requests per action, failed ones included (a throttled call is still a call)."""
        with self._lock:
            return Counter(r.action for r in self._records)

    def count(self, action: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self._records if action in (None, r.action))

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
