"""The recording plumbing port of the logic tests says what the real ``Plumbing`` does: the
same handler calls go to both, in the lab, and the host's veths, /32 routes and rules in
the node namespace are what ``RecordingPlumbing`` holds after each step."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

import pytest

from cni.backend import MAIN_TABLE
from cni.handler import CniHandler
from cni.keys import IpamKey
from cni.plumbing import RULE_TO_POD, PlumbedInterface, Plumbing, PodHandle, PodNetwork
from tests.cni.backend import PoolBackend, pool_from_lab
from tests.cni.harness import NETWORK, conf, env, host_state, ns_path, run
from tests.cni.recording_plumbing import RecordingPlumbing
from tools.lab.lab import Lab

pytestmark = pytest.mark.netns


@dataclass
class _Both:
    real: PodHandle
    recording: PodHandle

    def close(self) -> None:
        self.real.close()
        self.recording.close()


class TeePlumbing:
    """Every call to the real plumbing and to a recording one; the real one answers."""

    def __init__(self, real: Plumbing, recording: RecordingPlumbing) -> None:
        self.real = real
        self.recording = recording

    async def enter(
        self,
        netns: str,
        key: IpamKey,
        *,
        interfaces: int,
        veth_prefix: str,
        netns_fd: int | None = None,
    ) -> _Both:
        real = await self.real.enter(
            netns, key, interfaces=interfaces, veth_prefix=veth_prefix, netns_fd=netns_fd
        )
        try:
            recorded = await self.recording.enter(
                netns, key, interfaces=interfaces, veth_prefix=veth_prefix
            )
            return _Both(real, recorded)
        except BaseException:
            real.close()
            raise

    async def setup(self, net: PodNetwork, pod: PodHandle) -> list[PlumbedInterface]:
        assert isinstance(pod, _Both)
        done = await self.real.setup(net, pod.real)
        recorded = await self.recording.setup(net, pod.recording)
        assert [(i.host_ifname, i.pod_ifname, i.address, i.gateway) for i in done] == [
            (i.host_ifname, i.pod_ifname, i.address, i.gateway) for i in recorded
        ]
        return done

    async def check(self, net: PodNetwork) -> None:
        await self.real.check(net)
        await self.recording.check(net)

    async def teardown(
        self,
        key: IpamKey,
        addresses: Mapping[int, IPv4Address],
        *,
        veth_prefix: str,
        netns: str,
        interfaces: int = 1,
        netns_fd: int | None = None,
        v4_egress: bool = False,
    ) -> list[str]:
        errors = await self.real.teardown(
            key,
            addresses,
            veth_prefix=veth_prefix,
            netns=netns,
            interfaces=interfaces,
            netns_fd=netns_fd,
            v4_egress=v4_egress,
        )
        await self.recording.teardown(
            key,
            addresses,
            veth_prefix=veth_prefix,
            netns=netns,
            interfaces=interfaces,
            v4_egress=v4_egress,
        )
        await self.real.settle()
        return errors


def recorded_host(recording: RecordingPlumbing, before: dict[str, Any]) -> dict[str, Any]:
    """``host_state`` as the recording port has it, over what the lab had before."""
    rules = [
        (p, "", str(a), t) if p == RULE_TO_POD else (p, str(a), "", t)
        for p, a, t in recording.rules
    ]
    return {
        "links": sorted(before["links"] + list(recording.veths)),
        "rules": sorted(before["rules"] + rules),
        "routes": sorted(before["routes"] + [str(a) for a in recording.routes]),
    }


def test_the_recording_port_holds_what_the_kernel_does(lab: Lab) -> None:
    pods = [lab.create_pod_namespace(f"r{i}") for i in range(3)]
    backend = PoolBackend(pool_from_lab(lab))
    before = host_state(lab)
    recording = RecordingPlumbing()
    seen: list[tuple[dict[str, Any], dict[str, Any]]] = []
    orphaned: list[str] = []

    async def scenario() -> None:
        real = await Plumbing.open(ns_path(lab.node_ns))
        handler = CniHandler(backend, TeePlumbing(real, recording))

        async def call(command: str, i: int, **extra: Any) -> dict[str, Any]:
            code, out = await handler.handle(env(command, f"c{i}", ns_path(pods[i])), conf(**extra))
            assert code == 0, out
            return json.loads(out) if out.strip() else {}

        async def compare() -> None:
            kernel = await asyncio.to_thread(host_state, lab)
            seen.append((kernel, recorded_host(recording, before)))

        try:
            results = [await call("ADD", i) for i in range(3)]
            await compare()
            await call("CHECK", 0, prevResult=results[0])
            await call("DEL", 0, prevResult=results[0])
            await compare()
            # The allocation gone and no prevResult: the veth goes by name, and its rule
            # with the address the host routes to it.
            await backend.release(IpamKey(NETWORK, "c1", "eth0"))
            orphaned.append(results[1]["ips"][0]["address"].split("/")[0])
            await call("DEL", 1)
            await compare()
            await call("DEL", 2)
            await compare()
        finally:
            await real.close()

    run(scenario())
    for kernel, recorded in seen:
        assert kernel == recorded
    (address,) = orphaned
    assert (RULE_TO_POD, "", address, MAIN_TABLE) in seen[1][0]["rules"]
    assert (RULE_TO_POD, "", address, MAIN_TABLE) not in seen[2][0]["rules"]
    assert address not in seen[2][0]["routes"]
