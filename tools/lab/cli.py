"""``ultranet-lab up|down|status``: a lab for manual work.

``up`` starts the lab in a detached process (it owns the emulator and the namespaces)
and returns once the instance is launched; ``down <id>`` stops it, and removes what it
left if that process was killed (``down --all``: every lab); ``status`` lists running labs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict

from ipam.errors import UnknownInstanceType
from ipam.instance_types import lookup
from tools.lab import netns, owner
from tools.lab.lab import (
    STATE_ROOT,
    Lab,
    LabConfig,
    LabRecord,
    is_alive,
    read_records,
    remove_lab,
    remove_leftovers,
)

STOP_TIMEOUT_S = 20.0


def _config_from(args: argparse.Namespace) -> LabConfig:
    return LabConfig(
        instance_type=args.instance_type,
        prefixes_per_card=args.prefixes_per_card,
        other_cards=args.other_cards,
        nau_quota=args.nau_quota,
        seed=args.seed,
        ipv6=args.ipv6,
        ipv6_prefixes=args.ipv6_prefixes,
    )


def _add_lab_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instance-type", default="p5.48xlarge", help="EC2 instance type")
    parser.add_argument(
        "--prefixes-per-card",
        type=int,
        default=1,
        help="/28 prefixes pre-assigned at launch on each card's interface (default 1)",
    )
    parser.add_argument(
        "--other-cards",
        choices=["efa", "interface", "efa-only", "none"],
        default="efa",
        help="interface launched on each network card > 0 (default efa)",
    )
    parser.add_argument("--nau-quota", type=int, default=None, help="VPC NAU quota")
    parser.add_argument("--seed", type=int, default=0, help="seed of the emulator's choices")
    parser.add_argument(
        "--ipv6",
        action="store_true",
        help="dual-stack VPC as EKS IPv6 uses it: a unique-local /56, a /64 per subnet, "
        "the node's own IPv6 address",
    )
    parser.add_argument(
        "--ipv6-prefixes",
        type=int,
        default=1,
        help="with --ipv6: /80 prefixes on the primary interface at launch (default 1; "
        "0: the node agent assigns one)",
    )


def _cmd_up(args: argparse.Namespace) -> int:
    try:
        lookup(args.instance_type)
    except UnknownInstanceType as err:
        print(f"ultranet-lab: {err}", file=sys.stderr)
        return 2
    if args.prefixes_per_card < 0:
        print("ultranet-lab: --prefixes-per-card must be >= 0", file=sys.stderr)
        return 2
    if args.ipv6_prefixes < 0:
        print("ultranet-lab: --ipv6-prefixes must be >= 0", file=sys.stderr)
        return 2
    read_fd, write_fd = os.pipe()
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "tools.lab.cli", "serve", "--ready-fd", str(write_fd)]
    argv += ["--instance-type", args.instance_type]
    argv += ["--prefixes-per-card", str(args.prefixes_per_card)]
    argv += ["--other-cards", args.other_cards, "--seed", str(args.seed)]
    if args.nau_quota is not None:
        argv += ["--nau-quota", str(args.nau_quota)]
    if args.ipv6:
        argv += ["--ipv6", "--ipv6-prefixes", str(args.ipv6_prefixes)]
    with open(STATE_ROOT / "serve.log", "ab") as log_file:
        child = subprocess.Popen(
            argv,
            pass_fds=(write_fd,),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    os.close(write_fd)
    with os.fdopen(read_fd) as ready:
        line = ready.readline()
    if not line:
        child.wait()
        print(
            f"ultranet-lab: the lab failed to start (exit {child.returncode}); "
            f"see {STATE_ROOT / 'serve.log'}",
            file=sys.stderr,
        )
        return 1
    summary = json.loads(line)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"lab {summary['lab_id']} up (pid {summary['pid']})")
        print(f"  instance   {summary['instance_id']} ({summary['instance_type']})")
        print(f"  namespaces {', '.join(summary['namespaces'])}")
        print(f"  EC2        {summary['ec2_url']} (host), {summary['node_ec2_url']} (node)")
        print(f"  IMDS       {summary['imds_url']} (host), http://169.254.169.254 (node)")
        print(f"  stop with: ultranet-lab down {summary['lab_id']}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Lab(_config_from(args)) as lab:
        records = [r for r in read_records() if r.lab_id == lab.lab_id]
        with os.fdopen(args.ready_fd, "w") as ready:
            ready.write(json.dumps(asdict(records[0])) + "\n")
        stop.wait()
    return 0


def _wait_exit(pid: int, timeout: float) -> bool:
    """Block until ``pid`` exits or ``timeout`` passes; True if it exited."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


