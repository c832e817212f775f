"""The NAU benchmark writes its figures with the conditions they were taken under."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_the_json_holds_the_figures_and_the_run_s_conditions(tmp_path: Path) -> None:
    out = tmp_path / "nau.json"
    subprocess.run(
        [sys.executable, str(REPO / "tools/bench/nau/run.py"), "--quick", "--json", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    assert result["config"]["simulate"]["pod_events"] == 100_000
    assert result["config"]["argv"] == ["--quick", "--json", str(out)]
    assert len(result["plan_seconds"]["all"]) == 5
    assert result["plan_seconds"]["best"] == min(result["plan_seconds"]["all"])
    assert result["simulate_seconds"]["value"] > 0
    launch = result["launch"]
    assert "--nodes=10000" in launch["argv"] and launch["seconds"] > 0
    assert launch["result"]["nodes_ready"] == 10_000
    code = result["conditions"]["code"]
    assert len(code["commit"]) == 40 and isinstance(code["dirty"], bool)
    assert result["conditions"]["machine"]["cpus"] >= 1
    assert "uptime" in result["conditions"]["load_before"]
    assert "uptime" in result["conditions"]["load_after"]
