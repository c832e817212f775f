"""IPv6 pods in namespaces: the VPC CNI's IPv6 plumbing (a /128, default via fe80::1 with
a permanent neighbour, /128 host route, rule 512, accept_ra=0 on the host end), ICMPv6
echo to the node and to another pod, CHECK, DEL, GC; then through libcni.

Only unique-local addresses (fd00::/8), only in the test's own namespaces: a node
namespace with no link out and pod namespaces wired to it by the plumbing's veths, so no
IPv6 packet can leave them. Everything is removed, even on failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import socket
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from cni import netlink as cni_netlink
from cni.install import conflist
from cni.keys import IpamKey
from cni.plumbing import HOST_VETH_ALIAS, RULE_TO_POD, Plumbing, host_ifname, v4_egress_ifname
from ipam.pool6 import Ipv6PrefixPool
from tests.cni.exec_harness import exec_shim, install_shim, serving
from tests.cni.harness import NETWORK, conf, env, node, ns_path, run
from tests.lab.helpers import python_in
from tools.bench.cni.driver import Driver, DriverUnavailable, build
from tools.lab import netns
from tools.lab.lab import STATE_ROOT, LabRecord
from tools.lab.pool_backend import PoolBackend

pytestmark = pytest.mark.netns

PREFIX = IPv6Network("fd00:ec2:0:1:a1b2::/80")
NODE_ADDRESS = "fd00:ab::1"  # the node's own address, on its loopback


class Namespaces:
    """A node namespace with IPv6 forwarding and ``NODE_ADDRESS``, and pod namespaces.

    Named and recorded as a lab's (``tools.lab.lab``), so a lab's leftover sweep leaves
    them alone while this process lives and removes them if it is killed."""

    def __init__(self) -> None:
        self.lab_id = f"v6{secrets.token_hex(3)}"
        self.tag = f"{netns.PREFIX}{self.lab_id}"
        self.node = f"{self.tag}-node"
        self.pods: list[str] = []
        self.record = STATE_ROOT / f"{self.lab_id}.json"

    @property
    def node_ns(self) -> str:  # what tests.cni.harness.node() reads
        return self.node

    def _write_record(self) -> None:
        pid = os.getpid()
        started = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]
        record = LabRecord(self.lab_id, pid, started, [self.node, *self.pods])
        STATE_ROOT.mkdir(parents=True, exist_ok=True)
        self.record.write_text(json.dumps(dataclasses.asdict(record)))

    def create(self) -> None:
        self._write_record()
        netns.create(self.node)
        netns.sysctl(self.node, "net.ipv6.conf.all.forwarding", "1")
        with IPRoute(netns=self.node) as ipr:
            (lo,) = ipr.link_lookup(ifname="lo")
            ipr.link("set", index=lo, state="up")
            ipr.addr("add", index=lo, address=NODE_ADDRESS, prefixlen=128)

    def pod(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        self.pods.append(ns)
        self._write_record()
        netns.create(ns)
        with IPRoute(netns=ns) as ipr:
            (lo,) = ipr.link_lookup(ifname="lo")
            ipr.link("set", index=lo, state="up")
        return ns

    def remove(self) -> None:
        for ns in [*self.pods, self.node]:
            netns.delete(ns)
        self.record.unlink(missing_ok=True)


@pytest.fixture
def spaces() -> Iterator[Namespaces]:
    made = Namespaces()
    try:
        made.create()
        yield made
    finally:
        made.remove()
    assert not [n for n in netns.list_lab_namespaces() if n.startswith(made.tag)]


def backend() -> PoolBackend:
    pool = Ipv6PrefixPool("eni-primary", cooldown_s=0)
    pool.set_prefix(PREFIX)
    return PoolBackend(pool)


def host_neighbours(ns: str) -> dict[str, tuple[str, int]]:
    """The node's IPv6 neighbour entries on pod veths: address -> (MAC, NUD state)."""
    with IPRoute(netns=ns) as ipr:
        veths = {
            link["index"] for link in ipr.get_links() if str(link.get("ifname")).startswith("eni")
        }
        return {
            str(n.get("dst")): (str(n.get("lladdr")), n["state"])
            for n in ipr.get_neighbours(family=socket.AF_INET6)
            if n["ifindex"] in veths and not str(n.get("dst")).startswith(("fe80", "ff"))
        }


