"""``--prefixes-at-launch auto``: the agent's own warm plan decides."""

from __future__ import annotations

import pytest

from ipam.config import load_config
from ipam.instance_types import lookup
from ipam.nau.launch_auto import _steady, choose


def test_the_default_warm_target_releases_launch_prefixes_before_pods_arrive() -> None:
    # WARM_PREFIX_TARGET=1 alone: one prefix is too few once a pod lands, two are one too
    # many while none has: no launch count is steady, so auto pins them.
    own = load_config({}).warm_targets()
    slots = lookup("m5.large").max_prefixes_per_eni
    assert not any(_steady(own, n, 10, slots, 3) for n in range(1, slots + 1))
    choice = choose("m5.large", 10, {})
    assert (choice.prefixes, choice.env) == (1, {"MINIMUM_IP_TARGET": "16"})
    assert choice.addresses_per_node == 17


@pytest.mark.parametrize(
    ("pods", "env", "prefixes", "added"),
    [
        (15, {}, 1, {"MINIMUM_IP_TARGET": "16"}),  # one address stays free (implicit)
        (16, {}, 2, {"MINIMUM_IP_TARGET": "32"}),
        (30, {}, 2, {"MINIMUM_IP_TARGET": "32"}),
        (10, {"WARM_IP_TARGET": "16"}, 2, {"MINIMUM_IP_TARGET": "32"}),
        (10, {"MINIMUM_IP_TARGET": "32"}, 2, {}),  # the node's own settings hold
    ],
)
def test_fewest_prefixes_and_the_settings_that_keep_them(
    pods: int, env: dict[str, str], prefixes: int, added: dict[str, str]
) -> None:
    choice = choose("m5.large", pods, env)
    assert (choice.prefixes, choice.env) == (prefixes, added)


def test_no_choice_past_the_primary_enis_slots() -> None:
    with pytest.raises(ValueError, match="at most 9"):
        choose("m5.large", 9 * 16, {})
