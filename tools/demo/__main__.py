"""``make demo``: ultranet on one emulated node, end to end, then the plan for 100K nodes.

As root: the lab launches an emulated p5.48xlarge (32 network cards) with /28 prefixes
pre-assigned; ``ultranet-ipamd`` starts in its namespace from IMDS alone; Debian's
containerd starts in the node with ultranet's conflist, and 100 pods (10 of them
multi-NIC by annotation, one interface per card) are started through its CRI as the
kubelet starts them (RunPodSandbox: containerd execs the real CNI shim); the pods
resolve names through ``ultranet-dns`` in node-local mode, which forwards to a lab
upstream; the pods are stopped and removed (StopPodSandbox runs the CNI DEL). Beside it,
an IPv6 node (a second lab: an m5.large launched with its /80, ``ultranet-ipamd`` with
``ENABLE_IPv6=true``): a few pods through containerd's CRI, each with a /128 of the /80,
resolving the node's name over IPv6 through ``ultranet-dns`` on a node-local IPv6
address, and, where the build has it, reaching an IPv4 host through the egress path
(``tools/demo/node6.py``). The labs are removed. It prints ADD/DEL latency, the pods'
addresses, prefixes and NAU on the node, DNS hit rate and upstream queries, the IPv6
node's EC2 calls, /128s and DNS answers, then ``ultranet-nau plan`` for 100,000 nodes.

Where containerd cannot start (not installed, or refused by the machine), the demo
prints why and starts the pods through the libcni driver instead, labelled FALLBACK.
Without root there are no namespaces: it says so and runs the planner alone.

``--fail-at STEP`` fails on purpose at the start of a step (build, lab, imds, ipamd,
dns, containerd, pods, warm, queries, del, ipv6-node, ipv6-pods, ipv6-dns, ipv6-egress,
ipv6-del, teardown): it shows that clean-up leaves
nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Sequence

from tools.demo.node import Options, node_steps, run_node, summary
from tools.demo.progress import DemoError, Progress

STEP_KEYS = (
    "build",
    "lab",
    "imds",
    "ipamd",
    "dns",
    "containerd",
    "pods",
    "warm",
    "queries",
    "del",
    "ipv6-node",
    "ipv6-pods",
    "ipv6-dns",
    "ipv6-egress",
    "ipv6-del",
    "teardown",
)


def parse(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n")[0])
    p.add_argument("--instance-type", default="p5.48xlarge")
    p.add_argument("--prefixes-per-card", type=int, default=1, help="/28s pre-assigned per card")
    p.add_argument("--pods", type=int, default=100)
    p.add_argument("--multi-nic", type=int, default=10, help="how many of the pods are multi-NIC")
    p.add_argument("--queries-per-pod", type=int, default=5)
    p.add_argument(
        "--ipv6-pods",
        type=int,
        default=3,
        help="pods on the IPv6 node (ENABLE_IPv6, its /80 at launch); 0: no IPv6 node",
    )
    p.add_argument("--fail-at", choices=STEP_KEYS, help="fail on purpose there (tests clean-up)")
    p.add_argument(
        "--containerd",
        default="containerd",
        metavar="BINARY",
        help="the containerd to run (default: containerd on PATH); one that cannot start "
        "makes the demo say why and fall back to the libcni driver",
    )
    args = p.parse_args(argv)
    if not 1 <= args.pods <= 250:
        p.error("--pods must be 1..250 (250: the EKS max-pods ceiling)")
    if not 0 <= args.multi_nic <= args.pods:
        p.error("--multi-nic must be 0..--pods")
    if not 1 <= args.queries_per_pod <= 50:
        p.error("--queries-per-pod must be 1..50")
    if not 1 <= args.prefixes_per_card <= 8:
        p.error("--prefixes-per-card must be 1..8")
    if not 0 <= args.ipv6_pods <= 50:
        p.error("--ipv6-pods must be 0..50")
    if args.fail_at and args.fail_at.startswith("ipv6") and not args.ipv6_pods:
        p.error(f"--fail-at {args.fail_at} needs the IPv6 node (--ipv6-pods > 0)")
    return Options(
        instance_type=args.instance_type,
        prefixes_per_card=args.prefixes_per_card,
        pods=args.pods,
        multi_nic=args.multi_nic,
        queries_per_pod=args.queries_per_pod,
        fail_at=args.fail_at,
        containerd=args.containerd,
        ipv6_pods=args.ipv6_pods,
    )


def plan() -> tuple[str, int]:
    """``ultranet-nau plan`` (no arguments: the embedded 100,000-node default), in-process."""
    from ipam.nau.cli import main as nau_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = nau_main(["plan"])
    return out.getvalue(), code


def show_plan(text: str) -> str:
    print("\n== NAU plan for 100,000 nodes (ultranet-nau plan: the embedded AI/ML default) ==")
    print(text.rstrip())
    verdict = next((line for line in text.splitlines() if line.startswith("VERDICT")), "")
    largest = next((line for line in text.splitlines() if line.startswith("largest")), "")
    return f"{verdict.removeprefix('VERDICT: ')}; {largest}" if verdict else "no verdict printed"


def main(argv: Sequence[str] | None = None) -> int:
    options = parse(argv)
    if os.geteuid() != 0:
        print(
            "demo: not root, so no lab: the node, its pods and DNS need network namespaces "
            "(run `sudo make demo` for all of it). Running the NAU planner alone."
        )
        progress = Progress(1)
        with progress.step("plan", "planning NAU for 100,000 nodes"):
            text, code = plan()
        verdict = show_plan(text)
        print(f"\ndemo: planner only, {progress.elapsed():.1f} s. Plan verdict: {verdict}")
        return code
    progress = Progress(node_steps(options) + 1, fail_at=options.fail_at)
    try:
        report = run_node(options, progress)
        with progress.step("plan", "planning NAU for 100,000 nodes (ultranet-nau plan)"):
            text, code = plan()
    except DemoError as err:
        print(f"demo: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # a product's own error: name it, the clean-up has run
        print(f"demo: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    summary(report, print)
    verdict = show_plan(text)
    print(
        f"\ndemo: done in {progress.elapsed():.1f} s; left behind: nothing. "
        f"Plan verdict for 100K nodes: {verdict}"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
