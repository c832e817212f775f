"""`ultranet-nau plan --mode ipv6` on the embedded 100K default: IPv6 mode has no warm pool,
so the default's prefix-mode knob is dropped, and the address-space verdict changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipam.nau.cli import main


def plan_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    code = main(["plan", *argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc: dict[str, object] = json.loads(out)
    return doc


def test_default_plan_in_ipv6_mode(capsys: pytest.CaptureFixture[str]) -> None:
    prefix = plan_json(capsys)
    ipv6 = plan_json(capsys, "--mode", "ipv6")
    assert ipv6["mode"] == "ipv6" and ipv6["warm"] == {}
    assert ipv6["nodes"] == prefix["nodes"] == 100_000
    v4 = ipv6["addresses"]
    v4_prefix = prefix["addresses"]
    assert isinstance(v4, dict) and isinstance(v4_prefix, dict)
    # One IPv4 per node (and the infrastructure's) instead of /28s: IPv4 fits, NAU does not.
    assert v4["ipv4_needed"] < 2 * 100_000 < v4_prefix["ipv4_needed"]
    assert v4["fits_default_block_quota"] and not v4_prefix["fits_default_block_quota"]
    assert ipv6["fits_addresses"] is True and prefix["fits_addresses"] is False
    assert ipv6["fits_nau"] is False


def test_a_plan_files_warm_knob_is_still_refused_in_ipv6_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(
        "warm: {WARM_PREFIX_TARGET: 1}\n"
        "node_groups:\n"
        "  - {name: web, instance_type: m5.large, nodes: 100, pods_per_node: 10}\n"
    )
    assert main(["plan", "--plan", str(path), "--mode", "ipv6"]) == 2
    assert "do not apply in IPv6 mode" in capsys.readouterr().err