def _stop(record: LabRecord) -> str:
    if is_alive(record):
        os.kill(record.pid, signal.SIGTERM)
        if not _wait_exit(record.pid, STOP_TIMEOUT_S):
            os.kill(record.pid, signal.SIGKILL)
            _wait_exit(record.pid, STOP_TIMEOUT_S)
    removed = remove_lab(record.lab_id)
    return f"lab {record.lab_id} down" + (f" (removed {', '.join(removed)})" if removed else "")


def _cmd_down(args: argparse.Namespace) -> int:
    records = read_records()
    # Every lab on the machine has a record, the tests' in-process labs too: stopping them
    # all takes an explicit --all, never a forgotten id.
    if args.lab_id is None and not args.all:
        labs = ", ".join(r.lab_id for r in records) or "none"
        print(
            f"ultranet-lab: down needs a lab id (labs: {labs}), or --all to stop every lab",
            file=sys.stderr,
        )
        return 2
    if args.lab_id is not None and args.all:
        print("ultranet-lab: down takes a lab id or --all, not both", file=sys.stderr)
        return 2
    chosen = [r for r in records if args.all or r.lab_id == args.lab_id]
    if args.lab_id is not None and not chosen:
        print(f"ultranet-lab: no lab {args.lab_id}", file=sys.stderr)
        return 2
    for record in chosen:
        print(_stop(record))
    leftovers = remove_leftovers()
    if leftovers:
        print(f"removed leftovers: {', '.join(leftovers)}")
    if not chosen and not leftovers:
        print("no lab running")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    records = read_records()
    rows = []
    for record in records:
        dead = f"dead (run `ultranet-lab down {record.lab_id}`)"
        state = "running" if is_alive(record) else dead
        present = [ns for ns in record.namespaces if netns.exists(ns)]
        rows.append({**asdict(record), "state": state, "namespaces_present": present})
    unrecorded = [
        ns
        for ns in netns.list_lab_namespaces()
        if not any(ns.startswith(f"{netns.PREFIX}{r.lab_id}-") for r in records)
    ]
    # Another state root's lab, a test's or a benchmark's: its owner lives, it stays.
    orphans = [ns for ns in unrecorded if owner.provably_dead(ns)]
    unowned = [ns for ns in unrecorded if owner.owner_of(ns) is None]
    if args.json:
        print(
            json.dumps(
                {"labs": rows, "orphan_namespaces": orphans, "unowned_namespaces": unowned},
                indent=2,
            )
        )
        return 0
    if not rows:
        print("no lab running")
    for row in rows:
        print(f"lab {row['lab_id']}: {row['state']}, pid {row['pid']}")
        print(f"  instance   {row['instance_id']} ({row['instance_type']})")
        print(f"  namespaces {', '.join(row['namespaces_present']) or '-'}")
        print(f"  EC2        {row['ec2_url']}")
    if orphans:
        print(f"orphan namespaces (removed by the next up/down): {', '.join(orphans)}")
    if unowned:
        print(f"namespaces with no owner mark (never removed by a lab): {', '.join(unowned)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ultranet-lab",
        description="An emulated EC2 instance in an emulated VPC, built from network namespaces.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a lab in the background")
    _add_lab_flags(up)
    up.add_argument("--json", action="store_true", help="print the lab record as JSON")
    down = sub.add_parser("down", help="stop a lab (every lab with --all)")
    down.add_argument("lab_id", nargs="?", default=None, help="the lab to stop (see status)")
    down.add_argument(
        "--all", action="store_true", help="stop every lab on this machine, the tests' too"
    )
    status = sub.add_parser("status", help="list labs")
    status.add_argument("--json", action="store_true")
    serve = sub.add_parser("serve", help=argparse.SUPPRESS)
    _add_lab_flags(serve)
    serve.add_argument("--ready-fd", type=int, required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("ultranet-lab: must run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    commands = {"up": _cmd_up, "down": _cmd_down, "status": _cmd_status, "serve": _cmd_serve}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
