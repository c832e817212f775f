"""``python -m tools.bench.cni --mode ipv6`` in a tiny configuration: two real daemons,
an IPv4 node and an IPv6 node, the same libcni driver; the JSON holds both families, the
ratio and the bar."""

from __future__ import annotations

import json
from ipaddress import IPv6Network
from pathlib import Path

import pytest

from tools.bench.cni.__main__ import combine, main
from tools.bench.cni.driver import REFERENCE_PLUGINS, DriverUnavailable, build

pytestmark = pytest.mark.netns


def test_a_tiny_ipv6_run_times_both_families_on_two_daemons(tmp_path: Path) -> None:
    if not (REFERENCE_PLUGINS / "ptp").exists():
        pytest.skip("needs Debian package containernetworking-plugins")
    try:
        build()
    except DriverUnavailable as err:
        pytest.skip(str(err))
    out = tmp_path / "ipv6.json"
    argv = ["--mode", "ipv6", "-n", "3", "--rounds", "2", "--warmup", "1"]
    assert main([*argv, "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    config = result["config"]
    assert config["flags"]["mode"] == "ipv6" and config["headline_eligible"] is True
    assert config["ipv6_daemon_env"]["ENABLE_IPv6"] == "true"
    (run,) = result["runs"]
    for family in ("ipv4", "ipv6"):
        for metric in ("add_ms", "del_answer_ms", "del_removed_ms"):
            assert run[family][metric]["n"] == 6 and run[family][metric]["min"] > 0
        # Clock ticks (10 ms) may round a tiny run's daemon CPU to 0; the shim's is not.
        assert run[family]["cpu_us_per_op"]["add"]["shim"] > 0
        assert len(run["waits_for_steady_pool_s"][family]) == 3  # warm-up and two rounds
    effective = run["nodes"]["ipv6"]["effective_config"]
    assert effective["ENABLE_IPv6"] == {"value": True, "source": "env"}
    assert run["nodes"]["ipv4"]["effective_config"]["ENABLE_IPv6"]["source"] == "default"
    assert IPv6Network(run["ipv6_prefix"]).prefixlen == 80
    assert sum(run["ec2_calls_during_cycles"]["ipv6"].values()) == 0  # the /80 from launch
    ratio = run["ratio"]["add_ms_p50"]
    expected = run["ipv6"]["add_ms"]["median"] / run["ipv4"]["add_ms"]["median"]
    assert ratio == pytest.approx(expected, abs=0.001)
    assert run["bar"]["met"] == (ratio <= 1.10)
    twice = combine([result, result])
    assert twice["across_runs"]["runs"] == 2
    assert twice["across_runs"]["ratio"]["add_ms_p50"]["median"] == ratio
