"""deploy/Containerfile (statically: no container engine here) and the two init scripts
(for real, against a fake iptables and a temporary host tree)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import ipaddress
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dnscache.config import NodeLocalConfig
from dnscache.nodelocal import CHAINS, rules
from tests.deploy.conftest import (
    DEPLOY,
    DOCKERIGNORE,
    REPO,
    context_files,
    copied_from_context,
    in_build_context,
    instructions,
)

SCRIPTS = DEPLOY / "scripts"
CONTAINERFILE = (DEPLOY / "Containerfile").read_text()
PRODUCTS = ("cni", "ipam", "dnscache")


def build_args() -> dict[str, str]:
    """Every ``ARG NAME=default``; one declared in several stages must agree."""
    out: dict[str, str] = {}
    for word, rest in instructions():
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            assert out.setdefault(name, value) == value, name
    return out


# -- Containerfile ---------------------------------------------------------------------------


def test_bases_are_pinned_debian_bookworm_tags() -> None:
    args = build_args()
    bases = [rest.split()[0] for word, rest in instructions() if word == "FROM"]
    assert len(bases) == 3
    for base in bases:
        image = args[base[2:-1]] if base.startswith("${") else base
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "bookworm" in tag, image


def test_stages_copied_from_exist() -> None:
    stages = {
        rest.split()[-1] for word, rest in instructions() if word == "FROM" and " AS " in rest
    }
    used = set(re.findall(r"--from=(\S+)", CONTAINERFILE))
    assert used and used <= stages


def test_copied_sources_exist_and_are_in_the_build_context() -> None:
    for sources in copied_from_context().values():
        for source in sources:
            assert (REPO / source).exists(), source
            assert context_files([source]), f"{source}: the dockerignore keeps all of it out"


def test_the_context_is_what_the_stages_copy() -> None:
    """Every path the dockerignore lets in is copied by some stage: no stale re-include."""
    copied = {s.rstrip("/") for sources in copied_from_context().values() for s in sources}
    let_in = [
        line.strip()[1:].removesuffix("/**")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip().startswith("!")
    ]
    assert let_in
    for path in let_in:
        assert any(c == path or c.startswith(f"{path}/") for c in copied), path


def test_the_ignore_rules_follow_docker() -> None:
    # Docker's semantics (last matching rule wins; a rule on a directory covers its files);
    # the cases the product-only tests below rely on.
    assert in_build_context("cni/plugin.py")
    assert in_build_context("ipam/data/instance-network-limits.json")
    assert in_build_context("deploy/scripts/ultranet-node-init")
    assert not in_build_context("cni/__pycache__/plugin.cpython-311.pyc")
    assert not in_build_context("tools/lab/cli.py")
    assert not in_build_context("tests/cni/test_plugin.py")
    assert not in_build_context("deploy/kustomize/kustomization.yaml")
    assert not in_build_context(".git/HEAD")


def test_the_wheel_stage_copies_the_products_only() -> None:
    files = context_files(copied_from_context()["wheel"])
    assert {f.split("/")[0] for f in files} == {"pyproject.toml", "README.md", *PRODUCTS}
    # Every product module and data file is there: the dockerignore drops none of them.
    for product in PRODUCTS:
        shipped = {
            p.relative_to(REPO).as_posix()
            for p in (REPO / product).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        }
        assert shipped <= set(files), sorted(shipped - set(files))
    assert "ipam/data/instance-network-limits.json" in files


def test_the_image_holds_no_repo_tools_tests_or_test_doubles() -> None:
    files = [f for sources in copied_from_context().values() for f in context_files(sources)]
    assert files
    for path in files:
        parts = path.split("/")
        assert parts[0] not in ("tools", "tests"), path
        assert "testing" not in parts and "testing.py" not in parts, path
        assert "__pycache__" not in parts and not path.endswith(".pyc"), path


def test_pins_and_runtime_environment() -> None:
    args = build_args()
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["UV_VERSION"])
    assert re.fullmatch(r"3\.11\.\d+", args["HOST_PYTHON_VERSION"])
    assert "uv==${UV_VERSION}" in CONTAINERFILE
    env = " ".join(rest for word, rest in instructions() if word == "ENV")
    assert "ULTRANET_HOST_PYTHON_VERSION=${HOST_PYTHON_VERSION}" in env
    assert "ULTRANET_PYTHON_SRC=/usr/local/ultranet/python" in env
    assert "COPY --from=interpreter /usr/local/ultranet-python /usr/local/ultranet/python" in (
        CONTAINERFILE
    )
    (user,) = [rest for word, rest in instructions() if word == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    assert not [w for w, _ in instructions() if w == "ENTRYPOINT"]  # manifests name commands


def test_node_init_uses_the_interpreter_the_image_ships() -> None:
    script = (SCRIPTS / "ultranet-node-init").read_text()
    minor = build_args()["HOST_PYTHON_VERSION"].rsplit(".", 1)[0]
    assert f'python="$dest/bin/python{minor}"' in script
    assert f"sys.version_info[:2] == ({minor.replace('.', ', ')})" in script


# -- ultranet-node-init ----------------------------------------------------------------------


def _fake_standalone_python(root: Path) -> Path:
    """A relocatable-enough CPython 3.11 tree: Debian's binary and a link to its stdlib."""
    system = Path("/usr/bin/python3.11")
    stdlib = Path("/usr/lib/python3.11")
    if not system.is_file() or not (stdlib / "os.py").exists():
        pytest.skip("needs Debian's /usr/bin/python3.11 to stand in for the standalone build")
    (root / "bin").mkdir(parents=True)
    shutil.copy2(system, root / "bin" / "python3.11")
    (root / "lib").mkdir()
    (root / "lib" / "python3.11").symlink_to(stdlib)
    return root


