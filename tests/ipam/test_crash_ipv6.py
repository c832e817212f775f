"""``kill -9`` of the real ``ultranet-ipamd`` in IPv6 prefix mode (``ENABLE_IPv6``).

The window: the node has no /80 yet and the daemon's ``AssignIpv6Addresses`` is held by
the emulator (``Faults.hold``) until the daemon is dead. EC2 then applies it (the daemon
never heard) or refuses it. After the restart the node must hold exactly one /80, the
daemon must use it, and pods get /128s from it; with the request applied, the restart
takes the /80 from IMDS and calls EC2 no more. Acknowledged IPv6 allocations survive a
kill as well.

The lab's IPv4 node with a VPC /56 and a subnet /64 added through the emulator (IPv6 on
the lab's namespaced fabric is not needed: no pod traffic leaves the node here).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path

import pytest

from ipam.client import AsyncIpamClient
from tests.conftest import LabFactory
from tools.lab.daemon import IpamdProcess
from tools.lab.lab import Lab, LabConfig

pytestmark = pytest.mark.netns

VPC_56 = "fd12:3456:789a:1000::/56"
SUBNET_64 = "fd12:3456:789a:1000::/64"
IPV6 = {
    "ENABLE_IPv4": "false",
    "ENABLE_IPv6": "true",
    "ENABLE_PREFIX_DELEGATION": "true",
    "ULTRANET_V4_EGRESS_RANGE": "198.18.4.0/22",  # lab addresses only (default 169.254.172.0/22)
}
REACHED_S = 60.0


@pytest.fixture
def daemons() -> Iterator[list[IpamdProcess]]:
    started: list[IpamdProcess] = []
    try:
        yield started
    finally:
        for daemon in started:
            daemon.stop()


def ipv6_lab(lab_factory: LabFactory) -> Lab:
    lab = lab_factory(LabConfig(instance_type="m5.large"))
    (primary,) = lab.cloud.enis_of(lab.instance_id)
    lab.cloud.associate_vpc_ipv6_cidr(lab.vpc_id, VPC_56)
    lab.cloud.associate_subnet_ipv6_cidr(primary.subnet_id, SUBNET_64)
    return lab


def prefixes(lab: Lab) -> list[IPv6Network]:
    (primary,) = lab.cloud.enis_of(lab.instance_id)
    return list(lab.cloud.eni_view(primary.eni_id).ipv6_prefixes)


async def allocate(daemon: IpamdProcess, names: list[str]) -> dict[str, str]:
    async with AsyncIpamClient(daemon.socket) as client:
        return {n: (await client.allocate(n))["interfaces"][0]["address"] for n in names}


async def listed(daemon: IpamdProcess) -> dict[str, str]:
    async with AsyncIpamClient(daemon.socket) as client:
        return {a["container_id"]: a["interfaces"][0]["address"] for a in await client.list()}


@pytest.mark.parametrize("proceed", [True, False], ids=["assign-unanswered", "assign-refused"])
def test_kill_9_while_the_80_is_being_assigned(
    lab_factory: LabFactory, daemons: list[IpamdProcess], tmp_path: Path, proceed: bool
) -> None:
    lab = ipv6_lab(lab_factory)
    assert prefixes(lab) == []
    hold = lab.cloud.faults.hold("AssignIpv6Addresses")
    daemon = IpamdProcess(lab, tmp_path / "d", IPV6)
    daemons.append(daemon)
    daemon.start()
    assert hold.wait_reached(REACHED_S), f"AssignIpv6Addresses never came: {daemon.log_tail()}"
    answered = lab.cloud.requests.count("AssignIpv6Addresses")
    daemon.kill()
    hold.release(proceed=proceed)
    # The held request finishes in the emulator (applied or refused) before the restart.
    deadline = time.monotonic() + REACHED_S
    while lab.cloud.requests.count("AssignIpv6Addresses") == answered:
        assert time.monotonic() < deadline, "the held AssignIpv6Addresses never finished"
        time.sleep(0.01)  # polling the emulator's request log, bounded
    assert len(prefixes(lab)) == int(proceed)

    lab.cloud.requests.clear()
    daemon.start()
    daemon.wait_ready(REACHED_S)
    (prefix,) = prefixes(lab)  # exactly one /80: none leaked, none missing
    assigned = lab.cloud.requests.count("AssignIpv6Addresses")
    assert assigned == (0 if proceed else 1), "the applied assign was adopted from IMDS"
    pods = asyncio.run(allocate(daemon, ["p0", "p1"]))
    assert {IPv6Address(a) for a in pods.values()} == {
        prefix.network_address + 1,
        prefix.network_address + 2,
    }


def test_kill_9_keeps_every_acknowledged_ipv6_allocation(
    lab_factory: LabFactory, daemons: list[IpamdProcess], tmp_path: Path
) -> None:
    lab = ipv6_lab(lab_factory)
    (primary,) = lab.cloud.enis_of(lab.instance_id)
    lab.cloud.assign_ipv6_addresses(primary.eni_id, prefix_count=1)  # as at launch
    daemon = IpamdProcess(lab, tmp_path / "d", {**IPV6, "IP_COOLDOWN_PERIOD": "0"})
    daemons.append(daemon)
    lab.cloud.requests.clear()
    daemon.start()
    daemon.wait_ready(REACHED_S)
    assert lab.cloud.requests.count() == 0  # the bar: a node with its /80 is ready, no EC2
    acked = asyncio.run(allocate(daemon, [f"p{n}" for n in range(50)]))

    async def release_some() -> None:
        async with AsyncIpamClient(daemon.socket) as client:
            for n in range(0, 50, 2):
                await client.release(f"p{n}")

    asyncio.run(release_some())
    daemon.kill()
    lab.cloud.requests.clear()
    daemon.start()
    daemon.wait_ready(REACHED_S)
    after = asyncio.run(listed(daemon))
    assert after == {f"p{n}": acked[f"p{n}"] for n in range(1, 50, 2)}
    assert lab.cloud.requests.count() == 0  # the /80 from IMDS, the pods from the journal
    fresh = asyncio.run(allocate(daemon, ["new"]))["new"]
    assert fresh not in after.values()