def host_v6(ns: str) -> dict[str, Any]:
    """The node's IPv6 pod plumbing: veths, rule-512 destinations, /128 routes."""
    with IPRoute(netns=ns) as ipr:
        links = sorted(
            str(link.get("ifname"))
            for link in ipr.get_links()
            if str(link.get("ifname")).startswith("eni")
        )
        rules = sorted(
            str(r.get("dst"))
            for r in ipr.get_rules(family=socket.AF_INET6)
            if r.get("priority") == RULE_TO_POD
        )
        routes = sorted(
            str(r.get("dst"))
            for r in ipr.get_routes(family=socket.AF_INET6, table=254)
            if r["dst_len"] == 128 and r.get("dst") != NODE_ADDRESS
        )
    return {"links": links, "rules": rules, "routes": routes}


def pod_v6(ns: str) -> dict[str, Any]:
    with IPRoute(netns=ns) as ipr:
        (eth0,) = ipr.link_lookup(ifname="eth0")
        addrs = [
            (a.get("address"), a["prefixlen"], a.get("IFA_FLAGS", a["flags"]))
            for a in ipr.get_addr(family=socket.AF_INET6, index=eth0)
            if not str(a.get("address")).startswith("fe80")
        ]
        default = [
            (r.get("gateway"), r.get("oif") == eth0)
            for r in ipr.get_routes(family=socket.AF_INET6, table=254)
            if r["dst_len"] == 0
        ]
        neigh = [
            (n.get("dst"), n.get("lladdr"), n["state"])
            for n in ipr.get_neighbours(family=socket.AF_INET6, ifindex=eth0)
            if n.get("dst") == "fe80::1"
        ]
    return {"addrs": addrs, "default": default, "neigh": neigh}


ECHO = """
import socket, struct, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.settimeout(5)
s.sendto(struct.pack("!BBHHH", 128, 0, 0, 0x5eed, 1) + b"ultranet", (sys.argv[1], 0))
while True:
    data, peer = s.recvfrom(1500)
    if data[0] == 129 and data[4:6] == b"\\x5e\\xed":
        print(peer[0])
        break
"""


def ping6(ns: str, address: str) -> str:
    """An ICMPv6 echo from namespace ``ns``; the replier's address ("" if none came)."""
    done = python_in(ns, ECHO, address, timeout=20)
    return done.stdout.strip() if done.returncode == 0 else ""


def drop_default_route(ns: str) -> None:
    with IPRoute(netns=ns) as ipr:
        ipr.route("del", dst="::/0", family=socket.AF_INET6)


