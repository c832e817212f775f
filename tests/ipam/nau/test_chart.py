"""``plan --chart`` when matplotlib, the ``chart`` extra, is not installed."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest

from ipam.nau.cli import main

PLAN = ["plan", "--nodes", "5000", "--instance-type", "m5.large"]


def test_chart_without_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # None in sys.modules makes `import matplotlib` raise ModuleNotFoundError, as when absent.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "nau.svg"
    code = main([*PLAN, "--chart", str(path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert err == (
        f"ultranet-nau: error: --chart={str(path)!r}: needs matplotlib: "
        "pip install 'ultranet[chart]'\n"
    )
    assert out == ""
    assert not path.exists()


def test_plan_without_chart_needs_no_matplotlib(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(PLAN) == 0
    assert "VERDICT" in capsys.readouterr().out


class _BrokenMatplotlib(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """An installed matplotlib whose own dependency is missing."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "matplotlib":
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def exec_module(self, module: ModuleType) -> None:
        raise ModuleNotFoundError("No module named 'numpy'", name="numpy")


def test_a_broken_matplotlib_is_not_reported_as_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BrokenMatplotlib(), *sys.meta_path])
    with pytest.raises(ModuleNotFoundError) as excinfo:
        main([*PLAN, "--chart", str(tmp_path / "nau.svg")])
    assert excinfo.value.name == "numpy"
