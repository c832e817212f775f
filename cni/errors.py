"""Errors of the cni package, each carrying the CNI error code the runtime sees.

::

    UltranetError                       the root of every error ultranet raises on purpose
    └── CniError(code, msg, details)    answered as the spec's error JSON, exit code 1
        └── CheckFailed                 CHECK found state that differs from the ADD result

``UltranetError`` is defined here, in the lowest package, so that ``ipam`` (which imports
``cni``) and ``cni`` share one root without an import cycle.

Codes 1-99 are the spec's ("Error codes", CNI spec 1.1.0 §"Error"); 100+ are ours.
Every message names the environment variable, config key or object at fault, so the
kubelet event that carries it is enough to act on.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["CheckFailed", "CniError", "ErrorCode", "UltranetError"]


class UltranetError(Exception):
    """Root of every error ultranet raises on purpose."""


class ErrorCode(IntEnum):
    """CNI spec 1.1.0 well-known error codes, then ultranet's (>= 100)."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2  # the message names the key and its value
    UNKNOWN_CONTAINER = 3  # the runtime need not DEL
    INVALID_ENV = 4  # the message names the variable(s)
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_CONFIG = 7
    TRY_AGAIN_LATER = 11  # transient: the runtime retries
    NOT_AVAILABLE = 50  # STATUS: cannot serve ADD
    LIMITED_CONNECTIVITY = 51  # STATUS: and existing pods may be degraded
    PLUMBING_FAILED = 100  # a netlink step of the pod network failed (rolled back)
    IPAM_FAILED = 101  # the daemon's address store refused the request
    INTERFACE_EXISTS = 102  # CNI_IFNAME already exists in the pod namespace
    CHECK_FAILED = 103  # CHECK: the pod network differs from the ADD result
    GC_INCOMPLETE = 104  # GC: some stale attachments could not be removed
    INTERNAL = 999  # a bug of ours; libcni's ErrInternal


class CniError(UltranetError):
    """A failure answered to the runtime as ``{"code", "msg", "details"}``."""

    def __init__(self, code: ErrorCode, msg: str, details: str = "") -> None:
        super().__init__(f"[{int(code)}] {msg}" + (f": {details}" if details else ""))
        self.code = code
        self.msg = msg
        self.details = details


class CheckFailed(CniError):
    """CHECK: something the ADD made is missing or wrong; ``msg`` names it."""

    def __init__(self, msg: str, details: str = "") -> None:
        super().__init__(ErrorCode.CHECK_FAILED, msg, details)
