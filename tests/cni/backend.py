"""The lab's ENIs as the in-process backend's pool (``tools.lab.pool_backend``)."""

from __future__ import annotations

from ipam.pool import AddressPool
from tools.lab.lab import Lab
from tools.lab.pool_backend import PoolBackend, pool_from_enis

__all__ = ["PoolBackend", "pool_from_lab"]


def pool_from_lab(lab: Lab) -> AddressPool:
    return pool_from_enis(lab.cloud.eni_view(e.eni_id) for e in lab.cloud.enis_of(lab.instance_id))
