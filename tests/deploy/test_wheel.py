"""The ultranet wheel holds the products only, built offline from the checkout as it is and
from exactly the files the image's wheel stage copies (deploy/Containerfile).

Also: the repo tools' own distribution (tools/pyproject.toml) lists every tools package, and is
what puts ``ultranet-lab`` on PATH in the development venv.
"""

from __future__ import annotations

import ast
import email.parser
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipam.nau import chart
from tests.deploy.conftest import REPO, context_files, copied_from_context

PRODUCTS = {"cni", "ipam", "dnscache"}
CONSOLE_SCRIPTS = {
    "ultranet-ipamd": "ipam.cli:main",
    "ultranet-cni": "cni.install:main",
    "ultranet-dns": "dnscache.cli:main",
    "ultranet-nau": "ipam.nau.cli:main",
}
# What a build of the checkout must not read: VCS, venv, caches, earlier build output.
_NOT_SOURCES = shutil.ignore_patterns(
    ".*", "__pycache__", "*.pyc", "*.egg-info", "build", "dist", "out"
)


@dataclass(frozen=True)
class Wheel:
    name: str
    files: list[str]
    metadata: email.message.Message
    entry_points: str


def build_wheel(source: Path, out: Path) -> Wheel:
    """``pip wheel`` with the venv's setuptools: no index, no build isolation, so offline."""
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index"),
            *("--no-build-isolation", "--check-build-dependencies", "-w", str(out), str(source)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = out.glob("ultranet-*.whl")
    with zipfile.ZipFile(path) as archive:
        files = archive.namelist()
        (info,) = {f.split("/")[0] for f in files if f.split("/")[0].endswith(".dist-info")}
        metadata = email.parser.Parser().parsestr(archive.read(f"{info}/METADATA").decode())
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    return Wheel(path.name, files, metadata, entry_points)


@pytest.fixture(scope="module", params=["checkout", "image wheel stage"])
def wheel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Wheel:
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"
    if request.param == "checkout":
        shutil.copytree(REPO, source, ignore=_NOT_SOURCES)
    else:
        for relative in context_files(copied_from_context()["wheel"]):
            (source / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / relative, source / relative)
    return build_wheel(source, base / "out")


def _modules(wheel: Wheel) -> Iterator[tuple[str, list[str]]]:
    for path in wheel.files:
        if not path.split("/")[0].endswith(".dist-info"):
            yield path, path.split("/")


def test_the_wheel_is_pure_python(wheel: Wheel) -> None:
    assert wheel.name == "ultranet-0.1.0-py3-none-any.whl"


def test_the_wheel_holds_the_products_only(wheel: Wheel) -> None:
    assert {parts[0] for _, parts in _modules(wheel)} == PRODUCTS


def test_no_repo_tools_tests_or_test_doubles(wheel: Wheel) -> None:
    for path, parts in _modules(wheel):
        assert not {"tools", "tests"} & set(parts), path
        assert "testing" not in parts and "testing.py" not in parts, path


def test_every_product_module_and_data_file_is_shipped(wheel: Wheel) -> None:
    """Modules, py.typed and every data file (ipam/data, ipam/nau/data, ...): all but the
    READMEs and compiled caches."""
    shipped = set(wheel.files)
    for product in sorted(PRODUCTS):
        files = {
            p.relative_to(REPO).as_posix()
            for p in (REPO / product).rglob("*")
            if p.is_file() and p.suffix not in (".md", ".pyc") and "__pycache__" not in p.parts
        }
        assert f"{product}/py.typed" in files
        assert files <= shipped, sorted(files - shipped)
    assert [f for f in shipped if f.startswith("ipam/data/") and f.endswith(".json")]


def test_console_scripts_are_the_products(wheel: Wheel) -> None:
    section, scripts = "", {}
    for line in wheel.entry_points.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif "=" in line:
            name, target = (part.strip() for part in line.split("=", 1))
            scripts[(section, name)] = target
    assert scripts == {("[console_scripts]", n): t for n, t in CONSOLE_SCRIPTS.items()}
    for target in CONSOLE_SCRIPTS.values():
        module = target.split(":")[0].replace(".", "/")
        assert f"{module}.py" in wheel.files, target


def test_matplotlib_only_under_the_chart_extra(wheel: Wheel) -> None:
    requires = wheel.metadata.get_all("Requires-Dist") or []
    matplotlib = [r for r in requires if r.lower().startswith("matplotlib")]
    assert matplotlib and all(r.endswith('; extra == "chart"') for r in matplotlib), requires
    assert "chart" in (wheel.metadata.get_all("Provides-Extra") or [])
    # the extra the planner names when matplotlib is missing
    assert chart.MATPLOTLIB_EXTRA == "ultranet[chart]"


def _distribution(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group()).lower()


def _runtime_imports() -> dict[str, set[str]]:
    """Third-party top-level names the product modules import when they run (imports under
    ``if TYPE_CHECKING:`` excluded), with the modules that import them."""
    out: dict[str, set[str]] = {}
    for product in sorted(PRODUCTS):
        for path in (REPO / product).rglob("*.py"):
            tree = ast.parse(path.read_text())
            typing_only = {
                id(inner)
                for node in ast.walk(tree)
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                for stmt in node.body
                for inner in ast.walk(stmt)
            }
            for node in ast.walk(tree):
                if id(node) in typing_only:
                    continue
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PRODUCTS:
                        out.setdefault(top, set()).add(path.relative_to(REPO).as_posix())
    return out


# Imported only on request, with a message of their own when missing.
OPTIONAL_IMPORTS = {"uvloop"}  # ultranet-dns --loop uvloop (dnscache/cli.py)


def test_dependencies_are_what_the_products_import(wheel: Wheel) -> None:
    requires = wheel.metadata.get_all("Requires-Dist") or []
    declared = {_distribution(r) for r in requires if ";" not in r}
    extras = {_distribution(r) for r in requires if "extra ==" in r}
    installed = importlib.metadata.packages_distributions()
    imported: dict[str, set[str]] = {}
    for name, users in _runtime_imports().items():
        if name in OPTIONAL_IMPORTS or name == "__future__":
            continue
        owners = installed.get(name)
        assert owners, f"{name} (imported by {sorted(users)}) comes from no installed package"
        imported.setdefault(_distribution(owners[0]), set()).update(users)
    # Every run-time dependency is used by a product: nothing dev-only rides along.
    assert declared <= set(imported), declared - set(imported)
    through_declared = {
        _distribution(r)
        for dependency in declared
        for r in importlib.metadata.requires(dependency) or []
        if ";" not in r
    }
    for dist, users in imported.items():
        assert dist in declared | extras | through_declared, (dist, sorted(users))
    assert imported["matplotlib"] == {"ipam/nau/chart.py"}


def test_the_license_is_an_spdx_expression(wheel: Wheel) -> None:
    assert wheel.metadata["License-Expression"] == "Apache-2.0"


# -- tools/pyproject.toml: the repo tools, never in the wheel, on PATH in the venv ---------


def test_the_tools_distribution_lists_every_tools_package() -> None:
    project = tomllib.loads((REPO / "tools" / "pyproject.toml").read_text())
    listed = project["tool"]["setuptools"]["packages"]
    on_disk = sorted(
        ".".join(("tools", *init.parent.relative_to(REPO / "tools").parts))
        for init in (REPO / "tools").rglob("__init__.py")
        if "out" not in init.parts
    )
    assert sorted(listed) == on_disk


def test_the_dev_venv_gets_ultranet_lab_from_the_tools_distribution() -> None:
    (lab,) = importlib.metadata.entry_points(group="console_scripts", name="ultranet-lab")
    assert lab.value == "tools.lab.cli:main"
    assert lab.dist is not None and lab.dist.name == "ultranet-tools", "run `make venv`"
