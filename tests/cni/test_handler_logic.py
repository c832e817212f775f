"""The CNI handler's logic without root: ``CniHandler.handle`` driven with real CNI env and
stdin bytes, its plumbing a ``RecordingPlumbing``, its backend the in-process pool
(``tools.lab.pool_backend``) or the node agent (``ipam.cni_backend``) on the cloud
emulator over loopback. Every command, the spec's error JSON and codes, prevResult
chaining, multi-NIC, rollback, DEL idempotence and GC scoping; the netlink of each
step is tested in namespaces (``test_commands.py``, ``test_add_del.py``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from cni import shim
from cni.backend import IpamBackend
from cni.handler import CniHandler, HandlerConfig
from cni.keys import IpamKey
from cni.plumbing import RULE_FROM_POD, RULE_TO_POD, host_ifname
from cni.spec import ANNOTATIONS_CAPABILITY, MULTI_NIC_ANNOTATION, MULTI_NIC_VALUE
from cni.transport import replay_spool
from ipam.cni_backend import AgentBackend
from tests.cni.harness import NETWORK, conf, env
from tests.cni.recording_plumbing import RecordingPlumbing
from tests.ipam.agentenv import AgentRun
from tests.ipam.cloudnode import CloudNode, agent_on_cloud, cloud_node
from tools.lab.lab import LabConfig
from tools.lab.pool_backend import PoolBackend, pool_from_enis

MULTI = {ANNOTATIONS_CAPABILITY: {MULTI_NIC_ANNOTATION: MULTI_NIC_VALUE}}


def ns(container: str) -> str:
    return f"/run/netns/pod-{container}"


@dataclass
class Bed:
    """A handler on one backend, and what the test reads of that backend."""

    kind: str
    handler: CniHandler
    plumbing: RecordingPlumbing
    backend: IpamBackend
    loop: asyncio.AbstractEventLoop
    node: CloudNode
    agent: AgentRun | None

    def handle(self, variables: dict[str, str], stdin: bytes) -> tuple[int, bytes]:
        return self.loop.run_until_complete(self.handler.handle(variables, stdin))

    def call(self, variables: dict[str, str], stdin: bytes) -> tuple[int, dict[str, Any]]:
        code, out = self.handle(variables, stdin)
        return code, (json.loads(out) if out.strip() else {})

    def error(self, variables: dict[str, str], stdin: bytes) -> dict[str, Any]:
        code, out = self.call(variables, stdin)
        assert code == 1, out
        assert set(out) <= {"cniVersion", "code", "msg", "details"} and out["msg"], out
        return out

    def add(
        self, container: str, version: str = "1.1.0", netns: str = "", **extra: Any
    ) -> dict[str, Any]:
        variables = env("ADD", container, netns or ns(container))
        code, out = self.call(variables, conf(version, **extra))
        assert code == 0, out
        return out

    def delete(self, container: str, **extra: Any) -> None:
        code, out = self.call(env("DEL", container, ns(container)), conf(**extra))
        assert code == 0, out

    def held(self) -> set[IPv4Address]:
        """Addresses the backend has given out."""
        if isinstance(self.backend, PoolBackend):
            return self.backend.held()
        assert self.agent is not None
        return {lease.address for a in self.agent.agent.allocations() for lease in a.leases}

    def cooling(self) -> int:
        """Addresses in cooldown on card 0."""
        if isinstance(self.backend, PoolBackend):
            return self.backend.pool.card(0).usage(time.monotonic()).cooldown
        assert self.agent is not None and self.agent.agent.pool is not None
        return self.agent.agent.pool.card(0).usage(self.agent.clock()).cooldown


M5 = LabConfig(instance_type="m5.large", prefixes_per_card=1)  # one /28: 16 addresses
P5 = LabConfig(instance_type="p5.48xlarge", prefixes_per_card=1, other_cards="efa")


@contextmanager
def bed_on(
    kind: str,
    tmp_path: Path,
    config: LabConfig = M5,
    agent_env: Mapping[str, str] | None = None,
    **handler: Any,
) -> Iterator[Bed]:
    """A handler on the emulated node, its backend the in-process pool ("pool") or the
    node agent ("agent", the shipped IP_COOLDOWN_PERIOD of 30 s unless told)."""
    with ExitStack() as stack:
        node = stack.enter_context(cloud_node(config))
        plumbing = RecordingPlumbing()
        settings = HandlerConfig(**handler)
        if kind == "pool":
            views = [node.cloud.eni_view(e.eni_id) for e in node.cloud.enis_of(node.instance_id)]
            backend: IpamBackend = PoolBackend(pool_from_enis(views))
            loop = asyncio.new_event_loop()
            stack.callback(loop.close)
            yield Bed(
                kind, CniHandler(backend, plumbing, settings), plumbing, backend, loop, node, None
            )
            return
        run = stack.enter_context(agent_on_cloud(node, tmp_path / "state", agent_env))
        backend = AgentBackend(run.agent)
        yield Bed(
            kind, CniHandler(backend, plumbing, settings), plumbing, backend, run.loop, node, run
        )


@pytest.fixture(params=["pool", "agent"])
def bed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Bed]:
    with bed_on(request.param, tmp_path) as made:
        yield made


@pytest.fixture
def pool_bed(tmp_path: Path) -> Iterator[Bed]:
    with bed_on("pool", tmp_path) as made:
        yield made


# -- ADD's input errors: the spec's error JSON, naming the culprit ---------------------------


@pytest.mark.parametrize(
    ("variables", "stdin", "code", "needle"),
    [
        ({"CNI_COMMAND": ""}, conf(), 4, "[CNI_COMMAND] missing"),
        ({"CNI_COMMAND": "FROB"}, conf(), 4, "CNI_COMMAND='FROB'"),
        ({"CNI_NETNS": "", "CNI_IFNAME": ""}, conf(), 4, "[CNI_NETNS,CNI_IFNAME] missing"),
        ({"CNI_NETNS": "relative/ns"}, conf(), 4, "CNI_NETNS='relative/ns'"),
        ({"CNI_CONTAINERID": "-bad id"}, conf(), 4, "CNI_CONTAINERID='-bad id'"),
        ({"CNI_IFNAME": "eth0:1"}, conf(), 4, "CNI_IFNAME='eth0:1'"),
        ({"CNI_ARGS": "K8S_POD_NAME"}, conf(), 4, "CNI_ARGS: 'K8S_POD_NAME' is not KEY=VALUE"),
        ({"CNI_ARGS": "K8S_POD_NAMESPACE=a"}, conf(), 4, "CNI_ARGS lacks K8S_POD_NAME"),
        ({}, b"{not json", 6, "not JSON"),
        ({}, b"[1, 2]", 6, "not a JSON object"),
        ({}, conf("0.3.1"), 1, "incompatible CNI versions"),
        (
            {},
            json.dumps({"cniVersions": ["0.2.0"], "name": "n", "type": "t"}).encode(),
            1,
            "incompatible",
        ),
        ({}, conf(ipam={"type": "host-local"}), 2, 'ipam={"type": "host-local"}'),
        ({}, conf(mtu=9002), 7, "mtu=9002"),
        ({}, conf(vethPrefix="toolong"), 7, "vethPrefix='toolong'"),
        ({}, json.dumps({"cniVersion": "1.0.0", "type": "t"}).encode(), 7, "name=None"),
        ({}, conf(name="bad name"), 7, "name='bad name'"),
        ({}, conf(prevResult={"ips": [{"address": "nope"}]}), 6, "prevResult.ips[0]"),
    ],
)
def test_add_errors_name_the_culprit_and_touch_nothing(
    pool_bed: Bed, variables: dict[str, str], stdin: bytes, code: int, needle: str
) -> None:
    out = pool_bed.error({**env("ADD", "c1", ns("c1")), **variables}, stdin)
    assert out["code"] == code
    assert needle in out["msg"] + out.get("details", ""), out
    assert pool_bed.held() == set() and pool_bed.plumbing.calls == []


@pytest.mark.parametrize(
    ("variables", "stdin", "version"),
    [
        ({"CNI_COMMAND": ""}, conf("0.4.0"), "0.4.0"),  # env refused before stdin is read
        ({"CNI_NETNS": "relative/ns"}, conf("1.0.0"), "1.0.0"),
        ({}, conf("0.4.0", mtu=9002), "0.4.0"),  # config refused after its version was read
        ({}, conf("0.4.0", ipam={"type": "host-local"}), "0.4.0"),
        (
            {"CNI_IFNAME": ""},
            json.dumps({"cniVersions": ["0.4.0", "1.0.0", "9.9.9"], "name": "n"}).encode(),
            "1.0.0",  # the highest of cniVersions we speak, as pick_version reads it
        ),
        ({}, conf("0.3.1"), "1.1.0"),  # a version we do not speak: the latest we do
        ({"CNI_COMMAND": ""}, b"{not json", "1.1.0"),
    ],
)
def test_an_error_before_the_config_is_whole_answers_in_the_configs_version(
    pool_bed: Bed, variables: dict[str, str], stdin: bytes, version: str
) -> None:
    out = pool_bed.error({**env("ADD", "c1", ns("c1")), **variables}, stdin)
    assert out["cniVersion"] == version, out


def test_an_error_after_the_config_is_read_answers_in_its_version(pool_bed: Bed) -> None:
    variables = {**env("ADD", "c1", ns("c1")), "CNI_ARGS": "K8S_POD_NAMESPACE=a"}
    out = pool_bed.error(variables, conf("0.4.0"))
    assert (out["cniVersion"], out["code"]) == ("0.4.0", 4)


# -- ADD, CHECK, DEL ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_add_check_del_per_version(bed: Bed, version: str) -> None:
    result = bed.add("c1", version, mtu=1500)
    key = IpamKey(NETWORK, "c1", "eth0")
    assert result["cniVersion"] == version
    (ip,) = result["ips"]
    address = IPv4Address(ip["address"].split("/")[0])
    assert bed.held() == {address}
    assert ip["address"].endswith("/32") and ip["gateway"] == "169.254.1.1"
    assert ip["interface"] == 1 and ("version" in ip) == (version == "0.4.0")
    host_name = host_ifname(key, 0, "eni")
    assert [i["name"] for i in result["interfaces"]] == [host_name, "eth0"]
    assert result["interfaces"][1]["sandbox"] == ns("c1")
    assert result["interfaces"][0]["mac"] == bed.plumbing.veths[host_name].host_mac
    assert ("mtu" in result["interfaces"][1]) == (version == "1.1.0")
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    # What the plumbing was asked for: the pod's interface, its /32 and rule 512.
    assert bed.plumbing.pods[ns("c1")] == {"eth0": address}
    assert bed.plumbing.routes == {address: host_name}
    assert bed.plumbing.rules == {(RULE_TO_POD, address, 254)}  # on the primary ENI

    code, out = bed.call(env("CHECK", "c1", ns("c1")), conf(version, prevResult=result))
    assert (code, out) == (0, {})
    bed.delete("c1", prevResult=result)
    bed.delete("c1", prevResult=result)  # DEL twice: still success
    assert bed.held() == set() and bed.plumbing.state() == ({}, set(), {}, set())
    ops = [op for op, _, _ in bed.plumbing.calls]
    assert ops == ["enter", "setup", "check", "teardown", "teardown"]
    assert bed.plumbing.open_entries == 0


def test_the_agent_backend_makes_adds_durable_and_cools_released_addresses(
    tmp_path: Path,
) -> None:
    with bed_on("agent", tmp_path) as bed:
        assert bed.agent is not None
        first = IPv4Address(bed.add("c1")["ips"][0]["address"].split("/")[0])
        with agent_on_cloud(bed.node, tmp_path / "state") as again:  # a restarted daemon
            assert again.agent.lookup(IpamKey(NETWORK, "c1", "eth0")) is not None
        bed.delete("c1")
        assert bed.cooling() == 1
        for n in range(2, 17):  # the other 15 addresses of the prefix
            assert bed.add(f"c{n}")["ips"][0]["address"] != f"{first}/32"
        assert bed.error(env("ADD", "c17", ns("c17")), conf())["code"] == 11
        bed.agent.clock.advance(30)  # IP_COOLDOWN_PERIOD: the address is free again
        assert bed.add("c17")["ips"][0]["address"] == f"{first}/32"


def test_chained_after_another_plugin_extends_its_prev_result(bed: Bed) -> None:
    earlier = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "lo", "sandbox": ns("c1")}],
        "ips": [{"address": "fd00::5/128", "interface": 0}],
        "routes": [{"dst": "fd00::/8"}],
        "dns": {"nameservers": ["198.18.0.53"]},
        "x-unknown": {"kept": True},
    }
    result = bed.add("c1", "1.0.0", prevResult=earlier)
    assert [i["name"] for i in result["interfaces"]][0] == "lo"
    assert len(result["interfaces"]) == 3
    assert result["ips"][0] == earlier["ips"][0]  # IPv6 passes through untouched
    assert result["ips"][1]["interface"] == 2  # shifted past "lo"
    assert result["routes"][0] == {"dst": "fd00::/8"}
    assert result["dns"] == earlier["dns"] and result["x-unknown"] == {"kept": True}
    # The next plugin's prevResult is ours; CHECK and DEL find our address in it.
    code, out = bed.call(env("CHECK", "c1", ns("c1")), conf("1.0.0", prevResult=result))
    assert (code, out) == (0, {})
    bed.delete("c1", prevResult=result)
    assert bed.held() == set()


# -- ADD's failures: codes, rollback, nothing leaked ---------------------------------------------


def test_an_exhausted_pool_is_code_11_and_a_freed_address_serves_again(bed: Bed) -> None:
    for n in range(16):
        bed.add(f"c{n}")
    out = bed.error(env("ADD", "c16", ns("c16")), conf())
    assert out["code"] == 11 and out["msg"] == "no free pod address"
    assert "card 0" in out["details"]
    assert ("setup", IpamKey(NETWORK, "c16", "eth0"), ns("c16")) not in bed.plumbing.calls
    if bed.agent is not None:
        bed.agent.clock.advance(30)  # the agent's cooldown; the pool backend has none
    bed.delete("c3")
    if bed.agent is not None:
        bed.agent.clock.advance(30)
    bed.add("c16")
    assert len(bed.held()) == 16


def test_a_backend_not_ready_is_code_11_for_add_and_50_for_status(pool_bed: Bed) -> None:
    pool_bed.backend.down = "datastore not restored yet"  # type: ignore[attr-defined]
    add = pool_bed.error(env("ADD", "c1", ns("c1")), conf())
    assert add["code"] == 11 and add["details"] == "datastore not restored yet"
    status = pool_bed.error(env("STATUS"), conf())
    assert status["code"] == 50 and status["details"] == "datastore not restored yet"
    assert pool_bed.plumbing.calls == []


def test_an_agent_still_starting_is_code_11_for_add_and_50_for_status(tmp_path: Path) -> None:
    with bed_on("agent", tmp_path) as bed:
        assert bed.agent is not None
        starting = AgentBackend(type(bed.agent.agent)(bed.agent.agent.config))
        handler = CniHandler(starting, bed.plumbing)
        add = json.loads(
            bed.loop.run_until_complete(handler.handle(env("ADD", "c1", ns("c1")), conf()))[1]
        )
        status = json.loads(bed.loop.run_until_complete(handler.handle(env("STATUS"), conf()))[1])
        assert (add["code"], add["details"]) == (11, "ultranet-ipamd is still starting")
        assert status["code"] == 50
        assert bed.plumbing.calls == []


def test_a_plumbing_failure_rolls_back_and_leaks_no_address(bed: Bed) -> None:
    bed.add("c0")
    before, held = bed.plumbing.state(), bed.held()
    bed.plumbing.fail_after = 0
    out = bed.error(env("ADD", "c1", ns("c1")), conf())
    assert out["code"] == 100 and "injected" in out["msg"]
    assert bed.plumbing.state() == before
    assert bed.held() == held  # released
    # Leaked nothing: the pool still gives out its 16 at once (the failed ADD's address
    # skipped the agent's 30 s cooldown: nobody was ever told of it).
    bed.plumbing.fail_after = None
    for n in range(2, 17):
        bed.add(f"c{n}")
    assert len(bed.held()) == 16


def _pool_state(bed: Bed) -> tuple[object, ...]:
    """Everything of the pool an ADD can change: allocations, and per card the assigned,
    cooling and free addresses and the prefixes."""
    if isinstance(bed.backend, PoolBackend):
        pool, now = bed.backend.pool, time.monotonic()
    else:
        assert bed.agent is not None and bed.agent.agent.pool is not None
        pool, now = bed.agent.agent.pool, bed.agent.clock()
    allocations = {a.key: a.leases for a in pool.allocations()}
    return allocations, {card: pool.card(card).usage(now) for card in pool.cards}


@pytest.mark.parametrize(
    ("failure", "code"),
    [("gone", 3), ("not a netns", 4), ("interface taken", 102), ("plumbing", 100)],
)
def test_a_failed_add_leaves_the_pool_exactly_as_it_was(
    tmp_path: Path, failure: str, code: int
) -> None:
    # The agent with the shipped 30 s IP_COOLDOWN_PERIOD: a failed ADD puts no address in
    # cooldown. Checks come before the allocation; a failure after it (the plumbing)
    # releases without cooldown, durably: a restarted agent holds nothing of it.
    with bed_on("agent", tmp_path) as bed:
        assert bed.agent is not None
        bed.add("c0")
        if failure == "gone":
            bed.plumbing.gone.add(ns("c1"))
        elif failure == "not a netns":
            bed.plumbing.not_netns.add(ns("c1"))
        elif failure == "interface taken":
            bed.add("c9", netns=ns("c1"))  # another container's eth0 in that namespace
        else:
            bed.plumbing.fail_after = 0
        before, plumbed = _pool_state(bed), bed.plumbing.state()
        out = bed.error(env("ADD", "c1", ns("c1")), conf())
        assert out["code"] == code, out
        assert _pool_state(bed) == before and bed.cooling() == 0
        assert bed.plumbing.state() == plumbed and bed.plumbing.open_entries == 0
        allocated = failure == "plumbing"  # the only failure an allocation precedes
        setups = [k for op, k, _ in bed.plumbing.calls if op == "setup"]
        assert (IpamKey(NETWORK, "c1", "eth0") in setups) == allocated
        with agent_on_cloud(bed.node, tmp_path / "state") as again:  # the journal agrees
            assert again.agent.lookup(IpamKey(NETWORK, "c1", "eth0")) is None
            assert len(again.agent.allocations()) == len(before[0])


def test_a_repeated_add_that_fails_keeps_the_live_pods_address(bed: Bed) -> None:
    result = bed.add("c1")
    before, held = bed.plumbing.state(), bed.held()
    out = bed.error(env("ADD", "c1", ns("c1")), conf())  # eth0 is there: 102
    assert out["code"] == 102 and "CNI_IFNAME='eth0' already exists" in out["msg"]
    assert bed.held() == held and bed.plumbing.state() == before
    code, _ = bed.call(env("CHECK", "c1", ns("c1")), conf(prevResult=result))
    assert code == 0


def test_another_container_on_the_same_interface_is_code_102_and_gets_nothing(bed: Bed) -> None:
    bed.add("c1")
    held = bed.held()
    out = bed.error(env("ADD", "c2", ns("c1")), conf())  # the same namespace's eth0
    assert out["code"] == 102
    assert bed.held() == held
    assert len(bed.plumbing.veths) == 1


def test_a_gone_namespace_is_code_3_and_leaves_nothing(bed: Bed) -> None:
    bed.plumbing.gone.add(ns("c1"))
    out = bed.error(env("ADD", "c1", ns("c1")), conf())
    assert out["code"] == 3 and "gone" in out["msg"]
    assert bed.held() == set() and bed.plumbing.state() == ({}, set(), {}, set())


# -- DEL ------------------------------------------------------------------------------------------


def test_del_is_idempotent_without_netns_prev_result_or_allocation(bed: Bed) -> None:
    result = bed.add("c1")
    bed.delete("c1", prevResult=result)
    bed.delete("c1")  # no prevResult, no allocation
    code, out = bed.call(env("DEL", "c1", ""), conf())  # CNI_NETNS empty
    assert (code, out) == (0, {})
    code, out = bed.call(env("DEL", "never-added", ""), conf())
    assert (code, out) == (0, {})
    assert bed.held() == set() and bed.plumbing.state() == ({}, set(), {}, set())


def test_del_without_an_allocation_tears_down_what_prev_result_names(bed: Bed) -> None:
    result = bed.add("c1")
    key = IpamKey(NETWORK, "c1", "eth0")
    bed.loop.run_until_complete(bed.backend.release(key))  # the allocation went first
    bed.delete("c1", prevResult=result)
    address = IPv4Address(result["ips"][0]["address"].split("/")[0])
    assert address not in bed.plumbing.routes and bed.plumbing.rules == set()


def test_a_del_whose_teardown_fails_is_code_100_and_still_releases(bed: Bed) -> None:
    bed.add("c1")
    bed.plumbing.teardown_errors.append("eni0123456789a (100.64.0.5): injected")
    out = bed.error(env("DEL", "c1", ns("c1")), conf())
    assert out["code"] == 100 and "injected" in out["details"]
    assert bed.held() == set()


def test_del_with_backend_down_tears_down_from_prev_result_and_spools(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    with bed_on("pool", tmp_path, spool_dir=spool) as bed:
        result = bed.add("c1")
        bed.backend.down = "restarting"  # type: ignore[attr-defined]
        bed.delete("c1", prevResult=result)
        assert bed.plumbing.state() == ({}, set(), {}, set())  # from prevResult
        assert len(bed.held()) == 1  # the release waits in the spool
        assert [p.name for p in spool.iterdir()] == ["c1:eth0.del"]
        bed.backend.down = ""  # type: ignore[attr-defined]
        assert bed.loop.run_until_complete(replay_spool(spool, bed.handler.handle)) == []
        assert bed.held() == set() and list(spool.iterdir()) == []


def test_del_with_backend_down_and_no_spool_is_code_11(pool_bed: Bed) -> None:
    result = pool_bed.add("c1")
    pool_bed.backend.down = "restarting"  # type: ignore[attr-defined]
    out = pool_bed.error(env("DEL", "c1", ns("c1")), conf(prevResult=result))
    assert out["code"] == 11 and out["details"] == "restarting"


def test_add_replays_a_spooled_del_of_the_same_attachment_first(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    with bed_on("pool", tmp_path, spool_dir=spool) as bed:
        first = bed.add("c1")
        shim.spool(
            str(spool).encode(),
            {k.encode(): v.encode() for k, v in env("DEL", "c1", ns("c1")).items()},
            conf(prevResult=first),
        )
        bed.add("c1")  # would fail with eth0 taken, had the DEL not run
        assert list(spool.iterdir()) == []
        ops = [op for op, _, _ in bed.plumbing.calls]
        assert ops == ["enter", "setup", "teardown", "enter", "setup"]


# -- CHECK ----------------------------------------------------------------------------------------


def test_check_errors(bed: Bed) -> None:
    result = bed.add("c1")
    check = env("CHECK", "c1", ns("c1"))
    no_prev = bed.error(check, conf())
    unknown = bed.error(env("CHECK", "c9", ns("c9")), conf(prevResult=result))
    other = {**result, "ips": [{"address": "100.64.99.9/32", "interface": 1}]}
    wrong_ip = bed.error(check, conf(prevResult=other))
    address = IPv4Address(result["ips"][0]["address"].split("/")[0])
    bed.plumbing.rules.discard((RULE_TO_POD, address, 254))
    no_rule = bed.error(check, conf(prevResult=result))
    assert no_prev["code"] == 7 and "prevResult" in no_prev["msg"]
    assert unknown["code"] == 3
    assert wrong_ip["code"] == 103 and "prevResult lacks" in wrong_ip["msg"]
    assert no_rule["code"] == 103 and "prio 512" in no_rule["msg"]


# -- STATUS, GC, VERSION ----------------------------------------------------------------------


def test_status_is_0_when_ready_and_50_when_card_0_is_full(bed: Bed) -> None:
    assert bed.call(env("STATUS"), conf()) == (0, {})
    for n in range(16):
        bed.add(f"c{n}")
    full = bed.error(env("STATUS"), conf())
    assert full["code"] == 50 and "card 0: 0" in full["details"]


def test_status_is_51_when_existing_pods_lost_connectivity(pool_bed: Bed) -> None:
    pool_bed.backend.connectivity_limited = True  # type: ignore[attr-defined]
    assert pool_bed.error(env("STATUS"), conf())["code"] == 51


def test_status_is_50_until_the_agents_warm_pool_is_met(tmp_path: Path) -> None:
    with bed_on("agent", tmp_path, agent_env={"WARM_PREFIX_TARGET": "3"}) as bed:
        assert bed.agent is not None
        out = bed.error(env("STATUS"), conf())
        assert out["code"] == 50 and out["details"].startswith("card 0: ")
        bed.agent.converge()
        assert bed.call(env("STATUS"), conf()) == (0, {})


def test_gc_releases_only_this_networks_stale_attachments(bed: Bed) -> None:
    for n in range(3):
        bed.add(f"c{n}")
    other = conf(name="other")
    code, out = bed.call(env("ADD", "o1", ns("o1"), ifname="net1"), other)
    assert code == 0, out
    assert bed.call(env("GC"), conf()) == (0, {})  # no valid-attachments: nothing goes
    assert bed.call(env("GC"), conf(**{"cni.dev/valid-attachments": []})) == (0, {})  # unscoped
    assert len(bed.held()) == 4 and "teardown" not in {op for op, _, _ in bed.plumbing.calls}
    valid = [{"containerID": "c1", "ifname": "eth0"}]
    assert bed.call(env("GC"), conf(**{"cni.dev/valid-attachments": valid})) == (0, {})
    kept = {IpamKey(NETWORK, "c1", "eth0"), IpamKey("other", "o1", "net1")}
    added = kept | {IpamKey(NETWORK, f"c{n}", "eth0") for n in (0, 2)}
    assert {k for k in added if bed.backend.lookup(k) is not None} == kept
    torn = {(key, netns) for op, key, netns in bed.plumbing.calls if op == "teardown"}
    assert torn == {(IpamKey(NETWORK, "c0", "eth0"), ""), (IpamKey(NETWORK, "c2", "eth0"), "")}
    assert set(bed.plumbing.veths) == {
        host_ifname(k, 0, "eni") for k in kept
    }  # their veths went, the others' stayed
    bad = bed.error(env("GC"), conf(**{"cni.dev/valid-attachments": [{"x": 1}]}))
    assert bad["code"] == 7 and "valid-attachments[0]" in bad["msg"]


def test_gc_that_cannot_remove_plumbing_is_code_104(bed: Bed) -> None:
    bed.add("c1")
    bed.plumbing.teardown_errors.append("eni0123456789a: injected")
    out = bed.error(
        env("GC"), conf(**{"cni.dev/valid-attachments": [{"containerID": "c9", "ifname": "eth0"}]})
    )
    assert out["code"] == 104 and "injected" in out["details"]
    assert bed.held() == set()


def test_version_answers_every_supported_version(pool_bed: Bed) -> None:
    assert pool_bed.call({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0"}') == (
        0,
        {"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]},
    )
    assert pool_bed.plumbing.calls == []


# -- multi-NIC ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pool", "agent"])
def test_a_multi_nic_pod_gets_one_interface_per_card(tmp_path: Path, kind: str) -> None:
    with bed_on(kind, tmp_path, P5, {"ENABLE_MULTI_NIC": "true"}, enable_multi_nic=True) as bed:
        result = bed.add("m1", runtimeConfig=MULTI)
        assert len(result["ips"]) == 32
        assert [ip["gateway"] for ip in result["ips"]] == [f"169.254.1.{i + 1}" for i in range(32)]
        assert [i["name"] for i in result["interfaces"][1::2]] == ["eth0"] + [
            f"mNicIf{i}" for i in range(1, 32)
        ]
        assert [r.get("table") for r in result["routes"]] == [None] + list(range(1, 32))
        # Host rules: 512 for every address, 1536 to each card's ENI table but card 0's.
        from_pod = {(a, t) for p, a, t in bed.plumbing.rules if p == RULE_FROM_POD}
        assert len(from_pod) == 31 and {t for _, t in from_pod} == {
            10001 + 100 * card for card in range(1, 32)
        }
        assert len([r for r in bed.plumbing.rules if r[0] == RULE_TO_POD]) == 32
        single = bed.add("s1")  # not annotated: one interface
        assert len(single["ips"]) == 1
        bed.delete("m1", prevResult=result)
        bed.delete("s1", prevResult=single)
        assert bed.held() == set() and bed.plumbing.state() == ({}, set(), {}, set())


def test_a_multi_nic_failure_on_a_later_card_rolls_back_every_card(tmp_path: Path) -> None:
    with bed_on("agent", tmp_path, P5, {"ENABLE_MULTI_NIC": "true"}, enable_multi_nic=True) as bed:
        bed.plumbing.fail_after = 5
        out = bed.error(env("ADD", "m1", ns("m1")), conf(runtimeConfig=MULTI))
        assert out["code"] == 100
        assert bed.held() == set() and bed.plumbing.state() == ({}, set(), {}, set())


@pytest.mark.parametrize(("enabled", "annotated"), [(False, True), (True, False), (False, False)])
def test_single_interface_unless_node_enables_and_pod_asks(
    tmp_path: Path, enabled: bool, annotated: bool
) -> None:
    extra = {"runtimeConfig": MULTI} if annotated else {}
    with bed_on("pool", tmp_path, P5, enable_multi_nic=enabled) as bed:
        result = bed.add("s1", **extra)
        assert len(result["ips"]) == 1 and result["ips"][0]["gateway"] == "169.254.1.1"