def test_ipv6_pods_get_a_128_the_vpc_cni_routes_and_reach_the_node_and_each_other(
    spaces: Namespaces,
) -> None:
    pod_a, pod_b = spaces.pod("a"), spaces.pod("b")
    pools = backend()
    before = host_v6(spaces.node)

    async def scenario() -> dict[str, Any]:
        async with node(spaces, pools) as n:  # type: ignore[arg-type]
            results = {
                version: await n.add(f"c-{version}", pod, version, mtu=9001)
                for version, pod in (("0.4.0", pod_a), ("1.1.0", pod_b))
            }
            seen: dict[str, Any] = {"results": results}
            seen["host"] = await asyncio.to_thread(host_v6, spaces.node)
            seen["pods"] = {p: await asyncio.to_thread(pod_v6, p) for p in (pod_a, pod_b)}
            seen["neigh"] = await asyncio.to_thread(host_neighbours, spaces.node)
            address_a = results["0.4.0"]["ips"][0]["address"].split("/")[0]
            address_b = results["1.1.0"]["ips"][0]["address"].split("/")[0]
            seen["a->node"] = await asyncio.to_thread(ping6, pod_a, NODE_ADDRESS)
            seen["a->b"] = await asyncio.to_thread(ping6, pod_a, address_b)
            seen["b->a"] = await asyncio.to_thread(ping6, pod_b, address_a)
            host_a = results["0.4.0"]["interfaces"][0]["name"]
            seen["accept_ra"] = netns.run_in(
                spaces.node,
                lambda: Path(f"/proc/sys/net/ipv6/conf/{host_a}/accept_ra").read_text().strip(),
            )
            for version, pod in (("0.4.0", pod_a), ("1.1.0", pod_b)):
                check = conf(version, mtu=9001, prevResult=results[version])
                seen[f"check {version}"] = await n.call(
                    env("CHECK", f"c-{version}", ns_path(pod)), check
                )
            # CHECK notices a missing piece: the pod's default route goes.
            await asyncio.to_thread(drop_default_route, pod_a)
            broken = conf("0.4.0", mtu=9001, prevResult=results["0.4.0"])
            seen["check broken"] = await n.call(env("CHECK", "c-0.4.0", ns_path(pod_a)), broken)
            for version, pod in (("0.4.0", pod_a), ("1.1.0", pod_b)):
                await n.delete(f"c-{version}", pod, results[version], version)
                await n.delete(f"c-{version}", pod, results[version], version)  # idempotent
            await n.plumbing.settle()
            return seen

    seen = run(scenario())
    old, new = seen["results"]["0.4.0"], seen["results"]["1.1.0"]
    (ip_old,), (ip_new,) = old["ips"], new["ips"]
    assert ip_old["version"] == "6" and "version" not in ip_new  # 0.4.0 says the family
    for result, ip in ((old, ip_old), (new, ip_new)):
        assert ip["address"].endswith("/128") and ip["gateway"] == "fe80::1"
        assert IPv6Address(ip["address"].split("/")[0]) in PREFIX
        assert result["routes"] == [{"dst": "::/0", "gw": "fe80::1"}]
    address_a, address_b = (ip["address"].split("/")[0] for ip in (ip_old, ip_new))
    host_a = host_ifname(IpamKey(NETWORK, "c-0.4.0", "eth0"), 0, "eni")
    assert old["interfaces"][0]["name"] == host_a
    assert seen["host"]["rules"] == sorted([address_a, address_b])
    assert seen["host"]["routes"] == sorted([address_a, address_b])
    assert len(seen["host"]["links"]) == 2
    for pod, address in ((pod_a, address_a), (pod_b, address_b)):
        state = seen["pods"][pod]
        ((got, length, flags),) = state["addrs"]
        assert (got, length) == (address, 128)
        assert flags & 0x02 and not flags & 0x40  # IFA_F_NODAD, not IFA_F_TENTATIVE
        assert state["default"] == [("fe80::1", True)]
        ((dst, _, nud),) = state["neigh"]
        assert dst == "fe80::1" and nud == 0x80  # NUD_PERMANENT
    assert seen["accept_ra"] == "0"
    # The node reaches each pod's /128 with no neighbour discovery (its host end's link-local
    # is tentative for DAD's first second): a permanent entry with the pod end's MAC.
    macs = {old["interfaces"][1]["mac"], new["interfaces"][1]["mac"]}
    assert (
        seen["neigh"]
        == {
            address_a: (old["interfaces"][1]["mac"], 0x80),
            address_b: (new["interfaces"][1]["mac"], 0x80),
        }
        and len(macs) == 2
    )
    assert seen["a->node"] == NODE_ADDRESS
    assert seen["a->b"] == address_b and seen["b->a"] == address_a
    assert seen["check 0.4.0"] == (0, {}) and seen["check 1.1.0"] == (0, {})
    code, out = seen["check broken"]
    assert code == 1 and "default route via fe80::1" in out["msg"]
    assert host_v6(spaces.node) == before
    assert pools.held() == set()


def test_gc_through_the_shim_releases_an_ipv6_attachment_and_its_plumbing(
    spaces: Namespaces, tmp_path: Path
) -> None:
    pod_a, pod_b = spaces.pod("a"), spaces.pod("b")
    pools = backend()
    shim, sock = install_shim(tmp_path), tmp_path / "cni.sock"
    before = host_v6(spaces.node)

    async def scenario() -> tuple[int, dict[str, Any]]:
        async with node(spaces, pools) as n, serving(n, sock):  # type: ignore[arg-type]
            for name, pod in (("keep", pod_a), ("stale", pod_b)):
                code, out = await exec_shim(
                    shim, sock, env("ADD", name, ns_path(pod)), conf("1.1.0")
                )
                assert code == 0, out
            valid = [{"containerID": "keep", "ifname": "eth0"}]
            gc = conf("1.1.0", **{"cni.dev/valid-attachments": valid})
            outcome = await exec_shim(shim, sock, {**env("GC"), "CNI_NETNS": ""}, gc)
            await n.plumbing.settle()
            return outcome

    code, out = run(scenario())
    assert code == 0, out
    ((kept,),) = [[a.key.container_id for a in pools.pool.allocations()]]
    assert kept == "keep"
    after = host_v6(spaces.node)
    assert len(after["links"]) == len(before["links"]) + 1 and len(after["routes"]) == 1


