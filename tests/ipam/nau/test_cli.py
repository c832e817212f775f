"""The CLI: plan defaults, flags, plan files, --json, --chart, errors (one line, exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipam.nau.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_without_arguments_plans_100k_ai_ml_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan")
    assert code == 0
    assert "100,000 nodes" in out
    assert "VERDICT: DOES NOT FIT" in out
    assert "NAU rule table vpc-ug-2025" in out
    assert "ambiguous: efa-counting=adds" in out


def test_exit_code_reports_the_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "plan", "--exit-code")[0] == 1
    code, _, _ = run(
        capsys, "plan", "--nodes", "1000", "--instance-type", "m5.large", "--exit-code"
    )
    assert code == 0


def test_json_has_the_automation_fields(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "plan",
        "--nodes",
        "10000",
        "--instance-type",
        "m7i.4xlarge",
        "--pods-per-node",
        "12",
        "--warm-ip-target",
        "1",
        "--quota",
        "default",
        "--json",
    )
    doc = json.loads(out)
    assert code == 0
    assert doc["nau_total"] == 2 * 10_000 + doc["nau_infra"]
    assert doc["nau_per_node"] == {"m7i.4xlarge": 2}
    assert doc["quota"]["vpc"] == 64_000 and doc["quota"]["level"] == "default"
    assert doc["fits"] is True
    assert doc["warm"] == {"WARM_IP_TARGET": 1}
    assert doc["rules_version"].startswith("vpc-ug-")


def test_plan_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(
        "mode: secondary-ip\n"
        "azs: 2\n"
        "node_groups:\n"
        "  - {name: web, instance_type: m5.large, nodes: 100, pods_per_node: 10}\n"
        "consumers: {nat_gateways: 2}\n"
    )
    code, out, _ = run(capsys, "plan", "--plan", str(path), "--json")
    doc = json.loads(out)
    assert code == 0
    assert doc["mode"] == "secondary-ip" and doc["azs"] == 2
    assert doc["nau_infra"] == 12
    assert doc["nau_total"] == 100 * doc["nau_per_node"]["web"] + 12


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_chart(tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"nau{suffix}"
    code, _, _ = run(
        capsys, "plan", "--nodes", "5000", "--instance-type", "m5.large", "--chart", str(path)
    )
    assert code == 0
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in data[:2000]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nodes", "10", "--instance-type", "m5.lrage"], "did you mean m5.large"),
        (["--nodes", "-3", "--instance-type", "m5.large"], "nodes=-3: must be >= 1"),
        (["--nodes", "ten", "--instance-type", "m5.large"], "'ten' is not a whole number"),
        (["--nodes", "10", "--instance-type", "m5.large", "--efa-only", "2"], "EFA"),
        (
            ["--nodes", "10", "--instance-type", "m5.large", "--pods-per-node", "200"],
            "exceed max pods",
        ),
        (["--instance-type", "m5.large"], "--nodes"),
        (["--plan", "/nonexistent.yaml"], "No such file"),
        (["--chart", "out.gif"], ".png or .svg"),
        (["--quota", "lots"], "must be default, max or a number"),
        (["--mode", "ipv6", "--warm-ip-target", "1"], "IPv6"),
    ],
)
def test_errors_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        code = main(["plan", *argv])
        raise SystemExit(code)
    assert excinfo.value.code == 2
    _, err = capsys.readouterr()
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_plan_file_and_group_flags_do_not_mix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("node_groups: [{instance_type: m5.large, nodes: 1, pods_per_node: 1}]\n")
    code, _, err = run(capsys, "plan", "--plan", str(path), "--nodes", "5")
    assert code == 2 and "--nodes" in err


def test_rules_command_prints_the_versioned_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "rules", "--efa-counting", "restate")
    assert code == 0
    assert out.startswith("NAU rule table vpc-ug-")
    assert "efa-counting=restate" in out
