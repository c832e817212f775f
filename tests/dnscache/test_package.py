"""The shipped package holds the product only: no module named ``testing``, no test doubles.

The loopback authoritative server the tests use as upstream lives in ``tools/bench/dns``
(a repo tool); a product module that defines or imports it would ship it in the wheel.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import dnscache

PACKAGE = Path(dnscache.__file__).resolve().parent


def test_the_package_has_no_module_named_testing() -> None:
    names = {m.name for m in pkgutil.walk_packages([str(PACKAGE)])}
    assert "server" in names  # the walk sees the package's modules
    assert not {n for n in names if "testing" in n.split(".")}, names


def test_no_product_module_defines_or_imports_a_test_double() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name in ("AuthServer", "FakeUpstream"):
                offenders.append(f"{path.name}: class {node.name}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                "tests",
                "tools",
            ):
                offenders.append(f"{path.name}: from {node.module} import ...")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in ("tests", "tools"):
                        offenders.append(f"{path.name}: import {alias.name}")
    assert not offenders, offenders
