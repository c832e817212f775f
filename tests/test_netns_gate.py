"""The gate on namespace tests (``tests/netns_gate.py``), run in a pytest of its own on a
tiny test file: a skipped netns test fails the run under ULTRANET_REQUIRE_NETNS=1, and only
a netns one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CONFTEST = """
import pytest
import tests.netns_gate as gate
from tests.netns_gate import pytest_collection_modifyitems, pytest_runtest_makereport

# Who runs this test does not matter: root with iproute2, or not, as the test says.
gate.netns_capable = lambda: not {no_root}


def pytest_configure(config):
    config.addinivalue_line("markers", "netns: needs namespaces")
"""

TESTS = """
import pytest

@pytest.fixture
def plugins():
    pytest.skip("needs Debian package containernetworking-plugins")

@pytest.mark.netns
def test_in_a_namespace(plugins):
    pass

@pytest.mark.netns
def test_skips_itself():
    pytest.skip("no veth support")

@pytest.mark.netns
def test_runs():
    pass

@pytest.mark.netns
@pytest.mark.xfail(strict=True, reason="a known bug")
def test_known_bug():
    raise AssertionError

def test_other_skip():
    pytest.skip("shellcheck is not installed")
"""


def run_pytest(
    tmp_path: Path, *, required: bool, no_root: bool
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text(CONFTEST.format(no_root=no_root))
    (tmp_path / "test_gated.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if k != "ULTRANET_REQUIRE_NETNS"}
    env["PYTHONPATH"] = str(REPO)
    if required:
        env["ULTRANET_REQUIRE_NETNS"] = "1"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "-c",
            "/dev/null",
            "--rootdir",
            str(tmp_path),
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("no_root", [False, True])
def test_a_skipped_netns_test_passes_unless_required(tmp_path: Path, no_root: bool) -> None:
    done = run_pytest(tmp_path, required=False, no_root=no_root)
    assert done.returncode == 0, done.stdout + done.stderr
    skipped = 5 if no_root else 3  # without root every netns test; else two and one other
    assert f"{skipped} skipped" in done.stdout, done.stdout


def test_a_skipped_netns_test_fails_when_required(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, required=True, no_root=False)
    assert done.returncode == 1, done.stdout + done.stderr
    # The one its fixture skipped counts as an error at setup, as pytest counts those.
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed, 1 error" in done.stdout, done.stdout
    assert "ERROR at setup of test_in_a_namespace" in done.stdout
    assert "_ test_skips_itself _" in done.stdout
    assert "no veth support" in done.stdout
    assert "containernetworking-plugins" in done.stdout  # the skip's reason is kept
    assert "shellcheck is not installed" in done.stdout  # a non-netns skip stays a skip


def test_without_root_every_netns_test_fails_when_required(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, required=True, no_root=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 skipped, 4 errors" in done.stdout, done.stdout  # an xfail must run too
    assert done.stdout.count("needs root and iproute2") == 4