def _run_node_init(tmp_path: Path, src: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "ULTRANET_PYTHON_SRC": str(src),
        "ULTRANET_HOST_PYTHON_VERSION": "3.11.test",
        "ULTRANET_HOST_PYTHON_ROOT": str(tmp_path / "opt" / "ultranet"),
        "ULTRANET_CNI_BIN_DIR": str(tmp_path / "opt" / "cni" / "bin"),
    }
    return subprocess.run(
        [str(SCRIPTS / "ultranet-node-init")], env=env, capture_output=True, text=True, timeout=60
    )


def test_node_init_installs_interpreter_and_shim_but_no_conflist(tmp_path: Path) -> None:
    src = _fake_standalone_python(tmp_path / "image-python")
    first = _run_node_init(tmp_path, src)
    assert first.returncode == 0, first.stderr
    python = tmp_path / "opt" / "ultranet" / "python-3.11.test" / "bin" / "python3.11"
    assert "installed" in first.stdout
    shim = tmp_path / "opt" / "cni" / "bin" / "ultranet"
    assert shim.read_bytes().startswith(f"#!{python} -IS\n".encode())
    # The daemon writes the conflist once its warm pool is met (the node turns Ready then).
    assert not (tmp_path / "etc").exists()
    # The host runs the shim on the copied interpreter: VERSION needs no daemon.
    version = subprocess.run(
        [str(shim)], env={"CNI_COMMAND": "VERSION"}, input=b"{}", capture_output=True, timeout=30
    )
    assert version.returncode == 0, version.stderr
    assert b"1.1.0" in version.stdout
    # Again: the interpreter is already there (not copied twice), the shim is rewritten.
    second = _run_node_init(tmp_path, src)
    assert second.returncode == 0, second.stderr
    assert "installed" not in second.stdout
    assert not list((tmp_path / "opt" / "ultranet").glob(".python-*"))


