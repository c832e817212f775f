"""``make demo``, reduced: 6 pods (2 multi-NIC) on the emulated p5.48xlarge and 3 on the
IPv6 node beside it, end to end through containerd's CRI, then through the libcni fallback
when containerd cannot start, then runs failing on purpose; all must leave no namespace,
process, containerd shim, mount, sandbox namespace file or temp dir."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from tools.demo.__main__ import main
from tools.lab import netns

REPO = Path(__file__).resolve().parents[2]


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.demo", "--pods", "6", "--multi-nic", "2", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def assert_nothing_left(output: str) -> None:
    """No namespace of the run's lab, no process naming its temp dir (containerd and its
    shims name it in their arguments), no mount under it, no temp dir."""
    labs = re.findall(r"lab ([0-9a-f]{6}): namespaces", output)
    tmp = re.search(r"CNI: shim (/\S+/ultranet-demo-[^/]+)/", output)
    assert labs and tmp, output
    for lab in labs:  # the IPv4 node's, and the IPv6 node's when it ran
        assert [n for n in netns.list_lab_namespaces() if n.startswith(f"ul-{lab}-")] == []
    assert not Path(tmp.group(1)).exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert tmp.group(1) not in ps
    assert tmp.group(1) not in Path("/proc/self/mountinfo").read_text()


def sandbox_netns_files() -> set[str]:
    """containerd's sandbox namespace files (``cni-<uuid>``) present now."""
    return {p.name for p in Path("/run/netns").glob("cni-*")}


def assert_pods_and_dns(out: str) -> None:
    """What both runtimes must show: addresses, NAU, DNS answered from the pods, no
    allocation left, the plan."""
    assert re.search(r"single-NIC +4 pods +p50 +[\d.]+ ms +p99 +[\d.]+ ms", out), out
    assert re.search(r"multi-NIC +2 pods .* 32 interfaces each", out), out
    # 4 x 1 + 2 x 32 addresses, all distinct and inside the node's prefixes.
    assert "68 addresses on 6 pods (4 x 1 + 2 x 32); 68 distinct; 68 inside" in out
    assert "one address on each of 32 cards" in out
    assert re.search(r"NAU used in the VPC: 95 at launch -> \d+ with 6 pods", out), out
    dns = re.search(r"queries (\d+), cache hits (\d+), misses (\d+).*upstream queries (\d+)", out)
    assert dns, out
    queries, hits, misses, upstream = map(int, dns.groups())
    assert queries == 6 * 5 + 1  # the pods' dnslib queries and one dig
    assert hits + misses == queries and upstream == misses <= 32
    assert "ultranet-ipamd holds 0 allocations after DEL" in out
    assert "VERDICT: DOES NOT FIT" in out
    assert "left behind: nothing (checked" in out


def assert_ipv6_node(out: str) -> None:
    """The IPv6 node: ready with 0 EC2 calls, each pod a distinct /128 of the node's /80,
    the node's name answered over IPv6 by ultranet-dns, and an IPv6 pod's connection to an
    IPv4 host arriving from the node's primary IPv4."""
    node = re.search(
        r"instance (i-[0-9a-f]+); VPC (fd[0-9a-f:]+/56); primary ENI eni-[0-9a-f]+: "
        r"([\d.]+), (fd[0-9a-f:]+)/128 and the /80 (fd[0-9a-f:]+/80) \(at launch\)",
        out,
    )
    assert node, out
    instance, vpc, node_ipv4, node_ipv6, prefix = node.groups()
    assert IPv6Network(prefix).subnet_of(IPv6Network(vpc))
    assert IPv6Network(vpc).subnet_of(IPv6Network("fd00::/8"))
    assert "EC2 calls for the IPv6 node's start: 0 (the emulator's request counters: none)" in out
    assert re.search(rf"{instance} \(m5\.large\): /80 {prefix} .* with 0 EC2 calls", out), out
    # One NAU each for the primary IPv4, the node's /128 and the /80; pods add none.
    assert "NAU in its VPC: 3 (primary IPv4, IPv6 /128, /80), 3 with 3 pods" in out
    pods = re.findall(rf"(pod6-\d+)  eth0 (fd[0-9a-f:]+)/128 \(in {re.escape(prefix)}\)", out)
    addresses = {IPv6Address(a) for _, a in pods}
    assert len(pods) == 3 and len(addresses) == 3, out
    assert all(a in IPv6Network(prefix) for a in addresses)
    assert "15 AAAA answers over IPv6 from 3 pods, all NOERROR" in out
    dig = re.search(rf"dig @fd00::20:10 {instance}\.\S+ AAAA from pod6-000: (\S+)", out)
    assert dig and IPv6Address(dig.group(1)) == IPv6Address(node_ipv6), out
    seen = re.search(
        r"pod6-000 \(v4if0 ([\d.]+)\) -> [\d.]+:\d+ across the VPC router: the host saw "
        r"source ([\d.]+) ",
        out,
    )
    assert seen, out
    assert IPv4Address(seen.group(2)) == IPv4Address(node_ipv4) != IPv4Address(seen.group(1))
    assert "ultranet-ipamd (IPv6) holds 0 allocations after DEL" in out