@pytest.fixture(scope="module")
def driver_binary() -> Path:
    try:
        return build()
    except DriverUnavailable as err:
        pytest.skip(str(err))


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_add_check_del_of_an_ipv6_pod_through_libcni(
    spaces: Namespaces, tmp_path: Path, driver_binary: Path, version: str
) -> None:
    pod_ns = spaces.pod("l")
    pools = backend()
    shim, sock = install_shim(tmp_path), tmp_path / "cni.sock"
    body = conflist()
    body["cniVersion"] = version
    body.pop("cniVersions")  # libcni 1.1 reads cniVersion only
    (tmp_path / "net.conflist").write_text(json.dumps(body))
    before = host_v6(spaces.node)

    def drive() -> dict[str, Any]:
        with Driver(
            spaces.node,
            tmp_path / "net.conflist",
            tmp_path / "cache",
            [shim.parent],
            env={"ULTRANET_CNI_SOCKET": str(sock)},
        ) as driver:
            added = driver.call("add", "c1", ns_path(pod_ns))
            assert added["ok"], added
            seen = {"result": added["result"]}
            seen["check"] = driver.call("check", "c1", ns_path(pod_ns))
            seen["ping"] = ping6(pod_ns, NODE_ADDRESS)
            seen["del"] = driver.call("del", "c1", ns_path(pod_ns))
            seen["del2"] = driver.call("del", "c1", ns_path(pod_ns))
            return seen

    async def scenario() -> dict[str, Any]:
        async with node(spaces, pools) as n, serving(n, sock):  # type: ignore[arg-type]
            seen = await asyncio.to_thread(drive)
            await n.plumbing.settle()
            return seen

    seen = run(scenario())
    result = seen["result"]
    assert result["cniVersion"] == version
    (ip,) = result["ips"]
    assert ip["address"].endswith("/128") and ip["gateway"] == "fe80::1"
    assert ("version" in ip) == (version == "0.4.0")
    assert result["routes"] == [{"dst": "::/0", "gw": "fe80::1"}]
    assert seen["check"]["ok"], seen["check"]
    assert seen["ping"] == NODE_ADDRESS
    assert seen["del"]["ok"] and seen["del2"]["ok"], (seen["del"], seen["del2"])
    assert host_v6(spaces.node) == before
    assert pools.held() == set()


# -- IPv4 egress (v4if0), chained into the IPv6 ADD ------------------------------------------

EGRESS_RANGE = IPv4Network("198.18.4.0/22")
NODE_IPV4 = "198.18.9.1"  # the node's IPv4, on its loopback


def egress_backend() -> PoolBackend:
    pool = Ipv6PrefixPool("eni-primary", cooldown_s=0, egress_range=EGRESS_RANGE)
    pool.set_prefix(PREFIX)
    return PoolBackend(pool)


