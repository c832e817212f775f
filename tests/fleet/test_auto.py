"""``--prefixes-at-launch auto`` in the fleet: the real agents make no EC2 call."""

from __future__ import annotations

import json

import pytest

from tools.fleet.__main__ import main


def test_auto_keeps_a_slow_pod_wave_off_ec2(capsys: pytest.CaptureFixture[str]) -> None:
    # 40 pods at 5/s: the last land 8 s after their nodes are Ready, past the agent's 5 s
    # pool pass, which would have released a launch prefix its warm target did not need.
    code = main(
        [
            "--nodes=10",
            "--rate=6000/min",
            "--pods-per-node=4",
            "--pod-rate=5",
            "--prefixes-at-launch=auto",
            "--scenario=ultranet",
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out)["ultranet"]
    assert code == 0
    assert result["prefixes_at_launch_auto"]["warm_settings_added"] == {"MINIMUM_IP_TARGET": "16"}
    assert result["prefixes_at_launch"] == 1
    assert result["ec2_calls_per_node"] == 0
    assert result["ec2_requests_seen_by_emulator"] == 0
    assert result["nau_used"] == 10 * 2
