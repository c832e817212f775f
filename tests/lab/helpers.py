"""Helpers for lab tests: boto3 clients on the emulator, commands in namespaces."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import boto3
from botocore.config import Config
from pyroute2 import IPRoute

from tools.lab.lab import Lab


def ec2_client(lab: Lab, *, retries: int = 1) -> Any:
    return boto3.client(
        "ec2",
        endpoint_url=lab.ec2_url,
        region_name="us-west-2",
        aws_access_key_id="lab",
        aws_secret_access_key="lab",
        config=Config(retries={"total_max_attempts": retries, "mode": "standard"}),
    )


def links(ns: str) -> dict[str, dict[str, Any]]:
    """Links of a namespace by name: mac, state, addresses."""
    out: dict[str, dict[str, Any]] = {}
    with IPRoute(netns=ns) as ipr:
        for link in ipr.get_links():
            name = link.get("ifname")
            addrs = [a.get("address") for a in ipr.get_addr(index=link["index"])]
            out[name] = {"mac": link.get("address"), "state": link.get("state"), "addrs": addrs}
    return out


def routes(ns: str) -> set[str]:
    """Destinations of the main table's IPv4 routes, as CIDR strings."""
    found = set()
    with IPRoute(netns=ns) as ipr:
        for route in ipr.get_routes(family=2, table=254):
            dst = route.get("dst")
            if dst:
                found.add(f"{dst}/{route['dst_len']}")
    return found


def python_in(
    ns: str, code: str, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run Python code inside a namespace with the test's interpreter."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
