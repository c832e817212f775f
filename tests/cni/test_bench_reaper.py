"""``python -m tools.bench.cni.reaper``: a tiny run deletes every veth both ways, leaves
no namespace behind, and records its configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.bench.cni.reaper import FAMILIES, NAMESPACE_PREFIX, STRATEGIES, main
from tools.lab import netns

pytestmark = pytest.mark.netns


def test_a_tiny_run_times_both_strategies_for_both_families(tmp_path: Path) -> None:
    out = tmp_path / "reaper.json"
    assert main(["-n", "3", "--runs", "2", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["flags"] == {"pods": 3, "runs": 2}
    for family in FAMILIES:
        for strategy in STRATEGIES:
            timed = result["ms_to_delete_all"][family][strategy]
            assert len(timed["runs"]) == 2 and timed["min"] > 0
    # Its namespaces only (other tests' labs may come and go meanwhile).
    assert [ns for ns in netns.list_lab_namespaces() if ns.startswith(NAMESPACE_PREFIX)] == []
