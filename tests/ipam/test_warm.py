"""Warm-pool arithmetic: the VPC CNI's prefix-mode rules, with cooldown counted as used."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from ipam.warm import IPS_PER_PREFIX, CardUsage, Plan, WarmTargets, plan


def card(
    assigned: int = 0,
    cooldown: int = 0,
    prefixes: int = 0,
    releasable: int | None = None,
    slots_free: int | None = None,
    enis: int = 1,
    max_enis: int = 4,
    slots_per_eni: int = 14,
) -> CardUsage:
    """A card; by default pods are packed (releasable is as high as it can be) and every
    prefix sits on the existing ENIs."""
    if releasable is None:
        releasable = min(prefixes, (IPS_PER_PREFIX * prefixes - assigned - cooldown) // 16)
    if slots_free is None:
        slots_free = max(0, enis * slots_per_eni - prefixes)
    return CardUsage(
        assigned, cooldown, prefixes, releasable, slots_free, enis, max_enis, slots_per_eni
    )


def targets(
    wpt: int = 1, wip: int | None = None, mip: int | None = None, max_pods: int | None = None
) -> WarmTargets:
    return WarmTargets(wpt, wip, mip, max_pods)


# (id, usage, targets, (add_prefixes, new_enis, release_prefixes), reason substring)
CASES: list[tuple[str, CardUsage, WarmTargets, tuple[int, int, int], str]] = [
    # WARM_PREFIX_TARGET alone (VPC CNI isDatastorePoolTooLow / getPrefixesNeeded)
    ("fresh node, target 1", card(), targets(), (1, 0, 0), "free 0 < 16 (WARM_PREFIX_TARGET=1)"),
    ("1 pod on 1 prefix", card(1, prefixes=1), targets(), (1, 0, 0), "free 15 < 16"),
    ("15 pods on 1 prefix", card(15, prefixes=1), targets(), (1, 0, 0), "free 1 < 16"),
    ("16 pods on 1 prefix", card(16, prefixes=1), targets(), (1, 0, 0), "free 0 < 16"),
    ("1 pod on 2 prefixes", card(1, prefixes=2), targets(), (0, 0, 0), "at target"),
    (
        "spread pods keep the pool warm",
        card(3, prefixes=3, releasable=0),
        targets(wpt=2),
        (0, 0, 0),
        "at target",
    ),
    ("fresh node, target 3", card(), targets(wpt=3), (3, 0, 0), "WARM_PREFIX_TARGET=3"),
    (
        "target 3, partly used",
        card(40, prefixes=3, releasable=0),
        targets(wpt=3),
        (3, 0, 0),
        "free 8 < 48",
    ),
    # Difference 1: cooldown counts as used. VPC CNI: available = 32 - 16 = 16, not low.
    (
        "cooldown counted as used",
        card(16, cooldown=10, prefixes=2, releasable=0),
        targets(),
        (1, 0, 0),
        "free 6 (10 in cooldown) < 16",
    ),
    # Release beyond the target (VPC CNI isDatastorePoolTooHigh), releasable prefixes only.
    (
        "release beyond target",
        card(10, prefixes=5),
        targets(),
        (0, 0, 3),
        "4 releasable prefixes > WARM_PREFIX_TARGET=1",
    ),
    # Difference 2: the prefix holding cooldown addresses is kept. VPC CNI: 2 free > 1.
    (
        "no release of a prefix with cooldown addresses",
        card(10, cooldown=5, prefixes=3, releasable=1),
        targets(),
        (0, 0, 0),
        "at target",
    ),
    # Target 0: low only when nothing is free (VPC CNI `warmTarget == 0 && available == 0`).
    ("target 0, fresh node", card(), targets(wpt=0), (1, 0, 0), "keeps at least one address"),
    ("target 0, full prefix", card(16, prefixes=1), targets(wpt=0), (1, 0, 0), "free 0"),
    ("target 0, one free address", card(15, prefixes=1), targets(wpt=0), (0, 0, 0), "at target"),
    # Difference 5: the last free prefix is kept rather than freed and re-added.
    ("target 0 keeps one free", card(16, prefixes=2), targets(wpt=0), (0, 0, 0), "at target"),
    ("target 0 frees the rest", card(16, prefixes=4), targets(wpt=0), (0, 0, 2), "releasable"),
    # WARM_IP_TARGET / MINIMUM_IP_TARGET override WARM_PREFIX_TARGET (datastoreTargetState).
    (
        "WARM_IP_TARGET=5 overrides the prefix target",
        card(10, prefixes=1),
        targets(wip=5),
        (0, 0, 0),
        "at target",
    ),
    (
        "WARM_IP_TARGET=5 short",
        card(12, prefixes=1),
        targets(wip=5),
        (1, 0, 0),
        "free 4 < warm target 5",
    ),
    (
        "WARM_IP_TARGET=16",
        card(13, prefixes=1),
        targets(wip=16),
        (1, 0, 0),
        "free 3 < warm target 16 (WARM_IP_TARGET=16",
    ),
    ("WARM_IP_TARGET=40 fresh", card(), targets(wip=40), (3, 0, 0), "warm target 40"),
    (
        "MINIMUM_IP_TARGET=100",
        card(),
        targets(mip=100),
        (7, 0, 0),
        "total 0 < minimum 100 (WARM_IP_TARGET=unset, MINIMUM_IP_TARGET=100)",
    ),
    (
        "MINIMUM_IP_TARGET=100 satisfied",
        card(3, prefixes=7),
        targets(wpt=5, mip=100),
        (0, 0, 0),
        "at target",
    ),
    # Difference 4: MINIMUM_IP_TARGET alone still grows a full pool.
    (
        "MINIMUM_IP_TARGET alone, full pool",
        card(16, prefixes=1),
        targets(mip=16),
        (1, 0, 0),
        "keeps one address free",
    ),
    ("WARM_IP_TARGET=0 means unset", card(), targets(wpt=2, wip=0), (2, 0, 0), "PREFIX_TARGET=2"),
    (
        "release beyond WARM_IP_TARGET",
        card(3, prefixes=4),
        targets(wip=5),
        (0, 0, 3),
        "3 of 3 releasable prefixes beyond the 1 needed",
    ),
    (
        "MINIMUM_IP_TARGET floors the release",
        card(3, prefixes=6),
        targets(wip=5, mip=64),
        (0, 0, 2),
        "beyond the 4 needed",
    ),
    # Difference 2 with IP targets. VPC CNI: freePrefixes 2, over = min(2, 3 - 1) = 2.
    (
        "WARM_IP_TARGET keeps prefixes holding cooldown addresses",
        card(10, cooldown=2, prefixes=3, releasable=0),
        targets(wip=5),
        (0, 0, 0),
        "at target",
    ),
    (
        "cooldown-sized WARM_IP_TARGET release",
        card(10, cooldown=3, prefixes=4, releasable=2),
        targets(wip=5),
        (0, 0, 2),
        "beyond the 2 needed",
    ),
    # MAX_PODS (VPC CNI: never low while TotalIPs >= maxPods).
    (
        "at max pods",
        card(20, prefixes=2),
        targets(max_pods=32),
        (0, 0, 0),
        "but at MAX_PODS=32",
    ),
    (
        "max pods cuts the add",
        card(),
        targets(mip=100, max_pods=50),
        (4, 0, 0),
        "4 reach MAX_PODS=50",
    ),
    # Difference 3: cooldown addresses cannot hold pods. VPC CNI: total 32 >= 32, no add.
    (
        "max pods counts cooldown as unusable",
        card(30, cooldown=2, prefixes=2, releasable=0),
        targets(max_pods=32),
        (1, 0, 0),
        "free 0 (2 in cooldown)",
    ),
    # ENI capacity: existing slots first, then new ENIs (tryAssignPrefixes, tryAllocateENI).
    (
        "no free slot needs a new ENI",
        card(224, prefixes=14, slots_free=0),
        targets(),
        (1, 1, 0),
        "free 0 < 16",
    ),
    (
        "MINIMUM_IP_TARGET over small ENIs",
        card(slots_per_eni=3, max_enis=3),
        targets(mip=100),
        (7, 2, 0),
        "minimum 100",
    ),
    (
        "ENI capacity cap",
        card(prefixes=3, slots_free=0, max_enis=2, slots_per_eni=3),
        targets(mip=100),
        (3, 1, 0),
        "capped at 3 by ENI capacity (0 free slots, 1/2 ENIs, 3 prefixes per ENI)",
    ),
    (
        "no capacity at all",
        card(48, prefixes=3, slots_free=0, max_enis=1, slots_per_eni=3),
        targets(),
        (0, 0, 0),
        "capped at 0 by ENI capacity",
    ),
    (
        "MAX_ENI below the ENIs in use leaves only free slots",
        card(16, prefixes=1, slots_free=2, enis=3, max_enis=2, slots_per_eni=3),
        targets(wip=60),
        (2, 0, 0),
        "capped at 2",
    ),
    ("card with no ENI yet", card(enis=0, max_enis=2), targets(mip=1), (1, 1, 0), "TARGET=1"),
]


@pytest.mark.parametrize(
    ("usage", "warm", "expected", "reason"),
    [pytest.param(u, t, e, r, id=i) for i, u, t, e, r in CASES],
)
def test_plan(usage: CardUsage, warm: WarmTargets, expected: tuple[int, ...], reason: str) -> None:
    got = plan(usage, warm)
    assert (got.add_prefixes, got.new_enis, got.release_prefixes) == expected
    assert reason in got.reason
    assert got.capped == ("capped" in got.reason)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"assigned": -1}, "CardUsage.assigned=-1: must not be negative"),
        ({"assigned": 17, "prefixes": 1, "releasable": 0}, "exceeds 1 prefixes"),
        ({"assigned": 1, "prefixes": 1, "releasable": 1}, "releasable_prefixes=1: must be in"),
        ({"assigned": 1, "prefixes": 3, "releasable": 0}, "must be in [2, 2]"),
        ({"slots_free": -1}, "CardUsage.slots_free=-1"),
    ],
)
def test_card_usage_rejects_impossible_counts(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        card(**kwargs)
    assert message in str(info.value)


def test_warm_targets_reject_negative() -> None:
    with pytest.raises(ValueError, match="WarmTargets.warm_ip_target=-1"):
        WarmTargets(1, -1)


def _random_case(rng: random.Random) -> tuple[CardUsage, WarmTargets]:
    slots_per_eni = rng.choice([0, 1, 3, 9, 14, 14, 49, 49])
    max_enis = rng.randint(0, 15)
    enis = rng.randint(0, max_enis + 1)  # +1: MAX_ENI lowered below what is in use
    prefixes = rng.randint(0, min(20, enis * slots_per_eni))
    slots_free = max(0, enis * slots_per_eni - prefixes)
    if rng.random() < 0.3:  # some slots taken by secondary addresses or other users
        slots_free = rng.randint(0, slots_free)
    assigned = rng.randint(0, 16 * prefixes)
    cooldown = rng.randint(0, 16 * prefixes - assigned)
    used = assigned + cooldown
    releasable = rng.randint(max(0, prefixes - used), (16 * prefixes - used) // 16)
    usage = CardUsage(
        assigned, cooldown, prefixes, releasable, slots_free, enis, max_enis, slots_per_eni
    )
    warm = WarmTargets(
        rng.randint(0, 4),
        rng.choice([None, 0, rng.randint(1, 40)]),
        rng.choice([None, 0, rng.randint(1, 200)]),
        rng.choice([None, rng.randint(1, 300)]),
    )
    return usage, warm


def _after(usage: CardUsage, step: Plan) -> CardUsage:
    """The card once the plan has been carried out."""
    added = step.add_prefixes - step.release_prefixes
    return replace(
        usage,
        prefixes=usage.prefixes + added,
        releasable_prefixes=usage.releasable_prefixes + added,
        slots_free=usage.slots_free + step.new_enis * usage.slots_per_eni - added,
        enis=usage.enis + step.new_enis,
    )


def test_random_grid_properties() -> None:
    rng = random.Random(20260820)
    seen = {"add": 0, "release": 0, "capped": 0, "steady": 0}
    for _ in range(5000):
        usage, warm = _random_case(rng)
        step = plan(usage, warm)
        case = f"{usage} {warm} -> {step}"
        seen["add"] += step.add_prefixes > 0 and not step.capped
        seen["release"] += step.release_prefixes > 0
        seen["capped"] += step.capped
        seen["steady"] += step == Plan(0, 0, 0, step.reason)
        assert not (step.add_prefixes and step.release_prefixes), case
        assert 0 <= step.release_prefixes <= usage.releasable_prefixes, case
        assert 0 <= step.add_prefixes <= usage.capacity, case
        assert step.new_enis <= max(0, usage.max_enis - usage.enis), case
        if warm.max_pods is not None and step.add_prefixes:
            room = warm.max_pods - (usage.total - usage.cooldown)
            assert 0 < room and 16 * (step.add_prefixes - 1) < room, case
        after = _after(usage, step)  # validates slots_free >= 0 and the releasable bounds
        again = plan(after, warm)
        if not step.capped:
            assert again.add_prefixes == 0, f"{case} then {again}"
        assert again.release_prefixes == 0, f"{case} then {again}"
    assert min(seen.values()) >= 500, seen  # the grid exercises every branch


def test_converges_from_a_fresh_node_through_pod_churn() -> None:
    """Pods come and go; each plan is carried out; the pool never chases itself."""
    rng = random.Random(7)
    warm = WarmTargets(1, None, None, 110)
    usage = card()
    for _ in range(300):
        step = plan(usage, warm)
        usage = _after(usage, step)
        assert plan(usage, warm).add_prefixes == 0 or step.capped
        pods = max(0, min(usage.assigned + rng.randint(-8, 8), usage.total - usage.cooldown))
        usage = card(pods, prefixes=usage.prefixes, slots_free=usage.slots_free, enis=usage.enis)
    assert usage.total - usage.cooldown >= min(110, usage.assigned)
