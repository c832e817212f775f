"""Warm-pool arithmetic for one network card: how many /28 prefixes to add or give back.

Pure logic, no I/O: the daemon measures a card into a :class:`CardUsage`, calls
:func:`plan`, and performs the :class:`Plan` (AssignPrivateIpAddresses with
``Ipv4PrefixCount`` on existing ENIs first, then CreateNetworkInterface for ``new_enis``;
UnassignPrivateIpAddresses with ``Ipv4Prefixes`` for releases).

The rules are the VPC CNI's prefix-delegation rules (``aws/amazon-vpc-cni-k8s``:
``pkg/ipamd/ipamd.go``, ``docs/prefix-and-ip-target.md``), with the knobs meaning what they
mean there:

* ``WARM_IP_TARGET`` or ``MINIMUM_IP_TARGET`` set (non-zero) overrides
  ``WARM_PREFIX_TARGET``, as in ``isDatastorePoolTooLow``/``datastoreTargetState``;
* otherwise ``WARM_PREFIX_TARGET`` free prefixes' worth of addresses are kept, as in
  ``isDatastorePoolTooLow`` and ``datastorePrefixTargetState``.

Deliberate differences, each marked "VPC CNI:" where it applies:

1. Addresses in ``IP_COOLDOWN_PERIOD`` count as *used* when sizing the pool:
   ``available = 16 * prefixes - assigned - cooldown``. The VPC CNI counts them as
   available (``AvailableAddresses() = Total - Assigned``), so during churn the pool looks
   warm while every free address is still cooling down and pods wait up to 30 s
   (aws/amazon-vpc-cni-k8s #1700, #2896).
2. Only prefixes with neither assigned nor cooling-down addresses are released. The VPC
   CNI's ``FindFreeableCidrs`` ignores cooldown, handing addresses back to EC2 while
   kube-proxy may still route to them.
3. ``MAX_PODS`` caps growth on the addresses that can hold pods (``total - cooldown``),
   not on ``total`` as ``isDatastorePoolTooLow`` does, for the same reason as (1).
4. With ``MINIMUM_IP_TARGET`` set and ``WARM_IP_TARGET`` unset, a full pool still grows
   by one prefix (as if ``WARM_IP_TARGET=1``). The VPC CNI's ``short`` is 0 there once
   ``total >= MINIMUM_IP_TARGET``, so pod ADDs fail on a full pool; this mirrors its own
   ``WARM_PREFIX_TARGET=0`` rule (``available == 0`` is too low).
5. Releases never go below what the add rule keeps, so add and release never chase each
   other (with ``WARM_PREFIX_TARGET=0`` the VPC CNI frees the prefix it just added to
   keep one address free).
6. The whole shortfall is planned at once, with the ENIs it needs; the VPC CNI adds one
   ENI's worth per 5 s loop.

The VPC CNI hard-codes ``WARM_IP_TARGET=1``/``MINIMUM_IP_TARGET=1`` for network cards
other than 0; which targets a card gets is the caller's choice (pass them in
:class:`WarmTargets`). ``max_pods`` is node-wide: the caller decides how it applies to
cards other than 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

IPS_PER_PREFIX = 16  # a /28; the VPC CNI's GetPrefixDelegationDefaults


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_non_negative(obj: DataclassInstance) -> None:
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is not None and value < 0:
            raise ValueError(f"{type(obj).__name__}.{f.name}={value}: must not be negative")


@dataclass(frozen=True, slots=True)
class CardUsage:
    """What one network card holds right now."""

    assigned: int  # addresses held by pods
    cooldown: int  # released addresses still in IP_COOLDOWN_PERIOD
    prefixes: int  # /28 prefixes held on this card
    releasable_prefixes: int  # prefixes with no assigned and no cooldown address
    slots_free: int  # prefix slots still free on this card's existing ENIs
    enis: int  # ENIs used for pod addresses on this card
    max_enis: int  # ENIs this card may hold (instance limit, MAX_ENI applied by caller)
    slots_per_eni: int  # prefixes a new ENI can hold (Ipv4AddressesPerInterface - 1)

    def __post_init__(self) -> None:
        _check_non_negative(self)
        if self.used > self.total:
            raise ValueError(
                f"CardUsage: assigned+cooldown={self.used} exceeds {self.prefixes} prefixes"
                f" ({self.total} addresses)"
            )
        # Every prefix that is not releasable holds at least one used address, and every
        # releasable one holds sixteen unused ones.
        low = max(0, self.prefixes - self.used)
        high = min(self.prefixes, self.available // IPS_PER_PREFIX)
        if not low <= self.releasable_prefixes <= high:
            raise ValueError(
                f"CardUsage.releasable_prefixes={self.releasable_prefixes}: must be in"
                f" [{low}, {high}] for {self.prefixes} prefixes and {self.used} used addresses"
            )

    @property
    def total(self) -> int:
        return IPS_PER_PREFIX * self.prefixes

    @property
    def used(self) -> int:
        """Addresses a new pod cannot have now: assigned or cooling down (difference 1)."""
        return self.assigned + self.cooldown

    @property
    def available(self) -> int:
        return self.total - self.used

    @property
    def capacity(self) -> int:
        """Prefixes that can still be added: free slots plus the ENIs still allowed."""
        return self.slots_free + max(0, self.max_enis - self.enis) * self.slots_per_eni


@dataclass(frozen=True, slots=True)
class WarmTargets:
    """The knobs, as in ``ipam.config``: ``None`` or 0 means unset for the IP targets."""

    warm_prefix_target: int
    warm_ip_target: int | None = None
    minimum_ip_target: int | None = None
    max_pods: int | None = None

    def __post_init__(self) -> None:
        _check_non_negative(self)

    @property
    def ip_targets_set(self) -> bool:
        """Either IP target overrides WARM_PREFIX_TARGET (VPC CNI: warmIPTargetsDefined)."""
        return bool(self.warm_ip_target) or bool(self.minimum_ip_target)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do on this card now; never both an add and a release."""

    add_prefixes: int  # to assign (0 if none)
    new_enis: int  # ENIs to create for them (each holding up to slots_per_eni)
    release_prefixes: int  # releasable prefixes to give back
    reason: str  # one line for logs and introspection
    capped: bool = False  # ENI capacity held add_prefixes below what the targets ask