def test_an_ipv6_pod_gets_v4if0_with_its_node_local_ipv4_and_loses_it_on_del(
    spaces: Namespaces,
) -> None:
    pod_a, pod_b = spaces.pod("a"), spaces.pod("b")
    with IPRoute(netns=spaces.node) as ipr:
        (lo,) = ipr.link_lookup(ifname="lo")
        ipr.addr("add", index=lo, address=NODE_IPV4, prefixlen=32)
    pools = egress_backend()
    before = host_v6(spaces.node)
    with IPRoute(netns=pod_b) as ipr:  # pod b already has a v4if0: its egress step fails
        ipr.link("add", ifname="v4if0", kind="veth", peer={"ifname": "other"})

    async def scenario() -> dict[str, Any]:
        async with node(spaces, pools, v4_egress_range=EGRESS_RANGE) as n:  # type: ignore[arg-type]
            result = await n.add("c1", pod_a, "1.0.0")
            seen: dict[str, Any] = {"result": result}
            seen["pod"] = await asyncio.to_thread(pod_v4, pod_a)
            seen["host"] = await asyncio.to_thread(host_v4, spaces.node)
            seen["reach"] = await asyncio.to_thread(reach, pod_a, NODE_IPV4)
            seen["check"] = await n.call(
                env("CHECK", "c1", ns_path(pod_a)), conf("1.0.0", prevResult=result)
            )
            seen["failed"] = await n.call(env("ADD", "c2", ns_path(pod_b)), conf("1.0.0"))
            seen["held"] = pools.held()
            await n.delete("c1", pod_a, result, "1.0.0")
            await n.plumbing.settle()
            return seen

    seen = run(scenario())
    names = [i["name"] for i in seen["result"]["interfaces"]]
    assert names[-1] == "v4if0" and len(seen["result"]["ips"]) == 1  # listed, no IPv4 ip
    (address,) = seen["pod"]["addrs"]
    assert IPv4Address(address) == IPv4Address("198.18.4.2")
    assert seen["pod"]["default"] == "198.18.4.1" and seen["pod"]["neigh"] == 0x80
    host_end = v4_egress_ifname(IpamKey(NETWORK, "c1", "eth0"))
    assert seen["host"][host_end] == {"198.18.4.1": 253, "route": address}  # scope link
    assert seen["reach"] == "refused"  # a RST from the node: the packet got there and back
    assert seen["check"] == (0, {})
    code, out = seen["failed"]
    assert code == 1 and "IPv4 egress" in out["msg"], out
    assert len(seen["held"]) == 1  # c2's allocation went back with its failed ADD
    assert host_v6(spaces.node) == before  # c2's interfaces and c1's after its DEL
    assert host_v4(spaces.node) == {}
    with IPRoute(netns=pod_a) as ipr:
        assert ipr.link_lookup(ifname="v4if0") == []
    assert pools.held() == set()


def test_an_ipv6_del_hands_the_reaper_its_two_veths_in_one_request(
    spaces: Namespaces, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reaper deletes each delete_all as one batch (one RTM_DELLINK of its group): the
    # pod's eni* and v4e* veths go together, not in two batches a burst keeps apart.
    pod = spaces.pod("a")
    key = IpamKey(NETWORK, "c1", "eth0")
    group_deletions: list[int] = []
    real_delete_group = cni_netlink.delete_group

    def counted(sock: socket.socket, group: int, seq: int) -> int:
        group_deletions.append(group)
        return real_delete_group(sock, group, seq)

    monkeypatch.setattr(cni_netlink, "delete_group", counted)

    async def scenario() -> tuple[list[list[str]], list[list[str]]]:
        async with node(spaces, egress_backend(), v4_egress_range=EGRESS_RANGE) as n:  # type: ignore[arg-type]
            requests: list[list[str]] = []
            delete_all = n.plumbing._reaper.delete_all

            def spied(names: Sequence[str]) -> list[asyncio.Future[int]]:
                requests.append(list(names))
                return delete_all(names)

            n.plumbing._reaper.delete_all = spied  # type: ignore[method-assign]
            result = await n.add("c1", pod, "1.0.0")
            requests.clear()
            group_deletions.clear()
            await n.delete("c1", pod, result, "1.0.0")
            await n.plumbing.settle()
            first = list(requests)
            requests.clear()
            # RemovePodSandbox's DEL: no namespace, no cached result, nothing left.
            code, out = await n.call(env("DEL", "c1", ""), conf("1.0.0"))
            assert code == 0, out
            await n.plumbing.settle()
            return first, requests

    first, repeated = run(scenario())
    assert [sorted(names) for names in first] == [
        sorted([host_ifname(key, 0, "eni"), v4_egress_ifname(key)])
    ]
    assert len(group_deletions) == 1  # one kernel request deleted both
    assert [n for names in repeated for n in names] == []  # a repeated DEL finds none
    with IPRoute(netns=spaces.node) as ipr:
        assert ipr.link_lookup(ifname=v4_egress_ifname(key)) == []
        assert ipr.link_lookup(ifname=host_ifname(key, 0, "eni")) == []


def pod_v4(ns: str) -> dict[str, Any]:
    with IPRoute(netns=ns) as ipr:
        (index,) = ipr.link_lookup(ifname="v4if0")
        addrs = [a.get("address") for a in ipr.get_addr(family=socket.AF_INET, index=index)]
        (default,) = [
            r.get("gateway")
            for r in ipr.get_routes(family=socket.AF_INET, table=254)
            if r["dst_len"] == 0 and r.get("oif") == index
        ]
        (nud,) = [
            n["state"]
            for n in ipr.get_neighbours(family=socket.AF_INET, ifindex=index)
            if n.get("dst") == "198.18.4.1"
        ]
    return {"addrs": addrs, "default": default, "neigh": nud}


def host_v4(ns: str) -> dict[str, Any]:
    """Per v4e* link: its addresses with their scope, and the /32 route to it."""
    out: dict[str, Any] = {}
    with IPRoute(netns=ns) as ipr:
        for link in ipr.get_links():
            name = str(link.get("ifname"))
            if not name.startswith("v4e"):
                continue
            entry: dict[str, Any] = {
                a.get("address"): a["scope"]
                for a in ipr.get_addr(family=socket.AF_INET, index=link["index"])
            }
            for r in ipr.get_routes(family=socket.AF_INET, table=254, oif=link["index"]):
                if r["dst_len"] == 32:
                    entry["route"] = r.get("dst")
            out[name] = entry
    return out


def reach(ns: str, address: str) -> str:
    """A TCP connection to a closed port: "refused" when the node's RST came back."""
    code = (
        "import socket, sys\n"
        "try:\n"
        "    socket.create_connection((sys.argv[1], 7), timeout=5)\n"
        "except ConnectionRefusedError:\n"
        "    print('refused')\n"
        "except OSError as err:\n"
        "    print(type(err).__name__)\n"
    )
    return python_in(ns, code, address, timeout=20).stdout.strip()


def test_the_stray_rule_sweep_takes_an_ipv6_pods_rule_only_when_no_one_has_it(
    spaces: Namespaces,
) -> None:
    pod_a, pod_b = spaces.pod("a"), spaces.pod("b")
    pools = backend()

    async def scenario() -> tuple[list[Any], list[Any], dict[str, Any]]:
        async with node(spaces, pools) as n:  # type: ignore[arg-type]
            a = (await n.add("c1", pod_a))["ips"][0]["address"].split("/")[0]
            b = (await n.add("c2", pod_b))["ips"][0]["address"].split("/")[0]
            # Both pods' veths go behind the daemon's back (their namespaces went).
            for container in ("c1", "c2"):
                name = host_ifname(IpamKey(NETWORK, container, "eth0"), 0, "eni")
                await asyncio.to_thread(delete_link, spaces.node, name)
            first = await n.plumbing.reap_stray_rules(lambda: {IPv6Address(b)})
            second = await n.plumbing.reap_stray_rules(lambda: {IPv6Address(b)})
            host = await asyncio.to_thread(host_v6, spaces.node)
            return first, second, {"a": a, "b": b, "host": host}

    first, second, seen = run(scenario())
    assert first == [(RULE_TO_POD, IPv6Address(seen["a"]))] and second == []
    assert seen["host"]["rules"] == [seen["b"]]  # still accounted for: kept


def delete_link(ns: str, name: str) -> None:
    with IPRoute(netns=ns) as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname=name)[0])


