"""``make demo``, reduced: 6 pods (2 multi-NIC) on the emulated p5.48xlarge, end to end,
then a run failing on purpose; both must leave no namespace, process or temp dir."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools.demo.__main__ import main
from tools.lab import netns

REPO = Path(__file__).resolve().parents[2]


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.demo", "--pods", "6", "--multi-nic", "2", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def assert_nothing_left(output: str) -> None:
    """No namespace of the run's lab, no process naming its temp dir, no temp dir."""
    lab = re.search(r"lab ([0-9a-f]{6}): namespaces", output)
    tmp = re.search(r"CNI: shim (/\S+/ultranet-demo-[^/]+)/", output)
    assert lab and tmp, output
    assert [n for n in netns.list_lab_namespaces() if n.startswith(f"ul-{lab.group(1)}-")] == []
    assert not Path(tmp.group(1)).exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert tmp.group(1) not in ps


@pytest.mark.netns
def test_reduced_demo_runs_end_to_end_and_leaves_nothing() -> None:
    done = run_demo()
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "ready in" in out and "from IMDS alone" in out
    assert re.search(r"single-NIC +4 pods +p50 +[\d.]+ ms +p99 +[\d.]+ ms", out), out
    assert re.search(r"multi-NIC +2 pods .* 32 interfaces each", out), out
    # 4 x 1 + 2 x 32 addresses, all distinct and inside the node's prefixes.
    assert "68 addresses on 6 pods (4 x 1 + 2 x 32); 68 distinct; 68 inside" in out
    assert "one address on each of 32 cards" in out
    assert re.search(r"NAU used in the VPC: 95 at launch -> \d+ with 6 pods", out), out
    dns = re.search(r"queries (\d+), cache hits (\d+), misses (\d+).*upstream queries (\d+)", out)
    assert dns, out
    queries, hits, misses, upstream = map(int, dns.groups())
    assert queries == 6 * 5 + 1  # the pods' dnslib queries and one dig
    assert hits + misses == queries and upstream == misses <= 32
    assert "ultranet-ipamd holds 0 allocations after DEL" in out
    assert "VERDICT: DOES NOT FIT" in out
    assert "left behind: nothing (checked" in out
    assert_nothing_left(out)


@pytest.mark.netns
def test_a_failing_demo_cleans_up() -> None:
    done = run_demo("--fail-at", "queries")
    assert done.returncode == 1
    assert "failing on purpose at step 'queries'" in done.stderr
    assert "demo failed: cleaning up ... done" in done.stdout
    assert "left behind: nothing" in done.stdout
    assert_nothing_left(done.stdout)


def test_without_root_it_says_so_and_plans_alone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("demo: not root, so no lab")
    assert "NAU plan ai-ml-100k" in out and "VERDICT: DOES NOT FIT" in out
    assert "Plan verdict: DOES NOT FIT" in out