@dataclass(frozen=True, slots=True)
class _State:
    short: int  # prefixes to add to meet the targets
    over: int  # prefixes that may be released without falling short
    why: str  # why short, or why over, or why neither


def plan(usage: CardUsage, targets: WarmTargets) -> Plan:
    """The next action for this card; see the module docstring for the rules."""
    if targets.ip_targets_set:
        state = _ip_target_state(usage, targets)
    else:
        state = _prefix_target_state(usage, targets.warm_prefix_target)
    if state.short > 0:
        return _grow(usage, targets, state)
    if state.over > 0:
        return Plan(0, 0, state.over, state.why)
    return Plan(0, 0, 0, state.why)


def _free(usage: CardUsage) -> str:
    if usage.cooldown:
        return f"free {usage.available} ({usage.cooldown} in cooldown)"
    return f"free {usage.available}"


def _ip_target_state(usage: CardUsage, targets: WarmTargets) -> _State:
    """VPC CNI ``datastoreTargetState`` in prefix mode, with differences 1, 2 and 4.

    ``short = max(WARM_IP - available, MIN_IP - total, 0)`` addresses, i.e.
    ``ceil(short / 16)`` prefixes. ``over = min(releasable, prefixes -
    ceil((assigned + cooldown + WARM_IP) / 16), prefixes - ceil(MIN_IP / 16))`` clamped at
    0 (VPC CNI: ``freePrefixes`` ignores cooldown and the warm term uses ``assigned``
    alone). Releasing ``over`` keeps both ``short`` terms at 0, so the two never chase.
    """
    warm_ip = targets.warm_ip_target or 0
    min_ip = targets.minimum_ip_target or 0
    knobs = f"WARM_IP_TARGET={warm_ip or 'unset'}, MINIMUM_IP_TARGET={min_ip or 'unset'}"
    implicit = ""
    if warm_ip == 0:
        warm_ip = 1  # difference 4: a full pool must still grow
        implicit = "; WARM_IP_TARGET unset keeps one address free"
    warm_short = warm_ip - usage.available
    min_short = min_ip - usage.total
    short = max(warm_short, min_short, 0)
    if short > 0:
        if warm_short >= min_short:
            why = f"{_free(usage)} < warm target {warm_ip} ({knobs}{implicit})"
        else:
            why = f"total {usage.total} < minimum {min_ip} ({knobs})"
        return _State(_ceil_div(short, IPS_PER_PREFIX), 0, why)
    need_warm = _ceil_div(usage.used + warm_ip, IPS_PER_PREFIX)
    need_min = _ceil_div(min_ip, IPS_PER_PREFIX)
    over = max(0, min(usage.releasable_prefixes, usage.prefixes - max(need_warm, need_min)))
    if over > 0:
        why = (
            f"{over} of {usage.releasable_prefixes} releasable prefixes beyond the"
            f" {max(need_warm, need_min)} needed ({_free(usage)}, total {usage.total}; {knobs})"
        )
    else:
        why = f"at target ({_free(usage)}, total {usage.total}; {knobs})"
    return _State(0, over, why)


