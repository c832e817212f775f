"""Errors of the DNS cache.

::

    DnscacheError
    ├── ConfigError(field, value, reason)   configuration rejected at parse time
    ├── WireError(message, rcode)           a malformed or unsupported message
    │   └── OptNotLast                      a response whose OPT is not the last record
    ├── UpstreamError(upstream, reason)     one upstream attempt failed (timeout, refused...)
    └── NodeLocalError(step, reason)        the node-local interface or its rules failed
"""

from __future__ import annotations


class DnscacheError(Exception):
    """Root of the DNS cache's errors."""


class ConfigError(DnscacheError):
    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(f"config {field}={value!r}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason


class WireError(DnscacheError):
    """``rcode`` is what to answer (None: drop the message unanswered)."""

    def __init__(self, message: str, rcode: int | None = 1) -> None:
        super().__init__(message)
        self.rcode = rcode


class OptNotLast(WireError):
    """The OPT record is followed by others: it cannot be cut out by offset."""


class UpstreamError(DnscacheError):
    def __init__(self, upstream: str, reason: str) -> None:
        super().__init__(f"upstream {upstream}: {reason}")
        self.upstream = upstream
        self.reason = reason


class NodeLocalError(DnscacheError):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"node-local {step}: {reason}")
        self.step = step
        self.reason = reason
