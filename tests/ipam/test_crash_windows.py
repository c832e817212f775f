"""``kill -9`` of the real ``ultranet-ipamd`` inside the windows a burst of allocations
never reaches: a journal snapshot, an ENI's set-up, a reconcile with EC2.

Each window is hit exactly, with no sleep standing in for the timing: the snapshot by the
daemon's own pause point (``cni.pausepoint``, test-only: the daemon announces the point in
a file and blocks there), the ENI set-up and the reconcile by the emulator holding the
daemon's EC2 request (``Faults.hold``) until the daemon is dead. After each kill the
daemon restarts on the same state directory, and the test checks that every acknowledged
allocation and release held, no address is held twice, no ENI leaked in EC2, and the
pool's addresses are EC2's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from ipam.agent import CREATED_BY_TAG, ENI_WORK_FILE, INSTANCE_TAG
from ipam.client import AsyncIpamClient, IpamClientError
from tests.conftest import LabFactory
from tools.lab.daemon import IpamdProcess
from tools.lab.ec2.faults import Hold
from tools.lab.lab import Lab, LabConfig

pytestmark = pytest.mark.netns

STATIC_POOL = {  # the nine launch prefixes of an m5.large, kept, never grown, reused at once
    "IP_COOLDOWN_PERIOD": "0",
    "MINIMUM_IP_TARGET": "144",
    "WARM_IP_TARGET": "1",
    "MAX_ENI": "1",
}
REACHED_S = 60.0  # bound on waiting for a window; reaching it is an event, not a timer


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[IpamdProcess]]:
    started: list[IpamdProcess] = []
    try:
        yield started
    finally:
        for daemon in started:
            daemon.stop()


def _start(started: list[IpamdProcess], lab: Lab, state: Path, env: dict[str, str]) -> IpamdProcess:
    daemon = IpamdProcess(lab, state, env)
    started.append(daemon)
    daemon.start()
    return daemon


def _wait_for(condition: Any, what: str, daemon: IpamdProcess, *, running: bool = True) -> None:
    """Poll a condition the daemon (``running``) or the emulator brings about, bounded."""
    deadline = time.monotonic() + REACHED_S
    while not condition():
        assert daemon.process is not None
        if running and daemon.process.poll() is not None:
            raise AssertionError(f"{what}: the daemon exited: {daemon.log_tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {REACHED_S} s: {daemon.log_tail()}")
        time.sleep(0.01)  # polling a file or the emulator's state, bounded


def _kill_when_held(daemon: IpamdProcess, hold: Hold, *, proceed: bool) -> None:
    """Kill the daemon while its request is held; then let the request go on or fail."""
    assert hold.wait_reached(REACHED_S), f"{hold.action} never came: {daemon.log_tail()}"
    daemon.kill()
    hold.release(proceed=proceed)


async def _list(daemon: IpamdProcess) -> dict[str, str]:
    async with AsyncIpamClient(daemon.socket) as client:
        return {a["container_id"]: a["interfaces"][0]["address"] for a in await client.list()}


async def _status(daemon: IpamdProcess) -> dict[str, Any]:
    async with AsyncIpamClient(daemon.socket) as client:
        return await client.status()


def _assert_same_as_ec2(lab: Lab, held: dict[str, str], status: dict[str, Any]) -> None:
    """Every held address is on a prefix EC2 gives the instance, no address is held
    twice, and the pool holds exactly EC2's prefixes (free + assigned = 16 per prefix)."""
    prefixes = [p for eni in lab.cloud.enis_of(lab.instance_id) for p in eni.prefixes]
    addresses = list(held.values())
    assert len(addresses) == len(set(addresses)), "an address is held twice"
    for container, address in held.items():
        assert any(IPv4Address(address) in p for p in prefixes), (container, address)
    assert int(status["free_addresses"]["0"]) + len(held) == 16 * len(prefixes)


def _assert_no_leaked_eni(lab: Lab) -> None:
    """Every ENI the daemon created for the instance is attached to it and goes with it."""
    ours = [
        e
        for e in lab.cloud.enis()
        if e.tags.get(CREATED_BY_TAG) == "ultranet-ipamd"
        and e.tags.get(INSTANCE_TAG) == lab.instance_id
    ]
    leaked = [e.eni_id for e in ours if e.attachment is None]
    assert not leaked, f"created but never attached, still billed: {leaked}"
    kept = [e.eni_id for e in ours if e.attachment and not e.attachment.delete_on_termination]
    assert not kept, f"would outlive the instance: {kept}"


# -- (a) a journal snapshot -------------------------------------------------------------


