"""EC2's account-level API throttling: token buckets per action, as AWS documents them.

The numbers live in ``data/ec2-throttling.json``, taken from the EC2 Developer Guide page
"Request throttling for the Amazon EC2 API" (URL and retrieval date in the file). The
model, as the page states it:

* every request takes one token from its **action's** request bucket (limits apply to
  actions, not categories: ``DescribeSubnets`` and ``DescribeVpcs`` have a bucket each,
  both sized as non-mutating actions);
* the bucket's size comes from the action's own row when the page lists the action
  ("uncategorized"), else from its category: non-mutating (``Describe*``, ``List*``,
  ``Search*``, ``Get*``), resource-intensive (listed), or mutating (everything else);
* a few non-mutating actions (``DescribeInstances``, ``DescribeNetworkInterfaces``, ...)
  take from a smaller bucket of their own when sent with neither a filter nor
  pagination;
* ``RunInstances``, ``TerminateInstances``, ``StartInstances`` and ``StopInstances`` also
  take one token per instance from a resource bucket; either bucket empty refuses the
  request (``RequestLimitExceeded``) and takes nothing from the other;
* a bucket holds at most its capacity and refills at its rate, continuously.

Pure: the clock is passed in, so tests and the emulator decide what time it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from typing import Any

__all__ = [
    "AccountThrottle",
    "BucketSpec",
    "Category",
    "Limit",
    "ThrottleTable",
    "TokenBucket",
    "Verdict",
    "load_table",
]

DATA_FILE = "ec2-throttling.json"
NON_MUTATING_PREFIXES = ("Describe", "List", "Search", "Get")


class Category(StrEnum):
    NON_MUTATING = "non_mutating"
    UNFILTERED_NON_MUTATING = "unfiltered_non_mutating"
    MUTATING = "mutating"
    RESOURCE_INTENSIVE = "resource_intensive"
    UNCATEGORIZED = "uncategorized"  # the action has its own row in the page's table


@dataclass(frozen=True, slots=True)
class BucketSpec:
    capacity: float
    refill_per_s: float

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.refill_per_s <= 0:
            raise ValueError(
                f"a bucket needs capacity >= 1 and refill_per_s > 0, not "
                f"{self.capacity} and {self.refill_per_s}"
            )


@dataclass(frozen=True, slots=True)
class Limit:
    """The request bucket one request of an action draws from."""

    bucket: str  # the action, or "<action>/unfiltered" for the smaller bucket
    category: Category
    spec: BucketSpec


@dataclass(frozen=True, slots=True)
class ThrottleTable:
    source_url: str
    retrieved: str
    categories: Mapping[Category, BucketSpec]
    unfiltered_actions: frozenset[str]
    resource_intensive_actions: frozenset[str]
    uncategorized: Mapping[str, BucketSpec]
    resource_buckets: Mapping[str, BucketSpec]

    def limit(self, action: str, *, filtered_or_paginated: bool = True) -> Limit:
        """The request bucket ``action`` draws from; the category says why."""
        if action in self.uncategorized:
            return Limit(action, Category.UNCATEGORIZED, self.uncategorized[action])
        if action in self.unfiltered_actions and not filtered_or_paginated:
            category = Category.UNFILTERED_NON_MUTATING
            return Limit(f"{action}/unfiltered", category, self.categories[category])
        if action in self.resource_intensive_actions:
            category = Category.RESOURCE_INTENSIVE
        elif action.startswith(NON_MUTATING_PREFIXES):
            category = Category.NON_MUTATING
        else:
            category = Category.MUTATING
        return Limit(action, category, self.categories[category])

    def with_buckets(self, overrides: Mapping[str, BucketSpec]) -> ThrottleTable:
        """Some actions given buckets of their own (an account's raised or lowered limits)."""
        if not overrides:
            return self
        return ThrottleTable(
            self.source_url,
            self.retrieved,
            self.categories,
            self.unfiltered_actions,
            self.resource_intensive_actions,
            {**self.uncategorized, **overrides},
            self.resource_buckets,
        )

    def scaled(self, factor: float) -> ThrottleTable:
        """Every refill rate times ``factor`` (an account with raised limits, or a tighter
        one for a test); capacities unchanged."""
        if factor <= 0:
            raise ValueError(f"the refill factor must be > 0, not {factor}")

        def scale(spec: BucketSpec) -> BucketSpec:
            return BucketSpec(spec.capacity, spec.refill_per_s * factor)

        return ThrottleTable(
            self.source_url,
            self.retrieved,
            {c: scale(s) for c, s in self.categories.items()},
            self.unfiltered_actions,
            self.resource_intensive_actions,
            {a: scale(s) for a, s in self.uncategorized.items()},
            {a: scale(s) for a, s in self.resource_buckets.items()},
        )


def _spec(raw: Mapping[str, Any], where: str) -> BucketSpec:
    try:
        return BucketSpec(float(raw["capacity"]), float(raw["refill_per_s"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{DATA_FILE}: {where}: {err}") from err


def parse_table(doc: Mapping[str, Any]) -> ThrottleTable:
    categories: dict[Category, BucketSpec] = {
        c: _spec(doc["categories"][c.value], f"categories.{c.value}")
        for c in Category
        if c is not Category.UNCATEGORIZED
    }
    return ThrottleTable(
        source_url=str(doc["source"]["url"]),
        retrieved=str(doc["source"]["retrieved"]),
        categories=categories,
        unfiltered_actions=frozenset(doc["unfiltered_non_mutating_actions"]),
        resource_intensive_actions=frozenset(doc["resource_intensive_actions"]),
        uncategorized={a: _spec(r, f"uncategorized.{a}") for a, r in doc["uncategorized"].items()},
        resource_buckets={
            a: _spec(r, f"resource_buckets.{a}") for a, r in doc["resource_buckets"].items()
        },
    )


def load_table() -> ThrottleTable:
    """The shipped table (``ipam/nau/data/ec2-throttling.json``)."""
    text = resources.files("ipam.nau").joinpath("data", DATA_FILE).read_text()
    return parse_table(json.loads(text))


@dataclass(slots=True)
class TokenBucket:
    """``capacity`` tokens, refilled continuously at ``refill_per_s``; starts full."""

    spec: BucketSpec
    tokens: float = field(init=False)
    updated: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tokens = self.spec.capacity

    def refill(self, now: float) -> None:
        if self.updated is not None and now > self.updated:
            gained = (now - self.updated) * self.spec.refill_per_s
            self.tokens = min(self.spec.capacity, self.tokens + gained)
        if self.updated is None or now > self.updated:
            self.updated = now

    def can_take(self, now: float, count: float = 1.0) -> bool:
        self.refill(now)
        return self.tokens >= count

    def take(self, now: float, count: float = 1.0) -> bool:
        """Take ``count`` tokens if the bucket holds them; all or nothing."""
        if not self.can_take(now, count):
            return False
        self.tokens -= count
        return True


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    limit: Limit
    refused_by: str | None = None  # the bucket that was empty: request or resource


class AccountThrottle:
    """One account's buckets in one Region, created on first use. Not thread-safe: the
    caller serialises (the emulator holds a lock around ``admit``)."""

    def __init__(self, table: ThrottleTable, clock: Callable[[], float]) -> None:
        self.table = table
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def _bucket(self, name: str, spec: BucketSpec) -> TokenBucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = TokenBucket(spec)
        return bucket

    def admit(
        self, action: str, *, filtered_or_paginated: bool = True, resources: int = 0
    ) -> Verdict:
        """Take the request's token (and ``resources`` resource tokens), or refuse."""
        now = self._clock()
        limit = self.table.limit(action, filtered_or_paginated=filtered_or_paginated)
        request = self._bucket(limit.bucket, limit.spec)
        resource_spec = self.table.resource_buckets.get(action) if resources > 0 else None
        resource = None
        if resource_spec is not None:
            resource = self._bucket(f"{action}/resources", resource_spec)
        if not request.can_take(now):
            return Verdict(False, limit, "request")
        if resource is not None and not resource.can_take(now, resources):
            return Verdict(False, limit, "resource")
        request.take(now)
        if resource is not None:
            resource.take(now, resources)
        return Verdict(True, limit)

    def tokens(self, bucket: str) -> float | None:
        """Tokens in a bucket as of now (None: never used, so full)."""
        found = self._buckets.get(bucket)
        if found is None:
            return None
        found.refill(self._clock())
        return found.tokens
