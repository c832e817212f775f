"""``--prefixes-at-launch auto``: the launch template and warm settings for 0 EC2 calls.

A node makes no EC2 call from start until its pods run when, at every step, the agent's
own warm plan (``ipam.warm.plan``, what ``NodeAgent`` runs on each pool pass) neither
adds a prefix nor releases one: on the launch prefixes alone, with 0 pods (just Ready,
pods not yet scheduled, however long that takes) and with every pod count up to the
node's. This searches the fewest /28s on the primary ENI that hold, first with the
node's own warm settings, then with ``MINIMUM_IP_TARGET`` set to the launch addresses
(which stops the release of launch prefixes the warm target does not need yet).

Assumes pods take addresses prefix by prefix (the pool fills a prefix before the next),
so ``releasable_prefixes = prefixes - ceil(pods / 16)``; no cooldown (no pod leaves).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ipam.config import load_config
from ipam.instance_types import lookup
from ipam.warm import IPS_PER_PREFIX, CardUsage, WarmTargets, plan


@dataclass(frozen=True, slots=True)
class AutoChoice:
    prefixes: int  # /28s on the primary ENI at launch (Ipv4PrefixCount)
    env: dict[str, str]  # warm settings to add to the node's (empty: its own hold)
    addresses_per_node: int  # the primary's address and the prefixes', from the subnet

    def describe(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.env.items()) or "the node's own"
        return f"{self.prefixes} prefixes at launch, warm settings: {settings}"


def _steady(targets: WarmTargets, prefixes: int, pods: int, slots: int, max_enis: int) -> bool:
    for assigned in range(pods + 1):
        held = math.ceil(assigned / IPS_PER_PREFIX)
        usage = CardUsage(
            assigned=assigned,
            cooldown=0,
            prefixes=prefixes,
            releasable_prefixes=prefixes - held,
            slots_free=slots - prefixes,
            enis=1,
            max_enis=max_enis,
            slots_per_eni=slots,
        )
        step = plan(usage, targets)
        if step.add_prefixes or step.release_prefixes:
            return False
    return True


def choose(instance_type: str, pods_per_node: int, env: Mapping[str, str]) -> AutoChoice:
    """The fewest launch prefixes (and the settings) with which no step calls EC2."""
    itype = lookup(instance_type)
    slots = itype.max_prefixes_per_eni
    max_enis = itype.card(0).max_interfaces
    own = load_config(dict(env)).warm_targets()
    for prefixes in range(1, slots + 1):
        candidates: list[tuple[WarmTargets, dict[str, str]]] = [(own, {})]
        if not own.minimum_ip_target:
            keep = prefixes * IPS_PER_PREFIX
            pinned = WarmTargets(own.warm_prefix_target, own.warm_ip_target, keep, own.max_pods)
            candidates.append((pinned, {"MINIMUM_IP_TARGET": str(keep)}))
        for targets, extra in candidates:
            if _steady(targets, prefixes, pods_per_node, slots, max_enis):
                return AutoChoice(prefixes, extra, 1 + prefixes * IPS_PER_PREFIX)
    raise ValueError(
        f"no prefix count on the primary ENI of a {instance_type} (at most {slots}) holds "
        f"{pods_per_node} pods without EC2 calls under these warm settings"
    )