@pytest.mark.netns
def test_reduced_demo_runs_its_pods_through_containerd_and_leaves_nothing() -> None:
    before = sandbox_netns_files()
    done = run_demo()
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "ready in" in out and "from IMDS alone" in out
    assert re.search(r"containerd 1\.\d+\.\S+ \(CRI v1\); CNI from /tmp/ultranet-demo-", out), out
    assert "6 pods (2 multi-NIC): RunPodSandbox via containerd CRI" in out
    assert "StopPodSandbox (CNI DEL) + RemovePodSandbox via containerd CRI" in out
    assert "CRI RunPodSandbox wall time through containerd" in out
    assert re.search(r"DEL \(StopPodSandbox\) +6 pods +p50", out), out
    assert re.search(r"RemovePodSandbox +6 pods +p50", out), out
    # containerd's own timers counted exactly our calls: 6 ADDs, and a DEL at each Stop
    # and again at each Remove.
    assert re.search(r"CNI ADD timer .*: mean [\d.]+ ms over 6 calls", out), out
    assert re.search(r"CNI DEL timer .*: mean [\d.]+ ms over 12 calls", out), out
    assert "FALLBACK" not in out and "via libcni" not in out
    assert_pods_and_dns(out)
    assert_ipv6_node(out)
    assert re.search(r"IPv6 node: .*\n(?:      .*\n)*      pods: RunPodSandbox via containerd", out)
    assert "containerd's shims, mounts, pause processes" in out
    assert_nothing_left(out)
    assert sandbox_netns_files() <= before


@pytest.mark.netns
def test_when_containerd_cannot_start_it_says_why_and_falls_back_to_libcni() -> None:
    # /bin/false is found and started, and exits at once: the demo's containerd start
    # fails as a refused one would, and must stop it, say so and go on through libcni.
    done = run_demo("--containerd", "/bin/false")
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "containerd cannot start here: ContainerdError: containerd exited 1" in out
    assert "FALLBACK: the pods go through the libcni driver" in out
    assert "6 pods (2 multi-NIC): netns + CNI ADD via libcni (FALLBACK" in out
    assert "CNI DEL via libcni (FALLBACK)" in out
    assert re.search(r"libcni AddNetworkList wall time .*FALLBACK: containerd could not start", out)
    assert "RunPodSandbox" not in out and "containerd's own" not in out
    assert_pods_and_dns(out)
    assert_ipv6_node(out)
    assert "pods: netns + CNI ADD via libcni (FALLBACK" in out
    assert_nothing_left(out)


def test_a_missing_containerd_is_named_before_anything_starts() -> None:
    from tools.demo.runtime import containerd_missing

    assert containerd_missing("/nonexistent/containerd") == (
        "not found: /nonexistent/containerd (containerd)"
    )


@pytest.mark.netns
@pytest.mark.parametrize("step", ["containerd", "queries", "ipv6-egress"])
def test_a_failing_demo_cleans_up(step: str) -> None:
    # At "containerd" before it starts; at "queries" with containerd, its shims and
    # six sandboxes running; at "ipv6-egress" with both nodes up, the IPv6 node's
    # containerd and its three sandboxes running.
    before = sandbox_netns_files()
    done = run_demo("--fail-at", step)
    assert done.returncode == 1
    assert f"failing on purpose at step {step!r}" in done.stderr
    assert "demo failed: cleaning up ... done" in done.stdout
    assert "left behind: nothing" in done.stdout
    assert_nothing_left(done.stdout)
    if step.startswith("ipv6"):
        assert len(re.findall(r"lab ([0-9a-f]{6}): namespaces", done.stdout)) == 2
    assert sandbox_netns_files() <= before


def test_without_root_it_says_so_and_plans_alone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("demo: not root, so no lab")
    assert "NAU plan ai-ml-100k" in out and "VERDICT: DOES NOT FIT" in out
    assert "Plan verdict: DOES NOT FIT" in out


def test_ipv6_options_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    from tools.demo.__main__ import parse

    assert parse([]).ipv6_pods == 3
    assert parse(["--ipv6-pods", "0"]).ipv6_pods == 0
    for argv, message in (
        (["--ipv6-pods", "51"], "--ipv6-pods must be 0..50"),
        (["--ipv6-pods", "0", "--fail-at", "ipv6-dns"], "needs the IPv6 node"),
    ):
        with pytest.raises(SystemExit):
            parse(argv)
        assert message in capsys.readouterr().err