def test_the_stray_sweep_leaves_the_egress_veth_of_an_add_in_flight_alone(
    spaces: Namespaces,
) -> None:
    # An IPv6 pod's ADD makes its v4e<hash> veth after its eni one; a retried ADD, or one
    # rolling back, may have it while no allocation accounts for it. Until the ADD's entry
    # closes, the sweep keeps it (as it keeps the ADD's eni veths); then it is a stray.
    pod = spaces.pod("a")
    key = IpamKey(NETWORK, "c1", "eth0")
    name = v4_egress_ifname(key)

    async def scenario() -> tuple[list[str], list[str]]:
        plumbing = await Plumbing.open(f"/run/netns/{spaces.node}")
        try:
            entry = await plumbing.enter(ns_path(pod), key, veth_prefix="eni")
            try:
                await asyncio.to_thread(add_our_veth, spaces.node, name)
                during = await plumbing.reap_strays("eni", set)
            finally:
                entry.close()
            after = await plumbing.reap_strays("eni", set)
        finally:
            await plumbing.close()
        return during, after

    during, after = run(scenario())
    assert during == [] and after == [name]
    with IPRoute(netns=spaces.node) as ipr:
        assert ipr.link_lookup(ifname=name) == []


def add_our_veth(ns: str, name: str) -> None:
    with IPRoute(netns=ns) as ipr:
        ipr.link("add", ifname=name, kind="veth", peer={"ifname": f"p{name}"[:15]})
        (index,) = ipr.link_lookup(ifname=name)
        ipr.link("set", index=index, ifalias=HOST_VETH_ALIAS)