def test_node_init_passes_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    done = subprocess.run(
        ["shellcheck", "-s", "sh", str(SCRIPTS / "ultranet-node-init")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout


# -- ultranet-dns-node-setup -----------------------------------------------------------------


def dns_setup() -> ModuleType:
    path = SCRIPTS / "ultranet-dns-node-setup"
    loader = importlib.machinery.SourceFileLoader("ultranet_dns_node_setup", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class FakeHost:
    """`ip` and `iptables` as far as the script uses them: a set of links, addresses, rules."""

    def __init__(self) -> None:
        self.links: set[str] = set()
        self.addresses: set[str] = set()
        self.chains: set[tuple[str, str]] = set()
        self.rules: list[tuple[str, str, tuple[str, ...]]] = []
        self.v6_chains: set[tuple[str, str]] = set()
        self.v6_rules: list[tuple[str, str, tuple[str, ...]]] = []
        self.calls: list[list[str]] = []

    def __call__(self, argv: Any) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        self.calls.append(argv)
        ok = subprocess.CompletedProcess(argv, 0, "", "")

        def fail(msg: str) -> subprocess.CompletedProcess[str]:
            return subprocess.CompletedProcess(argv, 1, "", msg)

        if argv[:3] == ["ip", "link", "show"]:
            return ok if argv[3] in self.links else fail("does not exist")
        if argv[:3] == ["ip", "link", "add"]:
            self.links.add(argv[3])
            return ok
        if argv[:3] == ["ip", "link", "set"]:
            return ok
        if argv[:3] == ["ip", "addr", "add"]:
            if argv[3] in self.addresses:
                return fail("RTNETLINK answers: File exists")
            self.addresses.add(argv[3])
            return ok
        assert argv[0] in ("iptables-nft", "ip6tables-nft") and argv[1] == "-w", argv
        chains, rules = (
            (self.chains, self.rules)
            if argv[0] == "iptables-nft"
            else (self.v6_chains, self.v6_rules)
        )
        _, _, _, table, op, chain, *rest = argv
        if op == "-L":
            return ok if (table, chain) in chains else fail("No chain")
        if op == "-N":
            chains.add((table, chain))
            return ok
        if op == "-I":
            rest = rest[1:]  # the position
        rule = (table, chain, tuple(rest))
        if op == "-C":
            return ok if rule in rules else fail("Bad rule")
        assert op in ("-A", "-I"), argv
        rules.append(rule)
        return ok


def test_dns_node_setup_adds_nodelocal_rules_once() -> None:
    module = dns_setup()
    host = FakeHost()
    cfg = NodeLocalConfig()
    first = module.ensure(cfg, [53], "iptables-nft", host)
    assert host.links == {"nodelocaldns"}
    assert host.addresses == {"169.254.20.10/32"}
    assert host.chains == {(table, chain) for table, _, chain in CHAINS}
    expected = [(t, c, tuple(r)) for t, c, r in rules(cfg, [53])]
    jumps = [(table, builtin, ("-j", chain)) for table, builtin, chain in CHAINS]
    assert sorted(host.rules) == sorted(jumps + expected)
    assert first
    # A second run (the surge pod's init, or a restart) changes nothing and flushes nothing.
    second = module.ensure(cfg, [53], "iptables-nft", host)
    assert second == []
    assert sorted(host.rules) == sorted(jumps + expected)
    assert not [c for c in host.calls if "-F" in c or "-X" in c or "-D" in c or "del" in c]


def test_dns_node_setup_gives_an_ipv6_address_ip6tables_rules() -> None:
    module = dns_setup()
    host = FakeHost()
    v4, v6 = ipaddress.ip_address("169.254.20.10"), ipaddress.ip_address("fd00::20:10")
    cfg = NodeLocalConfig(addresses=(v4, v6))
    module.ensure(cfg, [53], "iptables-nft", host)
    assert ["ip", "addr", "add", "fd00::20:10/128", "dev", "nodelocaldns", "nodad"] in host.calls
    jumps = [(table, builtin, ("-j", chain)) for table, builtin, chain in CHAINS]
    for addresses, rules_held in (((v4,), host.rules), ((v6,), host.v6_rules)):
        only = NodeLocalConfig(addresses=addresses)
        assert sorted(rules_held) == sorted(
            jumps + [(t, c, tuple(r)) for t, c, r in rules(only, [53])]
        )
    assert module.ensure(cfg, [53], "iptables-nft", host) == []
    assert module.ip6tables_of("iptables-legacy") == "ip6tables-legacy"
    with pytest.raises(SystemExit):
        module.main(["--address", "not-an-address"])


@pytest.mark.parametrize(
    ("legacy", "nft", "backend"), [(0, 0, "nft"), (5, 0, "legacy"), (3, 7, "nft"), (4, 4, "nft")]
)
def test_dns_node_setup_follows_the_hosts_iptables_backend(
    legacy: int, nft: int, backend: str
) -> None:
    module = dns_setup()
    assert module.choose_backend(legacy, nft) == backend
    saved = "*raw\n:PREROUTING ACCEPT [0:0]\n" + "-A PREROUTING -j X\n" * legacy + "COMMIT\n"
    assert module.rule_count(saved) == legacy


def test_dns_node_setup_is_ruff_clean() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed")
    path = str(SCRIPTS / "ultranet-dns-node-setup")
    for argv in ([str(ruff), "check", path], [str(ruff), "format", "--check", path]):
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=os.environ)
        assert done.returncode == 0, done.stdout + done.stderr
