"""The package graph `make lint` enforces (pyproject.toml, [tool.importlinter]).

Each test runs the same `lint-imports` command as `make lint` on a temporary copy of the
packages, once as they are and once with one forbidden import planted, so the check is
shown both to pass on the tree and to catch the edge it exists for.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cni", "ipam", "dnscache", "tools")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(
            REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    # The copy must be what is analysed, not the editable install of the repo: the copy is
    # first on the path and the check prints the files it read.
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--verbose"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def plant(tree: Path, module: str, statement: str) -> None:
    path = tree / module
    path.write_text(path.read_text() + f"\n{statement}  # planted by the test\n")


def test_the_tree_keeps_every_contract(tree: Path) -> None:
    done = lint_imports(tree)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "statement", "contract"),
    [
        # the cycle the graph had: cni importing the daemon back
        ("cni/handler.py", "import ipam.pool", "tools -> ipam -> cni, never back"),
        ("ipam/agent.py", "import tools.lab.lab", "tools -> ipam -> cni, never back"),
        ("dnscache/server.py", "import cni.spec", "the DNS cache imports no other"),
        ("cni/plumbing.py", "import dnscache.wire", "do not import the DNS cache"),
        ("ipam/agent.py", "import ipam.nau.rules", "the daemon does not import the planner"),
    ],
)
def test_a_planted_import_breaks_its_contract(
    tree: Path, module: str, statement: str, contract: str
) -> None:
    plant(tree, module, statement)
    done = lint_imports(tree)
    assert done.returncode != 0
    broken = [line for line in done.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(contract in line for line in broken), done.stdout
