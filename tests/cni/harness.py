"""Shared pieces of the CNI tests: configs, env, a handler on a lab, leftover checks."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute

from cni.handler import CniHandler, HandlerConfig
from cni.plumbing import RULE_FROM_POD, RULE_TO_POD, Plumbing
from tests.cni.backend import PoolBackend
from tools.lab.lab import Lab

T = TypeVar("T")
NETWORK = "ultranet"
NETNS_DIR = Path("/run/netns")


def conf(version: str = "1.1.0", **extra: Any) -> bytes:
    body: dict[str, Any] = {"cniVersion": version, "name": NETWORK, "type": "ultranet"}
    body.update(extra)
    return json.dumps(body).encode()


def env(
    command: str, container: str = "", netns: str = "", ifname: str = "eth0", **more: str
) -> dict[str, str]:
    out = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod-{container}",
        "CNI_PATH": "/opt/cni/bin",
    }
    out.update(more)
    return out


def ns_path(name: str) -> str:
    return str(NETNS_DIR / name)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@dataclass
class Node:
    lab: Lab
    backend: PoolBackend
    handler: CniHandler
    plumbing: Plumbing

    async def call(self, e: dict[str, str], stdin: bytes) -> tuple[int, dict[str, Any]]:
        code, out = await self.handler.handle(e, stdin)
        return code, (json.loads(out) if out.strip() else {})

    async def add(
        self, container: str, pod_ns: str, version: str = "1.1.0", **extra: Any
    ) -> dict[str, Any]:
        code, out = await self.call(env("ADD", container, ns_path(pod_ns)), conf(version, **extra))
        assert code == 0, out
        return out

    async def delete(
        self,
        container: str,
        pod_ns: str,
        prev: dict[str, Any] | None = None,
        version: str = "1.1.0",
    ) -> None:
        extra = {} if prev is None else {"prevResult": prev}
        code, out = await self.call(env("DEL", container, ns_path(pod_ns)), conf(version, **extra))
        assert code == 0, out


@asynccontextmanager
async def node(lab: Lab, backend: PoolBackend, **config: Any) -> AsyncIterator[Node]:
    plumbing = await Plumbing.open(ns_path(lab.node_ns))
    try:
        yield Node(lab, backend, CniHandler(backend, plumbing, HandlerConfig(**config)), plumbing)
    finally:
        await plumbing.close()


def host_state(lab: Lab) -> dict[str, Any]:
    """What pod plumbing leaves in the node namespace: eni* links, 512/1536 rules, /32
    routes of the main table."""
    with IPRoute(netns=lab.node_ns) as ipr:
        links = sorted(
            link.get("ifname")
            for link in ipr.get_links()
            if str(link.get("ifname")).startswith("eni")
        )
        rules = sorted(
            (r.get("priority"), r.get("src") or "", r.get("dst") or "", r.get("table"))
            for r in ipr.get_rules(family=socket.AF_INET)
            if r.get("priority") in (RULE_TO_POD, RULE_FROM_POD)
        )
        routes = sorted(
            r.get("dst")
            for r in ipr.get_routes(family=socket.AF_INET, table=254)
            if r["dst_len"] == 32
        )
    return {"links": links, "rules": rules, "routes": routes}


def pod_state(ns: str) -> dict[str, Any]:
    with IPRoute(netns=ns) as ipr:
        links = {link["index"]: link.get("ifname") for link in ipr.get_links()}
        addrs = sorted(
            (links[a["index"]], a.get("address"))
            for a in ipr.get_addr(family=socket.AF_INET)
            if links[a["index"]] != "lo"
        )
        rules = sorted(
            (r.get("priority"), r.get("src") or "", r.get("table"))
            for r in ipr.get_rules(family=socket.AF_INET)
            if r.get("priority") not in (None, 0, 32766, 32767)
        )
    return {"links": sorted(n for n in links.values() if n != "lo"), "addrs": addrs, "rules": rules}
