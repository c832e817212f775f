"""``python -m tools.fleet.replay``: the model given a real wave's own flags and machine."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from tools.fleet.__main__ import main as fleet_main
from tools.fleet.replay import FIGURES, RESTART_FIGURES, ReplayError, main, model_inputs

FLEET_ARGV = [
    "--nodes=12",
    "--rate=6000/min",
    "--pods-per-node=2",
    "--prefixes-at-launch=1",
    "--scenario=ultranet-reactive",
    "--baseline=vpc-cni",
    "--bucket=AssignPrivateIpAddresses=5:10",
    "--faults=latency=20ms",
    "--vpccni-cleanup-delay-max=1",
    "--timeout=120",
    "--restart",
    "--json",
]


@pytest.fixture(scope="module")
def wave(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real wave (ultranet reactive and the VPC CNI's), as tools/fleet writes it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert fleet_main(FLEET_ARGV) == 0
    path = tmp_path_factory.mktemp("replay") / "wave.json"
    path.write_text(out.getvalue())
    return path


def test_the_model_input_is_the_runs_own(wave: Path) -> None:
    real = json.loads(wave.read_text())
    inputs = model_inputs(real)
    assert set(inputs) == {"ultranet-reactive", "vpc-cni-reactive"}
    for name, config in inputs.items():
        assert config.restart
        assert config.nodes == 12 and config.pods_per_node == 2
        assert config.prefixes_at_launch == 0
        assert config.launch_at_s == tuple(real[name]["launch_at_s"])
        assert config.faults.latency_s == pytest.approx(0.02)
        assert config.throttle is not None
        assert config.throttle.limit("AssignPrivateIpAddresses").spec.capacity == 5
    assert inputs["vpc-cni-reactive"].agent == "vpc-cni"
    assert inputs["vpc-cni-reactive"].vpccni_cleanup_delay_max_s == 1
    assert inputs["ultranet-reactive"].agent == "ultranet"


def test_real_and_both_model_columns_per_scenario(
    wave: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(wave), "--seeds", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    real = json.loads(wave.read_text())
    for name, r in result.items():
        assert r["real"]["ec2_calls_per_node"] == real[name]["ec2_calls_per_node"]
        for column in ("aws_timings", "lab_replayed"):
            figures = r[column]["figures"]
            assert set(figures) == set(FIGURES)
            calls = figures["ec2_calls_per_node"]
            assert 0 < calls["min"] <= calls["median"] <= calls["max"]
            assert "AssignPrivateIpAddresses" in r[column]["calls_per_node_by_action"]
            assert set(r[column]["restart"]) == set(RESTART_FIGURES)
        assert r["real"]["restart"]["ec2_calls"] == real[name]["restart"]["ec2_calls"]
    assert main([str(wave), "--seeds", "1"]) == 0
    table = capsys.readouterr().out
    assert "vpc-cni-reactive: real / model at AWS timings" in table
    assert "restart ready_p99_s" in table


def _fleet_result(**overrides: Any) -> dict[str, Any]:
    result: dict[str, Any] = {k: 0 for k in FIGURES}
    result |= {
        "prefixes_at_launch": 0,
        "launch_at_s": [0.0],
        "first_request_after_launch_s": [None],
        "request_latency_s": [0.0, 0.0],
        "loop_lag_s": [0.0, 0.0],
        "ec2_calls_by_action": {},
        "conditions": {"argv": ["--nodes=1", "--scenario=ultranet-reactive"]},
    }
    return result | overrides


@pytest.mark.parametrize(
    ("wave", "message"),
    [
        ([], "not a tools/fleet --json output"),
        ({}, "not a tools/fleet --json output"),
        ({"ultranet-reactive": 1}, "not a tools/fleet --json output"),
        ({"ultranet-reactive": _fleet_result(conditions={})}, "conditions.argv"),
        (
            {"ultranet-reactive": _fleet_result(conditions={"argv": ["--rate=fast"]})},
            "not a tools/fleet command line",
        ),
        (
            {"ultranet-reactive": {k: v for k, v in _fleet_result().items() if k != "loop_lag_s"}},
            "no loop_lag_s",
        ),
        ({"ultranet-reactive": _fleet_result(prefixes_at_launch=2)}, "2 prefixes at launch"),
    ],
)
def test_a_wave_it_cannot_replay_is_refused_with_the_reason(wave: Any, message: str) -> None:
    with pytest.raises(ReplayError, match=message):
        model_inputs(wave)


def test_the_cli_says_which_file_and_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "wave.json"
    bad.write_text("{not json")
    assert main([str(bad)]) == 2
    assert "replay: " in capsys.readouterr().err
    assert main([str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
