"""The handler's paths through real netlink, in-process in the lab: namespaces gone or not
namespaces (3, 4), a pod socket failing (11), an interface already there (102), rollback
after every netlink batch (100), DEL idempotence and spooling, CHECK against the kernel,
GC's teardown. The same logic without root, on a recording plumbing port:
``test_handler_logic.py``."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from cni import netlink, shim
from cni.errors import CniError, ErrorCode
from cni.handler import CniHandler
from cni.keys import IpamKey
from cni.plumbing import Plumbing, host_ifname
from cni.transport import replay_spool
from tests.cni.backend import PoolBackend, pool_from_lab
from tests.cni.harness import (
    NETWORK,
    Node,
    conf,
    env,
    host_state,
    node,
    ns_path,
    pod_state,
    run,
)
from tools.lab import netns
from tools.lab.lab import Lab

pytestmark = pytest.mark.netns


def backend_of(lab: Lab) -> PoolBackend:
    return PoolBackend(pool_from_lab(lab))


async def error(n: Node, e: dict[str, str], stdin: bytes) -> dict[str, Any]:
    code, out = await n.call(e, stdin)
    assert code == 1, out
    return out


def test_add_into_a_gone_namespace_is_code_3_and_leaves_nothing(lab: Lab) -> None:
    backend = backend_of(lab)
    before = host_state(lab)

    async def scenario() -> dict[str, Any]:
        async with node(lab, backend) as n:
            return await error(n, env("ADD", "c1", "/run/netns/ul-no-such-pod"), conf())

    assert run(scenario())["code"] == 3
    assert backend.held() == set() and host_state(lab) == before


def test_add_into_the_host_namespace_is_refused(lab: Lab) -> None:
    backend = backend_of(lab)

    async def scenario() -> dict[str, Any]:
        async with node(lab, backend) as n:
            return await error(n, env("ADD", "c1", ns_path(lab.node_ns)), conf())

    out = run(scenario())
    assert out["code"] == 4 and "host's own namespace" in out["msg"]
    assert backend.held() == set()


def test_add_into_a_path_that_is_no_network_namespace_is_code_4_and_leaves_nothing(
    lab: Lab,
) -> None:
    # The veth is created while the pod's socket is being made: the namespace's error, not
    # the veth's, is what the runtime must see.
    backend = backend_of(lab)
    before = host_state(lab)

    async def scenario() -> dict[str, Any]:
        async with node(lab, backend) as n:
            return await error(n, env("ADD", "c1", "/proc/self/ns/uts"), conf())

    out = run(scenario())
    assert out["code"] == 4 and "not a network namespace" in out["msg"], out
    assert backend.held() == set() and host_state(lab) == before


def test_a_namespace_removed_once_the_add_entered_it_is_plumbed_and_the_del_cleans_up(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ADD holds the namespace by descriptor from its checks on, so a removal of its
    # file meanwhile neither fails the ADD halfway nor sends the veth anywhere else; the
    # runtime's DEL (the namespace gone by then) leaves nothing.
    pod_ns = lab.create_pod_namespace("racing")
    backend = backend_of(lab)
    before = host_state(lab)
    enter = Plumbing.enter

    async def enter_then_the_pod_goes(self: Plumbing, path: str, *args: Any, **kw: Any) -> Any:
        entered = await enter(self, path, *args, **kw)
        await asyncio.to_thread(netns.delete, pod_ns)
        return entered

    monkeypatch.setattr(Plumbing, "enter", enter_then_the_pod_goes)

    async def scenario() -> None:
        async with node(lab, backend) as n:
            result = await n.add("c1", pod_ns)
            assert backend.held() == {IPv4Address(result["ips"][0]["address"][:-3])}
            await n.delete("c1", pod_ns)
            await n.plumbing.settle()

    run(scenario())
    assert backend.held() == set() and host_state(lab) == before


@pytest.mark.parametrize("failure", [errno.EAGAIN, errno.EMFILE])
def test_a_pod_socket_failing_is_code_11_and_leaves_nothing(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, failure: int
) -> None:
    # The daemon's own trouble entering the namespace (its thread replaced, out of
    # descriptors) is worth a retry, not "invalid environment"; nothing was taken.
    pod_ns = lab.create_pod_namespace("late")
    backend = backend_of(lab)
    before, before_pod = host_state(lab), pod_state(pod_ns)

    class NoSockets:
        def __getattr__(self, name: str) -> Any:
            return getattr(socket, name)

        def socket(self, *args: Any) -> socket.socket:
            raise OSError(failure, os.strerror(failure))

    async def scenario() -> dict[str, Any]:
        async with node(lab, backend) as n:
            with monkeypatch.context() as patched:
                patched.setattr(netlink, "socket", NoSockets())
                out = await error(n, env("ADD", "c1", ns_path(pod_ns)), conf())
            await n.plumbing.settle()
            return out

    out = run(scenario())
    assert out["code"] == 11, out
    assert host_state(lab) == before and pod_state(pod_ns) == before_pod
    assert backend.held() == set()


def test_interface_already_in_the_pod_is_code_102_and_rolls_back(lab: Lab) -> None:
    pod_ns = lab.create_pod_namespace("dup")
    backend = backend_of(lab)
    before = host_state(lab)

    async def scenario() -> dict[str, Any]:
        async with node(lab, backend) as n:
            await n.add("c1", pod_ns)
            other = await error(n, env("ADD", "c2", ns_path(pod_ns)), conf())  # eth0 is taken
            await n.plumbing.settle()
            assert len(backend.held()) == 1  # c1 keeps its address, c2 got none
            await n.delete("c1", pod_ns)
            await n.plumbing.settle()
            return other

    out = run(scenario())
    assert out["code"] == 102 and "CNI_IFNAME='eth0' already exists" in out["msg"]
    assert host_state(lab) == before and backend.held() == set()


class FailingPlumbing(Plumbing):
    """Runs the first ``keep`` requests of its ``fail_batch``-th netlink batch, then fails:
    a failure in the middle of a step, after the kernel did part of it."""

    fail_batch = 0
    keep = 0
    seen = 0

    def _run(self, sock: Any, messages: Any) -> None:
        self.seen += 1
        if self.seen == self.fail_batch:
            sock.batch(messages[: self.keep])
            raise CniError(ErrorCode.PLUMBING_FAILED, f"injected at batch {self.seen}")
        super()._run(sock, messages)


# Batch 1 is the pod side (link up, address, gateway route, default route, neighbour),
# batch 2 the host side (host route, rule 512).
@pytest.mark.parametrize(
    ("fail_batch", "keep"), [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (2, 0), (2, 1), (2, 2)]
)
def test_add_failing_anywhere_leaves_nothing(lab: Lab, fail_batch: int, keep: int) -> None:
    pod_ns = lab.create_pod_namespace("rb")
    backend = backend_of(lab)
    before_host, before_pod = host_state(lab), pod_state(pod_ns)

    async def scenario() -> dict[str, Any]:
        plumbing = await FailingPlumbing.open(ns_path(lab.node_ns))
        plumbing.fail_batch, plumbing.keep = fail_batch, keep
        n = Node(lab, backend, CniHandler(backend, plumbing), plumbing)
        try:
            out = await error(n, env("ADD", "c1", ns_path(pod_ns)), conf())
            await plumbing.settle()
            return out
        finally:
            await plumbing.close()

    out = run(scenario())
    assert out["code"] == 100 and f"batch {fail_batch}" in out["msg"]
    assert host_state(lab) == before_host
    assert pod_state(pod_ns) == before_pod
    assert backend.held() == set()


def test_del_is_idempotent_without_netns_prev_result_or_allocation(lab: Lab) -> None:
    pod_ns = lab.create_pod_namespace("d")
    backend = backend_of(lab)
    before = host_state(lab)

    async def scenario() -> None:
        async with node(lab, backend) as n:
            result = await n.add("c1", pod_ns)
            await asyncio.to_thread(netns.delete, pod_ns)  # the runtime removed it first
            await n.delete("c1", pod_ns, result)  # netns gone
            await n.delete("c1", pod_ns)  # and no prevResult
            code, out = await n.call(env("DEL", "c1", ""), conf())  # CNI_NETNS empty
            assert code == 0, out
            code, out = await n.call(env("DEL", "never-added", ""), conf())
            assert code == 0, out
            await n.plumbing.settle()

    run(scenario())
    assert host_state(lab) == before and backend.held() == set()


def test_del_with_backend_down_tears_down_from_prev_result_and_spools(
    lab: Lab, tmp_path: Path
) -> None:
    pod_ns = lab.create_pod_namespace("s")
    backend = backend_of(lab)
    before = host_state(lab)
    spool = tmp_path / "spool"

    async def scenario() -> list[Path]:
        async with node(lab, backend, spool_dir=spool) as n:
            result = await n.add("c1", pod_ns)
            backend.down = "restarting"
            await n.delete("c1", pod_ns, result)
            await n.plumbing.settle()
            assert await asyncio.to_thread(host_state, lab) == before  # from prevResult
            assert len(backend.held()) == 1  # the release waits in the spool
            assert [p.name for p in spool.iterdir()] == ["c1:eth0.del"]
            backend.down = ""
            return await replay_spool(spool, n.handler.handle)

    assert run(scenario()) == []
    assert backend.held() == set() and list(spool.iterdir()) == []


def test_add_replays_a_spooled_del_of_the_same_attachment_first(lab: Lab, tmp_path: Path) -> None:
    pod_ns = lab.create_pod_namespace("r")
    backend = backend_of(lab)
    spool = tmp_path / "spool"

    async def scenario() -> None:
        async with node(lab, backend, spool_dir=spool) as n:
            first = await n.add("c1", pod_ns)
            shim.spool(
                str(spool).encode(),
                {k.encode(): v.encode() for k, v in env("DEL", "c1", ns_path(pod_ns)).items()},
                conf(prevResult=first),
            )
            await n.add("c1", pod_ns)  # would fail with eth0 taken, had the DEL not run
            assert list(spool.iterdir()) == []
            await n.delete("c1", pod_ns)
            await n.plumbing.settle()

    run(scenario())
    assert backend.held() == set()


def test_check_detects_missing_pieces_with_code_103(lab: Lab) -> None:
    pod_ns = lab.create_pod_namespace("k")
    backend = backend_of(lab)

    async def scenario() -> list[dict[str, Any]]:
        async with node(lab, backend) as n:
            result = await n.add("c1", pod_ns)
            check = env("CHECK", "c1", ns_path(pod_ns))
            found = [await error(n, check, conf())]  # no prevResult: 7
            found.append(
                await error(n, env("CHECK", "c9", ns_path(pod_ns)), conf(prevResult=result))
            )
            other = {**result, "ips": [{"address": "100.64.99.9/32", "interface": 1}]}
            found.append(await error(n, check, conf(prevResult=other)))
            address = result["ips"][0]["address"].split("/")[0]
            await asyncio.to_thread(
                lab.node_exec, ["ip", "rule", "del", "prio", "512", "to", address]
            )
            found.append(await error(n, check, conf(prevResult=result)))
            await n.delete("c1", pod_ns, result)
            await n.plumbing.settle()
            return found

    no_prev, unknown, wrong_ip, no_rule = run(scenario())
    assert no_prev["code"] == 7 and "prevResult" in no_prev["msg"]
    assert unknown["code"] == 3
    assert wrong_ip["code"] == 103 and "prevResult lacks" in wrong_ip["msg"]
    assert no_rule["code"] == 103 and "prio 512" in no_rule["msg"]


def test_gc_releases_only_this_networks_stale_attachments(lab: Lab) -> None:
    pods = [lab.create_pod_namespace(f"g{i}") for i in range(4)]
    backend = backend_of(lab)
    before = host_state(lab)

    async def scenario() -> tuple[int, dict[str, Any]]:
        async with node(lab, backend) as n:
            for i, pod in enumerate(pods[:3]):
                await n.add(f"c{i}", pod)
            other = json.loads(conf(name="other"))
            code, out = await n.call(
                env("ADD", "o1", ns_path(pods[3]), ifname="net1"), json.dumps(other).encode()
            )
            assert code == 0, out
            assert (await n.call(env("GC"), conf()))[0] == 0  # no valid-attachments: no-op
            assert len(backend.held()) == 4
            valid = [{"containerID": "c1", "ifname": "eth0"}]
            gc = await n.call(env("GC"), conf(**{"cni.dev/valid-attachments": valid}))
            await n.plumbing.settle()
            held = {a.key for a in backend.pool.allocations()}
            assert held == {IpamKey(NETWORK, "c1", "eth0"), IpamKey("other", "o1", "net1")}
            bad = await n.call(env("GC"), conf(**{"cni.dev/valid-attachments": [{"x": 1}]}))
            await n.delete("c1", pods[1])
            await n.call(
                env("DEL", "o1", ns_path(pods[3]), ifname="net1"), json.dumps(other).encode()
            )
            await n.plumbing.settle()
            assert gc == (0, {})
            return bad

    bad = run(scenario())
    assert bad[0] == 1 and bad[1]["code"] == 7 and "valid-attachments[0]" in bad[1]["msg"]
    assert host_state(lab) == before and backend.held() == set()


def test_host_names_derive_from_the_attachment_key() -> None:
    key = IpamKey(NETWORK, "abc", "eth0")
    assert host_ifname(key, 0, "eni") == host_ifname(key, 0, "eni")
    assert host_ifname(key, 0, "eni") != host_ifname(key, 1, "eni")
    assert len(host_ifname(key, 0, "abcd")) == 15
    assert os.path.basename(host_ifname(key, 0, "eni")).startswith("eni")
