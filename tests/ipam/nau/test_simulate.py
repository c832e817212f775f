"""simulate end to end: launches and churn through the shared /28 allocator."""

from __future__ import annotations

import json
from typing import Any

import pytest

import ipam.nau.simulate as simulate_module
import ipam.nau.subnet_space
from ipam.nau.budget import evaluate
from ipam.nau.cli import main
from ipam.nau.model import parse_plan
from ipam.nau.simulate import simulate


def tight_plan(nodes: int = 2_000, **kw: Any) -> Any:
    return parse_plan(
        {
            "azs": 1,
            "node_groups": [{"instance_type": "m5.large", "nodes": nodes, "pods_per_node": 12}],
        }
        | kw
    )


def test_simulate_uses_the_allocator_the_emulator_uses() -> None:
    assert simulate_module.SubnetSpace is ipam.nau.subnet_space.SubnetSpace


def test_reservations_keep_a_full_layout_free_of_fragmentation() -> None:
    budget = evaluate(tight_plan())
    reserved = simulate(budget, pod_events=0, seed=3, reservations=True)
    assert reserved.first_failure is None
    assert reserved.nodes == 2_000 and reserved.nodes_short == 0


def test_without_reservations_the_same_layout_fragments() -> None:
    budget = evaluate(tight_plan())
    bare = simulate(budget, pod_events=0, seed=3, reservations=False)
    assert bare.first_icb is not None and bare.first_icb.phase == "launch"
    # InsufficientCidrBlocks means addresses were free, just no aligned /28
    assert bare.first_icb.free_addresses >= 16 and bare.first_icb.free_blocks == 0
    assert bare.insufficient_cidr_blocks > 0 and bare.nodes_short > 0
    assert bare.stranded > 0 and bare.blocks_lost > 0


def test_every_refusal_is_counted_and_the_first_described() -> None:
    budget = evaluate(tight_plan())
    bare = simulate(budget, pod_events=0, seed=3, reservations=False)
    # at launch a node asks until the first refusal, so each short node was refused once
    assert bare.prefixes_failed == bare.insufficient_cidr_blocks == bare.nodes_short > 1
    assert bare.first_failure == bare.first_icb
    assert bare.first_icb is not None and bare.first_icb.code == "InsufficientCidrBlocks"
    churned = simulate(budget, pod_events=5_000, seed=3, reservations=False)
    assert churned.first_icb == bare.first_icb  # churn comes after every launch
    assert churned.prefixes_failed > bare.prefixes_failed  # short nodes keep asking


def test_churn_accounts_for_every_prefix() -> None:
    budget = evaluate(tight_plan(500, warm={"WARM_IP_TARGET": 1}))
    seen: list[tuple[int, int]] = []
    result = simulate(
        budget,
        pod_events=20_000,
        seed=5,
        reservations=True,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen and seen[-1][0] == seen[-1][1] == 500 + 20_000
    assert all(a <= b for (a, _), (b, _) in zip(seen, seen[1:], strict=False))
    assert result.prefix_ops > 0  # pods crossing multiples of 16 move prefixes
    assert result.first_failure is None  # the /21-ish subnet has headroom for 500 nodes


def test_cli_simulate_json_and_progress(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "simulate",
            "--nodes",
            "300",
            "--instance-type",
            "m5.large",
            "--pods-per-node",
            "8",
            "--azs",
            "1",
            "--pod-events",
            "3000",
            "--progress",
            "--json",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    doc = json.loads(out)
    assert [s["scenario"] for s in doc["scenarios"]] == [
        "with prefix reservations",
        "without reservations",
    ]
    assert all(s["nodes"] == 300 and s["pod_events"] == 3000 for s in doc["scenarios"])
    assert "100%" in err and "[" in err


def test_cli_simulate_refuses_bad_event_counts(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--pod-events", "-1"])
    assert code == 2
    assert "--pod-events" in capsys.readouterr().err
