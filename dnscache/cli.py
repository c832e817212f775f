"""``ultranet-dns``: flags, the config file, and the supervisor.

Flags lay over the file: ``--listen`` and ``--upstream`` replace the file's ``listen`` and zone
``.`` upstreams, ``--workers`` and ``--metrics`` replace theirs. SIGHUP re-reads the file and
lays the same flags over it again.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import sys
from pathlib import Path
from typing import Any

from .config import load_file
from .errors import DnscacheError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ultranet-dns", description="Multi-core caching DNS forwarder."
    )
    p.add_argument(
        "--listen",
        action="append",
        metavar="ADDR:PORT",
        help="address to serve UDP and TCP on (repeatable; default 127.0.0.1:53)",
    )
    p.add_argument(
        "--upstream",
        action="append",
        metavar="ADDR:PORT",
        help="upstream for zone '.' (repeatable, tried in order)",
    )
    p.add_argument("--workers", type=int, metavar="N", help="worker processes (default: cores)")
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML config: zones and the rest")
    p.add_argument("--metrics", metavar="ADDR:PORT", help="serve /metrics, /health, /ready here")
    p.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop of the workers (default asyncio; see README, Benchmarks)",
    )
    p.add_argument(
        "--nodelocal-teardown",
        choices=("auto", "always", "never"),
        help="node_local.teardown: remove the interface and rules on exit (default auto: "
        "unless another process still serves the address; ignored without node_local)",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return p


def merged_doc(args: argparse.Namespace) -> dict[str, Any]:
    """The file (if any) with the flags laid over it."""
    doc: dict[str, Any] = load_file(args.config) if args.config is not None else {}
    doc = copy.deepcopy(doc)
    if args.listen:
        doc["listen"] = list(args.listen)
    if args.upstream:
        zones = dict(doc.get("zones") or {})
        root = next((k for k in zones if k.strip(".") == ""), ".")
        spec = dict(zones.get(root) or {})
        spec["upstreams"] = list(args.upstream)
        zones[root] = spec
        doc["zones"] = zones
    if args.workers is not None:
        doc["workers"] = args.workers
    if args.metrics is not None:
        doc["metrics"] = args.metrics
    if args.nodelocal_teardown is not None and isinstance(doc.get("node_local"), dict):
        doc["node_local"] = {**doc["node_local"], "teardown": args.nodelocal_teardown}
    return doc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    if args.loop == "uvloop":
        try:
            import uvloop  # noqa: F401  (optional: see the README, Benchmarks)
        except ImportError:
            print("ultranet-dns: --loop uvloop needs the uvloop package", file=sys.stderr)
            return 2
    from .supervisor import Supervisor

    try:
        return asyncio.run(_main(args, Supervisor))
    except DnscacheError as exc:
        print(f"ultranet-dns: {exc}", file=sys.stderr)
        return 2


async def _main(args: argparse.Namespace, supervisor: Any) -> int:
    sup = supervisor(lambda: merged_doc(args), loop_kind=args.loop, log_level=args.log_level)
    rc: int = await sup.run()
    return rc