@pytest.mark.parametrize("point", ["snapshot-written", "snapshot-renamed"])
def test_kill_9_inside_a_journal_snapshot(
    lab_factory: LabFactory, daemons: list[IpamdProcess], tmp_path: Path, point: str
) -> None:
    # snapshot-written: the new snapshot is synced under its temporary name, not renamed;
    # snapshot-renamed: renamed and the directory synced, the old journal not yet emptied.
    # The daemon snapshots once at start (pass 0, let through) and then every 5000
    # journal lines: ~2500 allocate+release pairs of churn reach the next one.
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=9))
    signal_file = tmp_path / "paused"
    env = {
        **STATIC_POOL,
        "ULTRANET_PAUSE_AT": f"{point}@1",
        "ULTRANET_PAUSE_SIGNAL": str(signal_file),
    }
    daemon = _start(daemons, lab, tmp_path / "d", env)
    daemon.wait_ready()

    held: dict[str, str] = {}  # acknowledged, never released
    released: set[str] = set()  # allocation and release both acknowledged
    in_flight: dict[str, str] = {}  # allocation acknowledged, release not (yet)
    asked: set[str] = set()  # every allocation sent, acknowledged or not

    async def churn() -> None:
        async with AsyncIpamClient(daemon.socket) as client:
            for n in range(40):
                reply = await client.allocate(f"held-{n}")
                held[f"held-{n}"] = reply["interfaces"][0]["address"]

        async def worker(index: int) -> None:
            n = 0
            try:
                async with AsyncIpamClient(daemon.socket) as client:
                    while True:
                        container = f"churn-{index}-{n}"
                        asked.add(container)
                        reply = await client.allocate(container)
                        in_flight[container] = reply["interfaces"][0]["address"]
                        await client.release(container)
                        del in_flight[container]
                        released.add(container)
                        n += 1
            except (ConnectionError, asyncio.IncompleteReadError, IpamClientError):
                return  # killed under us

        workers = [asyncio.create_task(worker(i)) for i in range(20)]
        deadline = time.monotonic() + REACHED_S
        # The whole line, not just the file: the point creates the file, then writes.
        while not (signal_file.exists() and signal_file.read_text().endswith("\n")):
            assert time.monotonic() < deadline, daemon.log_tail()
            assert not all(w.done() for w in workers), daemon.log_tail()
            await asyncio.sleep(0.01)  # polling the daemon's announcement, bounded
        daemon.kill()  # blocked at the point: nothing after it ran
        await asyncio.gather(*workers)

    asyncio.run(churn())
    assert signal_file.read_text() == f"{point}\n"
    assert len(released) > 2000  # the snapshot came from churn, not from the start

    del daemon.env["ULTRANET_PAUSE_AT"]
    daemon.start()
    daemon.wait_ready()
    after = asyncio.run(_list(daemon))
    for container, address in held.items():
        assert after.get(container) == address, container  # no acknowledged allocation lost
    assert not released & set(after), "an acknowledged release came back"
    for container, address in in_flight.items():  # its release may or may not have landed
        assert after.get(container, address) == address, container
    # An allocation sent but never answered may or may not have landed (the runtime DELs it).
    assert set(after) <= set(held) | asked
    _assert_same_as_ec2(lab, after, asyncio.run(_status(daemon)))


