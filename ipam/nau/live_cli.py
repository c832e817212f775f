"""``ultranet-nau inspect``: boto3 session and output around :mod:`ipam.nau.live`."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from ipam.errors import ConfigError
from ipam.nau.errors import InspectError
from ipam.nau.live import count_nau, read_vpc
from ipam.nau.report import rule_lines
from ipam.nau.rules import (
    CONSERVATIVE_RULES,
    NAU_QUOTA_DEFAULT,
    NAU_QUOTA_MAX,
)


def _client(args: argparse.Namespace) -> object:
    import boto3
    from botocore.exceptions import BotoCoreError

    try:
        session = boto3.Session(profile_name=args.profile, region_name=args.region)
        return session.client("ec2", endpoint_url=args.endpoint_url)
    except BotoCoreError as err:
        raise InspectError(f"no EC2 client: {err}") from None


def cmd_inspect(args: argparse.Namespace) -> int:
    quota = {"default": NAU_QUOTA_DEFAULT, "max": NAU_QUOTA_MAX}.get(args.quota)
    if quota is None:
        try:
            quota = int(args.quota, 10)
        except ValueError:
            raise ConfigError("--quota", args.quota, "must be default, max or a number") from None
    rules = replace(
        CONSERVATIVE_RULES,
        efa_adds_to_interface=args.efa_counting == "adds",
        extra_interface_primary_ip=args.extra_eni_primary_ip == "counted",
    )
    inventory = read_vpc(_client(args), args.vpc)
    rows, total = count_nau(inventory, rules)
    if args.json:
        doc = {
            "vpc": inventory.vpc_id,
            "cidr_blocks": list(inventory.cidrs),
            "nau_total": total,
            "quota": quota,
            "fits": total <= quota,
            "switches": {s: c for s, c, _ in rules.switches()},
            "resources": [
                {"resource": r.resource, "count": r.count, "nau": r.nau, "note": r.note}
                for r in rows
            ],
            "subnets": [
                {"id": i, "cidr": c, "az": az, "available_ip_address_count": free}
                for i, c, az, free in inventory.subnets
            ],
        }
        print(json.dumps(doc, indent=2))
        return 0
    print(f"VPC {inventory.vpc_id} ({', '.join(inventory.cidrs)}): NAU by resource")
    for r in rows:
        note = f"  ({r.note})" if r.note else ""
        print(f"  {r.nau:>9,}  {r.count:>7,} x {r.resource}{note}")
    print(
        f"  {total:>9,}  total, against a quota of {quota:,}: "
        + ("fits" if total <= quota else "OVER QUOTA")
    )
    free = sum(s[3] for s in inventory.subnets)
    print(f"subnets: {len(inventory.subnets)}, {free:,} IPv4 addresses free")
    print("\n".join(rule_lines(rules)))
    return 0
