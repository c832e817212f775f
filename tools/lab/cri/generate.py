"""Regenerate ``api_pb2.py`` and ``api_pb2.pyi`` from ``api.proto``:

    .venv/bin/python -m tools.lab.cri.generate [--check]

The generated modules are committed, so the lab, mypy and a fresh clone need no build
step; grpcio-tools is pinned in ``tools/pyproject.toml`` so that this command writes the
same bytes on every machine, and ``tests/lab/test_cri_proto.py`` fails when the committed
files differ from its output. Only message classes are generated: the client calls the
methods by name (``client.py``), so no untyped ``_pb2_grpc`` module is needed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PACKAGE_DIR = Path(__file__).resolve().parent
# Compiled relative to the repository root, so the descriptor is registered as
# "tools/lab/cri/api.proto" and cannot collide with another file named api.proto.
REPO_ROOT = PACKAGE_DIR.parents[2]
PROTO = PACKAGE_DIR.relative_to(REPO_ROOT) / "api.proto"
GENERATED = ("api_pb2.py", "api_pb2.pyi")


def generate(out_root: Path) -> list[Path]:
    """Compile api.proto into ``out_root``/tools/lab/cri/; returns the files written."""
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={REPO_ROOT}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            str(PROTO),
        ]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {code})")
    return [out_root / PROTO.parent / name for name in GENERATED]


def stale() -> list[str]:
    """The committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            path.name
            for path in fresh
            if not (PACKAGE_DIR / path.name).exists()
            or (PACKAGE_DIR / path.name).read_bytes() != path.read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="only report files that differ; exit 1 if any"
    )
    args = parser.parse_args(argv)
    if args.check:
        different = stale()
        for name in different:
            print(f"{PACKAGE_DIR / name} is stale: run python -m tools.lab.cri.generate")
        return 1 if different else 0
    for path in generate(REPO_ROOT):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
