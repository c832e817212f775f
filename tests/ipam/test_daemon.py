"""``ultranet-ipamd`` as a real process in the lab's node namespace, through its socket."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipam.client import AsyncIpamClient
from ipam.protocol import frame
from tests.conftest import LabFactory
from tools.lab.daemon import IpamdProcess, allocate_then_kill
from tools.lab.lab import Lab, LabConfig

pytestmark = pytest.mark.netns


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[IpamdProcess] = []

    def start(lab: Lab, env: dict[str, str] | None = None, name: str = "d") -> IpamdProcess:
        daemon = IpamdProcess(lab, tmp_path / name, env)
        started.append(daemon)
        daemon.start()
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            daemon.stop()


def test_p5_start_from_preassigned_prefixes_makes_no_ec2_call(
    lab_factory: LabFactory, daemon_factory: Any
) -> None:
    lab = lab_factory(LabConfig(instance_type="p5.48xlarge", prefixes_per_card=1))
    lab.cloud.requests.clear()
    daemon = daemon_factory(lab, {"ENABLE_MULTI_NIC": "true"})
    status = daemon.wait_ready()
    assert status["cards"] == list(range(32))
    assert status["ec2_used"] is False
    assert status["boto3_loaded"] is False
    assert lab.cloud.requests.count() == 0
    # The lab's daemon serves the CNI shim from its own directory, never the host's path.
    assert daemon.wait_cni_socket() == daemon.state_dir / "cni.sock"


def test_the_conflist_appears_only_once_the_warm_pool_is_met(
    lab_factory: LabFactory, daemon_factory: Any, tmp_path: Path
) -> None:
    # Nothing pre-assigned and EC2 throttling every prefix request: the daemon cannot be
    # ready, and the node must stay NetworkNotReady (no conflist) until it is.
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=0))
    lab.cloud.faults.throttle_next(1_000_000, "AssignPrivateIpAddresses")
    conf_dir = tmp_path / "net.d"
    daemon = daemon_factory(
        lab, {"ULTRANET_CNI_CONF_DIR": str(conf_dir), "AWS_VPC_ENI_MTU": "1500"}
    )

    async def throttled_while_not_ready() -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + 30
        while lab.cloud.requests.count("AssignPrivateIpAddresses") < 2:
            assert asyncio.get_running_loop().time() < deadline, daemon.log_tail()
            await asyncio.sleep(0.05)  # polling the emulator's request log, bounded
        client = await _client(daemon)
        try:
            return await client.status()
        finally:
            await client.close()

    status = asyncio.run(throttled_while_not_ready())
    assert status["ready"] is False
    assert not (conf_dir / "10-ultranet.conflist").exists()

    lab.cloud.faults.clear()
    daemon.wait_ready(timeout=60)
    conflist = conf_dir / "10-ultranet.conflist"
    deadline = time.monotonic() + 10
    while not conflist.exists():  # written just after ready, on a worker thread
        assert time.monotonic() < deadline, daemon.log_tail()
        time.sleep(0.02)
    written = json.loads(conflist.read_text())
    assert written["plugins"][0]["type"] == "ultranet"
    assert written["plugins"][0]["mtu"] == 1500


def test_an_unwritable_conflist_directory_stops_the_daemon_with_a_reason(
    lab_factory: LabFactory, daemon_factory: Any, tmp_path: Path
) -> None:
    lab = lab_factory()
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    daemon = daemon_factory(lab, {"ULTRANET_CNI_CONF_DIR": str(blocker / "net.d")})
    assert daemon.process.wait(timeout=30) == 1
    assert "cannot write the CNI conflist" in daemon.log_tail()


async def _client(daemon: IpamdProcess) -> AsyncIpamClient:
    client = AsyncIpamClient(daemon.socket)
    await client.__aenter__()
    return client


def test_bad_requests_get_clear_errors_and_never_crash(
    lab_factory: LabFactory, daemon_factory: Any
) -> None:
    lab = lab_factory()
    daemon = daemon_factory(lab)
    daemon.wait_ready()

    async def scenario() -> list[dict[str, Any]]:
        replies = []
        async with AsyncIpamClient(daemon.socket) as client:
            replies.append(await client.raw({"version": 99, "op": "status"}))
            replies.append(await client.raw({"version": 1, "op": "explode"}))
            replies.append(await client.raw({"version": 1, "op": "allocate"}))
            replies.append(
                await client.raw(
                    {
                        "version": 1,
                        "op": "allocate",
                        "network": "n",
                        "container_id": "-bad",
                        "ifname": "eth0",
                        "pod_namespace": "a",
                        "pod_name": "b",
                    }
                )
            )
            replies.append(await client.raw_bytes(b"\x00\x00\x00\x05nope!"))
            replies.append(await client.raw({"version": 1, "op": "status"}))
        return replies

    replies = asyncio.run(scenario())
    codes = [r.get("error", {}).get("code") for r in replies[:5]]
    assert codes == [
        "unsupported-version",
        "bad-request",
        "bad-request",
        "bad-request",
        "bad-request",
    ]
    assert "supported: [1]" in replies[0]["error"]["message"]
    assert "container_id" in replies[3]["error"]["message"]
    assert replies[5]["ok"] is True  # the same connection still works


def _read_reply(sock: socket.socket) -> dict[str, Any]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "the daemon closed the connection"
            data += chunk
        return data

    return dict(json.loads(exactly(int.from_bytes(exactly(4)))))


def test_frames_split_joined_or_large_are_all_answered_in_order(
    lab_factory: LabFactory, daemon_factory: Any
) -> None:
    lab = lab_factory()
    daemon = daemon_factory(lab)
    daemon.wait_ready()
    allocate = {
        "version": 1,
        "op": "allocate",
        "network": "n",
        "ifname": "eth0",
        "pod_namespace": "default",
        "pod_name": "web",
    }
    # A GC naming thousands of pods: one frame larger than the daemon's read buffer.
    valid = [[f"pod-{n:05d}-{'x' * 20}", "eth0"] for n in range(3000)]
    gc = frame({"version": 1, "op": "gc", "network": "n", "valid": [["joined-1", "eth0"], *valid]})
    assert len(gc) > 1 << 16
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.socket))
        # Two requests in one write: two replies, in request order.
        sock.sendall(
            frame({**allocate, "container_id": "joined-1"})
            + frame({**allocate, "container_id": "joined-2"})
        )
        first, second = _read_reply(sock), _read_reply(sock)
        assert first["result"]["container_id"] == "joined-1"
        assert second["result"]["container_id"] == "joined-2"
        # One request a byte at a time.
        for byte in frame({**allocate, "container_id": "split-1"}):
            sock.sendall(bytes([byte]))
        assert _read_reply(sock)["result"]["container_id"] == "split-1"
        sock.sendall(gc)
        released = _read_reply(sock)["result"]["released"]
        assert sorted(a["container_id"] for a in released) == ["joined-2", "split-1"]
        sock.sendall(frame({"version": 1, "op": "list"}))
        held = _read_reply(sock)["result"]["allocations"]
        assert [a["container_id"] for a in held] == ["joined-1"]


def test_hundreds_of_clients_connecting_at_once_are_all_served(
    lab_factory: LabFactory, daemon_factory: Any
) -> None:
    # Past asyncio's default listen backlog (100), a non-blocking Unix connect fails with
    # EAGAIN, which asyncio takes for success: the client's first read then fails.
    lab = lab_factory()
    daemon = daemon_factory(lab)
    daemon.wait_ready()

    async def connect_all() -> list[bool]:
        clients = [AsyncIpamClient(daemon.socket) for _ in range(400)]
        # All connect while the daemon cannot accept (stopped): every one waits in the
        # listen backlog, none is accepted before the others arrive.
        os.kill(daemon.process.pid, signal.SIGSTOP)
        try:
            await asyncio.gather(*(c.__aenter__() for c in clients))
        finally:
            os.kill(daemon.process.pid, signal.SIGCONT)
        try:
            return [s["ready"] for s in await asyncio.gather(*(c.status() for c in clients))]
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    assert asyncio.run(connect_all()) == [True] * 400


def test_only_root_may_use_the_socket(lab_factory: LabFactory) -> None:
    lab = lab_factory()
    # A directory others may traverse, so the refusal comes from the daemon, not the
    # file system.
    public = Path(tempfile.mkdtemp(prefix="ultranet-test-", dir="/run"))
    public.chmod(0o755)
    daemon = IpamdProcess(lab, public)
    try:
        daemon.start()
        daemon.wait_ready()
        daemon.socket.chmod(0o666)  # even if the mode were loosened, the peer check holds
        request = frame({"version": 1, "op": "status"})
        code = (
            "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
            f" s.sendall({request!r}); print(s.recv(4096)[4:].decode())"
        )
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            + [sys.executable, "-c", code, str(daemon.socket)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        daemon.stop()
        shutil.rmtree(public)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["error"]["code"] == "forbidden"
    assert "uid 65534" in reply["error"]["message"]


@pytest.mark.parametrize("trial", range(3))
def test_kill_9_during_200_allocations_loses_and_duplicates_nothing(
    lab_factory: LabFactory, daemon_factory: Any, trial: int
) -> None:
    lab = lab_factory(LabConfig(instance_type="m5.large", prefixes_per_card=9))
    # A static pool: the nine launch prefixes, kept (MINIMUM_IP_TARGET), never grown (MAX_ENI).
    env = {
        "IP_COOLDOWN_PERIOD": "0",
        "MINIMUM_IP_TARGET": "144",
        "WARM_IP_TARGET": "1",
        "MAX_ENI": "1",
    }
    daemon = daemon_factory(lab, env, name=f"t{trial}")
    daemon.wait_ready()
    keys = [f"t{trial}-pod{n:03d}" for n in range(200)]
    stop_after = random.Random(trial).randrange(1, 140)
    acked = asyncio.run(allocate_then_kill(daemon, keys, stop_after))
    assert len(acked) >= stop_after

    daemon.start()  # the same state directory: a restart after the crash
    daemon.wait_ready()

    async def check() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        async with AsyncIpamClient(daemon.socket) as client:
            held = await client.list()
            for container in keys:  # the runtime retries: DEL for every pod that went away
                await client.release(container)
            return held, await client.status()

    held, status = asyncio.run(check())
    by_key = {a["container_id"]: a["interfaces"][0]["address"] for a in held}
    for container, address in acked.items():
        assert by_key.get(container) == address, container  # nothing acknowledged lost
    addresses = list(by_key.values())
    assert len(addresses) == len(set(addresses))  # no address twice
    assert set(by_key) <= set(keys)
    assert status["free_addresses"]["0"] == 9 * 16  # no leak once every DEL arrived
