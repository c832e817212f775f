"""The CNI benchmark (``python -m tools.bench.cni``), end to end in a tiny configuration:
the real ultranet-ipamd behind the shim against ptp + host-local, through libcni."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tools.bench.cni.__main__ import combine, main
from tools.bench.cni.driver import REFERENCE_PLUGINS, DriverUnavailable, build
from tools.bench.cni.measure import distribution, host_links


def test_host_links_are_the_interfaces_outside_the_sandbox() -> None:
    result = {
        "interfaces": [
            {"name": "eni0123456789a", "mac": "02:00:00:00:00:01"},
            {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/run/netns/p"},
        ]
    }
    assert host_links(result) == ["eni0123456789a"]


def test_distribution_keeps_the_full_range() -> None:
    spread = distribution([5.0, 1.0, 3.0, 2.0, 40.0])
    assert (spread["median"], spread["min"], spread["max"], spread["n"]) == (3.0, 1.0, 40.0, 5)
    assert spread["min"] <= spread["p10"] <= spread["median"] <= spread["p90"] <= spread["max"]


@pytest.mark.netns
def test_a_tiny_run_against_the_real_daemon_records_its_conditions_and_both_dels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not (REFERENCE_PLUGINS / "ptp").exists():
        pytest.skip("needs Debian package containernetworking-plugins")
    try:
        build()
    except DriverUnavailable as err:
        pytest.skip(str(err))
    out = tmp_path / "cni.json"
    argv = ["-n", "3", "--rounds", "1", "--warmup", "1", "--json", "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result

    config = result["config"]
    assert config["command"][-len(argv) :] == argv
    assert config["flags"]["backend"] == "daemon" and config["headline_eligible"] is True
    assert config["counts"]["counted_adds_per_plugin_per_run"] == 3
    assert config["concurrency"]["in_flight_calls"] == 1
    assert set(config["versions"]["debian_packages"]) == {
        "golang-go",
        "golang-github-appc-cni-dev",
        "containernetworking-plugins",
    }
    assert config["versions"]["go"].startswith("go version")
    assert config["versions"]["python"]["version"]
    assert len(config["code"]["commit"]) == 40 and isinstance(config["code"]["dirty"], bool)
    assert config["machine"]["cpus"] >= 1

    (run,) = result["runs"]
    for moment in ("before", "after"):
        assert "load average" in run["load"][moment]["uptime"]
        assert len(run["load"][moment]["loadavg"]) == 3
    node = run["ultranet_node"]
    assert node["backend"] == "daemon" and node["env_overrides"] == {}
    effective = node["effective_config"]
    assert effective["IP_COOLDOWN_PERIOD"] == {"value": 30, "source": "default"}
    assert effective["WARM_PREFIX_TARGET"]["source"] == "default"
    assert run["shim_interpreter"]["version"]
    assert len(run["ultranet_waits_for_warm_pool_s"]) == 2  # before the warm-up and the round

    for side in ("ultranet", "reference"):
        row = run[side]
        for metric in ("add_ms", "del_answer_ms", "del_removed_ms", "del_link_gone_ms"):
            assert row[metric]["n"] == 3 and row[metric]["min"] > 0, (side, metric)
        # The removal figure holds the answer and the veth's RTM_DELLINK, whichever is later.
        assert row["del_removed_ms"]["min"] >= row["del_answer_ms"]["min"]
        assert row["del_removed_ms"]["max"] >= row["del_link_gone_ms"]["max"]
        for op in ("add", "del"):
            assert row["cpu_us_per_op"][op]["total"] > 0
    assert set(run["ultranet"]["cpu_us_per_op"]["add"]) == {"shim", "daemon", "total"}
    assert set(run["reference"]["cpu_us_per_op"]["add"]) == {"plugins", "total"}
    for key in ("add_ms_p50", "del_answer_ms_p50", "del_removed_ms_p50", "add_cpu", "del_cpu"):
        assert run["ratio"][key] > 0
        assert result["across_runs"]["ratio"][key]["median"] == run["ratio"][key]

    # Invocations combine only when they ran the same code with the same flags.
    twice = combine([result, result])
    assert twice["across_runs"]["runs"] == 2 and len(twice["runs"]) == 2
    other = json.loads(json.dumps(result))
    other["config"]["code"]["commit"] = "0" * 40
    with pytest.raises(ValueError, match="differ in code"):
        combine([result, other])


@pytest.mark.netns
def test_a_tiny_cri_run_times_both_plugins_through_one_containerd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not (REFERENCE_PLUGINS / "ptp").exists():
        pytest.skip("needs Debian package containernetworking-plugins")
    missing = [tool for tool in ("containerd", "ctr", "runc", "gcc") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (make test installs them)")
    try:
        build()
    except DriverUnavailable as err:
        pytest.skip(str(err))
    out = tmp_path / "cri.json"
    argv = ["--mode", "cri", "-n", "3", "--rounds", "1", "--warmup", "1", "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert "containerd CRI" in capsys.readouterr().out

    config = result["config"]
    assert config["command"][-len(argv) :] == argv
    assert config["flags"]["mode"] == "cri" and config["headline_eligible"] is True
    assert config["counts"]["counted_sandboxes_per_plugin_per_run"] == 3
    assert config["concurrency"]["in_flight_calls"] == 1
    assert config["versions"]["containerd"].startswith("containerd ")
    assert len(config["code"]["commit"]) == 40 and config["machine"]["cpus"] >= 1

    (run,) = result["runs"]
    assert run["containerd"]["runtime"].startswith("containerd ")
    # One containerd, a runtime handler per side, each with its own CNI conf dir.
    for side in ("ultranet", "reference"):
        assert f"containerd.runtimes.{side}]" in run["containerd"]["config"]
    assert run["containerd"]["config"].count("cni_conf_dir") == 2
    assert run["ultranet_node"]["env_overrides"] == {}
    assert run["shim_interpreter"]["version"]
    assert len(run["ultranet_waits_for_warm_pool_s"]) == 2
    for side in ("ultranet", "reference"):
        row = run[side]
        for metric in (
            "run_ms",
            "cni_add_ms",
            "stop_ms",
            "cni_del_ms",
            "remove_ms",
            "cni_del_remove_ms",
        ):
            spread = row[metric]
            assert spread["n"] == 3 and spread["min"] > 0, (side, metric)
            assert spread["min"] <= spread["median"] <= spread["p90"] <= spread["max"]
        # containerd's network timer is a part of the call that contains it.
        assert row["cni_add_ms"]["max"] < row["run_ms"]["max"]
        assert row["cni_del_ms"]["max"] < row["stop_ms"]["max"]
        assert row["cpu_us_per_op"]["add"]["total"] >= row["cpu_us_per_op"]["add"]["containerd"]
    assert "daemon" in run["ultranet"]["cpu_us_per_op"]["add"]
    for key, bar in (("cni_add_ms_p50", 1.1), ("cni_del_ms_p50", 0.8), ("run_ms_p50", 1.05)):
        assert run["bars"][key]["at_most"] == bar
        assert run["bars"][key]["met"] is (run["ratio"][key] <= bar)
    assert result["across_runs"]["ratio"]["run_ms_p50"]["median"] == run["ratio"]["run_ms_p50"]
    assert combine([result, result])["across_runs"]["runs"] == 2