def _prefix_too_low(available: int, target: int) -> bool:
    """VPC CNI ``isDatastorePoolTooLow`` without IP targets (prefix mode)."""
    return available < IPS_PER_PREFIX * target or (target == 0 and available == 0)


def _prefix_target_state(usage: CardUsage, target: int) -> _State:
    """VPC CNI ``isDatastorePoolTooLow`` / ``getPrefixesNeeded`` / ``isDatastorePoolTooHigh``.

    Too low when ``available < 16 * WARM_PREFIX_TARGET``, or when the target is 0 and
    ``available == 0`` (difference 1 applies to ``available``). Then add
    ``max(1, WARM_PREFIX_TARGET - releasable)`` prefixes (VPC CNI ``getPrefixesNeeded``
    with ``GetFreePrefixes``, which ignores cooldown). Release ``releasable -
    WARM_PREFIX_TARGET`` (VPC CNI: ``freePrefixes > warmPrefixTarget``), minus one if that
    would leave target 0 with no free address (difference 5).
    """
    knob = f"WARM_PREFIX_TARGET={target}"
    if _prefix_too_low(usage.available, target):
        short = max(1, target - usage.releasable_prefixes)
        if target == 0:
            why = f"{_free(usage)}, {knob} keeps at least one address free"
        else:
            why = f"{_free(usage)} < {IPS_PER_PREFIX * target} ({knob})"
        return _State(short, 0, why)
    over = max(0, usage.releasable_prefixes - target)
    if over and _prefix_too_low(usage.available - IPS_PER_PREFIX * over, target):
        over -= 1
    if over > 0:
        why = f"{usage.releasable_prefixes} releasable prefixes > {knob} ({_free(usage)})"
    else:
        why = f"at target ({_free(usage)}, {usage.releasable_prefixes} releasable; {knob})"
    return _State(0, over, why)


def _grow(usage: CardUsage, targets: WarmTargets, state: _State) -> Plan:
    """Cap the shortfall by MAX_PODS, then by ENI capacity, and count the new ENIs.

    VPC CNI: growth stops once ``TotalIPs >= maxPods``; here once ``total - cooldown >=
    max_pods`` (difference 3), and the add is also cut to what reaches it. New ENIs are
    needed for what the existing ENIs' free slots cannot hold (VPC CNI
    ``tryAssignPrefixes`` then ``tryAllocateENI``).
    """
    add, why = state.short, state.why
    if targets.max_pods is not None:
        pod_room = targets.max_pods - (usage.total - usage.cooldown)
        if pod_room <= 0:
            return Plan(0, 0, 0, f"{why}, but at MAX_PODS={targets.max_pods}")
        if add > _ceil_div(pod_room, IPS_PER_PREFIX):
            add = _ceil_div(pod_room, IPS_PER_PREFIX)
            why = f"{why}; {add} reach MAX_PODS={targets.max_pods}"
    capped = add > usage.capacity
    if capped:
        add = usage.capacity
        why = (
            f"{why}; capped at {add} by ENI capacity ({usage.slots_free} free slots,"
            f" {usage.enis}/{usage.max_enis} ENIs, {usage.slots_per_eni} prefixes per ENI)"
        )
    overflow = max(0, add - usage.slots_free)
    new_enis = _ceil_div(overflow, usage.slots_per_eni) if overflow else 0
    return Plan(add, new_enis, 0, why, capped)
