"""``make demo``: a p5.48xlarge launched with pre-assigned prefixes, as its node sees it.

Brings up the lab (emulated VPC + instance in network namespaces), reads the instance
from inside its namespace through IMDSv2 at 169.254.169.254 with ultranet's own IMDS
client, lists its ENIs per network card through boto3 against the emulator, prints
prefixes and NAU, and tears everything down. Without root there are no namespaces: it
says so and shows the same instance through the emulator's EC2 and IMDS on loopback.
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


def show_node(imds_doc: dict[str, Any], enis: list[Any], nau: int, quota: int) -> None:
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
        kind = str(eni["InterfaceType"])
        by_type[kind] = by_type.get(kind, 0) + 1
    cards = {e["Attachment"]["NetworkCardIndex"] for e in enis}
    prefix_count = sum(len(e.get("Ipv4Prefixes", [])) for e in enis)
    print("\n== what EC2 says (boto3 DescribeNetworkInterfaces) ==")
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(by_type.items()))
    print(
        f"{len(enis)} ENIs on {len(cards)} network cards ({kinds}); {prefix_count} /28 prefixes "
        f"= {prefix_count * 16} pod addresses"
    )
    print(f"NAU used in the VPC: {nau} of {quota:,} (quota)")


def run_lab() -> int:
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
            enis = instance_enis(lab.ec2_url, lab.instance_id)
            nau = lab.cloud.nau_used(lab.vpc_id)
            quota = lab.cloud.nau_quota(lab.vpc_id)
        show_node(imds_doc, enis, nau, quota)
    finally:
        with step(total, total, "tearing the lab down"):
            lab.close()
    return 0


def ec2_client(url: str) -> Any:
    import boto3

    return boto3.client(
        "ec2",
        endpoint_url=url,
        region_name="us-west-2",
        aws_access_key_id="lab",
        aws_secret_access_key="lab",
    )


def instance_enis(url: str, instance_id: str) -> list[Any]:
    pages = (
        ec2_client(url)
        .get_paginator("describe_network_interfaces")
        .paginate(Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}])
    )
    return [eni for page in pages for eni in page["NetworkInterfaces"]]


def run_loopback() -> int:
    """No root: the emulator alone, EC2 and IMDS on loopback, no namespaces."""
    from tools.lab.ec2.server import Ec2Server, ImdsServer
    from tools.lab.ec2.state import Cloud
    from tools.lab.lab import DEFAULT_SUBNETS, launch_interfaces

    print("demo: not root, so no network namespaces; EC2 and IMDS are served on loopback")
    cloud = Cloud()
    vpc = cloud.create_vpc(["100.64.0.0/16"])
    subnets = [
        cloud.create_subnet(vpc.vpc_id, s.cidr, s.availability_zone, dict(s.tags))
        for s in DEFAULT_SUBNETS
    ]
    instance = cloud.launch_instance(
        INSTANCE_TYPE,
        subnets[0].subnet_id,
        interfaces=launch_interfaces(INSTANCE_TYPE, PREFIXES_PER_CARD, "efa"),
    )
    ec2, imds = Ec2Server(cloud), ImdsServer(cloud, instance.instance_id)
    try:
        ec2_url, imds_url = ec2.start(), imds.start()
        seen = subprocess.run(
            [sys.executable, "-m", "ipam.imds", imds_url],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        enis = instance_enis(ec2_url, instance.instance_id)
        show_node(json.loads(seen.stdout), enis, cloud.nau_used(vpc.vpc_id), vpc.nau_quota)
    finally:
        ec2.close()
        imds.close()
    return 0


def main() -> int:
    if os.geteuid() != 0:
        return run_loopback()
    return run_lab()


if __name__ == "__main__":
    sys.exit(main())
