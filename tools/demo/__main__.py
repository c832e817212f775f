"""``make demo``: a p5.48xlarge launched with pre-assigned prefixes, as its node sees it.

Brings up the lab (emulated VPC + instance in network namespaces), reads the instance
from inside its namespace through IMDSv2 at 169.254.169.254 with ultranet's own IMDS
client, lists its ENIs per network card through boto3 against the emulator, prints
prefixes and NAU, and tears everything down. Without root it says so and runs the NAU
planner alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

INSTANCE_TYPE = "p5.48xlarge"
PREFIXES_PER_CARD = 1


@contextmanager
def step(number: int, total: int, text: str) -> Iterator[None]:
    print(f"[{number}/{total}] {text} ...", end="", flush=True)
    started = time.perf_counter()
    yield
    print(f" done ({time.perf_counter() - started:.2f} s)", flush=True)


def run_planner() -> int:
    from ipam.nau.cli import main as nau_main

    print("\n== NAU plan for 100,000 nodes (ultranet-nau plan) ==")
    return nau_main(["plan"])


def show_node(imds_doc: dict[str, Any], enis: list[dict[str, Any]], nau: int, quota: int) -> None:
    identity = imds_doc["identity"]
    interfaces = imds_doc["interfaces"]
    print(
        f"\n== what the node sees (IMDSv2 from inside its namespace, {imds_doc['imds_requests']}"
        " requests) =="
    )
    print(
        f"instance {identity['instance_id']}  type {identity['instance_type']}  "
        f"AZ {identity['availability_zone']}"
    )
    print(f"{'card':>4} {'dev':>3}  {'interface':<22} {'mac':<18} {'primary ip':<15} prefixes")
    for i in interfaces:
        primary = i["local_ipv4s"][0] if i["local_ipv4s"] else "-"
        prefixes = ", ".join(i["ipv4_prefixes"]) or "-"
        print(
            f"{i['network_card']:>4} {i['device_number']:>3}  {i['interface_id']:<22} "
            f"{i['mac']:<18} {primary:<15} {prefixes}"
        )
    by_type: dict[str, int] = {}
    for eni in enis:
        by_type[eni["InterfaceType"]] = by_type.get(eni["InterfaceType"], 0) + 1
    cards = {e["Attachment"]["NetworkCardIndex"] for e in enis}
    prefixes = sum(len(e.get("Ipv4Prefixes", [])) for e in enis)
    print("\n== what EC2 says (boto3 DescribeNetworkInterfaces) ==")
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(by_type.items()))
    print(
        f"{len(enis)} ENIs on {len(cards)} network cards ({kinds}); {prefixes} /28 prefixes "
        f"= {prefixes * 16} pod addresses"
    )
    print(f"NAU used in the VPC: {nau} of {quota:,} (quota)")


def run_lab() -> int:
    import boto3

    from tools.lab.lab import Lab, LabConfig

    total = 4
    config = LabConfig(instance_type=INSTANCE_TYPE, prefixes_per_card=PREFIXES_PER_CARD)
    with step(
        1,
        total,
        f"lab up: VPC, {INSTANCE_TYPE} launched with {PREFIXES_PER_CARD} "
        "prefix per card, vpc + node namespaces",
    ):
        lab = Lab(config)
        lab.__enter__()
    try:
        with step(2, total, "reading IMDS from inside the node namespace"):
            seen = subprocess.run(
                ["ip", "netns", "exec", lab.node_ns, sys.executable, "-m", "ipam.imds"],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            imds_doc = json.loads(seen.stdout)
        with step(3, total, "asking EC2 (emulator) through boto3"):
            ec2 = boto3.client(
                "ec2",
                endpoint_url=lab.ec2_url,
                region_name="us-west-2",
                aws_access_key_id="lab",
                aws_secret_access_key="lab",
            )
            pages = ec2.get_paginator("describe_network_interfaces").paginate(
                Filters=[{"Name": "attachment.instance-id", "Values": [lab.instance_id]}]
            )
            enis = [eni for page in pages for eni in page["NetworkInterfaces"]]
            nau = lab.cloud.nau_used(lab.vpc_id)
            quota = lab.cloud.nau_quota(lab.vpc_id)
        show_node(imds_doc, enis, nau, quota)
    finally:
        with step(total, total, "tearing the lab down"):
            lab.close()
    return 0


def main() -> int:
    if os.geteuid() != 0:
        print("demo: not root, so no lab (it needs network namespaces); running the planner only")
        return run_planner()
    return run_lab()


if __name__ == "__main__":
    sys.exit(main())