# -- (b) an ENI's set-up ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "proceed"),
    [
        # Created, then killed before AttachNetworkInterface reached EC2.
        ("AttachNetworkInterface", False),
        # Killed with the attach sent: EC2 attaches it, the daemon never hears.
        ("AttachNetworkInterface", True),
        # Attached and DeleteOnTermination set, killed before the host-side set-up.
        ("ModifyNetworkInterfaceAttribute", True),
    ],
    ids=["before-attach", "attach-unanswered", "before-host-setup"],
)
def test_kill_9_inside_an_eni_setup(
    lab_factory: LabFactory,
    daemons: list[IpamdProcess],
    tmp_path: Path,
    action: str,
    proceed: bool,
) -> None:
    # An m5.large whose primary ENI is full (nine prefixes), all kept (MINIMUM_IP_TARGET),
    # 16 addresses warm: at 129 pods the pool grows by a second ENI:
    # CreateNetworkInterface, AttachNetworkInterface, ModifyNetworkInterfaceAttribute
    # (DeleteOnTermination), the link, the host side.
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=9))
    hold = lab.cloud.faults.hold(action)
    env = {"MINIMUM_IP_TARGET": "144", "WARM_IP_TARGET": "16"}
    daemon = _start(daemons, lab, tmp_path / "d", env)
    daemon.wait_ready()

    async def fill() -> dict[str, str]:
        acked = {}
        async with AsyncIpamClient(daemon.socket) as client:
            for n in range(129):
                reply = await client.allocate(f"pod-{n}")
                acked[f"pod-{n}"] = reply["interfaces"][0]["address"]
        return acked

    acked = asyncio.run(fill())
    answered = lab.cloud.requests.count(action)
    _kill_when_held(daemon, hold, proceed=proceed)
    # The held request finishes in the emulator (applied or refused) before the restart,
    # as EC2 has long finished an attach by the time a killed daemon is back.
    _wait_for(
        lambda: lab.cloud.requests.count(action) > answered, f"{action} done", daemon, running=False
    )
    assert lab.cloud.requests.count("CreateNetworkInterface") == 1

    daemon.start()
    daemon.wait_ready()
    work = daemon.state_dir / "state" / ENI_WORK_FILE
    _wait_for(lambda: not work.exists(), "the sweep of cut-short ENI work", daemon)
    after = asyncio.run(_list(daemon))
    for container, address in acked.items():
        assert after.get(container) == address, container
    _assert_no_leaked_eni(lab)
    _assert_same_as_ec2(lab, after, asyncio.run(_status(daemon)))
    # The second ENI (the one from before the kill, or its replacement) is plumbed on the
    # host: its link up and its source rule in place.
    (second,) = [
        e for e in lab.cloud.enis_of(lab.instance_id) if e.attachment and e.attachment.device_index
    ]
    assert second.primary_ip is not None
    _wait_for(
        lambda: f"from {second.primary_ip} lookup" in lab.node_exec(["ip", "rule"]).stdout,
        "the second ENI's rule",
        daemon,
    )
    link = lab.node_exec(["ip", "-o", "link", "show"]).stdout
    (line,) = [row for row in link.splitlines() if second.mac in row]
    assert "state UP" in line or ",UP" in line, line


# -- (c) a reconcile with EC2 -----------------------------------------------------------


def test_kill_9_inside_a_reconcile(
    lab_factory: LabFactory, daemons: list[IpamdProcess], tmp_path: Path
) -> None:
    # IMDS frozen at launch (no prefix): every prefix the daemon has came from EC2's
    # answers. A restart then finds its journal on prefixes IMDS does not list, asks EC2
    # (DescribeNetworkInterfaces #1) and adopts them; its first periodic reconcile sees
    # IMDS disagree with the pool and asks EC2 again (#2): held, and the daemon killed
    # there. While it is held EC2 takes one prefix back, as an operator's unassign would.
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=0))
    lab.cloud.set_imds_lag(3600)
    state = tmp_path / "d"
    env = {"WARM_PREFIX_TARGET": "2"}  # 20 pods fit before the first regrowth
    first = _start(daemons, lab, state, env)
    first.wait_ready()

    async def allocate(n: int) -> dict[str, str]:
        acked = {}
        async with AsyncIpamClient(first.socket) as client:
            for i in range(n):
                reply = await client.allocate(f"pod-{i}")
                acked[f"pod-{i}"] = reply["interfaces"][0]["address"]
            deadline = time.monotonic() + REACHED_S
            while (await client.status())["free_addresses"]["0"] < 32:
                assert time.monotonic() < deadline, first.log_tail()  # warm again: idle
                await asyncio.sleep(0.01)  # polling the daemon's answer, bounded
        return acked

    acked = asyncio.run(allocate(20))
    first.stop()
    (primary,) = lab.cloud.enis_of(lab.instance_id)
    prefixes = list(primary.prefixes)
    assert len(prefixes) >= 2

    hold = lab.cloud.faults.hold("DescribeNetworkInterfaces", skip=1)
    second = _start(daemons, lab, state, env)
    assert hold.wait_reached(REACHED_S), second.log_tail()
    taken = next(p for p in prefixes if any(IPv4Address(a) in p for a in acked.values()))
    lab.cloud.unassign_private_ip_addresses(primary.eni_id, prefixes=[str(taken)])
    second.kill()
    hold.release(proceed=True)

    third = _start(daemons, lab, state, env)
    third.wait_ready()
    after = asyncio.run(_list(third))
    on_taken = {c for c, a in acked.items() if IPv4Address(a) in IPv4Network(taken)}
    assert on_taken and not on_taken & set(after)  # EC2 took their prefix: removed
    for container, address in acked.items():
        if container not in on_taken:
            assert after.get(container) == address, container
    _assert_no_leaked_eni(lab)
    _assert_same_as_ec2(lab, after, asyncio.run(_status(third)))
